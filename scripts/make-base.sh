#!/usr/bin/env bash
# Makes the shipped base checkpoint assets/fc-tiny/ from nothing: SRML SFT of a fresh tiny
# model on the embedded task (configs/base-fc-tiny.toml), then its last checkpoint's model
# files and a MANIFEST.json (the command, each file's SHA-256, the first training losses that
# tests/base_model.rs reproduces, and the held-out accuracy) are copied into assets/fc-tiny/.
# Runs are deterministic for a given machine; about 15 minutes on 2 cores.
# Usage: scripts/make-base.sh   (from the repository root; refuses an existing runs/base-fc-tiny)
set -euo pipefail
cd "$(dirname "$0")/.."
cfg=configs/base-fc-tiny.toml
run=runs/base-fc-tiny
if [ -e "$run" ]; then
  echo "scripts/make-base.sh: $run exists; remove it first" >&2
  exit 1
fi
cargo build --release
mkdir -p runs
./target/release/fcgpu sft --config "$cfg" --run-dir "$run" 2>&1 | tee "$run.log"
steps=$(sed -n 's/^steps = //p' "$cfg")
python3 - "$run" "$steps" <<'PY'
import hashlib, json, os, shutil, sys
run, steps = sys.argv[1], int(sys.argv[2])
src, dst = f"{run}/checkpoint-{steps}", "assets/fc-tiny"
files = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
os.makedirs(dst, exist_ok=True)
for f in files:
    shutil.copyfile(f"{src}/{f}", f"{dst}/{f}")
losses = [json.loads(l)["loss"] for l in open(f"{run}/metrics.jsonl")][:40]
heldout = json.load(open(f"{run}/eval-sft.json"))
manifest = {
    "made_by": "scripts/make-base.sh (fcgpu sft --config configs/base-fc-tiny.toml)",
    "steps": steps,
    "sha256": {f: hashlib.sha256(open(f"{dst}/{f}", "rb").read()).hexdigest() for f in files},
    "first_losses": losses,
    "heldout": heldout,
}
with open(f"{dst}/MANIFEST.json", "w") as out:
    json.dump(manifest, out, indent=1)
    out.write("\n")
print(f"wrote {dst} (model.safetensors {os.path.getsize(dst + '/model.safetensors')} bytes)")
PY
