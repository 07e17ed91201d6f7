#!/usr/bin/env python3
"""Copy a small, fixed subset of BFCL v4 (a few entries per category, plus the entries with
documented gold-answer quirks) into tests/data/bfcl/v4 so tests run without ../shared.

    python3 tools/bfcl_subset.py --bfcl-dir ../shared/bfcl/v4 --out tests/data/bfcl/v4 --per-category 10
"""
import argparse
import json
import random
from pathlib import Path

QUIRKS = {"parallel_178", "live_simple_106-63-0", "live_multiple_964-207-0",
          "live_multiple_507-149-4", "live_multiple_862-181-3"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bfcl-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--per-category", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    src, out = Path(a.bfcl_dir), Path(a.out)
    (out / "possible_answer").mkdir(parents=True, exist_ok=True)
    rng = random.Random(a.seed)
    for qf in sorted(src.glob("BFCL_v4_*.json")):
        lines = [l for l in qf.read_text().splitlines() if l.strip()]
        ids = [json.loads(l)["id"] for l in lines]
        # Keep some entries with a system message, non-ASCII text or an assistant turn.
        special = [i for i, l in enumerate(lines) if '"role": "system"' in l or '"role": "assistant"' in l or "\\u" in l]
        keep = set(rng.sample(range(len(lines)), min(a.per_category, len(lines))))
        keep |= set(special[:3])
        keep |= {i for i, x in enumerate(ids) if x in QUIRKS}
        chosen = {ids[i] for i in keep}
        (out / qf.name).write_text("".join(lines[i] + "\n" for i in sorted(keep)))
        af = src / "possible_answer" / qf.name
        if af.exists():
            al = [l for l in af.read_text().splitlines() if l.strip()]
            (out / "possible_answer" / qf.name).write_text("".join(l + "\n" for l in al if json.loads(l)["id"] in chosen))


if __name__ == "__main__":
    main()
