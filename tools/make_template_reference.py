#!/usr/bin/env python3
"""Reference renders of chat templates by transformers' `apply_chat_template(tokenize=False)`,
for tests/chat_template.rs, which checks that fcgpu renders each byte for byte.

Run once, in a scratch venv with transformers 5.25, jinja2 3.1.6 and gguf 0.19 (never in tests):

    /work/venvs/refg/bin/python tools/make_template_reference.py \
        --smollm2-dir /work/cache/smollm2-tf --gguf /work/cache/SmolLM2-135M-Instruct.Q4_1.gguf

It writes tests/fixtures/templates/reference.jsonl (one line per render: the template, the
special-token variables, the conversation, the tools, add_generation_prompt, extra variables,
and either the text or the error transformers raised) and copies SmolLM2's template and
tokenizer_config.json into tests/fixtures/templates/smollm2/. It refuses to overwrite without
--force.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "tests/fixtures/templates"

ADD = {"type": "function", "function": {"name": "add", "description": "Add two integers.", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "description": "first"},
                                     "b": {"type": "integer", "default": 1}}, "required": ["a"]}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Météo d'une ville — «temps» ☀",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name, e.g. \"Paris\""},
        "unit": {"type": "string", "enum": ["c", "f"], "default": "c"},
        "days": {"type": "number", "default": 1.5},
        "tags": {"type": "array", "items": {"type": "string"}, "default": []},
        "extra": {"type": "object", "properties": {}, "default": {}},
        "tiny": {"type": "number", "default": 1e-05}}, "required": ["city"]}}}


def call(name, args, cid="call_1"):
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}


U = lambda t: {"role": "user", "content": t}
A = lambda t: {"role": "assistant", "content": t}
S = lambda t: {"role": "system", "content": t}
T = lambda t: {"role": "tool", "content": t}

# (name, messages, tools, extra variables)
CONVERSATIONS = [
    ("user", [U("What is 2+2?")], None, {}),
    ("system_user", [S("Be brief."), U("What is 2+2?")], None, {}),
    ("multi_turn", [U("Hi!"), A("Hello! How can I help?"), U("Add 2 and 3.")], None, {}),
    ("system_multi_turn", [S("You are a calculator."), U("2+2?"), A("4"), U("3+3?"), A("6"), U("And 4+4?")], None, {}),
    ("system_only", [S("Only a system message.")], None, {}),
    ("tools", [U("Add 2 and 3.")], [ADD], {}),
    ("system_tools", [S("Use the tools."), U("Weather in Paris?")], [ADD, WEATHER], {}),
    ("call_object", [U("Add 2 and 3."), {"role": "assistant", "content": "", "tool_calls": [call("add", {"a": 2, "b": 3})]},
                     T("5")], [ADD], {}),
    ("call_string_args", [U("Add 2 and 3."), {"role": "assistant", "content": None,
                          "tool_calls": [call("add", "{\"a\": 2, \"b\": 3}")]}, T("5"), A("It is 5.")], [ADD], {}),
    ("two_calls", [U("Weather in Paris and Rome?"), {"role": "assistant", "content": "Checking both.", "tool_calls": [
        call("get_weather", {"city": "Paris"}, "c1"), call("get_weather", {"city": "Rome", "days": 2.0}, "c2")]},
        T("{\"temp\": 20}"), T("{\"temp\": 25}")], [WEATHER], {}),
    ("tool_result_object", [U("Add 1 and 1."), {"role": "assistant", "content": "", "tool_calls": [call("add", {"a": 1, "b": 1})]},
                            {"role": "tool", "content": {"result": 2}}], [ADD], {}),
    ("think_in_content", [U("Add 2 and 3."), A("<think>\nThe user wants a sum.\n</think>\n\n[add(a=2, b=3)]")], None, {}),
    ("reasoning_field", [U("Q1"), A("A1"), U("Q2"), {"role": "assistant", "content": "A2",
                         "reasoning_content": "\nthinking about Q2\n"}], None, {}),
    ("think_before_query", [U("Q1"), A("<think>old</think>A1"), U("Q2")], None, {}),
    ("unicode", [S("Réponds en français. 中文 ok 🙂"), U("Quel temps à Zürich ?\tMerci…")], [WEATHER], {}),
    ("whitespace", [S("  padded system \n"), U("\n  padded user  \n\n"), A(" padded answer "), U("x\u001c")], None, {}),
    ("multi_step_tool", [U("Plan a trip."), {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Oslo"})]},
                         T("cold"), U("<tool_response>\nlater\n</tool_response>"), A("Take a coat.")], [WEATHER], {}),
    ("no_thinking", [U("Add 2 and 3.")], [ADD], {"enable_thinking": False}),
    ("long", [S("sys"), U("a"), A("b"), U("c"), A("d"), U("e"), A("f"), U("g"), A("h"), U("i")], None, {}),
    ("empty_content", [U(""), A("")], None, {}),
    ("developer_like_roles", [U("first"), {"role": "tool", "content": "orphan result"}, U("second")], None, {}),
]

# (template path relative to the repository, or a model directory; special-token overrides)
TEMPLATES = [
    ("dir", "tests/fixtures/templates/smollm2", {}),
    ("dir", "tests/fixtures/models/qwen2-tiny", {}),
    ("file", "prompts/templates/qwen-chatml.jinja", {}),
    ("file", "tests/fixtures/templates/llama3-tools.jinja", {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    ("file", "tests/fixtures/templates/features.jinja", {"bos_token": "<s>", "eos_token": "</s>"}),
]


def copy_smollm2(src: Path, gguf_path: Path):
    """SmolLM2's own template and tokenizer_config.json, checked against the GGUF's metadata."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    field = reader.fields["tokenizer.chat_template"]
    from_gguf = field.contents() if hasattr(field, "contents") else bytes(field.parts[-1]).decode()
    template = (src / "chat_template.jinja").read_text()
    if template != from_gguf:
        sys.exit(f"{src}/chat_template.jinja differs from the GGUF's tokenizer.chat_template")
    dest = OUT_DIR / "smollm2"
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "chat_template.jinja", dest / "chat_template.jinja")
    config = json.loads((src / "tokenizer_config.json").read_text())
    keep = {k: v for k, v in config.items() if k.endswith("_token") or k in ("tokenizer_class", "backend")}
    (dest / "tokenizer_config.json").write_text(json.dumps(keep, indent=2) + "\n")


def render(tok, template, specials, messages, tools, agp, extra):
    kwargs = dict(specials)
    kwargs.update(extra)
    return tok.apply_chat_template(messages, tools=tools, chat_template=template, add_generation_prompt=agp,
                                   tokenize=False, **kwargs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smollm2-dir", type=Path, required=True, help="SmolLM2 in Hugging Face layout")
    ap.add_argument("--gguf", type=Path, required=True, help="SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--force", action="store_true", help="overwrite an existing reference")
    a = ap.parse_args()
    out = OUT_DIR / "reference.jsonl"
    if out.exists() and not a.force:
        sys.exit(f"{out} exists; pass --force to overwrite it")
    import transformers
    from transformers import AutoTokenizer

    copy_smollm2(a.smollm2_dir, a.gguf)
    fixture_tok = AutoTokenizer.from_pretrained(ROOT / "tests/fixtures/models/qwen2-tiny")
    lines = []
    for kind, path, overrides in TEMPLATES:
        if kind == "dir":
            # The SmolLM2 copy has no tokenizer.json: load the tokenizer it was copied from.
            source = a.smollm2_dir if path.endswith("smollm2") else ROOT / path
            tok = AutoTokenizer.from_pretrained(source)
            template = None
            specials = dict(tok.special_tokens_map)
        else:
            tok = fixture_tok
            template = (ROOT / path).read_text()
            specials = {**tok.special_tokens_map, **overrides}
        for name, messages, tools, extra in CONVERSATIONS:
            if "llama3" in path:
                extra = {**extra, "date_string": "26 Jul 2024"}
            for agp in (True, False):
                rec = {"template": path, "kind": kind, "specials": specials, "name": name, "messages": messages,
                       "tools": tools, "add_generation_prompt": agp, "extra": extra}
                try:
                    text = render(tok, template, specials, messages, tools, agp, extra)
                    rec["text"] = text
                    if tools is not None:
                        # A template that never reads `tools` renders the same text without them.
                        rec["ignores_tools"] = text == render(tok, template, specials, messages, None, agp, extra)
                except Exception as e:  # the template raised: fcgpu must refuse too
                    rec["error"] = f"{type(e).__name__}: {e}"
                lines.append(json.dumps(rec, ensure_ascii=False))
    fd, tmp = tempfile.mkstemp(dir=OUT_DIR, prefix=".reference.")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)
    n_err = sum('"error"' in l for l in lines)
    print(f"{out}: {len(lines)} renders ({n_err} errors) by transformers {transformers.__version__}")


if __name__ == "__main__":
    main()
