#!/usr/bin/env python3
"""PEFT references for fcgpu's LoRA adapters (issue 29), read by tests/lora_parity.rs.

transformers + peft compute, from the same checkpoints and adapters fcgpu loads:
  * tiny (tests/fixtures/models/qwen2-tiny): a rank-4 adapter on all seven projections (alpha 8)
    made by `get_peft_model` (PEFT's own init: A Kaiming-uniform, B zero), its B then set to
    seeded noise so it changes the output, written by PEFT's `save_pretrained` (fcgpu reads these
    files as a user would): float64 log-probs of 3 sequences with the adapter, the mean NLL over
    their predicted tokens, and that loss's float64 gradient of every lora_A / lora_B;
  * a 50-step LoRA SFT (rank 4, alpha 8, dropout 0, AdamW on the adapters only, clipping by
    their global norm, the trajectory harness's schedule and plain loss: its functions are
    imported from tools/make_trajectory_reference.py) from PEFT's untouched init (B zero), the
    init also written by `save_pretrained`: per-step loss and pre-clip gradient norm, and the
    final adapter weights; float32 as the trajectory harness;
  * real (SmolLM2-135M, the converted model the tests run on, given by --real-model): float64
    log-probs of 3 sequences of tests/fixtures/real/smollm2/logprobs.safetensors without and with
    a rank-4 adapter on all seven projections whose entries follow a formula (so nothing large
    is committed: tests/lora_parity.rs builds the same adapter), alpha 8.

float64 as tools/make_reference.py does it (`patch_f64`: RMSNorm, RoPE and eager softmax in
float64; stock transformers computes those in float32 even in a float64 model).

Writes tests/fixtures/lora/{qwen2-tiny-r4,qwen2-tiny-r4-init}/ (PEFT's two files each),
tests/fixtures/lora/reference.safetensors, tests/fixtures/lora/sft.json and
tests/fixtures/real/smollm2/lora-logprobs.safetensors (--real-model only).

RUN (repository root; a scratch venv with torch, transformers 5.x and peft, CPU only):
    VENV/bin/python tools/make_lora_reference.py --real-model ~/.cache/fcgpu/models/smollm2-135m
"""
import argparse
import json
import os
import sys

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_trajectory_reference as T  # noqa: E402  (schedule, batches, plain SFT loss, norms)
from make_reference import patch_f64  # noqa: E402  (the float64 patches, shared)

TINY = "tests/fixtures/models/qwen2-tiny"
OUT = "tests/fixtures/lora"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 4, 8.0


def log(*a):
    print(*a, flush=True)


def lora_config():
    return LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS,
                      task_type="CAUSAL_LM", bias="none")


def base(path, dtype):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")


def fcgpu_name(peft_name):
    """PEFT's parameter name in memory -> its name in adapter_model.safetensors."""
    return peft_name.replace(".default", "")


def make_adapters():
    """PEFT's init (saved as the SFT start), then B set to noise (saved as the parity adapter)."""
    torch.manual_seed(29)
    pm = get_peft_model(base(TINY, torch.float32), lora_config())
    pm.save_pretrained(os.path.join(OUT, "qwen2-tiny-r4-init"))
    g = torch.Generator().manual_seed(2929)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(os.path.join(OUT, "qwen2-tiny-r4"))
    for d in ("qwen2-tiny-r4-init", "qwen2-tiny-r4"):
        os.remove(os.path.join(OUT, d, "README.md"))  # PEFT's model card template


def f64_peft(base_path, adapter_dir):
    """The base in float64 with the adapter loaded by PeftModel.from_pretrained, every op f64."""
    m = PeftModel.from_pretrained(base(base_path, torch.float32), adapter_dir, is_trainable=True).double()
    for n, p in m.named_parameters():
        assert p.dtype == torch.float64, n
    restore, _ = patch_f64(m)
    return m, restore


def seq_logprobs(model, seqs):
    out = []
    for ids in seqs:
        z = model(input_ids=torch.tensor([ids])).logits[0][:-1]
        lsm = torch.log_softmax(z, dim=-1)
        out.append(lsm.gather(1, torch.tensor(ids[1:])[:, None])[:, 0])
    return out


def tiny_reference():
    g = torch.Generator().manual_seed(7)
    seqs = [torch.randint(0, 384, (n,), generator=g).tolist() for n in (23, 9, 41)]
    m, restore = f64_peft(TINY, os.path.join(OUT, "qwen2-tiny-r4"))
    try:
        lps = seq_logprobs(m, seqs)
        loss = -torch.cat(lps).mean()
        loss.backward()
    finally:
        restore()
    t = {"loss": loss.detach().reshape(())}
    for i, (s, lp) in enumerate(zip(seqs, lps)):
        t[f"input_ids.{i}"] = torch.tensor(s, dtype=torch.int64)
        t[f"logprobs.{i}"] = lp.detach()
    n = 0
    for name, p in m.named_parameters():
        if "lora_" in name:
            t[f"grad.{fcgpu_name(name)}"] = p.grad.detach().clone()
            n += 1
    assert n == 2 * 7 * 2, n
    log(f"tiny: loss {float(loss):.6f}, {n} adapter gradients")
    save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(OUT, "reference.safetensors"),
              metadata={"peft": peft.__version__, "transformers": transformers.__version__, "torch": torch.__version__})


def sft_reference():
    """50 steps of LoRA SFT the PyTorch way: AdamW on the adapter parameters only."""
    cfg = {"model": TINY, "adapter": os.path.join(OUT, "qwen2-tiny-r4-init"), "think_end": T.THINK_END,
           "steps": 50, "lr": 5e-3, "warmup": 5, "min_ratio": 0.1, "weight_decay": 0.01, "max_grad_norm": 1.0}
    batches = T.make_sft_batches(torch.Generator().manual_seed(2029), n_batches=12)
    torch.manual_seed(0)
    m = PeftModel.from_pretrained(base(TINY, torch.float32), cfg["adapter"], is_trainable=True)
    m.train()
    params = [p for p in m.parameters() if p.requires_grad]
    names = [fcgpu_name(n) for n, p in m.named_parameters() if p.requires_grad]
    assert len(params) == 28 and all("lora_" in n for n in names), names
    opt = torch.optim.AdamW(params, lr=cfg["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg["weight_decay"])
    rec = {"loss": [], "grad_norm": []}
    for step in range(1, cfg["steps"] + 1):
        lr = T.lr_at(step, cfg["lr"], cfg["warmup"], cfg["steps"], cfg["min_ratio"])
        for grp in opt.param_groups:
            grp["lr"] = lr
        opt.zero_grad(set_to_none=False)
        loss, _, _, _ = T.sft_loss(m, batches[(step - 1) % len(batches)], "plain", None, 0.5)
        loss.backward()
        rec["grad_norm"].append(T.global_norm(params))
        torch.nn.utils.clip_grad_norm_(params, cfg["max_grad_norm"])
        opt.step()
        rec["loss"].append(float(loss))
    rec["weights_final"] = {n: p.detach().reshape(-1).tolist() for n, p in zip(names, params)}
    log(f"sft: loss {rec['loss'][0]:.4f} -> {rec['loss'][-1]:.4f}, grad norm {rec['grad_norm'][0]:.4f} -> {rec['grad_norm'][-1]:.4f}")
    with open(os.path.join(OUT, "sft.json"), "w") as f:
        json.dump(dict(cfg, batches=batches, run=rec), f, separators=(",", ":"))


def formula_adapter(cfg):
    """The real-model adapter, entry by entry (tests/lora_parity.rs has the same formula): for
    layer l and target t (index in TARGETS), A[i][j] = ((31i + 17j + 7l + 3t) mod 23 − 11)/512,
    B[i][j] = ((13i + 29j + 5l + t) mod 19 − 9)/1024. Exact in float32."""
    h, kv = cfg.hidden_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    inter = cfg.intermediate_size
    shapes = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
              "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}
    out = {}
    for layer in range(cfg.num_hidden_layers):
        for t, name in enumerate(TARGETS):
            o, i = shapes[name]
            part = "self_attn" if name in TARGETS[:4] else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{name}"
            ii, jj = torch.meshgrid(torch.arange(RANK), torch.arange(i), indexing="ij")
            out[f"{key}.lora_A.weight"] = (((31 * ii + 17 * jj + 7 * layer + 3 * t) % 23) - 11).double() / 512
            ii, jj = torch.meshgrid(torch.arange(o), torch.arange(RANK), indexing="ij")
            out[f"{key}.lora_B.weight"] = (((13 * ii + 29 * jj + 5 * layer + t) % 19) - 9).double() / 1024
    return out


def real_reference(model_dir, tmp):
    src = "tests/fixtures/real/smollm2/logprobs.safetensors"
    with safe_open(src, "pt") as f:
        seqs = [f.get_tensor(f"input_ids.{i}").tolist() for i in (0, 3, 6)]
    b = base(model_dir, torch.float32)
    pm = get_peft_model(b, lora_config())
    pm.save_pretrained(tmp)  # the config; the weights are replaced by the formula's next
    save_file({k: v.float() for k, v in formula_adapter(b.config).items()}, os.path.join(tmp, "adapter_model.safetensors"))
    t = {}
    m, restore = f64_peft(model_dir, tmp)
    try:
        with torch.no_grad():
            on = seq_logprobs(m, seqs)
            with m.disable_adapter():
                off = seq_logprobs(m, seqs)
    finally:
        restore()
    for i, s in enumerate(seqs):
        t[f"input_ids.{i}"] = torch.tensor(s, dtype=torch.int32)
        t[f"logprobs.{i}"] = on[i].float()
        t[f"base_logprobs.{i}"] = off[i].float()
    moved = max(float((a - b).abs().max()) for a, b in zip(on, off))
    assert moved > 1e-2, f"the formula adapter barely changes the model ({moved})"
    log(f"real: {[len(s) for s in seqs]} tokens, adapter moves log-probs by up to {moved:.3f}")
    save_file(t, "tests/fixtures/real/smollm2/lora-logprobs.safetensors",
              metadata={"peft": peft.__version__, "transformers": transformers.__version__, "rank": str(RANK), "alpha": str(ALPHA)})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--real-model", help="the converted SmolLM2-135M directory the tests run on")
    a = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    os.makedirs(OUT, exist_ok=True)
    make_adapters()
    tiny_reference()
    sft_reference()
    if a.real_model:
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            real_reference(a.real_model, tmp)


if __name__ == "__main__":
    main()
