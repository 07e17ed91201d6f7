#!/usr/bin/env python3
"""The induction (copy) probe, PyTorch side (issue 10, item 2).

Trains transformers' Qwen2 from the initial weights fcgpu wrote (`<out>/init`, made by
`cargo run --example induction_probe -- --out <out> ...`) on the same batches: the
counter-based splitmix64 generator of src/train/probe.rs, reimplemented here. Recipe as
fcgpu's probe: plain cross-entropy on the second copy (mean over its tokens), AdamW lr 3e-3
(betas 0.9/0.999, eps 1e-8, weight decay 0.01 on every parameter), warm-up 10 steps then
cosine to 0.1·lr, clipping at global norm 1.0. Float32.

    .venv-ref/bin/python tools/induction_probe.py train --out runs/probe/seed0 --seed 0 --steps 3000
    .venv-ref/bin/python tools/induction_probe.py summary runs/probe/seed*

`train` writes `<out>/torch.jsonl` (step, loss, grad_norm). `summary` prints a markdown table
of the phase-change step per seed and engine (first step whose 10-step trailing mean loss is
below half the mean loss of steps 11-30, the plateau after warm-up), and the loss (20-step
trailing mean) at a few steps.
"""
import argparse
import json
import math
import os
import sys

MASK = (1 << 64) - 1
VOCAB = 1536
FIRST_TOKEN = 3


def splitmix64(x):
    z = (x + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def copy_sequence(seed, step, seq, length):
    base = splitmix64(splitmix64(seed) ^ step)
    span = VOCAB - FIRST_TOKEN
    half = [FIRST_TOKEN + splitmix64(base ^ ((seq << 32) | pos)) % span for pos in range(length)]
    return half + half


def lr_at(step, lr, warmup, total, min_ratio):
    if warmup > 0 and step <= warmup:
        return lr * step / warmup
    decay = max(total - warmup, 1)
    t = min(max(step - warmup, 0) / decay, 1.0)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def phase_change(losses, plateau=(11, 30), window=10):
    a, b = max(plateau[0], 1), min(plateau[1], len(losses))
    if a > b:
        return None
    level = sum(losses[a - 1:b]) / (b - a + 1)
    for end in range(window, len(losses) + 1):
        if sum(losses[end - window:end]) / window < level / 2:
            return end
    return None


def train(args):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(os.path.join(args.out, "init"), torch_dtype=torch.float32, attn_implementation="eager")
    model.train()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    out = open(os.path.join(args.out, "torch.jsonl"), "w")
    losses = []
    for step in range(1, args.steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.lr, 10, args.steps, 0.1)
        ids = torch.tensor([copy_sequence(args.seed, step, s, args.len) for s in range(args.batch)])
        logits = model(input_ids=ids).logits
        # Rows len-1 .. 2len-2 predict the second copy's tokens.
        pred = logits[:, args.len - 1:-1].reshape(-1, logits.shape[-1])
        loss = torch.nn.functional.cross_entropy(pred, ids[:, args.len:].reshape(-1))
        opt.zero_grad(set_to_none=False)
        loss.backward()
        norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in params))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss))
        out.write(json.dumps({"step": step, "loss": float(loss), "grad_norm": norm}) + "\n")
        if step % 10 == 0:
            out.flush()
        if step % 100 == 0:
            print(f"step {step}: loss {float(loss):.4f} grad norm {norm:.3f}", file=sys.stderr)
    out.close()
    print(f"seed {args.seed}: phase change at step {phase_change(losses)}")


def read_losses(path):
    if not os.path.exists(path):
        return None
    return [json.loads(line)["loss"] for line in open(path) if line.strip()]


def summary(args):
    marks = [20, 60, 80, 100, 150, 200, 500, 1000, 3000]
    print("| seed | engine | steps run | phase change (step) | " + " | ".join(f"loss @{m}" for m in marks) + " |")
    print("| --- | --- | --- | --- | " + " | ".join("---" for _ in marks) + " |")
    for d in args.dirs:
        for engine in ["torch", "fcgpu"]:
            losses = read_losses(os.path.join(d, f"{engine}.jsonl"))
            if losses is None:
                continue
            pc = phase_change(losses)
            cells = [f"{sum(losses[max(0, m - 20):m]) / len(losses[max(0, m - 20):m]):.3f}" if m <= len(losses) else "" for m in marks]
            print(f"| {os.path.basename(d.rstrip('/'))} | {engine} | {len(losses)} | {pc if pc else 'none'} | " + " | ".join(cells) + " |")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--out", required=True)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--len", type=int, default=24)
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--threads", type=int, default=1)
    s = sub.add_parser("summary")
    s.add_argument("dirs", nargs="+")
    args = ap.parse_args()
    train(args) if args.cmd == "train" else summary(args)


if __name__ == "__main__":
    main()
