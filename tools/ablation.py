#!/usr/bin/env python3
"""Ablation of fcgpu's training choices on the embedded task, with several seeds.

For each seed it runs, with the defaults of `fcgpu train` everywhere else:
  sft-plain   `fcgpu sft --loss plain`                 (cross-entropy warm-up)
  sft-srml    `fcgpu sft --loss srml`                  (SRML warm-up: the default)
and, from the seed's SRML warm-up checkpoint:
  grpo-l0     `fcgpu train --entropy-lambda 0`          (plain GRPO)
  grpo        `fcgpu train`                             (entropy-enhanced GRPO, SRML aggregation)
  grpo-tm     `fcgpu train --loss-agg token-mean`       (entropy-enhanced, token-mean)
Every run scores the same held-out prompts greedily (`eval-sft.json`, `eval-after.json` in its
run directory; key `accuracy`: answers well formed AND accepted by the BFCL checker, see
docs/metrics.md); this prints that held-out accuracy per category as
mean ± std over the seeds, as a Markdown table. Finished runs are reused, so an interrupted
ablation resumes where it stopped.

    python3 tools/ablation.py --seeds 0 1 2 [--bin target/release/fcgpu] [--out runs/ablation]

Only the standard library is needed. Build fcgpu first (`cargo build --release`).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import tomllib

CATEGORIES = ["simple", "multiple", "parallel", "parallel_multiple", "irrelevance"]

SFT_RUNS = {"sft-plain": ["--loss", "plain"], "sft-srml": ["--loss", "srml"]}
GRPO_RUNS = {
    "grpo-l0": ["--entropy-lambda", "0"],
    "grpo": [],
    "grpo-tm": ["--loss-agg", "token-mean"],
}
ROWS = [
    ("SFT, plain cross-entropy", "sft-plain", "eval-sft.json"),
    ("SFT, SRML (default warm-up)", "sft-srml", "eval-sft.json"),
    ("GRPO λ = 0, srml aggregation", "grpo-l0", "eval-after.json"),
    ("GRPO + entropy bonus, srml (default)", "grpo", "eval-after.json"),
    ("GRPO + entropy bonus, token-mean", "grpo-tm", "eval-after.json"),
]


def run(cmd, log):
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.time()
    os.makedirs(os.path.dirname(log) or ".", exist_ok=True)
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}; see {log}")
    print(f"  done in {time.time() - t0:.0f} s", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--bin", default="target/release/fcgpu")
    ap.add_argument("--out", default="runs/ablation")
    ap.add_argument("--sft-steps", type=int, help="warm-up steps (default: fcgpu train's)")
    ap.add_argument("--grpo-steps", type=int, help="GRPO steps (default: fcgpu train's)")
    ap.add_argument("--eval-samples", type=int, default=200)
    ap.add_argument("--table-only", action="store_true", help="print the table of finished runs")
    a = ap.parse_args()
    if not a.table_only:
        for seed in a.seeds:
            run_seed(a, seed)
    print_table(a)


def run_seed(a, seed):
    sft_steps = a.sft_steps or default_of(a, "warmup_sft_steps")
    for name, extra in SFT_RUNS.items():
        d = os.path.join(a.out, f"{name}-s{seed}")
        if not os.path.exists(os.path.join(d, "eval-sft.json")):
            run([a.bin, "sft", "--run-dir", d, "--seed", str(seed), "--steps", str(sft_steps),
                 "--save-every", "0", "--eval-samples", str(a.eval_samples)] + extra, d + ".log")
    base = os.path.join(a.out, f"sft-srml-s{seed}")
    start = os.path.join(base, f"checkpoint-{sft_steps}")
    for name, extra in GRPO_RUNS.items():
        d = os.path.join(a.out, f"{name}-s{seed}")
        if os.path.exists(os.path.join(d, "eval-after.json")):
            continue
        cmd = [a.bin, "train", "--run-dir", d, "--seed", str(seed), "--model", start,
               "--data", os.path.join(base, "task", "train.jsonl"), "--eval-data", os.path.join(base, "task", "eval.jsonl"),
               "--eval-samples", str(a.eval_samples)] + extra
        if a.grpo_steps:
            cmd += ["--steps", str(a.grpo_steps)]
        run(cmd, d + ".log")


def default_of(a, key):
    """A default of `fcgpu train` (kept in one place: the binary)."""
    out = subprocess.run([a.bin, "train", "--print-config"], capture_output=True, text=True, check=True).stdout
    return tomllib.loads(out)[key]


def scores(a, run_name, seed, file):
    p = os.path.join(a.out, f"{run_name}-s{seed}", file)
    if not os.path.exists(p):
        return None
    h = json.load(open(p))
    cats = {c["category"]: c["accuracy"] for c in h["categories"]}
    cats["all"] = h["accuracy"]
    return cats


def fmt(xs):
    xs = [100 * x for x in xs]
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{xs[0]:.1f}"
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}"


def late_reward(a, run_name, seed):
    """Mean rollout reward (`reward_mean`) over the last 10% of GRPO steps (None for SFT runs)."""
    p = os.path.join(a.out, f"{run_name}-s{seed}", "metrics.jsonl")
    if not run_name.startswith("grpo") or not os.path.exists(p):
        return None
    steps = [json.loads(l) for l in open(p) if l.strip()]
    steps = [m for m in steps if m["step"] > 0]
    tail = steps[-max(1, len(steps) // 10):]
    return sum(m["reward_mean"] for m in tail) / len(tail)


def print_table(a):
    cols = CATEGORIES + ["all"]
    print(f"\nHeld-out accuracy (%), greedy, format and BFCL verdict; mean ± std over seeds {a.seeds}\n")
    print("| run | " + " | ".join(cols) + " | rollout reward, last 10% of steps | seeds |")
    print("|---|" + "---:|" * (len(cols) + 2))
    for label, name, file in ROWS:
        per_seed = [s for s in (scores(a, name, seed, file) for seed in a.seeds) if s]
        cells = [fmt([s[c] for s in per_seed if c in s]) for c in cols]
        rewards = [r for r in (late_reward(a, name, seed) for seed in a.seeds) if r is not None]
        reward = f"{statistics.mean(rewards):.3f}" if rewards else "–"
        print(f"| {label} | " + " | ".join(cells) + f" | {reward} | {len(per_seed)} |")


if __name__ == "__main__":
    main()
