#!/usr/bin/env python3
"""Ablation of fcgpu's training choices on the embedded task, with several seeds.

For each seed it runs, with the defaults everywhere else:
  sft-plain   `fcgpu sft --config configs/base-fc-tiny.toml --loss plain`   (cross-entropy)
  sft-srml    `fcgpu sft --config configs/base-fc-tiny.toml`                (SRML: the base recipe)
(a fresh model each, with the seed's task; `--sft-steps` shortens the recipe's 4,000 steps,
about 20 minutes each on 2 cores) and, from the shipped base `fc-tiny` as `fcgpu train` starts:
  grpo        `fcgpu train`                             (the default: entropy bonus, srml, dynamic sampling)
  grpo-l0     `fcgpu train --entropy-lambda 0`          (plain GRPO advantages)
  grpo-tm     `fcgpu train --loss-agg token-mean`       (token-mean aggregation)
  grpo-nods   `fcgpu train --dynamic-sampling false`    (no re-drawing of all-equal groups)
Every run scores the same held-out prompts greedily (`eval-sft.json`, `eval-before.json`,
`eval-after.json` in its run directory; key `accuracy`: answers well formed AND accepted by
the BFCL checker, see docs/metrics.md); this prints that held-out accuracy per category as
mean ± std over the seeds, and each GRPO variant's difference from the default paired by seed,
as Markdown. Finished runs are reused, so an interrupted ablation resumes where it stopped.

    python3 tools/ablation.py --seeds 0 1 2 [--skip-sft | --sft-steps N] [--bin target/release/fcgpu] [--out runs/ablation]

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

SFT_RUNS = {"sft-plain": ["--loss", "plain"], "sft-srml": []}
GRPO_RUNS = {
    "grpo": [],
    "grpo-l0": ["--entropy-lambda", "0"],
    "grpo-tm": ["--loss-agg", "token-mean"],
    "grpo-nods": ["--dynamic-sampling", "false"],
}
ROWS = [
    ("SFT, plain cross-entropy", "sft-plain", "eval-sft.json"),
    ("SFT, SRML (the base recipe)", "sft-srml", "eval-sft.json"),
    ("the shipped base fc-tiny (GRPO's start)", "grpo", "eval-before.json"),
    ("GRPO, default (λ = 0.4, srml, dynamic sampling)", "grpo", "eval-after.json"),
    ("GRPO, λ = 0", "grpo-l0", "eval-after.json"),
    ("GRPO, token-mean aggregation", "grpo-tm", "eval-after.json"),
    ("GRPO, no dynamic sampling", "grpo-nods", "eval-after.json"),
]
BASE_RECIPE = "configs/base-fc-tiny.toml"


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
    ap.add_argument("--sft-steps", type=int, help="SFT steps (default: the base recipe's)")
    ap.add_argument("--skip-sft", action="store_true", help="run only the GRPO variants")
    ap.add_argument("--grpo-steps", type=int, help="GRPO steps (default: fcgpu train's)")
    ap.add_argument("--eval-samples", type=int, default=200)
    ap.add_argument("--table-only", action="store_true", help="print the table of finished runs")
    a = ap.parse_args()
    if not a.table_only:
        for seed in a.seeds:
            run_seed(a, seed)
    print_table(a)


def run_seed(a, seed):
    if not a.skip_sft:
        for name, extra in SFT_RUNS.items():
            d = os.path.join(a.out, f"{name}-s{seed}")
            if not os.path.exists(os.path.join(d, "eval-sft.json")):
                cmd = [a.bin, "sft", "--config", BASE_RECIPE, "--run-dir", d, "--seed", str(seed),
                       "--save-every", "0", "--eval-samples", str(a.eval_samples)] + extra
                if a.sft_steps:
                    cmd += ["--steps", str(a.sft_steps)]
                run(cmd, d + ".log")
    for name, extra in GRPO_RUNS.items():
        d = os.path.join(a.out, f"{name}-s{seed}")
        if os.path.exists(os.path.join(d, "eval-after.json")):
            continue
        cmd = [a.bin, "train", "--run-dir", d, "--seed", str(seed), "--eval-samples", str(a.eval_samples)] + extra
        if a.grpo_steps:
            cmd += ["--steps", str(a.grpo_steps)]
        run(cmd, d + ".log")


def scores(a, run_name, seed, file):
    p = os.path.join(a.out, f"{run_name}-s{seed}", file)
    if not os.path.exists(p):
        return None
    h = json.load(open(p))
    cats = {c["category"]: c["accuracy"] for c in h["categories"]}
    cats["all"] = h["accuracy"]
    cats["calls"] = h.get("calls_accuracy", float("nan"))
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
    cols = CATEGORIES + ["calls", "all"]
    print(f"\nHeld-out accuracy (%), greedy, format and BFCL verdict; mean ± std over seeds {a.seeds}\n")
    print("| run | " + " | ".join(cols) + " | rollout reward, last 10% of steps | seeds |")
    print("|---|" + "---:|" * (len(cols) + 2))
    for label, name, file in ROWS:
        per_seed = [s for s in (scores(a, name, seed, file) for seed in a.seeds) if s]
        cells = [fmt([s[c] for s in per_seed if c in s]) for c in cols]
        after = file == "eval-after.json"
        rewards = [r for r in (late_reward(a, name, seed) for seed in a.seeds) if after and r is not None]
        reward = f"{statistics.mean(rewards):.3f}" if rewards else "–"
        print(f"| {label} | " + " | ".join(cells) + f" | {reward} | {len(per_seed)} |")
    print("\nGRPO variant − default, paired by seed (points; `calls` pools the four call categories)\n")
    print("| variant | all | calls | seeds |")
    print("|---|---:|---:|---|")
    for label, name, file in ROWS[4:]:
        diffs = {"all": [], "calls": []}
        for seed in a.seeds:
            v, d = scores(a, name, seed, file), scores(a, "grpo", seed, "eval-after.json")
            if v and d:
                for k in diffs:
                    diffs[k].append(v[k] - d[k])
        cells = [fmt(diffs[k]) for k in ("all", "calls")]
        print(f"| {label} | " + " | ".join(cells) + f" | {len(diffs['all'])} |")


if __name__ == "__main__":
    main()
