#!/usr/bin/env python3
"""Checks that a model directory written by fcgpu (`fcgpu init`, checkpoints, `Model::save`)
loads in transformers and computes what fcgpu computes.

    fcgpu init --config some/config.json --out /tmp/m
    echo '{"input_ids": [5, 17, 42, 7, 99, 3]}' > /tmp/in.jsonl
    fcgpu logprobs --model /tmp/m --input /tmp/in.jsonl > /tmp/out.jsonl
    /work/venvs/ref4/bin/python tools/check_hf_load.py /tmp/m /tmp/in.jsonl /tmp/out.jsonl

Prints the largest absolute log-prob difference; exits 1 above 2e-4.
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM


def main():
    model_dir, inp, out = sys.argv[1:4]
    m = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    worst = 0.0
    for li, lo in zip(open(inp), open(out)):
        ids = json.loads(li)["input_ids"]
        ours = torch.tensor(json.loads(lo)["logprobs"], dtype=torch.float64)
        with torch.no_grad():
            logits = m(torch.tensor([ids])).logits[0].double()
        ref = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        worst = max(worst, (ours - ref).abs().max().item())
    print(f"{model_dir}: max |fcgpu - transformers| log-prob = {worst:.3e}")
    sys.exit(0 if worst < 2e-4 else 1)


if __name__ == "__main__":
    main()
