#!/usr/bin/env python3
"""PyTorch reference for fcgpu's GRPO policy-loss op and group advantages (SPEC §3).

Writes tests/fixtures/rl/policy_loss.safetensors: random cases (masked tokens, a fully masked
sequence, think/result segments, clipped and unclipped ratios, KL on and off) with the loss and
its gradient d loss / d logp from torch autograd in float64, for every aggregation mode.

Setup: the venv of tools/requirements-ref4.txt.  Run:
    /work/venvs/ref4/bin/python tools/make_rl_reference.py --out tests/fixtures/rl
"""
import argparse
import os

import torch
from safetensors.torch import save_file


def policy_loss(logp, old, ref, adv, mask, seg, eps_low, eps_high, beta, agg, alpha):
    """Same formula as SPEC §3.5-3.7, written the PyTorch way (autograd does the backward)."""
    n, t = logp.shape
    rho = torch.exp(logp - old)
    a = adv if adv.dim() == 2 else adv[:, None].expand(n, t)
    unclipped = rho * a
    clipped = torch.clamp(rho, 1 - eps_low, 1 + eps_high) * a
    per_tok = -torch.minimum(unclipped, clipped)
    if beta != 0.0:
        d = ref - logp
        per_tok = per_tok + beta * (torch.exp(d) - d - 1)
    if agg == "token-mean":
        w = mask / mask.sum()
    elif agg == "seq-mean":
        cnt = mask.sum(1, keepdim=True)
        w = torch.where(cnt > 0, mask / cnt.clamp(min=1) / n, torch.zeros_like(mask))
    else:
        think = mask * (seg == 1)
        result = mask * (seg == 2)
        nt = think.sum(1, keepdim=True)
        nr = result.sum(1, keepdim=True)
        # A sequence with one segment only gives it the whole weight.
        both = (nt > 0) & (nr > 0)
        a_t = torch.where(both, torch.full_like(nt, alpha), torch.ones_like(nt))
        a_r = torch.where(both, torch.full_like(nr, 1 - alpha), torch.ones_like(nr))
        w = torch.where(nt > 0, think * a_t / nt.clamp(min=1) / n, torch.zeros_like(mask)) + \
            torch.where(nr > 0, result * a_r / nr.clamp(min=1) / n, torch.zeros_like(mask))
    return (w * per_tok).sum()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/rl")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(7)
    tensors = {}
    cases = 0
    for agg in ["token-mean", "seq-mean", "srml"]:
        for beta in [0.0, 0.04]:
            for per_token in [False, True]:
                n, t = 5, 9
                logp = -torch.rand(n, t, generator=g, dtype=torch.float64) * 3
                # old log-probs near the new ones, some far enough to clip either side
                old = logp + (torch.rand(n, t, generator=g, dtype=torch.float64) - 0.5) * 0.9
                ref = logp + (torch.rand(n, t, generator=g, dtype=torch.float64) - 0.5) * 0.5
                adv = torch.randn(n, t, generator=g, dtype=torch.float64) if per_token else torch.randn(n, generator=g, dtype=torch.float64)
                mask = (torch.rand(n, t, generator=g) > 0.2).double()
                mask[3] = 0.0  # a sequence with no completion tokens
                seg = torch.zeros(n, t, dtype=torch.int32)
                for i in range(n):
                    cut = int(torch.randint(0, t + 1, (1,), generator=g))
                    seg[i, :cut] = 1
                    seg[i, cut:] = 2
                seg[4] = 2  # no think segment (no </think>): all result
                lp = logp.clone().requires_grad_(True)
                loss = policy_loss(lp, old, ref, adv, mask, seg, 0.2, 0.28, beta, agg, 0.5)
                loss.backward()
                k = f"case{cases}"
                tensors.update({
                    f"{k}.logp": logp, f"{k}.old": old, f"{k}.ref": ref, f"{k}.adv": adv,
                    f"{k}.mask": mask, f"{k}.seg": seg, f"{k}.loss": loss.detach().reshape(1),
                    f"{k}.grad": lp.grad,
                    f"{k}.cfg": torch.tensor([["token-mean", "seq-mean", "srml"].index(agg), beta, float(per_token), 0.5], dtype=torch.float64),
                })
                cases += 1
    os.makedirs(args.out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(args.out, "policy_loss.safetensors"))
    print(f"wrote {cases} cases to {args.out}/policy_loss.safetensors")


if __name__ == "__main__":
    main()
