#!/usr/bin/env python3
"""fcgpu against torch + transformers on a real model (SmolLM2-135M-Instruct), on the CPU.

Setup: a venv with torch and transformers (tools/requirements-ref5.txt works), the model from
`scripts/get-model.sh smollm2-135m`, and a release build (`cargo build --release`).
Run:   VENV/bin/python tools/bench_real.py --model ~/.cache/fcgpu/models/smollm2-135m \\
           [--fcgpu target/release/fcgpu] [--runs 3] [--threads 2] [--write docs/performance.md]

Every run does each task once with fcgpu and once with the peer, one after the other, so both
see the same machine; the table gives min and median over the runs. Each side is its own
process with OMP_NUM_THREADS, MKL_NUM_THREADS and RAYON_NUM_THREADS set to --threads (and
torch.set_num_threads), and its peak RSS is the process's ru_maxrss (os.wait4).

  logprobs   4 sequences x 512 tokens (the ids of tests/fixtures/real/smollm2/logprobs.safetensors,
             cycled): log p(next token) and the entropy of every position. "wall" is the whole
             process, import and load included. "compute" for the peer is its timed forward
             (log-softmax, gather, entropy included); for fcgpu it is the wall time minus the
             fastest wall time of the same command on a 2-token input (its load cost).
  sample     16 sequences (4 prompts x 4 samples, T = 1, top-p 1, no EOS stop) x 128 new tokens,
             KV cache; tokens/s = 16 x 127 / (t(128 new tokens) - t(1 new token)), so load and
             prefill cancel, for both sides alike (fcgpu: two `fcgpu generate` processes; the peer:
             two `generate` calls in one process after a warm-up call).
  sft step   batch 8, max 512 tokens, AdamW, plain next-token loss: fcgpu's own `fcgpu sft` on
             generated BFCL-style samples (its metrics.jsonl gives the tokens and seconds of each
             step; step 2 is reported, step 1 allocates the optimizer state); the peer is PyTorch
             eager (forward, cross-entropy, backward, torch.optim.AdamW step) on 8 sequences of
             the same mean length, second step reported. tokens/s compare.

Numbers measured while other work runs on the machine are not final: the table records the
1-minute load average seen during the run.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests/fixtures/real/smollm2/logprobs.safetensors")
START, END = "<!-- bench_real:start -->", "<!-- bench_real:end -->"
NEW_TOKENS, PROMPTS, SAMPLES = 128, 4, 4


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def fixture_ids():
    from safetensors import safe_open
    with safe_open(FIXTURE, "np") as f:
        return [f.get_tensor(f"input_ids.{i}").astype(int).tolist() for i in range(8)]


def seqs_of(n, length):
    """`n` sequences of `length` tokens from the fixture's ids, cycled."""
    pool = [t for s in fixture_ids() for t in s]
    return [[pool[(i * length + j) % len(pool)] for j in range(length)] for i in range(n)]


def prompts():
    """PROMPTS prompts of equal length (no padding on the peer's side)."""
    with open(os.path.join(ROOT, "tests/fixtures/real/smollm2/greedy.jsonl")) as f:
        ids = [json.loads(line)["prompt_ids"] for line in f]
    n = min(len(p) for p in ids[:PROMPTS])
    return [p[:n] for p in ids[:PROMPTS]]


# --------------------------------------------------------------------------- the peer (in a child)
def peer(args):
    t0 = time.perf_counter()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig
    torch.set_num_threads(args.threads)
    m = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    loaded = time.perf_counter() - t0
    out = {"load_s": loaded, "torch": torch.__version__, "transformers": transformers.__version__,
           "attn": m.config._attn_implementation}
    if args.peer == "logprobs":
        m.eval()
        x = torch.tensor(seqs_of(4, 512))
        with torch.inference_mode():
            t = time.perf_counter()
            lsm = torch.log_softmax(m(input_ids=x, use_cache=False).logits[:, :-1], dim=-1)
            lp = lsm.gather(2, x[:, 1:, None])[..., 0]
            ent = -(lsm.exp() * lsm).sum(-1)
            out["compute_s"] = time.perf_counter() - t
        assert lp.shape == ent.shape == (4, 511)
    elif args.peer == "sample":
        m.eval()
        x = torch.tensor(prompts())

        def gen(n):
            gc = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=n,
                                  min_new_tokens=n, num_return_sequences=SAMPLES, eos_token_id=None,
                                  pad_token_id=2, use_cache=True)
            t = time.perf_counter()
            r = m.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=gc)
            assert r.shape == (PROMPTS * SAMPLES, x.shape[1] + n), r.shape
            return time.perf_counter() - t
        with torch.inference_mode():
            gen(2)
            out["t1_s"], out["t128_s"] = gen(1), gen(NEW_TOKENS)
    elif args.peer == "sft":
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-5, weight_decay=0.0)
        x = torch.tensor(seqs_of(8, args.length))
        steps = []
        for _ in range(2):
            t = time.perf_counter()
            logits = m(input_ids=x, use_cache=False).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            steps.append(time.perf_counter() - t)
        out["step_s"], out["tokens"] = steps[1], 8 * args.length
    print(json.dumps(out))


# --------------------------------------------------------------------------- the driver
def run_rss(cmd, env, stdout_path=None):
    """(seconds, peak RSS MB, stdout text) of a child, with its own ru_maxrss from wait4."""
    t = time.perf_counter()
    out_f = open(stdout_path, "w") if stdout_path else tempfile.TemporaryFile("w+")
    err_f = tempfile.TemporaryFile("w+")
    p = subprocess.Popen(cmd, env=env, stdout=out_f, stderr=err_f, text=True)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    p.returncode = os.waitstatus_to_exitcode(status)
    err_f.seek(0)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[:3]))} ... failed ({p.returncode}): {err_f.read()[-2000:]}")
    text = ""
    if not stdout_path:
        out_f.seek(0)
        text = out_f.read()
    return wall, ru.ru_maxrss / 1024.0, text


class Bench:
    def __init__(self, args):
        self.a = args
        self.env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
                        RAYON_NUM_THREADS=str(args.threads))
        self.tmp = tempfile.mkdtemp(prefix="bench_real-")
        self.rows = {}
        self.loads = []
        self.versions = {}

    def add(self, key, value):
        self.rows.setdefault(key, []).append(value)

    def fc(self, *args, stdout_path=None):
        return run_rss([self.a.fcgpu, *args], self.env, stdout_path)

    def py(self, task, *extra):
        wall, rss, out = run_rss([sys.executable, os.path.abspath(__file__), "--peer", task, "--model",
                                  self.a.model, "--threads", str(self.a.threads), *extra], self.env)
        res = json.loads(out.strip().splitlines()[-1])
        self.versions = {k: res[k] for k in ("torch", "transformers", "attn")}
        return wall, rss, res

    def write_jsonl(self, name, rows):
        path = os.path.join(self.tmp, name)
        with open(path, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        return path

    def logprobs(self):
        big = self.write_jsonl("lp.jsonl", [{"input_ids": s} for s in seqs_of(4, 512)])
        tiny = self.write_jsonl("lp-load.jsonl", [{"input_ids": seqs_of(1, 2)[0]}])
        common = ["--model", self.a.model, "--device", "cpu", "--batch-size", "4"]
        load, _, _ = self.fc("logprobs", *common, "--input", tiny, stdout_path=os.devnull)
        wall, rss, _ = self.fc("logprobs", *common, "--input", big, stdout_path=os.devnull)
        self.add("fc_lp_load", load)
        self.add("fc_lp_wall", wall)
        self.add("fc_lp_rss", rss)
        pwall, prss, res = self.py("logprobs")
        self.add("pt_lp_wall", pwall)
        self.add("pt_lp_compute", res["compute_s"])
        self.add("pt_lp_rss", prss)

    def sample(self):
        inp = self.write_jsonl("prompts.jsonl", [{"prompt_ids": p} for p in prompts()])
        common = ["generate", "--model", self.a.model, "--input", inp, "--device", "cpu", "--n", str(SAMPLES),
                  "--temperature", "1", "--top-p", "1", "--ignore-eos", "--seed", "1"]
        t1, _, _ = self.fc(*common, "--max-new-tokens", "1", stdout_path=os.devnull)
        t128, rss, _ = self.fc(*common, "--max-new-tokens", str(NEW_TOKENS), stdout_path=os.devnull)
        self.add("fc_gen_tps", PROMPTS * SAMPLES * (NEW_TOKENS - 1) / (t128 - t1))
        self.add("fc_gen_rss", rss)
        _, prss, res = self.py("sample")
        self.add("pt_gen_tps", PROMPTS * SAMPLES * (NEW_TOKENS - 1) / (res["t128_s"] - res["t1_s"]))
        self.add("pt_gen_rss", prss)

    def sft_data(self):
        """BFCL-style samples that render to a few hundred tokens (tools from tests/data/bfcl)."""
        path = os.path.join(ROOT, "tests/data/bfcl/v4/BFCL_v4_multiple.json")
        with open(path) as f:
            entries = [json.loads(line) for line in f]
        answers = {}
        with open(os.path.join(ROOT, "tests/data/bfcl/v4/possible_answer/BFCL_v4_multiple.json")) as f:
            for line in f:
                e = json.loads(line)
                answers[e["id"]] = e["ground_truth"]
        rows = []
        for i in range(32):
            e = entries[i % len(entries)]
            extra = [f for k in (1, 2) for f in entries[(i + k) % len(entries)]["function"]]
            rows.append({"id": f"bench_{i}", "messages": e["question"][0], "tools": e["function"] + extra,
                         "calls": answers[e["id"]]})
        return self.write_jsonl("sft.jsonl", rows)

    def sft(self):
        data = self.sft_data()
        run_dir = os.path.join(self.tmp, f"sft-{time.time_ns()}")
        try:
            _, rss, _ = self.fc("sft", "--model", self.a.model, "--data", data, "--run-dir", run_dir,
                                "--steps", "2", "--batch-size", "8", "--max-len", "512", "--loss", "plain",
                                "--lr", "1e-5", "--warmup-steps", "0", "--eval-samples", "0",
                                "--save-every", "1000", "--device", "cpu", stdout_path=os.devnull)
        except RuntimeError as e:
            self.add("fc_sft_error", str(e).splitlines()[-1][:200])
            return
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            steps = [json.loads(line) for line in f]
        step = steps[-1]
        self.add("fc_sft_tps", step["tokens"] / step["seconds"])
        self.add("fc_sft_tokens", step["tokens"])
        self.add("fc_sft_rss", rss)
        subprocess.run(["rm", "-rf", run_dir], check=True)
        _, prss, res = self.py("sft", "--length", str(max(2, round(step["tokens"] / 8))))
        self.add("pt_sft_tps", res["tokens"] / res["step_s"])
        self.add("pt_sft_rss", prss)

    def go(self):
        for i in range(self.a.runs):
            for task in self.a.tasks.split(","):
                log(f"run {i + 1}/{self.a.runs}: {task}")
                getattr(self, task)()
                self.loads.append(os.getloadavg()[0])
        return self.rows


def mm(v, fmt="{:.2f}"):
    return f"{fmt.format(min(v))} / {fmt.format(statistics.median(v))}" if v else "—"


def table(b, args):
    r = b.rows
    g = lambda k: r.get(k, [])  # noqa: E731
    fc_compute = [w - min(g("fc_lp_load")) for w in g("fc_lp_wall")]
    lines = [
        "| what (SmolLM2-135M-Instruct, f32, cpu, %d threads each) | fcgpu min / median | torch + transformers min / median | ratio (median) |" % args.threads,
        "|---|---|---|---|",
    ]

    def row(what, fk, pk, fmt, better="lower", fvals=None):
        fv, pv = fvals if fvals is not None else g(fk), g(pk)
        if not fv or not pv:
            err = g("fc_sft_error")
            lines.append(f"| {what} | {'failed: ' + err[0] if err else '—'} | {mm(pv, fmt)} | — |")
            return
        fm, pm = statistics.median(fv), statistics.median(pv)
        ratio = pm / fm if better == "lower" else fm / pm
        lines.append(f"| {what} | {mm(fv, fmt)} | {mm(pv, fmt)} | **{ratio:.2f}×** |")

    if g("fc_lp_wall"):
        row("log-probs 4 × 512 tokens, compute (s)", None, "pt_lp_compute", "{:.2f}", fvals=fc_compute)
        row("log-probs 4 × 512 tokens, wall with import and load (s)", "fc_lp_wall", "pt_lp_wall", "{:.2f}")
        row("log-probs: peak RSS (MB)", "fc_lp_rss", "pt_lp_rss", "{:.0f}")
    if g("fc_gen_tps"):
        row("sampling 16 × 128 new tokens (tokens/s)", "fc_gen_tps", "pt_gen_tps", "{:.1f}", better="higher")
        row("sampling: peak RSS (MB)", "fc_gen_rss", "pt_gen_rss", "{:.0f}")
    if g("fc_sft_tps") or g("fc_sft_error"):
        tok = g("fc_sft_tokens")
        what = f"SFT step, batch 8 ({tok[0] if tok else '?'} tokens), AdamW (tokens/s)"
        row(what, "fc_sft_tps", "pt_sft_tps", "{:.0f}", better="higher")
        row("SFT: peak RSS (MB)", "fc_sft_rss", "pt_sft_rss", "{:.0f}")
    v = b.versions
    notes = [
        "",
        f"Measured {datetime.date.today().isoformat()} by `tools/bench_real.py --runs {args.runs}` on "
        f"{platform.machine()} with {os.cpu_count()} cores; peer: torch {v.get('torch', '?')}, transformers "
        f"{v.get('transformers', '?')} ({v.get('attn', '?')} attention), float32 eager. Ratios are the peer's "
        "median over fcgpu's (times, memory) or fcgpu's over the peer's (tokens/s): above 1 means fcgpu is "
        "ahead. 1-minute load average during the runs: "
        f"{min(b.loads):.2f}–{max(b.loads):.2f}" + (" (other work was running: these numbers are not final)."
                                                    if max(b.loads) > args.threads + 0.5 else "."),
    ]
    return "\n".join(lines + notes)


def write_doc(path, text):
    body = open(path).read() if os.path.exists(path) else "# Performance\n"
    block = f"{START}\n## A real model: SmolLM2-135M-Instruct against torch + transformers\n\n{text}\n{END}"
    if START in body and END in body:
        body = body[:body.index(START)] + block + body[body.index(END) + len(END):]
    else:
        body = body.rstrip("\n") + "\n\n" + block + "\n"
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the converted model directory")
    ap.add_argument("--fcgpu", default=os.path.join(ROOT, "target/release/fcgpu"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tasks", default="logprobs,sample,sft")
    ap.add_argument("--write", help="put the table in this Markdown file (docs/performance.md)")
    ap.add_argument("--json", help="write every measurement to this file")
    ap.add_argument("--peer", choices=["logprobs", "sample", "sft"], help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, default=512, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer:
        return peer(args)
    for p, what in [(args.fcgpu, "--fcgpu"), (os.path.join(args.model, "config.json"), "--model")]:
        if not os.path.exists(p):
            sys.exit(f"bench_real.py: {what}: {p} does not exist")
    b = Bench(args)
    try:
        b.go()
    finally:
        subprocess.run(["rm", "-rf", b.tmp])
    text = table(b, args)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": b.rows, "loadavg": b.loads, "versions": b.versions}, f, indent=1)
    if args.write:
        write_doc(args.write, text)


if __name__ == "__main__":
    main()
