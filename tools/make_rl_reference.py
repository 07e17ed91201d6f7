#!/usr/bin/env python3
"""PyTorch reference for fcgpu's GRPO policy-loss op and group advantages (SPEC §3).

Writes into --out (tests/fixtures/rl):
- policy_loss.safetensors: random cases (masked tokens, a fully masked sequence, think/result
  segments, clipped and unclipped ratios, KL on and off) with the loss and its gradient
  d loss / d logp from torch autograd in float64, for every aggregation mode;
- policy_loss_correction.safetensors: the same kinds of cases with rollout log-probs, for every
  rollout correction (none, token-tis, token-mis, seq-tis, seq-mis) at both importance levels
  (token, sequence = GSPO), with the loss, the gradient and the stats (clip, masked and capped
  fractions). The formulas are the ones docs/training.md gives ("Rollout correction", "GSPO").

Setup: a venv with torch and safetensors (tools/requirements-ref4.txt has both; the committed
files were made with torch 2.15).  Run:
    /work/venvs/ref4/bin/python tools/make_rl_reference.py --out tests/fixtures/rl
Both files come from seeded generators (7 and 28): rerunning rewrites policy_loss.safetensors
byte for byte.
"""
import argparse
import os

import torch
from safetensors.torch import save_file

AGGS = ["token-mean", "seq-mean", "srml"]
CORRECTIONS = ["none", "token-tis", "token-mis", "seq-tis", "seq-mis"]
LEVELS = ["token", "sequence"]


def agg_weights(mask, seg, agg, alpha):
    """Aggregation weights w (SPEC §3.7): loss = Σ w·per-token loss."""
    n = mask.shape[0]
    if agg == "token-mean":
        return mask / mask.sum()
    if agg == "seq-mean":
        cnt = mask.sum(1, keepdim=True)
        return torch.where(cnt > 0, mask / cnt.clamp(min=1) / n, torch.zeros_like(mask))
    think = mask * (seg == 1)
    result = mask * (seg == 2)
    nt = think.sum(1, keepdim=True)
    nr = result.sum(1, keepdim=True)
    # A sequence with one segment only gives it the whole weight.
    both = (nt > 0) & (nr > 0)
    a_t = torch.where(both, torch.full_like(nt, alpha), torch.ones_like(nt))
    a_r = torch.where(both, torch.full_like(nr, 1 - alpha), torch.ones_like(nr))
    return torch.where(nt > 0, think * a_t / nt.clamp(min=1) / n, torch.zeros_like(mask)) + \
        torch.where(nr > 0, result * a_r / nr.clamp(min=1) / n, torch.zeros_like(mask))


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
    return (agg_weights(mask, seg, agg, alpha) * per_tok).sum()


def seq_mean(x, mask):
    """Masked mean over each sequence, broadcast back to its tokens (0 for an empty one)."""
    return ((x * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)).expand_as(x)


def correction_weight(old, roll, mask, corr, cap):
    """Detached rollout-correction weight c and the masked / capped indicators."""
    if corr == "none":
        ones = torch.ones_like(old)
        return ones, ones * 0, ones * 0
    log_r = (old - roll) * mask
    if corr.startswith("seq"):
        log_r = seq_mean(old - roll, mask)  # geometric mean of the sequence's token ratios
    r = torch.exp(log_r)
    over = (r > cap).double()
    if corr.endswith("tis"):
        return torch.clamp(r, max=cap), over * 0, over
    return 1 - over, over, over * 0


def policy_loss_corrected(logp, old, roll, ref, adv, mask, seg, cfg):
    """Policy loss with GSPO's sequence ratio and rollout correction (docs/training.md); returns
    the loss and the stats (clip fraction, masked fraction, capped fraction)."""
    n, t = logp.shape
    log_ratio = logp - old
    if cfg["level"] == "sequence":
        log_ratio = seq_mean(log_ratio, mask)  # s_i, its gradient reaching every token
    rho = torch.exp(log_ratio)
    a = adv if adv.dim() == 2 else adv[:, None].expand(n, t)
    unclipped = rho * a
    clipped = torch.clamp(rho, 1 - cfg["eps_low"], 1 + cfg["eps_high"]) * a
    c, masked, capped = correction_weight(old, roll, mask, cfg["corr"], cfg["cap"])
    per_tok = -torch.minimum(unclipped, clipped) * c
    if cfg["beta"] != 0.0:
        d = ref - logp
        per_tok = per_tok + cfg["beta"] * (torch.exp(d) - d - 1)
    loss = (agg_weights(mask, seg, cfg["agg"], cfg["alpha"]) * per_tok).sum()
    tokens = mask.sum()
    stats = torch.stack([((unclipped > clipped).double() * mask).sum() / tokens,
                         (masked * mask).sum() / tokens, (capped * mask).sum() / tokens])
    return loss, stats.detach()


def random_inputs(g, n, t, per_token):
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
    return logp, old, ref, adv, mask, seg


def plain_cases():
    g = torch.Generator().manual_seed(7)
    tensors = {}
    cases = 0
    for agg in AGGS:
        for beta in [0.0, 0.04]:
            for per_token in [False, True]:
                logp, old, ref, adv, mask, seg = random_inputs(g, 5, 9, per_token)
                lp = logp.clone().requires_grad_(True)
                loss = policy_loss(lp, old, ref, adv, mask, seg, 0.2, 0.28, beta, agg, 0.5)
                loss.backward()
                k = f"case{cases}"
                tensors.update({
                    f"{k}.logp": logp, f"{k}.old": old, f"{k}.ref": ref, f"{k}.adv": adv,
                    f"{k}.mask": mask, f"{k}.seg": seg, f"{k}.loss": loss.detach().reshape(1),
                    f"{k}.grad": lp.grad,
                    f"{k}.cfg": torch.tensor([AGGS.index(agg), beta, float(per_token), 0.5], dtype=torch.float64),
                })
                cases += 1
    return tensors, cases


def correction_cases():
    """Every (level, correction) pair, the aggregation, β, advantage kind and clip range varied."""
    g = torch.Generator().manual_seed(28)
    tensors = {}
    cases = 0
    seen = torch.zeros(3, dtype=torch.float64)
    for level in LEVELS:
        for corr in CORRECTIONS:
            for j, agg in enumerate(AGGS):
                per_token = (cases + j) % 2 == 1
                beta = 0.04 if cases % 3 != 0 else 0.0
                # GSPO's clip range is ~1e-3 wide (the GSPO paper uses 3e-4 / 4e-4): half of the
                # sequence-level cases use it so that sequences clip on both sides.
                eps = (3e-4, 4e-4) if level == "sequence" and cases % 2 == 0 else (0.2, 0.28)
                n, t = 6, 9
                logp, old, ref, adv, mask, seg = random_inputs(g, n, t, per_token)
                # rollout log-probs: per-token noise plus a per-sequence shift, so that token and
                # sequence ratios land on both sides of the cap
                shift = torch.tensor([1.0, -0.3, 0.5, 0.0, 0.2, 0.9], dtype=torch.float64)[:, None]
                roll = old - shift + (torch.rand(n, t, generator=g, dtype=torch.float64) - 0.5) * 1.6
                cfg = {"level": level, "corr": corr, "agg": agg, "beta": beta, "alpha": 0.3,
                       "cap": 2.0, "eps_low": eps[0], "eps_high": eps[1]}
                lp = logp.clone().requires_grad_(True)
                loss, stats = policy_loss_corrected(lp, old, roll, ref, adv, mask, seg, cfg)
                loss.backward()
                seen += (stats > 0).double()
                k = f"case{cases}"
                tensors.update({
                    f"{k}.logp": logp, f"{k}.old": old, f"{k}.rollout": roll, f"{k}.ref": ref,
                    f"{k}.adv": adv, f"{k}.mask": mask, f"{k}.seg": seg,
                    f"{k}.loss": loss.detach().reshape(1), f"{k}.grad": lp.grad, f"{k}.stats": stats,
                    # agg, β, per-token advantages, α_s, level, correction, cap, ε_low, ε_high
                    f"{k}.cfg": torch.tensor([AGGS.index(agg), beta, float(per_token), 0.3,
                                              LEVELS.index(level), CORRECTIONS.index(corr), 2.0,
                                              eps[0], eps[1]], dtype=torch.float64),
                })
                cases += 1
    # The cases must exercise clipping, masking and capping, or the test proves little.
    assert (seen > 0).all(), f"cases with clipped / masked / capped tokens: {seen.tolist()}"
    return tensors, cases


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/rl")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name, (tensors, cases) in [("policy_loss", plain_cases()),
                                   ("policy_loss_correction", correction_cases())]:
        path = os.path.join(args.out, f"{name}.safetensors")
        save_file({k: v.contiguous() for k, v in tensors.items()}, path)
        print(f"wrote {cases} cases to {path}")


if __name__ == "__main__":
    main()
