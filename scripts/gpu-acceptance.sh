#!/usr/bin/env bash
# The first run on a real GPU, prepared on a CPU machine (issue 13 item 4).
#
#   scripts/gpu-acceptance.sh           here: build, strip and pack what the GPU machine needs
#                                       into .accept/ (git-ignored) and print the device `run` call
#   scripts/gpu-acceptance.sh --device  there (what that call runs): every check, logged to $OUT
#
# The GPU machine has no cargo, so everything is built here: the release fcgpu binary, the CUDA
# test binaries built with FCGPU_TEST_CUDA=1 (so their GPU tests are not #[ignore]d there) and the
# kernel bench, in their own target dir (target/accept) so the everyday build is untouched. The
# test binaries have this checkout's path baked in (CARGO_MANIFEST_DIR for fixtures,
# CARGO_BIN_EXE_fcgpu for the CLI tests); the device side links that path to its own copy of the
# working tree, which the run tool puts at another path.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PACK=.accept

if [ "${1:-}" != "--device" ]; then
  t0=$(date +%s)
  command -v cargo >/dev/null || { echo "gpu-acceptance: cargo not found" >&2; exit 1; }
  export CARGO_TARGET_DIR="$ROOT/target/accept"
  nice -n 10 cargo build --release --bin fcgpu
  FCGPU_TEST_CUDA=1 nice -n 10 cargo test --no-run --test gpu_cuda --test device_parity --test cli_doctor \
    --bench kernels --message-format=json-render-diagnostics >"$CARGO_TARGET_DIR/accept-build.json"
  rm -rf "$PACK" && mkdir -p "$PACK/bin"
  cp "$CARGO_TARGET_DIR/release/fcgpu" "$PACK/bin/fcgpu"
  # The test and bench executables, by target name (cargo's JSON names their hashed paths).
  python3 - "$CARGO_TARGET_DIR/accept-build.json" "$PACK/bin" <<'EOF'
import json, shutil, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"][0] in ("test", "bench"):
        shutil.copy(m["executable"], f"{sys.argv[2]}/{m['target']['name']}")
EOF
  strip "$PACK"/bin/*
  cp scripts/gpu-acceptance.sh "$PACK/run.sh"
  echo "$ROOT" >"$PACK/build-root"                  # the path baked into the test binaries
  tar -C "$PACK" -cJf "$PACK.tar.xz" bin run.sh build-root
  rm -rf "$PACK/bin" && mv "$PACK.tar.xz" "$PACK/pack.tar.xz"
  grep -qx '/.accept' .git/info/exclude 2>/dev/null || grep -qx '/.accept' .gitignore ||
    echo "gpu-acceptance: add /.accept to .gitignore" >&2
  echo "gpu-acceptance: packed $(du -h "$PACK/pack.tar.xz" | cut -f1) in $(($(date +%s) - t0)) s ($(tar -tvJf "$PACK/pack.tar.xz" | awk '{s += $3} END {printf "%.1f MB", s / 1e6}') unpacked)"
  cat <<EOF

Run it on the lent GPU (device tool, one call, ~8 min of device time):
  run(command="tar -xJf .accept/pack.tar.xz -C .accept && bash .accept/run.sh --device",
      carry=[".accept"], timeout_s=560)
Logs come back in \$OUT: summary.txt (one line per step), one log per step.
EOF
  exit 0
fi

# ---- on the GPU machine, in the repository root of the copied working tree ----
OUT="${OUT:-$ROOT/accept-out}"
mkdir -p "$OUT"
BIN="$ROOT/$PACK/bin"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
BUILD_ROOT="$(cat "$PACK/build-root")"
if [ "$BUILD_ROOT" != "$ROOT" ]; then   # fixtures and the CLI binary at the paths baked in
  mkdir -p "$(dirname "$BUILD_ROOT")"
  [ -e "$BUILD_ROOT" ] || ln -s "$ROOT" "$BUILD_ROOT"
fi
mkdir -p target/accept/debug target/accept/release
ln -sf "$BIN/fcgpu" target/accept/debug/fcgpu
ln -sf "$BIN/fcgpu" target/accept/release/fcgpu
# NVRTC and cuBLAS from the machine's Python packages (cudarc loads them by name).
for d in $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null); do
  for lib in "$d"/nvidia/*/lib "$d"/nvidia/cu*/lib; do
    if [ -d "$lib" ]; then LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; fi
  done
done
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}"
export FCGPU_KERNEL_CACHE="$ROOT/target/accept/kernel-cache"

# step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, one summary line.
step() {
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS rc=0
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
  local verdict=ok
  if [ $rc -eq 124 ]; then verdict="FAIL (timed out)"; elif [ $rc -ne 0 ]; then verdict="FAIL (exit $rc)"; fi
  printf '%-22s %-28s %4d s  %s\n' "$name" "$verdict" $((SECONDS - t0)) "$(grep -E 'test result|passed|failed' "$OUT/$name.log" | tail -n 1 || true)" | tee -a "$SUMMARY"
}

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true; echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"; } >"$OUT/machine.txt"
# Time caps add up to < 9 min (535 s); each step usually takes far less (plan_vs_cuda: 90 s more).
step doctor 60 "$BIN/fcgpu" doctor --device cuda
step gpu_cuda 90 "$BIN/gpu_cuda" --test-threads 1
step device_parity 120 "$BIN/device_parity" --test-threads 1 cuda::
if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    step "sanitizer_$tool" 50 compute-sanitizer --tool "$tool" --error-exitcode 99 "$BIN/gpu_cuda" --test-threads 1 \
      flash_attention logprob sampling
  done
else
  echo "compute-sanitizer: absent on this machine" | tee -a "$SUMMARY"
fi
step bench_kernels 45 "$BIN/kernels" --bench --warm-up-time 0.2 --measurement-time 0.5 --sample-size 10
TRAIN_DIR="$(mktemp -d)"
step train_micro 60 "$BIN/fcgpu" train --device cuda --base scratch --preset micro --warmup-sft-steps 2 --steps 2 --run-dir "$TRAIN_DIR/run"
step train_fc_tiny 120 "$BIN/fcgpu" train --device cuda --steps 5 --eval-samples 20 --run-dir "$TRAIN_DIR/fc-tiny"
# The device counters (launches, bytes, syncs, allocations per decode step) must be the same on
# cuda as on emu, where CI holds them to budgets.
printf '{"prompt_ids": [1, 2, 3, 4, 5]}\n{"prompt_ids": [7, 8, 9]}\n' >"$TRAIN_DIR/prompts.jsonl"
count_on() {
  "$BIN/fcgpu" generate --model tests/fixtures/models/qwen2-tiny --input "$TRAIN_DIR/prompts.jsonl" --n 2 \
    --max-new-tokens 6 --ignore-eos --temperature 0 --device "$1" --counters "$OUT/counters-$1.json" >/dev/null
}
step counters_cuda_vs_emu 30 bash -c "$(declare -f count_on); BIN='$BIN' TRAIN_DIR='$TRAIN_DIR' OUT='$OUT'; \
  count_on cuda && count_on emu && diff '$OUT/counters-cuda.json' '$OUT/counters-emu.json' && echo 'counters: passed'"
# The paged KV cache on the GPU: the paged decode-attention kernel against the strided one, then
# the same generations (seeded, sampled on the device) with blocks of 1, 16 and 4,096 positions
# (one block per sequence: a contiguous cache); in f32, the same generations with a KV budget of
# 160 positions (preempting and recomputing) as without (the tokens; log-probs move by float
# rounding); serve's decode loop (batched step,
# prefix-cache hits through the block tables) giving the cpu's texts.
step paged_decode 60 bash -c "set -e; \
  '$BIN/gpu_cuda' --test-threads 1 paged_decode_attention; \
  for bs in 1 16 4096; do '$BIN/fcgpu' generate --model tests/fixtures/models/qwen2-tiny \
    --input '$TRAIN_DIR/prompts.jsonl' --n 4 --max-new-tokens 40 --seed 3 --device cuda \
    --kv-block-size \$bs > \"$OUT/paged-\$bs.jsonl\"; done; \
  cmp '$OUT/paged-1.jsonl' '$OUT/paged-16.jsonl' && cmp '$OUT/paged-16.jsonl' '$OUT/paged-4096.jsonl'; \
  for cap in 0 160; do '$BIN/fcgpu' generate --model tests/fixtures/models/qwen2-tiny --dtype f32 \
    --input '$TRAIN_DIR/prompts.jsonl' --n 4 --max-new-tokens 40 --seed 3 --ignore-eos --device cuda \
    --max-batch-tokens \$cap --counters \"$OUT/budget-\$cap.json\" > \"$OUT/budget-\$cap.jsonl\"; done; \
  ids() { grep -o '\"new_ids\":\[[^]]*\]' \"\$1\"; }; \
  cmp <(ids '$OUT/budget-0.jsonl') <(ids '$OUT/budget-160.jsonl'); grep -q '\"preemptions\": *[1-9]' '$OUT/budget-160.json'; \
  '$BIN/serve_engine' --include-ignored --test-threads 1 cuda_serves_the_cpus_texts \
  && echo 'paged decode, preemption and serve: passed'"
# The memory plan against the GPU (issue 29): the plan's SFT and GRPO steps run on cuda with a
# random model of Qwen2.5-0.5B's shapes; each phase's counted peak must be within 1% of the
# plan's, and the log has cuMemGetInfo and the pool's high-water mark beside it.
step plan_vs_cuda 90 "$BIN/fcgpu" plan --model configs/models/qwen2.5-0.5b.json --device h100 --measure cuda \
  --prompts-per-step 4 --group-size 4 --prompt-len 128 --max-new-tokens 64 --max-len 256 --batch-size 4 --micro-batch 4
cat "$SUMMARY"
! grep -q FAIL "$SUMMARY"
