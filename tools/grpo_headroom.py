#!/usr/bin/env python3
"""Probes of how much room GRPO has on the embedded task (docs/results.md, "No start along the
SFT path leaves GRPO 10 points").

Two rewrites of an fcgpu JSONL task file (a run's `sft/task/train.jsonl` or `eval.jsonl`), for
`fcgpu train --data` / `fcgpu eval --data`:

  made-up-words  every word of three letters or more in a free-text argument value (enums
                 left alone) becomes a made-up word of 2–3 training syllables, in the request
                 and in the ground truth alike, so no value can be recalled and every one must
                 be copied. Only training syllables are used, so held-out parts stay unseen.
  rename-tools   8 of the 26 tools get new function and parameter names (the requests are
                 unchanged): tools the base was never trained on, as far as names go.

and `headroom`, which runs `fcgpu eval` greedily and with `--samples 8 --temperature 0.8` on a
model and a task file, and prints greedy, pass@1 and pass@8 pooled over the four call
categories: what sharpening the policy could add at most.

    python3 tools/grpo_headroom.py made-up-words IN OUT [--seed 7] [--force]
    python3 tools/grpo_headroom.py rename-tools IN OUT [--force]
    python3 tools/grpo_headroom.py headroom MODEL_DIR TASK.jsonl [--bin target/release/fcgpu]

Only the standard library is needed.
"""

import argparse
import json
import os
import random
import re
import subprocess
import sys

# The embedded task's syllable pool (src/data/synth.rs); every fifth entry is held out.
SYLLABLES = [
    "ka", "lo", "mer", "vin", "tor", "sa", "del", "ri", "an", "bel", "cor", "du", "fen", "gar",
    "hal", "is", "jo", "kel", "lan", "mor", "nes", "or", "pal", "quin", "ros", "sel", "tam", "ul",
    "ver", "wen", "yar", "zan", "bri", "cal", "dor", "el", "fi", "go", "hu", "ta",
]
TRAIN_SYLLABLES = [s for i, s in enumerate(SYLLABLES) if i % 5 != 0]
KEEP_WORDS = {"the", "com", "org", "net", "io"}

RENAMES = {
    "get_news": ("fetch_headlines", {"topic": "subject", "count": "limit"}),
    "play_music": ("start_playback", {"song": "track", "artist": "performer", "shuffle": "randomize"}),
    "track_package": ("locate_shipment", {"tracking_number": "shipment_code", "carrier": "courier"}),
    "get_time_zone": ("lookup_timezone", {"city": "location"}),
    "calculate_bmi": ("body_mass_index", {"weight_kg": "mass_kg", "height_m": "stature_m"}),
    "set_reminder": ("schedule_alert", {"message": "note", "minutes_from_now": "delay_minutes"}),
    "get_population": ("count_residents", {"country": "nation", "year": "census_year"}),
    "find_recipes": ("suggest_dishes", {"ingredients": "components", "max_minutes": "time_limit",
                                        "vegetarian": "meatless"}),
}

CALLS = ["simple", "multiple", "parallel", "parallel_multiple"]


def samples(path):
    """(line number, sample) of an fcgpu JSONL task file; a malformed line is an error naming it."""
    try:
        f = open(path, "rb")
    except OSError as e:
        sys.exit(f"{path}: {e.strerror}")
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                s = json.loads(line.decode("utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                sys.exit(f"{path}:{n}: not JSON: {e}")
            if not (isinstance(s, dict) and isinstance(s.get("tools"), list)
                    and isinstance(s.get("ground_truth"), list) and isinstance(s.get("messages"), list)):
                sys.exit(f"{path}:{n}: not an fcgpu task sample (needs lists `messages`, `tools`, `ground_truth`)")
            yield n, s


def rewrite(a, fn):
    """Writes fn(sample) for every sample of a.input to a.output, atomically; an existing output
    is kept unless --force."""
    if os.path.exists(a.output) and not a.force:
        sys.exit(f"{a.output} exists; pass --force to overwrite it")
    if os.path.abspath(a.output) == os.path.abspath(a.input):
        sys.exit("the output would overwrite the input")
    rows = []
    for n, s in samples(a.input):
        try:
            rows.append(fn(s))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            sys.exit(f"{a.input}:{n}: malformed sample ({type(e).__name__}: {e})")
    tmp = f"{a.output}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, a.output)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        sys.exit(f"{a.output}: {e.strerror}")
    print(f"{len(rows)} samples written to {a.output}")


def strings(v):
    if isinstance(v, str):
        yield v
    elif isinstance(v, list):
        for x in v:
            yield from strings(x)


def map_strings(v, f):
    if isinstance(v, str):
        return f(v)
    if isinstance(v, list):
        return [map_strings(x, f) for x in v]
    return v


def enum_params(s):
    return {(t["name"], p) for t in s["tools"] for p, sch in t["parameters"]["properties"].items() if "enum" in sch}


def made_up_words(s, rng):
    enums = enum_params(s)
    words = set()
    for call in s["ground_truth"]:
        (fn, params), = call.items()
        for p, allowed in params.items():
            if (fn, p) not in enums:
                for v in strings(allowed):
                    words.update(w.lower() for w in re.findall(r"[A-Za-z]+", v)
                                 if len(w) >= 3 and w.lower() not in KEEP_WORDS)
    table = {w: "".join(rng.choice(TRAIN_SYLLABLES) for _ in range(rng.randint(2, 3))) for w in sorted(words)}

    def sub(text):
        def one(m):
            w = m.group(0)
            new = table.get(w.lower())
            if new is None:
                return w
            return new.capitalize() if w[0].isupper() else new
        return re.sub(r"[A-Za-z]+", one, text)

    s["messages"] = [dict(m, content=sub(m["content"])) for m in s["messages"]]
    s["ground_truth"] = [
        {fn: {p: (a if (fn, p) in enums else map_strings(a, sub)) for p, a in params.items()}}
        for call in s["ground_truth"] for fn, params in call.items()
    ]
    s.pop("reasoning", None)  # it names the old tools' parameters; GRPO does not read it
    return s


def rename_tools(s):
    for t in s["tools"]:
        if t["name"] in RENAMES:
            new, pmap = RENAMES[t["name"]]
            t["name"] = new
            pr = t["parameters"]
            pr["properties"] = {pmap.get(k, k): v for k, v in pr["properties"].items()}
            pr["required"] = [pmap.get(k, k) for k in pr.get("required", [])]
    gt = []
    for call in s["ground_truth"]:
        (fn, params), = call.items()
        if fn in RENAMES:
            new, pmap = RENAMES[fn]
            gt.append({new: {pmap.get(k, k): v for k, v in params.items()}})
        else:
            gt.append(call)
    s["ground_truth"] = gt
    s.pop("reasoning", None)
    return s


def eval_table(cmd):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        sys.exit(f"cannot run {cmd[0]}: {e.strerror} (build it with `cargo build --release`, or pass --bin)")
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-2000:]}")
    rows = {}
    for line in r.stdout.splitlines():
        p = line.split()
        if len(p) >= 3 and p[0] in CALLS + ["irrelevance"]:
            rows[p[0]] = ([float(x.rstrip("%")) for x in p[1:-1]], int(p[-1]))
    return rows


def headroom(a):
    base = [a.bin, "eval", "--model", a.model, "--data", a.task, "--style", "compact", "--device", "cpu",
            "--max-new-tokens", "256"]
    greedy = eval_table(base)
    sampled = eval_table(base + ["--samples", "8", "--temperature", "0.8"])
    cats = [c for c in CALLS if c in greedy and c in sampled]
    n = sum(greedy[c][1] for c in cats)
    if n == 0:
        sys.exit(f"{a.task}: no prompt of a call category ({', '.join(CALLS)}) was scored")

    def pooled(rows, k):
        return sum(rows[c][0][k] * rows[c][1] for c in cats) / n

    print(f"calls ({n} prompts): greedy {pooled(greedy, 0):.1f}%  pass@1 {pooled(sampled, 0):.1f}%  "
          f"pass@8 {pooled(sampled, 1):.1f}%  (temperature 0.8)")
    for c in cats:
        print(f"  {c:<18} greedy {greedy[c][0][0]:5.1f}%  pass@8 {sampled[c][0][1]:5.1f}%  of {greedy[c][1]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("made-up-words")
    m.add_argument("input")
    m.add_argument("output")
    m.add_argument("--seed", type=int, default=7)
    m.add_argument("--force", action="store_true", help="overwrite OUT")
    r = sub.add_parser("rename-tools")
    r.add_argument("input")
    r.add_argument("output")
    r.add_argument("--force", action="store_true", help="overwrite OUT")
    h = sub.add_parser("headroom")
    h.add_argument("model")
    h.add_argument("task")
    h.add_argument("--bin", default="target/release/fcgpu")
    a = ap.parse_args()
    if a.cmd == "headroom":
        headroom(a)
    elif a.cmd == "made-up-words":
        rng = random.Random(a.seed)
        rewrite(a, lambda s: made_up_words(s, rng))
    else:
        rewrite(a, rename_tools)


if __name__ == "__main__":
    main()
