#!/usr/bin/env python3
"""Reads a run directory's TensorBoard event files with TensorBoard's own EventAccumulator and
checks them against metrics.jsonl: every number of every line is a scalar (train/<field>, or
eval/<field> for heldout_*) at that step with the same float32 value, and the GRPO histograms
(train/reward, train/advantage, train/completion_length) exist at every step of a GRPO run.

Usage: python tools/check_tensorboard.py RUN_DIR [--grpo]   (venv: pip install tensorboard)
Prints one summary line; exits 1 with the first mismatch."""
import json
import struct
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


def main():
    run, grpo = sys.argv[1], "--grpo" in sys.argv[2:]
    acc = EventAccumulator(run, size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    checked = 0
    with open(f"{run}/metrics.jsonl") as f:
        lines = [json.loads(l) for l in f if l.strip()]
    for line in lines:
        step = line["step"]
        for k, v in line.items():
            if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            tag = ("eval/" if k.startswith("heldout") else "train/") + k
            if tag not in tags["scalars"]:
                sys.exit(f"{tag}: in metrics.jsonl, not in the event files")
            got = [e.value for e in acc.Scalars(tag) if e.step == step]
            if f32(v) not in [f32(g) for g in got]:
                sys.exit(f"{tag} at step {step}: {v} in metrics.jsonl, {got} in the event files")
            checked += 1
    hists = 0
    if grpo:
        for tag in ["train/reward", "train/advantage", "train/completion_length"]:
            steps = {e.step for e in acc.Histograms(tag)} if tag in tags["histograms"] else set()
            want = {l["step"] for l in lines if l["step"] > 0}
            if not want <= steps:
                sys.exit(f"{tag}: histograms at steps {sorted(steps)}, want {sorted(want)}")
            hists += len(want)
    print(f"tensorboard: {checked} scalars and {hists} histograms of {run} match metrics.jsonl")


if __name__ == "__main__":
    main()
