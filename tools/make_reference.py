#!/usr/bin/env python3
"""Make the tiny reference models and their reference outputs under tests/fixtures/models/.

SETUP (venvs live outside the repo; CPU only, nothing is downloaded at fixture-making time except
the pip packages themselves):

    python3 -m venv /work/venvs/ref4 && /work/venvs/ref4/bin/pip install -r tools/requirements-ref4.txt
    python3 -m venv /work/venvs/ref5 && /work/venvs/ref5/bin/pip install -r tools/requirements-ref5.txt

  (torch from PyPI pulls the nvidia-* CUDA wheels: `import torch` fails without them even on CPU,
  because libtorch_cuda.so links them; ~3 GB of wheels, install takes ~2 minutes.)

RUN (from the repository root):

    /work/venvs/ref4/bin/python tools/make_reference.py --out tests/fixtures/models   # transformers 4.x models
    /work/venvs/ref5/bin/python tools/make_reference.py --out tests/fixtures/models   # transformers 5.x models
    ... --models qwen2-tiny,qwen3-tiny     # only some models (each must match the installed major version)
    ... --verify                           # write nothing; reload + re-check every fixture dir

By default every model whose `tf` major version matches the installed transformers is (re)built.
Everything is seeded: re-running with the same package versions gives byte-identical files.
See tests/fixtures/README.md for the layout of every file.

How the references are computed
  * Models are built with `from_config`, then EVERY parameter is perturbed with seeded noise
    (norm weights around 1 but not 1, biases non-zero, projections re-scaled), cast to the
    storage dtype and written with `save_pretrained` (bf16 rounding happens there).
  * Logprobs / entropy / logits / loss / grads are computed from the SAVED files, loaded in f32
    and converted with `.double()`, eager attention.  Stock transformers silently drops to f32
    in three places even in a float64 model (RMSNorm casts to f32, eager attention's softmax is
    computed in f32, RoPE cos/sin are computed in f32); for the references those three are
    replaced on the model instance by float64 versions with the same formulas (inv_freq is
    recomputed in f64 from the config and checked against transformers' f32 inv_freq), so the
    references are true float64.  The unpatched f64 forward is also run and the max difference
    is reported (it is ~1e-7, i.e. the f32 round-off of the stock code).
  * Gradients are checked against central finite differences on a few entries.
  * Greedy generation uses the stock f32 model (no patches), eager attention, a neutral
    generation config (no repetition penalty etc.) and NO eos (runs exactly max_new_tokens); it is
    checked against a manual argmax loop, and against an f64 argmax loop (ties/near-ties warned).
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import types

import torch
import torch.nn.functional as F

import transformers
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast
from safetensors.torch import save_file, load_file

TF_MAJOR = int(transformers.__version__.split(".")[0])

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen2's pre-tokenizer split regex (same as in Qwen2/2.5/3 tokenizer.json).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CORPUS = r'''
The quick brown fox jumps over the lazy dog. A function call names a tool and passes its arguments.
When the user asks for the weather in Paris, the assistant calls get_weather with the city and the unit.
Models learn to call functions reliably when the reward checks every argument, its type and its value.
<|im_start|>system
You are a helpful assistant. You can call the functions listed below.<|im_end|>
<|im_start|>user
What is the weather like in Berlin today, in celsius?<|im_end|>
<|im_start|>assistant
{"name": "get_weather", "arguments": {"location": "Berlin, Germany", "unit": "celsius"}}<|im_end|>
[{"name": "search_flights", "arguments": {"origin": "SFO", "destination": "JFK", "date": "2024-05-17", "passengers": 2}}]
[{"name": "calculate_area", "parameters": {"shape": "circle", "radius": 4.5}}, {"name": "convert", "parameters": {"value": 12, "from": "km", "to": "mi"}}]
{"type": "function", "function": {"name": "send_email", "description": "Send an email to a recipient.",
 "parameters": {"type": "object", "properties": {"to": {"type": "string"}, "subject": {"type": "string"},
 "body": {"type": "string"}}, "required": ["to", "subject"]}}}
def get_weather(location: str, unit: str = "celsius") -> dict:
    """Return the current weather for a location."""
    if unit not in ("celsius", "fahrenheit"):
        raise ValueError(f"bad unit: {unit}")
    return {"location": location, "temperature": 21.5, "unit": unit}

for i in range(10):
    total += values[i] * weights[i]
print(json.dumps(result, indent=2))

fn softmax(xs: &mut [f32]) {
    let max = xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for x in xs.iter_mut() { *x = (*x - max).exp(); sum += *x; }
    for x in xs.iter_mut() { *x /= sum; }
}
SELECT name, price FROM products WHERE price > 100 ORDER BY price DESC LIMIT 5;
In 2023, the numbers were 1, 2, 3, 42, 3.14159, 1e-5 and 65536; the total was 123456789.
Le café est très bon à Paris. Größe, Straße, naïve façade, coöperate. 東京は日本の首都です。 Привет, мир!
Emoji and symbols: ✓ → ≤ ≥ ± € £ ¥ © ™ 😀 🚀
'''

TEXTS = [
    'Call get_weather with {"location": "Paris", "unit": "celsius"}.',
    "def add(a, b):\n    return a + b  # simple\n",
    "Größe: 42 € — naïve café, 東京 😀",
]

CHAT_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the weather in Paris?"},
]

# ---------------------------------------------------------------------------------------------
# Model specs. Keys: arch, tf (transformers major version that writes it), dtype (storage),
# tied, shard (max_shard_size or None), and the config numbers.
MODELS = {
    "qwen2-tiny": dict(
        arch="qwen2", tf=4, dtype="float32", tied=True, shard=None, seed=1001,
        vocab=384, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=None, inter=128,
        rope_theta=10000.0, rope_scaling=None, eps=1e-6, max_pos=512),
    "qwen3-tiny": dict(
        arch="qwen3", tf=4, dtype="float32", tied=False, shard=None, seed=1002,
        vocab=384, hidden=48, layers=2, heads=4, kv_heads=2, head_dim=16, inter=96,
        rope_theta=1000000.0, rope_scaling=None, eps=1e-6, max_pos=512),
    "llama-tiny-bf16": dict(
        arch="llama", tf=4, dtype="bfloat16", tied=False, shard="100KB", seed=1003,
        vocab=384, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=None, inter=128,
        rope_theta=50000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        eps=1e-5, max_pos=256),
    "qwen2-tiny-bf16-untied": dict(
        arch="qwen2", tf=4, dtype="bfloat16", tied=False, shard=None, seed=1004, legacy_torch_dtype=True,
        vocab=384, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=None, inter=64,
        rope_theta=10000.0, rope_scaling=None, eps=1e-6, max_pos=512),
    "qwen2-tiny-tf5": dict(
        arch="qwen2", tf=5, dtype="float32", tied=False, shard=None, seed=1005,
        vocab=384, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=None, inter=64,
        rope_theta=10000.0, rope_scaling=None, eps=1e-6, max_pos=512),
    "llama-tiny-tf5": dict(
        arch="llama", tf=5, dtype="float32", tied=True, shard=None, seed=1006,
        vocab=384, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=None, inter=64,
        rope_theta=50000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        eps=1e-5, max_pos=256),
}

SEQ_LENS = [1, 7, 19]
GEN_PROMPT_LENS = [1, 5, 11]
MAX_NEW = 12
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def log(*a):
    print(*a, flush=True)


# ---------------------------------------------------------------------------------------------
# Tokenizer
def train_tokenizer(vocab_size):
    """Byte-level BPE, Qwen2-style pre-tokenizer; base vocab = vocab_size - 3 - 3 (a few spare
    model rows stay unused by the tokenizer), then the 3 special tokens appended."""
    from tokenizers import Tokenizer, AddedToken, Regex, decoders, models, normalizers
    from tokenizers import pre_tokenizers, processors, trainers

    base = vocab_size - len(SPECIAL_TOKENS) - 3
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=base, min_frequency=2, show_progress=False, special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [line for line in CORPUS.split("\n") if line] + TEXTS
    # Train on the corpus several times with variations so merges are not all tied counts.
    tok.train_from_iterator(corpus * 3 + [c.lower() for c in corpus], trainer=trainer)
    assert tok.get_vocab_size() == base, (tok.get_vocab_size(), base)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    assert ids["<|endoftext|>"] == base, ids
    return tok, ids


def make_hf_tokenizer(tok, arch):
    kw = dict(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
              unk_token=None, model_max_length=32768, clean_up_tokenization_spaces=False)
    if arch == "llama":
        kw["bos_token"] = "<|endoftext|>"
    else:
        kw["bos_token"] = None
    hf = PreTrainedTokenizerFast(**kw)
    try:
        hf.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    except Exception:  # transformers 5 may name this differently; not essential
        pass
    hf.chat_template = CHAT_TEMPLATE
    return hf


# ---------------------------------------------------------------------------------------------
# Config / model
def make_config(spec, ids):
    arch = spec["arch"]
    eot, im_end = ids["<|endoftext|>"], ids["<|im_end|>"]
    kw = dict(
        vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec["inter"],
        num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv_heads"], max_position_embeddings=spec["max_pos"],
        rms_norm_eps=spec["eps"], tie_word_embeddings=spec["tied"], hidden_act="silu",
        initializer_range=0.02, use_cache=True, attention_dropout=0.0,
    )
    if spec["head_dim"] is not None:
        kw["head_dim"] = spec["head_dim"]
    if arch == "llama":
        kw.update(bos_token_id=eot, eos_token_id=[im_end, eot], pad_token_id=None,
                  attention_bias=False, mlp_bias=False)
    else:
        kw.update(bos_token_id=eot, eos_token_id=im_end, pad_token_id=eot)
        if arch == "qwen3":
            kw.update(attention_bias=False)
    if TF_MAJOR >= 5:
        rp = {"rope_type": "default", "rope_theta": spec["rope_theta"]}
        if spec["rope_scaling"]:
            rp = dict(spec["rope_scaling"], rope_theta=spec["rope_theta"])
        kw["rope_parameters"] = rp
        kw["dtype"] = spec["dtype"]
    else:
        kw["rope_theta"] = spec["rope_theta"]
        kw["rope_scaling"] = dict(spec["rope_scaling"]) if spec["rope_scaling"] else None
        kw["torch_dtype"] = spec["dtype"]
    if arch == "qwen2":
        from transformers import Qwen2Config as C
    elif arch == "qwen3":
        from transformers import Qwen3Config as C
    else:
        from transformers import LlamaConfig as C
    return C(**kw)


def perturb_(model, seed):
    """Seeded noise on EVERY parameter (in named_parameters order, tied ones once)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("norm.weight"):           # RMSNorm gains: around 1, spread 0.25
                p.copy_(1.0 + 0.25 * noise)
            elif name.endswith(".bias"):                # q/k/v biases
                p.copy_(0.3 * noise)
            elif "embed_tokens" in name:                # embeddings ~ N(0, 0.3^2) (also the tied lm_head)
                p.copy_(p + 0.3 * noise)
            elif name == "lm_head.weight":
                p.copy_(p + noise * (2.0 / math.sqrt(p.shape[1])))
            else:                                        # projections ~ N(0, 1/fan_in) * 1.2
                p.copy_(p + noise * (1.2 / math.sqrt(p.shape[1])))


def load_model(path, dtype, attn="eager"):
    newer = tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 56)
    kw = {"dtype": dtype} if newer else {"torch_dtype": dtype}
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, **kw)


# ---------------------------------------------------------------------------------------------
# float64 patches (instance-level for norms / rotary, module-global for eager attention)
def _rms_forward_native(self, hidden_states):
    dt = hidden_states.dtype if hidden_states.dtype == torch.float64 else torch.float32
    x = hidden_states.to(dt)
    var = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(var + self.variance_epsilon)
    return self.weight * x.to(hidden_states.dtype)


def rope_inv_freq_f64(cfg):
    """inv_freq in float64 from the config (default and llama3 rope types)."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if getattr(cfg, "rope_parameters", None):
        rp = dict(cfg.rope_parameters)
        theta = rp["rope_theta"]
        rtype = rp.get("rope_type", "default")
    else:
        rp = dict(cfg.rope_scaling or {})
        theta = cfg.rope_theta
        rtype = rp.get("rope_type", rp.get("type", "default")) if rp else "default"
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if rtype == "default":
        return inv
    assert rtype == "llama3", rtype
    factor, lo, hi = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"]
    old = rp["original_max_position_embeddings"]
    lo_w, hi_w = old / lo, old / hi
    wl = 2 * math.pi / inv
    out = torch.where(wl > lo_w, inv / factor, inv)
    smooth = (old / wl - lo) / (hi - lo)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = ~(wl < hi_w) & ~(wl > lo_w)
    return torch.where(medium, smoothed, out)


def _make_rotary_forward_f64(inv_f64):
    def fwd(self, x, position_ids):
        with torch.no_grad():
            freqs = position_ids.to(torch.float64)[:, :, None] * inv_f64[None, None, :].to(x.device)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos = emb.cos() * self.attention_scaling
            sin = emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)
    return fwd


def _eager_attention_native(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' eager attention with the softmax in the input dtype (f64 stays f64)."""
    from transformers.models.llama.modeling_llama import repeat_kv
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    w = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            w = w.masked_fill(~attention_mask[:, :, :, : key_states.shape[-2]], float("-inf"))
        else:
            w = w + attention_mask[:, :, :, : key_states.shape[-2]]
    sm_dt = torch.float64 if query.dtype == torch.float64 else torch.float32
    w = F.softmax(w, dim=-1, dtype=sm_dt).to(query.dtype)
    w = F.dropout(w, p=dropout, training=module.training)
    out = torch.matmul(w, value_states).transpose(1, 2).contiguous()
    return out, w


def patch_f64(model):
    """Make a .double() model truly float64. Returns (restore_fn, inv_freq_f64)."""
    n_norm = n_rot = 0
    inv64 = rope_inv_freq_f64(model.config)
    for name, m in model.named_modules():
        cls = type(m).__name__
        if cls.endswith("RMSNorm"):
            m.forward = types.MethodType(_rms_forward_native, m)
            n_norm += 1
        elif cls.endswith("RotaryEmbedding"):
            hf_inv = m.inv_freq.to(torch.float64)
            rel = ((hf_inv - inv64).abs() / inv64.abs()).max().item()
            assert rel < 1e-6, f"inv_freq mismatch vs transformers: rel {rel}"
            assert float(m.attention_scaling) == 1.0, m.attention_scaling
            m.forward = types.MethodType(_make_rotary_forward_f64(inv64), m)
            n_rot += 1
    assert n_norm >= 2 * model.config.num_hidden_layers + 1 and n_rot >= 1, (n_norm, n_rot)
    mods = {sys.modules[type(m).__module__] for m in model.modules()
            if hasattr(sys.modules[type(m).__module__], "eager_attention_forward")}
    assert mods, "no eager_attention_forward found"
    saved = {mod: mod.eager_attention_forward for mod in mods}
    for mod in mods:
        mod.eager_attention_forward = _eager_attention_native

    def restore():
        for mod, f in saved.items():
            mod.eager_attention_forward = f
    return restore, inv64


@contextlib.contextmanager
def f64_attention(restore):
    try:
        yield
    finally:
        restore()


# ---------------------------------------------------------------------------------------------
def choose_sequences(spec, ids, hf_tok, seed):
    V = spec["vocab"]
    forbid = {ids["<|endoftext|>"]}  # = pad_token_id / embedding padding_idx: keep it out of inputs
    g = torch.Generator().manual_seed(seed + 7)

    def rand_ids(n):
        out = []
        while len(out) < n:
            t = int(torch.randint(0, V, (1,), generator=g))
            if t not in forbid:
                out.append(t)
        return out

    text_ids = hf_tok.encode(TEXTS[0] + " " + TEXTS[1], add_special_tokens=False)
    seqs = [
        rand_ids(1),
        rand_ids(SEQ_LENS[1]),
        # realistic text, then <|im_end|> and the last model row (beyond the tokenizer vocab)
        [ids["<|im_start|>"]] + text_ids[: SEQ_LENS[2] - 3] + [ids["<|im_end|>"], V - 1],
    ]
    assert [len(s) for s in seqs] == SEQ_LENS, [len(s) for s in seqs]
    assert all(0 <= t < V and t not in forbid for s in seqs for t in s)
    t2 = hf_tok.encode(TEXTS[2] + " " + TEXTS[0], add_special_tokens=False)
    prompts = [t2[:GEN_PROMPT_LENS[0]], rand_ids(GEN_PROMPT_LENS[1]), t2[3:3 + GEN_PROMPT_LENS[2]]]
    assert [len(p) for p in prompts] == GEN_PROMPT_LENS
    return seqs, prompts


def forward_stats(model, seqs):
    """Returns per-seq (logits, logprobs, entropy) and the mean NLL over all predicted tokens."""
    outs, total, count = [], 0.0, 0
    for s in seqs:
        x = torch.tensor([s], dtype=torch.long)
        logits = model(input_ids=x, use_cache=False).logits[0]
        lsm = torch.log_softmax(logits, dim=-1)
        tgt = x[0, 1:]
        lp = lsm[:-1].gather(1, tgt[:, None])[:, 0]
        ent = -(lsm[:-1].exp() * lsm[:-1]).sum(-1)
        outs.append((logits, lp, ent))
        total = total + (-lp).sum()
        count += len(s) - 1
    return outs, total / count


def greedy_manual(model, prompt, n):
    """Argmax loop without cache; returns (tokens, min top1-top2 margin)."""
    ids = list(prompt)
    margins = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
            top = torch.topk(logits, 2).values
            margins.append(float(top[0] - top[1]))
            ids.append(int(logits.argmax()))
    return ids[len(prompt):], min(margins)


def neutral_gen_config(pad, bos):
    return GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=MAX_NEW, min_new_tokens=None,
                            eos_token_id=None, pad_token_id=pad, bos_token_id=bos,
                            repetition_penalty=1.0, use_cache=True)


def gen_config_to_save(spec, ids):
    eot, im_end = ids["<|endoftext|>"], ids["<|im_end|>"]
    if spec["arch"] == "llama":  # Llama-3-instruct style
        return GenerationConfig(bos_token_id=eot, eos_token_id=[im_end, eot], do_sample=True,
                                temperature=0.6, top_p=0.9)
    return GenerationConfig(bos_token_id=eot, eos_token_id=[im_end, eot], pad_token_id=eot,  # Qwen2.5 style
                            do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def build_one(name, spec, out_root):
    d = os.path.join(out_root, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    log(f"=== {name} ({spec['arch']}, {spec['dtype']}, tied={spec['tied']}, transformers {transformers.__version__})")

    # --- tokenizer
    tok, ids = train_tokenizer(spec["vocab"])
    hf_tok = make_hf_tokenizer(tok, spec["arch"])

    # --- model
    cfg = make_config(spec, ids)
    torch.manual_seed(spec["seed"])
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    model = model.float()
    perturb_(model, spec["seed"] + 1)
    model = model.to(DTYPES[spec["dtype"]])
    model.generation_config = gen_config_to_save(spec, ids)
    save_kw = {}
    if spec["shard"]:
        save_kw["max_shard_size"] = spec["shard"]
    model.save_pretrained(d, **save_kw)
    hf_tok.save_pretrained(d)
    del model
    if spec.get("legacy_torch_dtype"):
        # config.json as transformers < 4.56 wrote it (what most hub checkpoints have): the
        # storage dtype under "torch_dtype" instead of "dtype".
        p = os.path.join(d, "config.json")
        c = json.load(open(p))
        c = {("torch_dtype" if k == "dtype" else k): v for k, v in c.items()}
        with open(p, "w") as f:
            json.dump(c, f, indent=2, sort_keys=True)
            f.write("\n")

    # --- check the checkpoint
    files = sorted(os.listdir(d))
    st_files = [f for f in files if f.endswith(".safetensors")]
    ckpt = {}
    for f in st_files:
        ckpt.update(load_file(os.path.join(d, f)))
    if spec["shard"]:
        assert len(st_files) >= 2 and "model.safetensors.index.json" in files, files
    for k, v in ckpt.items():
        assert v.dtype == DTYPES[spec["dtype"]], (k, v.dtype)
    assert ("lm_head.weight" in ckpt) == (not spec["tied"]), sorted(ckpt)

    # --- f64 references from the saved files
    m64 = load_model(d, torch.float32).double().eval()
    pnames = [n for n, _ in m64.named_parameters()]
    assert set(pnames) == set(ckpt), (set(pnames) ^ set(ckpt))
    for n, p in m64.named_parameters():
        assert torch.equal(p.detach(), ckpt[n].double()), n
    for n, p in m64.named_parameters():
        if n.endswith("norm.weight") or n.endswith(".bias"):
            assert (p - (1.0 if n.endswith("norm.weight") else 0.0)).abs().min() > 0 or p.numel() > 0
    seqs, prompts = choose_sequences(spec, ids, hf_tok, spec["seed"])

    with torch.no_grad():  # stock transformers f64 (has f32 round-off inside) for the notes
        stock, stock_loss = forward_stats(m64, seqs)
    restore, inv64 = patch_f64(m64)
    with f64_attention(restore):
        outs, loss = forward_stats(m64, seqs)
        m64.zero_grad(set_to_none=True)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in m64.named_parameters()}
        stock_diff = max(float((a[1] - b[1].detach()).abs().max()) if a[1].numel() else 0.0 for a, b in zip(stock, outs))
        # finite-difference check of a few grad entries
        fd = []
        g = torch.Generator().manual_seed(spec["seed"] + 99)
        params = dict(m64.named_parameters())
        picks = [pnames[0], pnames[len(pnames) // 2], pnames[-1]] + [n for n in pnames if "norm" in n][:1] \
            + [n for n in pnames if n.endswith("bias")][:1]
        with torch.no_grad():
            for n in picks:
                p = params[n]
                flat = p.view(-1)
                if "embed_tokens" in n:   # pick a row that is used
                    row = seqs[2][3]
                    idx = row * p.shape[1] + int(torch.randint(0, p.shape[1], (1,), generator=g))
                else:
                    idx = int(torch.randint(0, flat.numel(), (1,), generator=g))
                h = 1e-6
                old = flat[idx].item()
                flat[idx] = old + h
                lp_ = forward_stats(m64, seqs)[1].item()
                flat[idx] = old - h
                lm_ = forward_stats(m64, seqs)[1].item()
                flat[idx] = old
                num = (lp_ - lm_) / (2 * h)
                ana = grads[n].view(-1)[idx].item()
                fd.append((n, idx, ana, num))
                assert abs(num - ana) <= 1e-6 + 1e-5 * abs(ana), (n, idx, ana, num)
        # f64 greedy, for the tie check of the f32 generation
        greedy64 = [greedy_manual(m64, p, MAX_NEW)[0] for p in prompts]

    # --- f32 generation, stock transformers
    m32 = load_model(d, torch.float32).eval()
    pad = ids["<|endoftext|>"]
    m32.generation_config = GenerationConfig(bos_token_id=pad, pad_token_id=pad, eos_token_id=None)
    gc = neutral_gen_config(pad, pad)
    warnings = []
    greedy, margins = [], []
    with torch.no_grad():
        for i, p in enumerate(prompts):
            x = torch.tensor([p])
            out = m32.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=gc)
            new = out[0, len(p):].tolist()
            assert len(new) == MAX_NEW, new
            man, margin = greedy_manual(m32, p, MAX_NEW)
            if man != new:
                warnings.append(f"gen {i}: generate() {new} != manual argmax {man}")
            if greedy64[i] != new:
                warnings.append(f"gen {i}: f32 greedy {new} != f64 greedy {greedy64[i]}")
            greedy.append(new)
            margins.append(margin)
        L = max(len(p) for p in prompts)
        bx = torch.tensor([[pad] * (L - len(p)) + p for p in prompts])
        bm = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
        bout = m32.generate(input_ids=bx, attention_mask=bm, generation_config=gc)
        batched = [r[L:].tolist() for r in bout]
        for i in range(len(prompts)):
            if batched[i] != greedy[i]:
                warnings.append(f"gen {i}: batched {batched[i]} != unbatched {greedy[i]}")
    for w in warnings:
        log("WARNING:", w)

    # --- write reference.safetensors
    T = {}
    for i, (s, (logits, lp, ent)) in enumerate(zip(seqs, outs)):
        T[f"input_ids.{i}"] = torch.tensor(s, dtype=torch.int64)
        T[f"logprobs.{i}"] = lp.detach().clone()
        T[f"entropy.{i}"] = ent.detach().clone()
        T[f"logits.{i}"] = logits.detach().clone()
    T["loss"] = loss.detach().clone().reshape(())
    for n in pnames:
        T[f"grad.{n}"] = grads[n]
    for i, p in enumerate(prompts):
        T[f"gen.prompt.{i}"] = torch.tensor(p, dtype=torch.int64)
        T[f"gen.greedy.{i}"] = torch.tensor(greedy[i], dtype=torch.int64)
        T[f"gen.greedy_batched.{i}"] = torch.tensor(batched[i], dtype=torch.int64)
    T["rope.inv_freq"] = inv64.clone()
    for k, v in T.items():
        if k.startswith(("logprobs", "entropy", "logits", "grad.", "loss", "rope")):
            assert v.dtype == torch.float64, k
    T = {k: v.contiguous() for k, v in T.items()}
    save_file(T, os.path.join(d, "reference.safetensors"), metadata={"generator": "tools/make_reference.py"})

    # --- reference.json
    text_ids = [hf_tok.encode(t, add_special_tokens=False) for t in TEXTS]
    chat = {}
    try:
        chat_text = hf_tok.apply_chat_template(CHAT_MESSAGES, tokenize=False, add_generation_prompt=True)
        chat_ids = hf_tok.encode(chat_text, add_special_tokens=False)
        chat = {"messages": CHAT_MESSAGES, "add_generation_prompt": True, "text": chat_text, "ids": chat_ids}
    except Exception as e:  # pragma: no cover
        warnings.append(f"chat template failed: {e}")
    ref = {
        "model": name,
        "texts": TEXTS,
        "text_ids": text_ids,
        "chat_template": chat,
        "special_token_ids": ids,
        "tokenizer_vocab_size": tok.get_vocab_size(),
        "model_vocab_size": spec["vocab"],
        "seq_lens": SEQ_LENS,
        "loss": float(loss.detach()),
        "loss_tokens": sum(len(s) - 1 for s in seqs),
        "generation": {
            "max_new_tokens": MAX_NEW,
            "do_sample": False,
            "eos_token_ids_used": [],
            "eos_note": "generate() ran with eos_token_id=None (no stopping, no min_new_tokens logit "
                        "suppression): pure argmax for exactly max_new_tokens steps; the f32 model, "
                        "eager attention, KV cache, neutral generation config (no repetition penalty).",
            "pad_token_id_for_batched": pad,
            "batched_padding_side": "left",
            "min_top1_top2_logit_margin_f32": margins,
            "f64_greedy_equal": [greedy64[i] == greedy[i] for i in range(len(prompts))],
            "batched_equal_unbatched": [batched[i] == greedy[i] for i in range(len(prompts))],
        },
        "finite_difference_checks": [{"param": n, "flat_index": i, "analytic": a, "numeric": nu}
                                     for n, i, a, nu in fd],
        "max_abs_logprob_diff_stock_transformers_f64_vs_reference": stock_diff,
        "spec": {k: v for k, v in spec.items() if k != "seed"},
        "seed": spec["seed"],
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "warnings": warnings,
        "notes": (
            "All reference numbers are float64, computed from the saved checkpoint (bf16 rounding "
            "included) converted with .double(), eager attention, each sequence run alone (no padding, "
            "positions 0..n-1). Stock transformers computes RMSNorm, the attention softmax and RoPE cos/sin "
            "in float32 even for float64 models; the reference replaces those three with float64 "
            "versions of the same formulas (see max_abs_logprob_diff_stock_transformers_f64_vs_reference). "
            "logprobs.i[t] = log p(x[t+1] | x[..=t]); entropy.i[t] = entropy of softmax(logits.i[t]) for "
            "t in 0..n-2; logits.i is (n, vocab). loss = sum of NLLs of all predicted tokens of all "
            "sequences / their count; grad.<name> = d loss / d param, named as in the checkpoint (tied "
            "embeddings: only model.embed_tokens.weight, holding both uses). The pad token "
            "(<|endoftext|>) never occurs in the input sequences, because transformers' nn.Embedding "
            "padding_idx would zero that row's gradient. rope.inv_freq is the float64 inverse-frequency "
            "vector (after llama3 scaling where configured). gen.* are float32 greedy generations "
            "(new tokens only)."
        ),
    }
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1, ensure_ascii=False)
        f.write("\n")

    # --- self-test: reload everything fresh and recompute
    self_test(d, spec)
    size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
    log(f"  files: {sorted(os.listdir(d))}")
    log(f"  size: {size / 1024:.0f} KiB; loss {float(loss.detach()):.6f}; entropy range "
        f"[{min(float(o[2].min()) for o in outs if o[2].numel()):.3f}, "
        f"{max(float(o[2].max()) for o in outs if o[2].numel()):.3f}] (log V = {math.log(spec['vocab']):.3f})")
    log(f"  stock-vs-f64 logprob max diff {stock_diff:.2e}; fd checks ok: "
        + ", ".join(f"{n}[{i}] {a:.3e}~{nu:.3e}" for n, i, a, nu in fd))
    log(f"  greedy: {greedy}; min margins {[round(m, 4) for m in margins]}")
    return size, warnings


def independent_logits(d, ids):
    """Plain-torch float64 forward written from the formulas, reading only config.json and the
    *.safetensors checkpoint (no transformers): a cross-check of the reference semantics."""
    cfg = json.load(open(os.path.join(d, "config.json")))
    W = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors") and f != "reference.safetensors":
            W.update({k: v.double() for k, v in load_file(os.path.join(d, f)).items()})
    H, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or H // nh
    eps = cfg["rms_norm_eps"]
    if "rope_parameters" in cfg:
        rp = dict(cfg["rope_parameters"])
        theta = rp["rope_theta"]
    else:
        rp, theta = dict(cfg.get("rope_scaling") or {}), cfg["rope_theta"]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    if rp.get("rope_type", rp.get("type", "default")) == "llama3":
        f, lo, hi, old = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"], rp["original_max_position_embeddings"]
        new = []
        for w in inv.tolist():
            wl = 2 * math.pi / w
            if wl < old / hi:
                new.append(w)
            elif wl > old / lo:
                new.append(w / f)
            else:
                s = (old / wl - lo) / (hi - lo)
                new.append((1 - s) * w / f + s * w)
        inv = torch.tensor(new, dtype=torch.float64)
    n = len(ids)
    ang = torch.arange(n, dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None, :], torch.cat([ang.sin()] * 2, -1)[:, None, :]

    def rms(x, w):
        return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))

    def rope(x):
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def lin(x, name):
        y = x @ W[name + ".weight"].T
        return y + W[name + ".bias"] if name + ".bias" in W else y

    x = W["model.embed_tokens.weight"][torch.tensor(ids)]
    causal = torch.full((n, n), float("-inf"), dtype=torch.float64).triu(1)
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        h = rms(x, W[p + "input_layernorm.weight"])
        q = lin(h, p + "self_attn.q_proj").view(n, nh, hd)
        k = lin(h, p + "self_attn.k_proj").view(n, nkv, hd)
        v = lin(h, p + "self_attn.v_proj").view(n, nkv, hd)
        if p + "self_attn.q_norm.weight" in W:
            q, k = rms(q, W[p + "self_attn.q_norm.weight"]), rms(k, W[p + "self_attn.k_norm.weight"])
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
        att = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd) + causal, -1)
        o = torch.einsum("hqk,khd->qhd", att, v).reshape(n, nh * hd)
        x = x + lin(o, p + "self_attn.o_proj")
        h = rms(x, W[p + "post_attention_layernorm.weight"])
        g = lin(h, p + "mlp.gate_proj")
        x = x + lin(g * torch.sigmoid(g) * lin(h, p + "mlp.up_proj"), p + "mlp.down_proj")
    x = rms(x, W["model.norm.weight"])
    return x @ W.get("lm_head.weight", W["model.embed_tokens.weight"]).T


def self_test(d, spec):
    try:
        tok = PreTrainedTokenizerFast.from_pretrained(d)
    except Exception as e:  # transformers 4.x cannot read a 5.x tokenizer_config.json; tokenizer.json is fine
        log(f"  NOTE: tokenizer dir not loadable here ({type(e).__name__}); using tokenizer.json alone")
        tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(d, "tokenizer.json"))
    ref = json.load(open(os.path.join(d, "reference.json")))
    for t, want in zip(ref["texts"], ref["text_ids"]):
        got = tok.encode(t, add_special_tokens=False)
        assert got == want, (t, got, want)
        assert tok.decode(got) == t, (tok.decode(got), t)
    R = load_file(os.path.join(d, "reference.safetensors"))
    m = load_model(d, torch.float32).double().eval()
    restore, _ = patch_f64(m)
    with f64_attention(restore), torch.no_grad():
        seqs = [R[f"input_ids.{i}"].tolist() for i in range(len(SEQ_LENS))]
        outs, loss = forward_stats(m, seqs)
    for i, (logits, lp, ent) in enumerate(outs):
        assert torch.allclose(lp, R[f"logprobs.{i}"], atol=1e-12, rtol=0), i
        assert torch.allclose(ent, R[f"entropy.{i}"], atol=1e-12, rtol=0), i
    assert abs(float(loss) - float(R["loss"])) < 1e-12
    worst = 0.0
    for i in range(len(SEQ_LENS)):
        ind = independent_logits(d, R[f"input_ids.{i}"].tolist())
        worst = max(worst, float((ind - R[f"logits.{i}"]).abs().max()))
    assert worst < 1e-10, f"independent plain-torch forward differs from reference logits by {worst}"
    log(f"  independent plain-torch f64 forward vs reference logits: max |diff| {worst:.1e}")
    m32 = load_model(d, torch.float32).eval()
    with torch.no_grad():
        for i in range(len(GEN_PROMPT_LENS)):
            man, _ = greedy_manual(m32, R[f"gen.prompt.{i}"].tolist(), MAX_NEW)
            if man != R[f"gen.greedy.{i}"].tolist():
                log(f"WARNING self-test: reloaded f32 argmax differs for prompt {i}")
    log("  self-test (reload, tokenizer round trip, logprobs/entropy/loss 1e-12): ok")


def main():
    ap = argparse.ArgumentParser(description="Make tiny HF reference models + reference outputs.")
    ap.add_argument("--out", default="tests/fixtures/models")
    ap.add_argument("--models", default=None,
                    help="comma list; default: every model for the installed transformers major "
                         f"(installed: {transformers.__version__})")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--verify", action="store_true",
                    help="write nothing: re-load every model dir under --out with the installed "
                         "transformers (also ones written by the other major version) and re-check it")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    if args.verify:
        bad = 0
        for n in sorted(os.listdir(args.out)):
            d = os.path.join(args.out, n)
            if not os.path.isfile(os.path.join(d, "reference.json")):
                continue
            log(f"=== verify {n} with transformers {transformers.__version__}")
            try:
                self_test(d, MODELS.get(n))
            except Exception as e:  # report and go on
                newer = json.load(open(os.path.join(d, "reference.json")))["transformers_version"]
                if int(newer.split(".")[0]) > TF_MAJOR:
                    log(f"  FAILED (expected: written by transformers {newer}, which this older version "
                        f"does not fully read): {type(e).__name__}: {str(e)[:300]}")
                else:
                    bad += 1
                    log(f"  FAILED: {type(e).__name__}: {str(e)[:300]}")
        log(f"verify: {bad} failed")
        sys.exit(1 if bad else 0)
    names = args.models.split(",") if args.models else [n for n, s in MODELS.items() if s["tf"] == TF_MAJOR]
    for n in names:
        if n not in MODELS:
            raise SystemExit(f"unknown model {n}; known: {list(MODELS)}")
        if MODELS[n]["tf"] != TF_MAJOR:
            raise SystemExit(f"{n} must be written by transformers {MODELS[n]['tf']}.x, "
                             f"installed is {transformers.__version__}")
    os.makedirs(args.out, exist_ok=True)
    summary = []
    for n in names:
        size, warns = build_one(n, MODELS[n], args.out)
        summary.append((n, size, len(warns)))
    log("\nSUMMARY (transformers %s, torch %s)" % (transformers.__version__, torch.__version__))
    for n, size, nw in summary:
        log(f"  {n:28s} {size / 1024:8.0f} KiB  warnings: {nw}")
    total = 0
    for root, _, fs in os.walk(args.out):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in fs)
    log(f"  total under {args.out}: {total / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
