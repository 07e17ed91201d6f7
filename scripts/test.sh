#!/usr/bin/env bash
# Every test fcgpu has, with the set-up they need, on a bare machine.
# Usage: scripts/test.sh            (from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "scripts/test.sh: cargo not found; install a Rust toolchain (rustup) first" >&2
  exit 1
fi

# Rust tests (dev profile is optimised: see Cargo.toml), then the CLI end-to-end checks.
cargo test --all-targets -- --test-threads 2
