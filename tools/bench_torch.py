#!/usr/bin/env python3
"""PyTorch peer benchmark: forward+backward tokens/s of a small random Qwen2 model.

Setup: the venv from tools/requirements-ref4.txt (torch + transformers 4.x, CPU is fine).
Run:   /work/venvs/ref4/bin/python tools/bench_torch.py [--threads 2] [--iters 5] ...
       /work/venvs/ref4/bin/python tools/bench_torch.py --config-json cfg.json

The model is built from a config with random init (no downloads). Every iteration runs a
forward pass on a (batch, seq) block of random token ids, computes loss = mean token NLL of
the next-token predictions (positions 0..seq-2 predict 1..seq-1) and runs loss.backward();
the timing covers forward + loss + backward (gradients are reset, no optimizer step).
tokens_per_s = batch * seq * iters / elapsed (wall clock); best_tokens_per_s uses the fastest
iteration; tokens_per_cpu_s uses the process CPU time (useful when the machine is shared:
tokens_per_cpu_s * threads approximates the uncontended rate).  Prints one JSON line.

--config-json accepts a JSON object with any of: hidden, layers, heads, kv_heads,
intermediate, vocab, seq, batch, rope_theta, tie (keys override the command-line values).
"""
import argparse
import json
import os
import platform
import time

import torch
import torch.nn.functional as F


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", dest="kv_heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=704)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rope-theta", dest="rope_theta", type=float, default=10000.0)
    ap.add_argument("--tie", action="store_true", help="tie input/output embeddings")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"],
                    help="transformers attention implementation")
    ap.add_argument("--config-json", dest="config_json", default=None,
                    help="JSON file (or inline JSON object) overriding the model/shape options")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    cfg = dict(hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
               intermediate=args.intermediate, vocab=args.vocab, seq=args.seq, batch=args.batch,
               rope_theta=args.rope_theta, tie=args.tie)
    if args.config_json:
        src = args.config_json
        over = json.loads(src) if src.strip().startswith("{") else json.load(open(src))
        unknown = set(over) - set(cfg)
        if unknown:
            raise SystemExit(f"unknown config keys: {sorted(unknown)}")
        cfg.update(over)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from transformers import Qwen2Config, Qwen2ForCausalLM
    import transformers

    hf_cfg = Qwen2Config(
        vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
        num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["kv_heads"], max_position_embeddings=max(2048, cfg["seq"]),
        rope_theta=cfg["rope_theta"], tie_word_embeddings=bool(cfg["tie"]), use_cache=False,
    )
    hf_cfg._attn_implementation = args.attn
    model = Qwen2ForCausalLM(hf_cfg).float()
    model.train()  # dropout is 0 in Qwen2 anyway
    n_params = sum(p.numel() for p in model.parameters())

    B, T = cfg["batch"], cfg["seq"]
    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, cfg["vocab"], (B, T), generator=g)

    def step():
        logits = model(input_ids=ids, use_cache=False).logits  # (B, T, V) f32
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                               ids[:, 1:].reshape(-1), reduction="mean")
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(args.warmup):
        step()
    times = []
    loss = None
    c0 = time.process_time()
    for _ in range(args.iters):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    cpu_s = time.process_time() - c0
    total = sum(times)
    out = {
        "tokens_per_s": B * T * args.iters / total,
        "config": cfg,
        "threads": args.threads,
        "iters": args.iters,
        "warmup": args.warmup,
        "iter_s": times,
        "median_iter_s": sorted(times)[len(times) // 2],
        "best_tokens_per_s": B * T / min(times),
        "loadavg_1m_after": os.getloadavg()[0],
        # CPU seconds of this process over the timed iterations (all threads): on a shared,
        # overloaded machine tokens_per_cpu_s * threads estimates the uncontended rate.
        "cpu_s": cpu_s,
        "tokens_per_cpu_s": B * T * args.iters / cpu_s,
        "loss": loss,
        "n_params": n_params,
        "attn": args.attn,
        "dtype": "float32",
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
