#!/usr/bin/env python3
"""PyTorch trajectories for fcgpu's SFT (plain, SRML fixed / learnable / loss-ratio) and GRPO
update paths, from one initial checkpoint and fixed data (issue 10, item 1).

Everything here is written from SPEC §3-4 the PyTorch way (autograd for every gradient,
torch.optim.AdamW, torch.nn.utils.clip_grad_norm_), not translated from fcgpu's code:
- schedule: linear warm-up to lr over `warmup` steps, then cosine to min_ratio·lr at `total`;
- AdamW(betas 0.9/0.999, eps 1e-8) on every model parameter, weight decay on all of them
  (fcgpu decays every parameter, norms and biases included; SPEC says nothing either way);
- clipping by the global L2 norm of the model's gradients (SRML's α logit is not clipped and
  not decayed: it is its own parameter group);
- SFT loss SPEC §4; GRPO loss SPEC §3 (group advantage, entropy bonus, clipped ratio, k3 KL,
  token-mean / seq-mean / srml aggregation), ppo epochs 2: the old log-probs and entropies are
  the current policy's at the start of each step, the reference is the initial model.

Writes tests/fixtures/trajectory/{sft,grpo}.json (data, settings, per-step loss and grad norm,
and a strided probe of the weights after step 10). Float32 throughout (eager attention).

Setup: the venv of tools/requirements-ref4.txt.  Run:
    .venv-ref/bin/python tools/make_trajectory_reference.py
"""
import argparse
import json
import math
import os

import torch
from transformers import AutoModelForCausalLM

MODEL = "tests/fixtures/models/qwen2-tiny"
THINK_END = 381  # a model row no tokenizer entry maps to: stands in for `</think>`
IM_END = 380


def lr_at(step, lr, warmup, total, min_ratio):
    """SPEC: linear warm-up, then cosine decay to min_ratio·lr (step is 1-based)."""
    if warmup > 0 and step <= warmup:
        return lr * step / warmup
    decay = max(total - warmup, 1)
    t = min(max(step - warmup, 0) / decay, 1.0)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def load_model():
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(MODEL, torch_dtype=torch.float32, attn_implementation="eager")
    m.train()  # no dropout in Qwen2 anyway
    return m


def seq_logits(model, ids):
    return model(input_ids=torch.tensor([ids])).logits[0]


def token_logp(model, ids, temperature=1.0):
    """log p(ids[j+1] | ids[..=j]) for j = 0..len-2, and the entropies of softmax(z/T)."""
    z = seq_logits(model, ids)[:-1] / temperature
    lsm = torch.log_softmax(z, dim=-1)
    lp = lsm.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    ent = -(lsm.exp() * lsm).sum(-1)
    return lp, ent


def probe_indices(n):
    stride = max(1, n // 48)
    return list(range(0, n, stride))


def weight_probe(model):
    out = {}
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        out[name] = [float(flat[i]) for i in probe_indices(flat.numel())]
    return out


def global_norm(params):
    return math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in params if p.grad is not None))


# ---------------------------------------------------------------- SFT

def make_sft_batches(gen, n_batches=24, per_batch=4):
    """Random sequences: prompt, then think tokens ending in THINK_END, result tokens, IM_END.
    Batch 3 has no think segment at all (α must then drop out of the loss); some sequences in
    other batches have none either."""
    batches = []
    for b in range(n_batches):
        seqs, pls = [], []
        for s in range(per_batch):
            r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=gen))
            prompt = torch.randint(0, 378, (r(4, 10),), generator=gen).tolist()
            think = torch.randint(0, 378, (r(2, 9),), generator=gen).tolist() + [THINK_END]
            result = torch.randint(0, 378, (r(3, 12),), generator=gen).tolist() + [IM_END]
            no_think = b == 3 or (b + s) % 5 == 4
            seqs.append(prompt + ([] if no_think else think) + result)
            pls.append(len(prompt))
        batches.append({"seqs": seqs, "prompt_lens": pls})
    return batches


def segment_rows(ids, pl):
    """Rows (logp index j predicts token j+1) of the think and result segments."""
    end = len(ids)
    close = next((j for j in range(pl, end) if ids[j] == THINK_END), None)
    if close is None:
        return range(pl - 1, pl - 1), range(pl - 1, end - 1)
    return range(pl - 1, close), range(close, end - 1)


def sft_loss(model, batch, mode, alpha_logit, alpha_fixed):
    """SPEC §4. Returns (loss, alpha used, L_think, L_result)."""
    think_means, result_means, all_nll = [], [], []
    for ids, pl in zip(batch["seqs"], batch["prompt_lens"]):
        lp, _ = token_logp(model, ids)
        tr, rr = segment_rows(ids, pl)
        if len(tr):
            think_means.append(-lp[tr.start:tr.stop].mean())
        result_means.append(-lp[rr.start:rr.stop].mean())
        all_nll.append(-lp[pl - 1:len(ids) - 1])
    l_result = torch.stack(result_means).mean()
    l_think = torch.stack(think_means).mean() if think_means else torch.zeros(())
    if mode == "plain":
        nll = torch.cat(all_nll)
        n_think = sum(len(segment_rows(i, p)[0]) for i, p in zip(batch["seqs"], batch["prompt_lens"]))
        return nll.mean(), n_think / nll.numel(), l_think, l_result
    if not think_means:
        # No think token in the batch: the loss is L_result alone and does not depend on α
        # (0·logit keeps a zero gradient so AdamW still steps the α logit, like every parameter).
        return l_result + 0.0 * alpha_logit, 0.0, l_think, l_result
    if mode == "fixed":
        a = torch.tensor(alpha_fixed)
    elif mode == "learnable":
        a = torch.sigmoid(alpha_logit)
    else:  # loss-ratio, detached
        a = (l_result / (l_think + l_result)).detach()
    return a * l_think + (1 - a) * l_result, float(a), l_think, l_result


def run_sft(mode, batches, cfg):
    model = load_model()
    alpha_logit = torch.nn.Parameter(torch.tensor(math.log(cfg["alpha"] / (1 - cfg["alpha"]))))
    opt = torch.optim.AdamW([
        {"params": list(model.parameters()), "weight_decay": cfg["weight_decay"]},
        {"params": [alpha_logit], "weight_decay": 0.0},
    ], lr=cfg["lr"], betas=(0.9, 0.999), eps=1e-8)
    rec = {"loss": [], "grad_norm": [], "alpha": [], "l_think": [], "l_result": [], "alpha_after": []}
    params = list(model.parameters())
    for step in range(1, cfg["steps"] + 1):
        lr = lr_at(step, cfg["lr"], cfg["warmup"], cfg["steps"], cfg["min_ratio"])
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=False)
        batch = batches[(step - 1) % len(batches)]
        loss, a, lt, lr_ = sft_loss(model, batch, mode, alpha_logit, cfg["alpha"])
        loss.backward()
        rec["grad_norm"].append(global_norm(params))
        torch.nn.utils.clip_grad_norm_(params, cfg["max_grad_norm"])
        if mode != "learnable":
            alpha_logit.grad = None  # not a parameter of this run
        opt.step()
        rec["loss"].append(float(loss))
        rec["alpha"].append(a)
        rec["l_think"].append(float(lt))
        rec["l_result"].append(float(lr_))
        rec["alpha_after"].append(float(torch.sigmoid(alpha_logit)))
        if step == 10:
            rec["weights_step10"] = weight_probe(model)
    rec["weights_final"] = weight_probe(model)
    return rec


# ---------------------------------------------------------------- GRPO

def make_rollouts(gen, steps, prompts, group):
    """Per step: `prompts` prompts × `group` completions (think ending in THINK_END, then a
    result ending in IM_END; a few without think), binary rewards; group 0 of step 2 all equal."""
    out = []
    for s in range(steps):
        seqs, pls, tls, rewards = [], [], [], []
        for p in range(prompts):
            r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=gen))
            prompt = torch.randint(0, 378, (r(4, 8),), generator=gen).tolist()
            for i in range(group):
                think = torch.randint(0, 378, (r(1, 7),), generator=gen).tolist() + [THINK_END]
                result = torch.randint(0, 378, (r(2, 9),), generator=gen).tolist() + [IM_END]
                if (s + p + i) % 7 == 3:
                    think = []
                seqs.append(prompt + think + result)
                pls.append(len(prompt))
                tls.append(len(think))
                rewards.append(float(torch.rand(1, generator=gen) < 0.5))
        if s == 2:
            rewards[:group] = [1.0] * group
        out.append({"seqs": seqs, "prompt_lens": pls, "think_lens": tls, "rewards": rewards})
    return out


def advantages(rewards, h_seq, g, lam, ent_alpha):
    """SPEC §3.2-3.4 (group scale): A = (r - mean)/(std_unbiased + 1e-6), ψ = min(λH, |A|/α)."""
    raw, adv = [], []
    for k in range(0, len(rewards), g):
        grp = torch.tensor(rewards[k:k + g], dtype=torch.float64)
        std = grp.std(unbiased=True) if g > 1 else torch.tensor(0.0, dtype=torch.float64)
        a = (grp - grp.mean()) / (std + 1e-6)
        for j in range(g):
            psi = min(lam * h_seq[k + j], abs(float(a[j])) / ent_alpha)
            raw.append(float(a[j]))
            adv.append(float(a[j]) + psi)
    return raw, adv


def grpo_loss(logps, old, ref, adv_tok, think_lens, cfg, agg):
    """Σ w·(−min(ρA, clip(ρ)A) + β·k3) with the aggregation weights of SPEC §3.7, in float64."""
    n = len(logps)
    total = sum(len(x) for x in logps)
    loss = torch.zeros((), dtype=torch.float64)
    for i in range(n):
        lp = logps[i].double()
        rho = torch.exp(lp - old[i].double())
        a = adv_tok[i]
        per = -torch.minimum(rho * a, torch.clamp(rho, 1 - cfg["eps_low"], 1 + cfg["eps_high"]) * a)
        d = ref[i].double() - lp
        per = per + cfg["beta"] * (torch.exp(d) - d - 1)
        m = len(lp)
        tl = think_lens[i]
        if agg == "token-mean":
            w = torch.full((m,), 1.0 / total, dtype=torch.float64)
        elif agg == "seq-mean":
            w = torch.full((m,), 1.0 / (m * n), dtype=torch.float64)
        else:
            sa = cfg["srml_alpha"]
            w = torch.zeros(m, dtype=torch.float64)
            # A sequence with no think segment gives its result tokens the whole weight.
            if tl > 0:
                w[:tl] = sa / (tl * n)
                w[tl:] = (1 - sa) / ((m - tl) * n)
            else:
                w[:] = 1.0 / (m * n)
        loss = loss + (w * per).sum()
    return loss


def completion_logps(model, seqs, pls, temperature):
    lps, ents = [], []
    for ids, pl in zip(seqs, pls):
        lp, ent = token_logp(model, ids, temperature)
        lps.append(lp[pl - 1:])
        ents.append(ent[pl - 1:])
    return lps, ents


def run_grpo(agg, granularity, rollouts, cfg):
    model = load_model()
    reference = load_model()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=cfg["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg["weight_decay"])
    rec = {"loss": [], "grad_norm": []}
    T = cfg["temperature"]
    for step, ro in enumerate(rollouts, start=1):
        lr = lr_at(step, cfg["lr"], cfg["warmup"], len(rollouts), cfg["min_ratio"])
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.no_grad():
            old, ent = completion_logps(model, ro["seqs"], ro["prompt_lens"], T)
            ref, _ = completion_logps(reference, ro["seqs"], ro["prompt_lens"], T)
        tls = ro["think_lens"]
        h_seq = [float(e[:tl].mean()) if tl > 0 else 0.0 for e, tl in zip(ent, tls)]
        raw, adv = advantages(ro["rewards"], h_seq if granularity == "response" else [0.0] * len(tls), cfg["group_size"], cfg["entropy_lambda"], cfg["entropy_alpha"])
        adv_tok = []
        for i, (e, tl) in enumerate(zip(ent, tls)):
            if granularity == "response":
                adv_tok.append(torch.full((len(e),), adv[i], dtype=torch.float64))
            else:
                a = raw[i]
                t = torch.full((len(e),), a, dtype=torch.float64)
                for j in range(tl):
                    t[j] = a + min(cfg["entropy_lambda"] * float(e[j]), abs(a) / cfg["entropy_alpha"])
                adv_tok.append(t)
        # fcgpu keeps advantages in f32
        adv_tok = [t.float().double() for t in adv_tok]
        for _ in range(cfg["ppo_epochs"]):
            opt.zero_grad(set_to_none=False)
            lps, _ = completion_logps(model, ro["seqs"], ro["prompt_lens"], T)
            loss = grpo_loss(lps, old, ref, adv_tok, tls, cfg, agg)
            loss.backward()
            rec["grad_norm"].append(global_norm(params))
            torch.nn.utils.clip_grad_norm_(params, cfg["max_grad_norm"])
            opt.step()
            rec["loss"].append(float(loss))
        if step == 5:
            rec["weights_step5"] = weight_probe(model)
    rec["weights_final"] = weight_probe(model)
    return rec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/trajectory")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    gen = torch.Generator().manual_seed(2026)

    sft_cfg = {"model": MODEL, "think_end": THINK_END, "steps": 100, "lr": 3e-3, "warmup": 10, "min_ratio": 0.1,
               "weight_decay": 0.01, "max_grad_norm": 1.0, "alpha": 0.7}
    batches = make_sft_batches(gen)
    sft = dict(sft_cfg, batches=batches, runs={})
    for mode in ["plain", "fixed", "learnable", "loss-ratio"]:
        sft["runs"][mode] = run_sft(mode, batches, sft_cfg)
        r = sft["runs"][mode]
        print(f"sft {mode}: loss {r['loss'][0]:.4f} -> {r['loss'][-1]:.4f}, grad norm {r['grad_norm'][0]:.3f} -> {r['grad_norm'][-1]:.3f}")
    with open(os.path.join(args.out, "sft.json"), "w") as f:
        json.dump(sft, f, separators=(",", ":"))

    grpo_cfg = {"model": MODEL, "steps": 10, "lr": 1e-3, "warmup": 2, "min_ratio": 0.1, "weight_decay": 0.01,
                "max_grad_norm": 1.0, "temperature": 0.8, "group_size": 4, "prompts_per_step": 2,
                "eps_low": 0.2, "eps_high": 0.28, "beta": 0.05, "entropy_lambda": 0.4, "entropy_alpha": 2.0,
                "srml_alpha": 0.5, "ppo_epochs": 2, "micro_batch": 3}
    rollouts = make_rollouts(gen, grpo_cfg["steps"], grpo_cfg["prompts_per_step"], grpo_cfg["group_size"])
    grpo = dict(grpo_cfg, rollouts=rollouts, runs={})
    for agg, gran in [("srml", "response"), ("token-mean", "response"), ("seq-mean", "response"), ("srml", "token")]:
        key = f"{agg}/{gran}"
        grpo["runs"][key] = run_grpo(agg, gran, rollouts, grpo_cfg)
        r = grpo["runs"][key]
        print(f"grpo {key}: loss {r['loss'][0]:.5f} -> {r['loss'][-1]:.5f}, grad norm {r['grad_norm'][0]:.4f} -> {r['grad_norm'][-1]:.4f}")
    with open(os.path.join(args.out, "grpo.json"), "w") as f:
        json.dump(grpo, f, separators=(",", ":"))


if __name__ == "__main__":
    main()
