#!/usr/bin/env bash
# Fetches BFCL v4's single-turn data from the pinned bfcl-eval wheel on PyPI, checks the wheel's
# sha256, and lays it out in the cache:
#   $CACHE/bfcl/v4/                 the 13 single-turn categories BFCL scores (questions and
#                                   possible_answer/), as BFCL ships them
#   $CACHE/bfcl/split/train/        the real-model task's training split, BFCL layout
#   $CACHE/bfcl/split/heldout/      its held-out split, BFCL layout
#   $CACHE/bfcl/split/dev/          a development part of train (choices such as which SFT
#                                   checkpoint to start GRPO from are made here, never on held-out)
#   $CACHE/bfcl/split/fit/          train less dev: what SFT and GRPO train on
# CACHE is ${FCGPU_CACHE:-$HOME/.cache/fcgpu}. Idempotent: a second run checks the stamp and
# prints the paths. `--offline` fails instead of downloading.
#
# The split (docs/real-model.md): the non-live categories simple_python, multiple, parallel,
# parallel_multiple and irrelevance; an entry is held out when the first 8 bytes of
# sha256("fcgpu-split-v1:" + id), read as a big-endian integer, are below 0.3 * 2^64. It
# depends on the id alone, so it never changes with the order or content of the files. A
# training entry is in dev when sha256("fcgpu-dev-v1:" + id) is below 0.15 * 2^64 likewise.
set -euo pipefail

WHEEL_VERSION="2026.3.23"
WHEEL_NAME="bfcl_eval-${WHEEL_VERSION}-py3-none-any.whl"
WHEEL_SHA256="3bb6dfa5f0c68ad403c9ec50b00db2bb3b4cc9b38ab1ff33f48fe30d853d3a0a"
SPLIT_VERSION="fcgpu-split-v1"
STAMP_VERSION="2"  # bump when the layout written below changes

offline=0
for arg in "$@"; do
  case "$arg" in
    --offline) offline=1 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "get-bfcl.sh: unknown argument '$arg' (usage: scripts/get-bfcl.sh [--offline])" >&2; exit 2 ;;
  esac
done

CACHE="${FCGPU_CACHE:-$HOME/.cache/fcgpu}"
WHEELS="$CACHE/downloads"
OUT="$CACHE/bfcl"
STAMP="$OUT/.stamp"
mkdir -p "$WHEELS"

want_stamp="$WHEEL_SHA256 $SPLIT_VERSION $STAMP_VERSION"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want_stamp" ] \
  && [ -f "$OUT/v4/BFCL_v4_simple_python.json" ] && [ -f "$OUT/split/heldout/BFCL_v4_irrelevance.json" ] && [ -f "$OUT/split/dev/BFCL_v4_irrelevance.json" ]; then
  echo "$OUT"
  exit 0
fi

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

wheel="$WHEELS/$WHEEL_NAME"
if [ -f "$wheel" ] && [ "$(sha_of "$wheel")" != "$WHEEL_SHA256" ]; then
  echo "get-bfcl.sh: cached $wheel has the wrong sha256; downloading it again" >&2
  rm -f "$wheel"
fi
if [ ! -f "$wheel" ]; then
  if [ "$offline" = 1 ]; then
    echo "get-bfcl.sh: $wheel is not cached and --offline was given" >&2
    exit 1
  fi
  tmp="$(mktemp -d "$WHEELS/.dl.XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --no-deps --only-binary=:all: "bfcl-eval==$WHEEL_VERSION" -d "$tmp" >&2
  [ -f "$tmp/$WHEEL_NAME" ] || { echo "get-bfcl.sh: pip did not produce $WHEEL_NAME" >&2; exit 1; }
  got="$(sha_of "$tmp/$WHEEL_NAME")"
  if [ "$got" != "$WHEEL_SHA256" ]; then
    echo "get-bfcl.sh: $WHEEL_NAME has sha256 $got, expected $WHEEL_SHA256; not using it" >&2
    exit 1
  fi
  mv "$tmp/$WHEEL_NAME" "$wheel"
fi

# Extract and split into a fresh directory, then swap it in: a kill leaves the old one whole.
work="$(mktemp -d "$CACHE/.bfcl.XXXXXX")"
trap 'rm -rf "$work"' EXIT
python3 - "$wheel" "$work" "$SPLIT_VERSION" <<'PY'
import hashlib, json, os, sys, zipfile

wheel, out, split_version = sys.argv[1:]
SCORED = ["simple_python", "simple_java", "simple_javascript", "multiple", "parallel",
          "parallel_multiple", "live_simple", "live_multiple", "live_parallel",
          "live_parallel_multiple", "irrelevance", "live_irrelevance", "live_relevance"]
TASK = ["simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance"]
HELDOUT, DEV = 0.3, 0.15

def below(salt, entry_id, share):
    h = hashlib.sha256(f"{salt}:{entry_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") < int(share * 2**64)

def parts_of(entry_id):
    if below(split_version, entry_id, HELDOUT):
        return ["heldout"]
    return ["train", "dev" if below("fcgpu-dev-v1", entry_id, DEV) else "fit"]

def write(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)

z = zipfile.ZipFile(wheel)
counts = {}
for cat in SCORED:
    for sub in ["", "possible_answer/"]:
        name = f"bfcl_eval/data/{sub}BFCL_v4_{cat}.json"
        if sub and name not in z.namelist():
            continue  # irrelevance categories have no answers
        text = z.read(name).decode("utf-8")
        lines = [l + "\n" for l in text.splitlines() if l.strip()]
        write(os.path.join(out, "v4", sub, f"BFCL_v4_{cat}.json"), lines)
        if cat not in TASK:
            continue
        parts = {"train": [], "fit": [], "dev": [], "heldout": []}
        for l in lines:
            for part in parts_of(json.loads(l)["id"]):
                parts[part].append(l)
        for part, ls in parts.items():
            write(os.path.join(out, "split", part, sub, f"BFCL_v4_{cat}.json"), ls)
            if not sub:
                counts.setdefault(cat, {})[part] = len(ls)
for cat, c in counts.items():
    print(f"{cat:18} train {c['train']:4} (fit {c['fit']:4}, dev {c['dev']:3})  heldout {c['heldout']:4}",
          file=sys.stderr)
PY
mkdir -p "$OUT"
for d in v4 split; do
  rm -rf "$OUT/$d.old"
  [ -e "$OUT/$d" ] && mv "$OUT/$d" "$OUT/$d.old"
  mv "$work/$d" "$OUT/$d"
  rm -rf "$OUT/$d.old"
done
echo "$want_stamp" > "$STAMP.tmp" && mv "$STAMP.tmp" "$STAMP"
echo "$OUT"
