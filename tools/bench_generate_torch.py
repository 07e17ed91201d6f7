#!/usr/bin/env python3
"""PyTorch peer benchmark: decode tokens/s of transformers `generate` with sampling.

Setup: the venv from tools/requirements-ref4.txt (torch + transformers 4.x, CPU is fine).
Run:   /work/venvs/ref4/bin/python tools/bench_generate_torch.py [--threads 2] [--new-tokens 64]

A small random Qwen2 model (no downloads) is built from a config.  8 prompts (random ids, all
of --prompt-len tokens, so no padding) are expanded to 8 samples each
(num_return_sequences=8 -> 64 rows), sampled with do_sample=True, temperature 1, top_k 0,
top_p 1 (plain softmax sampling), min_new_tokens = max_new_tokens so every row produces the full
length, KV cache on.  One small warmup call precedes the timed call.

decode_tokens_per_s = rows * new_tokens / elapsed of the whole generate call (prefill included;
prefill_s is measured separately with one forward pass over the prompts, and
decode_only_tokens_per_s = rows * (new_tokens - 1) / (elapsed - prefill_s)).
Peak RSS is the process's max resident set size (ru_maxrss).  tokens_per_cpu_s uses the
process CPU time of the timed call (x threads ~ the uncontended rate on a shared machine).
Prints one JSON line.
"""
import argparse
import json
import os
import platform
import resource
import time

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", dest="kv_heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=704)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8, help="num_return_sequences")
    ap.add_argument("--prompt-len", dest="prompt_len", type=int, default=32)
    ap.add_argument("--new-tokens", dest="new_tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--config-json", dest="config_json", default=None,
                    help="JSON file or inline object overriding hidden/layers/heads/kv_heads/intermediate/vocab")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    cfg = dict(hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
               intermediate=args.intermediate, vocab=args.vocab)
    if args.config_json:
        src = args.config_json
        over = json.loads(src) if src.strip().startswith("{") else json.load(open(src))
        unknown = set(over) - set(cfg)
        if unknown:
            raise SystemExit(f"unknown config keys: {sorted(unknown)}")
        cfg.update(over)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM
    import transformers

    V = cfg["vocab"]
    hf_cfg = Qwen2Config(
        vocab_size=V, hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
        num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["kv_heads"], max_position_embeddings=4096,
        tie_word_embeddings=True, bos_token_id=V - 3, eos_token_id=V - 1, pad_token_id=V - 2,
    )
    hf_cfg._attn_implementation = args.attn
    model = Qwen2ForCausalLM(hf_cfg).float().eval()

    g = torch.Generator().manual_seed(args.seed + 1)
    prompts = torch.randint(0, V - 3, (args.prompts, args.prompt_len), generator=g)
    mask = torch.ones_like(prompts)

    def gen_cfg(n):
        return GenerationConfig(
            do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
            max_new_tokens=n, min_new_tokens=n, num_return_sequences=args.samples,
            eos_token_id=V - 1, pad_token_id=V - 2, bos_token_id=V - 3, use_cache=True,
        )

    with torch.inference_mode():
        model.generate(input_ids=prompts, attention_mask=mask, generation_config=gen_cfg(4))
        rows = args.prompts * args.samples
        big = prompts.repeat_interleave(args.samples, dim=0)
        t0 = time.perf_counter()
        model(input_ids=big, attention_mask=torch.ones_like(big), use_cache=True)
        prefill_s = time.perf_counter() - t0

        torch.manual_seed(args.seed + 2)
        t0, c0 = time.perf_counter(), time.process_time()
        out = model.generate(input_ids=prompts, attention_mask=mask, generation_config=gen_cfg(args.new_tokens))
        elapsed, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    new = out[:, args.prompt_len:]
    assert new.shape == (rows, args.new_tokens), new.shape

    res = {
        "decode_tokens_per_s": rows * args.new_tokens / elapsed,
        "decode_only_tokens_per_s": rows * (args.new_tokens - 1) / max(elapsed - prefill_s, 1e-9),
        "elapsed_s": elapsed,
        "cpu_s": cpu_s,
        "tokens_per_cpu_s": rows * args.new_tokens / cpu_s,
        "prefill_s": prefill_s,
        "rows": rows,
        "prompts": args.prompts,
        "samples_per_prompt": args.samples,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "loadavg_1m_after": os.getloadavg()[0],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "config": cfg,
        "threads": args.threads,
        "attn": args.attn,
        "dtype": "float32",
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(res))


if __name__ == "__main__":
    main()
