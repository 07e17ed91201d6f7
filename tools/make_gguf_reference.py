#!/usr/bin/env python3
"""One-time references for `fcgpu convert` on SmolLM2-135M-Instruct, made with transformers' own
GGUF loader (`from_pretrained(dir, gguf_file=...)`). Run in a scratch venv (transformers 5.25,
gguf, torch, accelerate), never in tests; tests/gguf_convert.rs reads what it writes.

    python tools/make_gguf_reference.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf \
        --bfcl path/to/bfcl/v4 --out tests/fixtures/real/smollm2

weights.json: for every tensor transformers loads (lm_head skipped when tied), its shape, the
float64 sum and sum of squares, and 64 values at pseudo-random flat indices: splitmix64 seeded
with the FNV-1a 64 hash of the tensor's name, each index = next() % numel.

tokenizer.json: a deterministic corpus of strings (chat-formatted BFCL tool prompts, Python and
JSON snippets, Unicode, whitespace runs, numbers of many shapes) with, per string, the token count
and the FNV-1a 64 hash of its ids (each id as 4 little-endian bytes), from transformers' GGUF
tokenizer with its pre-tokenizer set to upstream SmolLM2's (Digits(individual_digits=True) then
ByteLevel(add_prefix_space=False, use_regex=True)), `add_special_tokens=True`. It also records how
many strings get other ids from transformers' unpatched GGUF tokenizer, which does not split
digits (for docs/models.md).
"""

import argparse
import hashlib
import json
import os
import random
import sys

M64 = (1 << 64) - 1


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & M64
    return h


def splitmix64(state: int):
    while True:
        state = (state + 0x9E3779B97F4A7C15) & M64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        yield z ^ (z >> 31)


def ids_hash(ids) -> str:
    return "%016x" % fnv1a64(b"".join(int(i).to_bytes(4, "little") for i in ids))


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def f32_short(x) -> float:
    """The float whose repr is the shortest decimal that reads back as this float32."""
    import numpy as np

    return float(str(np.float32(x)))


def weights_reference(model, tied):
    import torch

    out = {}
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        flat = t.detach().to(torch.float32).reshape(-1)
        d = flat.double()
        gen = splitmix64(fnv1a64(name.encode()))
        idx = [next(gen) % flat.numel() for _ in range(64)]
        out[name] = {
            "shape": list(t.shape),
            "sum": float(d.sum()),
            "sumsq": float((d * d).sum()),
            "values": [f32_short(flat[i].item()) for i in idx],
        }
    return out


# ---- the tokenizer corpus ----

WORDS = "the model calls a function with arguments when the user asks for weather flights stock prices".split()
CJK = ["你好，世界", "日本語のテキスト", "한국어 문장입니다", "東京都は晴れ", "数据科学与机器学习", "ラーメン大好き"]
EMOJI = ["😀", "🚀", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "❤️", "🧑‍💻", "🎉🎉", "☕"]
ACCENTS = ["café", "naïve", "résumé", "Ångström", "São Paulo", "Zürich", "façade", "coöperate", "e\u0301te\u0301"]
RTL = ["مرحبا بالعالم", "שלום עולם", "العربية 123", "עברית ו-English"]
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<file_sep>", "<jupyter_code>"]


def numbers(r):
    shapes = [
        lambda: str(r.randint(0, 9)),
        lambda: str(r.randint(10, 999)),
        lambda: str(r.randint(1000, 10**12)),
        lambda: str(-r.randint(1, 10**6)),
        lambda: f"{r.uniform(-1e4, 1e4):.{r.randint(1, 6)}f}",
        lambda: f"{r.uniform(0, 1):.3e}",
        lambda: f"{r.randint(1, 999)},{r.randint(0, 999):03d},{r.randint(0, 999):03d}",
        lambda: f"+1 ({r.randint(200, 999)}) {r.randint(100, 999)}-{r.randint(1000, 9999)}",
        lambda: f"{r.randint(1990, 2030)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}",
        lambda: f"0x{r.getrandbits(32):08X}",
        lambda: f"v{r.randint(0, 9)}.{r.randint(0, 20)}.{r.randint(0, 99)}",
        lambda: f"{r.randint(1, 9)}/{r.randint(2, 16)}",
        lambda: f"{r.uniform(0, 100):.1f}%",
        lambda: f"${r.randint(1, 99999)}.{r.randint(0, 99):02d}",
        lambda: f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}:{r.randint(0, 59):02d}",
        lambda: "".join(r.choice("0123456789") for _ in range(r.randint(10, 40))),
        lambda: f"{r.randint(1, 99)}km/h, {r.randint(-40, 45)}°C",
        lambda: f"[{', '.join(str(r.randint(-50, 500)) for _ in range(r.randint(2, 6)))}]",
        lambda: f"x{r.randint(0, 99)}y{r.randint(0, 99)}_{r.randint(100, 999)}abc{r.randint(0, 9)}",
        lambda: "٣٤٥ ١٢ ४२ ７８９ ²³ ½ Ⅻ",
    ]
    return [r.choice(shapes)() + ("" if r.random() < 0.5 else " " + r.choice(WORDS)) for _ in range(420)]


def python_snippets(r):
    names = ["compute", "get_weather", "parse_args", "x", "_private", "CamelCase", "snake_case_name", "λ"]
    out = []
    for i in range(300):
        n = r.choice(names)
        body = r.choice(
            [
                f"def {n}(a, b={r.randint(0, 99)}):\n    return a * b + {r.uniform(0, 9):.2f}\n",
                f"for i in range({r.randint(1, 100)}):\n\tif i % {r.randint(2, 9)} == 0:\n\t\tprint(f\"{{i}} ok\")\n",
                f"class {n.title()}:\n    '''Docstring {i}.'''\n    def __init__(self):\n        self.v = [{r.randint(0, 9)}, {r.randint(10, 99)}]\n",
                f"import numpy as np\nx = np.zeros(({r.randint(1, 64)}, {r.randint(1, 64)}), dtype=np.float32)  # shape\n",
                f"result = {n}(city=\"San Francisco\", days={r.randint(1, 14)}, units='metric')\n",
                f"lambda x: x**{r.randint(2, 5)} if x >= {r.randint(0, 9)} else -x\n",
                f"    \n\n    return {{'k': {r.randint(0, 999)}, \"v\": None}}\n\n\n",
            ]
        )
        out.append(body)
    return out


def json_snippets(r):
    out = []
    for i in range(300):
        obj = {
            "name": r.choice(["get_weather", "book_flight", "calc.area", "search"]),
            "arguments": {
                r.choice(WORDS): r.choice([r.randint(-999, 99999), r.uniform(-1, 1), r.choice(WORDS), None, True, [1, 2, 3]])
                for _ in range(r.randint(1, 4))
            },
        }
        if r.random() < 0.3:
            obj["note"] = r.choice(CJK + ACCENTS + EMOJI)
        indent = r.choice([None, 2, 4, "\t"])
        out.append(json.dumps(obj, indent=indent, ensure_ascii=r.random() < 0.5))
    return out


def unicode_strings(r):
    pools = CJK + EMOJI + ACCENTS + RTL
    out = []
    for _ in range(300):
        parts = [r.choice(pools + WORDS) for _ in range(r.randint(1, 6))]
        out.append(r.choice([" ", "", "\n", "  "]).join(parts))
    return out


def whitespace_strings(r):
    out = []
    for _ in range(220):
        pieces = []
        for _ in range(r.randint(1, 5)):
            pieces.append(r.choice(WORDS + ["", "x", "1"]))
            pieces.append("".join(r.choice([" ", "\t", "\n", "\r\n", "\u00a0", "\u3000"]) for _ in range(r.randint(1, 12))))
        out.append("".join(pieces))
    return out


def misc_strings(r, questions):
    out = []
    for _ in range(180):
        out.append(r.choice(questions))
    for _ in range(100):
        s = r.choice(["I'm", "you're", "it's", "we'll", "they'd", "I've", "DON'T", "She'S"]) + " " + " ".join(r.sample(WORDS, 4))
        out.append(s + r.choice(["!!!", "...", "?!", " --- ", " ;)", "\n"]))
    for _ in range(80):
        out.append(f"{r.choice(SPECIAL)}{r.choice(WORDS)}{r.choice(SPECIAL)} text {r.choice(SPECIAL)}\n")
    for _ in range(40):
        out.append(f"https://example.com/{r.choice(WORDS)}?id={r.randint(0, 10**6)}&q={r.choice(ACCENTS)} **bold** `code` # {r.choice(WORDS)}")
    return out


def tool_prompts(r, tok, bfcl_dir):
    """Chat-formatted prompts: the functions in the system message, the question as the user's,
    rendered with the GGUF's own chat template."""
    entries = []
    for cat in ["simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance", "simple_java", "simple_javascript"]:
        path = os.path.join(bfcl_dir, f"BFCL_v4_{cat}.json")
        with open(path) as f:
            entries += [json.loads(line) for line in f if line.strip()]
    r.shuffle(entries)
    out = []
    for e in entries:
        tools = json.dumps(e["function"], ensure_ascii=False)
        system = "You are a function-calling assistant. Tools:\n" + tools + "\nAnswer with a JSON call."
        msgs = [{"role": "system", "content": system}] + e["question"][0]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        if len(text) <= 1000:
            out.append(text)
        if len(out) == 200:
            break
    return out, [e["question"][0][-1]["content"] for e in entries]


def corpus(tok, bfcl_dir):
    r = random.Random(2026)
    prompts, questions = tool_prompts(r, tok, bfcl_dir)
    strings = prompts + numbers(r) + python_snippets(r) + json_snippets(r) + unicode_strings(r)
    strings += whitespace_strings(r) + misc_strings(r, questions)
    return strings


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--bfcl", required=True, help="directory with the BFCL_v4_*.json files")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    import tokenizers
    import torch
    import transformers
    from tokenizers import pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    d, name = os.path.split(os.path.abspath(a.gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    strings = corpus(tok, a.bfcl)
    unpatched = [tok(s, add_special_tokens=True)["input_ids"] for s in strings]
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    patched = [tok(s, add_special_tokens=True)["input_ids"] for s in strings]
    differ = [i for i in range(len(strings)) if unpatched[i] != patched[i]]
    source = {
        "gguf": name,
        "gguf_sha256": sha256(a.gguf),
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "torch": torch.__version__,
        "made_by": "tools/make_gguf_reference.py",
    }
    tok_ref = {
        "source": source,
        "pre_tokenizer": "Digits(individual_digits=True) + ByteLevel(add_prefix_space=False, use_regex=True)",
        "unpatched_differ": len(differ),
        "unpatched_differ_examples": [strings[i] for i in differ[:5]],
        "tokens_total": sum(len(p) for p in patched),
        "cases": [{"text": s, "n": len(p), "hash": ids_hash(p)} for s, p in zip(strings, patched)],
    }
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    tied = bool(model.config.tie_word_embeddings)
    w_ref = {"source": source, "tied": tied, "tensors": weights_reference(model, tied)}
    os.makedirs(a.out, exist_ok=True)
    for fname, obj in [("tokenizer.json", tok_ref), ("weights.json", w_ref)]:
        path = os.path.join(a.out, fname)
        with open(path + ".tmp", "w") as f:
            json.dump(obj, f, ensure_ascii=False, separators=(",", ":"))
            f.write("\n")
        os.replace(path + ".tmp", path)
        print(f"wrote {path} ({os.path.getsize(path)} bytes)", file=sys.stderr)
    print(
        f"{len(strings)} strings, {tok_ref['tokens_total']} tokens; {len(differ)} differ under the unpatched import; "
        f"{len(w_ref['tensors'])} tensors",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
