#!/usr/bin/env python3
"""Generate perturbed model answers for every BFCL v4 single-turn category, score them with
BFCL's own checker (the `bfcl-eval` package), and write the verdicts as JSON lines
`{id, category, format, result, valid, error_type}`. fcgpu's test `fc_bfcl_compare` replays
them and asserts the same verdicts.

Run it in a scratch venv that has bfcl-eval==2026.3.23 installed (see the README):

    python tools/bfcl_compare.py --bfcl-dir ../shared/bfcl/v4 --out /tmp/cases.jsonl
    python tools/bfcl_compare.py --bfcl-dir ../shared/bfcl/v4 --prompts-out tests/data/bfcl/prompts.jsonl --ids-per-category 3

`--unicode` writes only the Unicode and JSON-number cases (`unicode_variants`): identifiers
that Python's NFKC normalisation makes valid, `\\N{...}` escapes, and JSON mode's `NaN`,
`1e999`, long integers and lone surrogates.
"""

import argparse
import copy
import json
import random
import sys
import types
from pathlib import Path


def stub_model_config():
    # bfcl_eval.constants.model_config imports every API SDK; the checker only needs
    # MODEL_CONFIG_MAPPING[name].underscore_to_dot.
    class Cfg:
        underscore_to_dot = False

    class Mapping(dict):
        def __getitem__(self, k):
            return Cfg()

    m = types.ModuleType("bfcl_eval.constants.model_config")
    m.MODEL_CONFIG_MAPPING = Mapping()
    sys.modules["bfcl_eval.constants.model_config"] = m


stub_model_config()

from bfcl_eval.constants.enums import Language, ReturnFormat  # noqa: E402
from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker  # noqa: E402
from bfcl_eval.model_handler.utils import (  # noqa: E402
    default_decode_ast_prompting,
    system_prompt_pre_processing_chat_model,
)
from bfcl_eval.utils import (  # noqa: E402
    _func_doc_language_specific_pre_processing,
    is_empty_output,
    is_function_calling_format_output,
)

CATEGORIES = [
    "simple_python", "simple_java", "simple_javascript", "multiple", "parallel",
    "parallel_multiple", "live_simple", "live_multiple", "live_parallel",
    "live_parallel_multiple", "irrelevance", "live_irrelevance", "live_relevance",
]


def load(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def lang_of(cat):
    if "javascript" in cat:
        return Language.JAVASCRIPT, ReturnFormat.JAVASCRIPT
    if "java" in cat:
        return Language.JAVA, ReturnFormat.JAVA
    return Language.PYTHON, ReturnFormat.PYTHON


# ---- decoding exactly as BFCL's Qwen handlers, after fcgpu's reasoning removal ----

def fcgpu_strip(text):
    # Same as BFCL's Qwen handler (text after the last </think>), plus <answer> unwrapping.
    if "</think>" in text:
        text = text.split("</think>")[-1]
    s = text.find("<answer>")
    if s >= 0:
        e = text.find("</answer>", s + 8)
        if e >= 0:
            text = text[s + 8:e]
    return text


def extract_tool_calls(text):
    import re
    out = []
    for m in re.findall(r"<tool_call>\n(.*?)\n</tool_call>", text, re.DOTALL):
        try:
            out.append(json.loads(m))
        except Exception:
            pass
    return out


def decode(text, fmt, ret_fmt):
    if fmt == "json":  # QwenFCHandler.decode_ast
        calls = extract_tool_calls(text)
        if type(calls) != list or any(type(x) != dict for x in calls):
            raise ValueError("not a list of calls")
        return [{c["name"]: {k: v for k, v in c["arguments"].items()}} for c in calls]
    return default_decode_ast_prompting(text, ret_fmt, False)


def bfcl_verdict(entry, answer, cat, fmt, result):
    text = fcgpu_strip(result)
    if "relevance" in cat:  # _evaluate_single_relevance_entry
        try:
            d = decode(text, fmt, ReturnFormat.PYTHON)
            has = not is_empty_output(d)
        except Exception:
            has = False
        ok = (not has) if "irrelevance" in cat else has
        if ok:
            return True, ""
        return False, "irrelevance_error:decoder_success" if "irrelevance" in cat else "relevance_error:decoder_failed"
    language, ret_fmt = lang_of(cat)
    try:
        d = decode(text, fmt, ret_fmt)
    except Exception:
        return False, "ast_decoder:decoder_failed"
    if not is_function_calling_format_output(d):
        return False, "ast_decoder:decoder_wrong_output_format"
    try:
        r = ast_checker(entry["function"], d, answer["ground_truth"], language, cat, "stub")
    except Exception:
        return False, "checker:exception"
    return bool(r["valid"]), "" if r["valid"] else r["error_type"]


# ---- answer generation ----

def py_call(name, args):
    return f"{name}(" + ", ".join(f"{k}={v}" for k, v in args) + ")"


def render_value(v, lang):
    if lang == "python":
        return repr(v)
    return v if isinstance(v, str) else json.dumps(v)


def pick_args(params, rng, first=True):
    out = []
    for k, alts in params.items():
        choices = alts if not first else alts[:1]
        v = rng.choice(choices) if choices else ""
        if v == "":
            continue
        out.append((k, v))
    return out


def mutate_value(v, rng):
    if isinstance(v, bool):
        return rng.choice([not v, str(v).lower(), int(v)])
    if isinstance(v, int):
        return rng.choice([v + 1, str(v), float(v), -v, v * 10, True])
    if isinstance(v, float):
        return rng.choice([v * 1.5 + 1, int(v), str(v), round(v, 1) + 0.01])
    if isinstance(v, str):
        return rng.choice([v + "x", v.upper(), v.replace(" ", ""), "", 1, v + " ", v[:-1] if v else "a", [v]])
    if isinstance(v, list):
        if not v:
            return rng.choice([[1], "[]", ()])
        return rng.choice([v[:-1], v + v[:1], list(reversed(v)), tuple(v), [mutate_value(v[0], rng)] + v[1:], v[0]])
    if isinstance(v, dict):
        if not v:
            return rng.choice([{"a": 1}, [], "{}"])
        k = rng.choice(list(v))
        w = dict(v)
        c = rng.randrange(3)
        if c == 0:
            w[k] = mutate_value(w[k], rng)
        elif c == 1:
            del w[k]
        else:
            w[k + "_x"] = 1
        return w
    return rng.choice([1, "x", None])


def java_mutate(v, rng):
    forms = [v + "L", v + "f", v.strip('"'), '"' + v + '"', v + "x", "new int[]{" + v + "}", "null", v.upper(), "true", "1", "1.5"]
    return rng.choice(forms)


TOKENS = ["(", ")", "[", "]", "{", "}", ",", "=", ":", ".", "'", '"', "\\", "\n", " ", "-", "+", "*", "**", "/",
          "%", "a", "x", "1", "0", "1.5", "e", "j", "_", "0x1", "True", "None", "not ", "lambda: ", " for x in y",
          " if 1 else 2", "'''", "b'", "r'", "f'", "#", "@", "~", "<", "!", "&", "|", "^", "`", ";", "\u00e9",
          "<think>", "</think>", "<answer>", "</answer>", "new int[]{", "new ArrayList<>(", "Arrays.asList(",
          'new HashMap<String, Object>() {{ put("k", 1); }}', "=>", "...", "**k", ":=", "null", "true",
          "false", "1L", "2.5f", "1n", "`t${x}`", "() => 1", "function(){}", "x.y", "a[0]", "f()", "g(h=1)"]


def char_mutations(s, rng, k):
    """Random token-level edits of an answer: insertions, deletions, duplications, swaps."""
    for _ in range(k):
        t = list(s)
        for _ in range(rng.randrange(1, 4)):
            pos = rng.randrange(len(t) + 1)
            op = rng.randrange(4)
            if op == 0:
                t[pos:pos] = list(rng.choice(TOKENS))
            elif op == 1 and pos < len(t):
                del t[pos:pos + rng.randrange(1, 6)]
            elif op == 2 and pos < len(t):
                t[pos:pos] = t[pos:pos + rng.randrange(1, 12)]
            elif pos < len(t):
                t[pos] = rng.choice(TOKENS)
        yield "".join(t)


def call_variants(entry, answer, cat, rng):
    """Yield (format, text) answers derived from the gold answer."""
    lang = "python"
    if "javascript" in cat:
        lang = "js"
    elif "java" in cat:
        lang = "java"
    gold = answer["ground_truth"]
    funcs = entry["function"]

    def render(calls, lang=lang):
        parts = [py_call(n, [(k, render_value(v, lang)) for k, v in args]) for n, args in calls]
        return "[" + ", ".join(parts) + "]"

    base = [(list(c)[0], pick_args(c[list(c)[0]], rng)) for c in gold]
    yield "python", render(base)
    yield "python", render([(n, pick_args(c[n], rng, first=False)) for c in gold for n in [list(c)[0]]])
    for _ in range(3):
        calls = copy.deepcopy(base)
        i = rng.randrange(len(calls))
        n, args = calls[i]
        kind = rng.randrange(9)
        if kind == 0 and args:  # wrong value / type
            j = rng.randrange(len(args))
            k, v = args[j]
            args[j] = (k, java_mutate(v, rng) if lang != "python" and isinstance(v, str) else mutate_value(v, rng))
        elif kind == 1 and args:  # drop a param
            args.pop(rng.randrange(len(args)))
        elif kind == 2:  # extra unknown param
            args.append(("unknown_param", 1))
        elif kind == 3:  # a schema param the answer leaves out, or an optional one
            fd = next((f for f in funcs if f["name"] == n), funcs[0])
            props = list(fd["parameters"]["properties"])
            if props:
                p = rng.choice(props)
                if p not in dict(args):
                    args.append((p, "x" if lang == "python" else '"x"'))
        elif kind == 4:  # wrong name
            others = [f["name"] for f in funcs if f["name"] != n]
            calls[i] = (rng.choice(others) if others and rng.random() < 0.5 else n + "_v2", args)
        elif kind == 5 and len(calls) > 1:  # reorder
            rng.shuffle(calls)
        elif kind == 6:  # duplicate / drop a call
            if rng.random() < 0.5:
                calls.append(calls[i])
            elif len(calls) > 1:
                calls.pop(i)
        elif kind == 7 and args:  # param order shuffle
            rng.shuffle(args)
        elif kind == 8:
            calls = list(reversed(calls))
        yield "python", render(calls)
    g = render(base)
    for m in char_mutations(g, rng, 12 if lang == "python" else 40):
        yield "python", m
    wrappers = [
        lambda s: s,
        lambda s: s[1:-1],
        lambda s: "```\n" + s + "\n```",
        lambda s: "```python\n" + s + "\n```",
        lambda s: "Sure! " + s,
        lambda s: s + "\nDone.",
        lambda s: "<think>The user wants this.</think>\n\n" + s,
        lambda s: "<think>x</think><answer>" + s + "</answer>",
        lambda s: "<think>a</think>b</think>" + s,
        lambda s: " \n" + s + "\n\n",
        lambda s: s.replace("'", '"'),
        lambda s: s.replace("=", " = "),
        lambda s: s.replace(", ", ",\n"),
        lambda s: "'" + s + "'",
        lambda s: s + ";",
    ]
    for w in rng.sample(wrappers, 5):
        yield "python", w(g)
    # Qwen JSON mode
    tc = "\n".join(
        "<tool_call>\n" + json.dumps({"name": n, "arguments": dict(args)}) + "\n</tool_call>" for n, args in base
    )
    yield "json", tc
    yield "json", "<think>ok</think>\n\n" + tc
    if base and base[0][1]:
        n, args = base[0]
        bad = dict(args)
        k = rng.choice(list(bad))
        bad[k] = mutate_value(bad[k], rng)
        yield "json", "<tool_call>\n" + json.dumps({"name": n, "arguments": bad}) + "\n</tool_call>"
    yield "json", g
    for s in ["", "[]", "None", "I cannot answer that with the given functions.", "[{}]", "func()", "[f(x=1)"]:
        if rng.random() < 0.3:
            yield "python", s
    # Python-expression quirks
    if lang == "python" and base and base[0][1]:
        n, args = base[0]
        k, v = args[0]
        quirks = ["+3", "-3", "2*3", "true", "None", "sqrt(2)", "x[0]", "math.pi", "...", "not True", "(1, 2)",
                  "{'a': 1}", "[1, 2]", "f(a=1)", "1e3", "0x10", "'a' 'b'", "1_000", "b'x'", "-0.5", "3j", "2**10",
                  "'%s' % 1", "[i for i in x]", "lambda: 1", "1 if True else 2", "a.b", "{1, 2}", "10/4", "7//2", "-7 % 3",
                  "\"it's\"", "'\\u00e9'", "u'x'", "r'\\d'", "'''tri'''", "2 ** -1", "1 + 2.5", "[1] * 2", "'ab' * 2"]
        for q in rng.sample(quirks, 6):
            a2 = [(k, q)] + [(kk, repr(vv)) for kk, vv in args[1:]]
            yield "python", "[" + py_call(n, a2) + "]"
        yield "python", "[" + n + "(" + repr(v) + ", " + ", ".join(f"{kk}={vv!r}" for kk, vv in args) + ")]"
        yield "python", "[" + n + "(**{'" + k + "': 1})]"


def fullwidth(c):
    return chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c


def bold(c):
    # MATHEMATICAL BOLD SMALL/CAPITAL letters: NFKC maps them back to ASCII.
    if "a" <= c <= "z":
        return chr(0x1D41A + ord(c) - ord("a"))
    if "A" <= c <= "Z":
        return chr(0x1D400 + ord(c) - ord("A"))
    return c


def respell(name, rng, how):
    """`name` with one ASCII letter written as a compatibility character (`how` maps it)."""
    idx = [i for i, c in enumerate(name) if c.isascii() and c.isalpha()]
    if not idx:
        return name
    i = rng.choice(idx)
    return name[:i] + how(name[i]) + name[i + 1:]


def named_escapes(v, rng):
    """repr(v) with one character written as `\\N{NAME}` (sometimes lower-case, sometimes a
    name Python does not know or a malformed escape, sometimes in a raw literal)."""
    import unicodedata
    r = repr(v)
    spots = [i for i in range(1, len(r) - 1) if r[i - 1] != "\\" and r[i] != "\\" and unicodedata.name(r[i], "")]
    if not spots:
        return r
    i = rng.choice(spots)
    name = unicodedata.name(r[i])
    kind = rng.randrange(6)
    if kind == 1:
        name = name.lower()
    elif kind == 2:
        name = name.replace(" ", "  ", 1) if " " in name else name + "X"
    elif kind == 3:
        name = "NO SUCH CHARACTER NAME"
    out = r[:i] + "\\N{" + name + "}" + r[i + 1:]
    if kind == 4:
        out = "r" + out
    elif kind == 5:
        out = "\\N{" + name + "}" if rng.random() < 0.5 else out[:i] + "\\N" + r[i + 1:]
    return out


JSON_NUMBERS = ["1e999", "-1e999", "NaN", "Infinity", "-Infinity", "1e-999", "1" + "0" * 399,
                "-" + "9" * 400, "9" * 5000, "12345678901234567890123456789012345678901234567890"]


def unicode_variants(entry, answer, cat, rng):
    """Answers that BFCL's Python reads differently from a naive parser: compatibility
    characters in names (NFKC), named escapes, and JSON values Python's json accepts."""
    if "java" in cat or "relevance" in cat:
        return
    gold = answer["ground_truth"]
    base = [(list(c)[0], pick_args(c[list(c)[0]], rng)) for c in gold]

    i = rng.randrange(len(base))
    n, args = base[i]

    def with_call(parts, name=n):
        return "[" + ", ".join(py_call(name, parts) if ii == i else py_call(m, [(k, repr(v)) for k, v in a])
                               for ii, (m, a) in enumerate(base)) + "]"

    for how in (fullwidth, bold):
        yield "python", with_call([(k, repr(v)) for k, v in args], respell(n, rng, how))
        if args:
            j = rng.randrange(len(args))
            yield "python", with_call([(respell(k, rng, how) if jj == j else k, repr(v)) for jj, (k, v) in enumerate(args)])

    strs = [(j, v) for j, (k, v) in enumerate(args) if isinstance(v, str) and v]
    for _ in range(3 if strs else 0):
        j, v = rng.choice(strs)
        yield "python", with_call([(k, named_escapes(v, rng) if jj == j else repr(w)) for jj, (k, w) in enumerate(args)])
    nums = [j for j, (k, v) in enumerate(args) if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if nums:
        j = rng.choice(nums)
        digits = lambda w: "".join(fullwidth(c) if c.isdigit() and rng.random() < 0.5 else c for c in repr(w))
        yield "python", with_call([(k, digits(w) if jj == j else repr(w)) for jj, (k, w) in enumerate(args)])

    # JSON mode: numbers Python's json reads (and one it refuses), lone surrogates.
    def tool_calls(changed):
        calls = [(changed if ii == i else (m, dict(a))) for ii, (m, a) in enumerate(base)]
        return "\n".join("<tool_call>\n" + json.dumps({"name": m, "arguments": a}) + "\n</tool_call>" for m, a in calls)

    for _ in range(3):
        a = dict(args)
        k = rng.choice(list(a) or ["x"])
        yield "json", tool_calls((n, {**a, k: "@@"})).replace('"@@"', rng.choice(JSON_NUMBERS))
    if strs:
        j, v = rng.choice(strs)
        a = dict(args)
        a[args[j][0]] = v + "\ud800" if rng.random() < 0.5 else "\udfff" + v
        yield "json", tool_calls((n, a))
    yield "json", tool_calls((n + "\udc00", dict(args)))


def relevance_variants(entry, cat, rng):
    funcs = entry["function"]
    for s in ["", "[]", "None of the functions apply.", "I cannot help.", "[{}]", "<think>no</think>\n\nNo call.",
              "```\n[]\n```", "None", "[None]", "f()"]:
        yield "python", s
    if not funcs:
        return
    for _ in range(3):
        f = rng.choice(funcs)
        props = list(f["parameters"]["properties"])
        args = [(p, repr(rng.choice([1, "x", True, 2.5]))) for p in props[: rng.randrange(len(props) + 1)]]
        yield "python", "[" + py_call(f["name"], args) + "]"
        yield "json", "<tool_call>\n" + json.dumps({"name": f["name"], "arguments": {p: 1 for p in props[:1]}}) + "\n</tool_call>"
    yield "json", "no tools needed"
    f = funcs[0]
    props = list(f["parameters"]["properties"])
    g = "[" + py_call(f["name"], [(p, "1") for p in props[:2]]) + "]"
    for m in char_mutations(g, rng, 6):
        yield "python", m
    yield "python", "<think>t</think>[" + funcs[0]["name"] + "()]"


def cases(bfcl_dir, seed, per_entry_limit, only=None, unicode=False):
    rng = random.Random(seed)
    for cat in CATEGORIES:
        if only and cat not in only:
            continue
        qf = Path(bfcl_dir) / f"BFCL_v4_{cat}.json"
        if not qf.exists():
            continue
        entries = load(qf)
        af = Path(bfcl_dir) / "possible_answer" / f"BFCL_v4_{cat}.json"
        answers = {a["id"]: a for a in load(af)} if af.exists() else {}
        for e in entries:
            ans = answers.get(e["id"])
            if unicode:
                gen = unicode_variants(e, ans, cat, random.Random(f"{seed}:{e['id']}"))
            elif "relevance" in cat:
                gen = relevance_variants(e, cat, rng)
            else:
                gen = call_variants(e, ans, cat, rng)
            for n, (fmt, result) in enumerate(gen):
                if n >= per_entry_limit:
                    break
                valid, et = bfcl_verdict(e, ans, cat, fmt, result)
                yield {"id": e["id"], "category": cat, "format": fmt, "result": result, "valid": valid, "error_type": et}


def import_stubbing(modname, attr):
    """Imports a handler class, stubbing SDK modules it imports but never uses here."""
    import importlib
    for _ in range(50):
        try:
            return getattr(importlib.import_module(modname), attr)
        except ModuleNotFoundError as e:
            stub = types.ModuleType(e.name)
            stub.__getattr__ = lambda name: type(name, (), {})
            sys.modules[e.name] = stub
    raise RuntimeError("too many missing modules")


def prompts(bfcl_dir, per_cat, seed):
    QwenHandler = import_stubbing("bfcl_eval.model_handler.local_inference.qwen", "QwenHandler")
    QwenFCHandler = import_stubbing("bfcl_eval.model_handler.local_inference.qwen_fc", "QwenFCHandler")

    rng = random.Random(seed)
    for cat in CATEGORIES:
        entries = load(Path(bfcl_dir) / f"BFCL_v4_{cat}.json")
        # Entries with a system message or non-ASCII text are the interesting ones.
        special = [e for e in entries if e["question"][0][0]["role"] == "system" or not json.dumps(e).isascii()
                   or any(m["role"] == "assistant" for m in e["question"][0])]
        pick = rng.sample(entries, min(per_cat, len(entries))) + special[:per_cat]
        for e in pick:
            e = copy.deepcopy(e)
            funcs = _func_doc_language_specific_pre_processing(e["function"], cat)
            msgs = system_prompt_pre_processing_chat_model(copy.deepcopy(e["question"][0]), funcs, e["id"])
            bfcl = QwenHandler._format_prompt(None, msgs, funcs)
            fc = QwenFCHandler._format_prompt(None, copy.deepcopy(e["question"][0]), funcs)
            yield {"id": e["id"], "category": cat, "bfcl": bfcl, "qwen_fc": fc}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bfcl-dir", required=True)
    ap.add_argument("--out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-entry", type=int, default=40)
    ap.add_argument("--categories", help="comma-separated subset of categories")
    ap.add_argument("--prompts-out")
    ap.add_argument("--ids-per-category", type=int, default=3)
    ap.add_argument("--unicode", action="store_true", help="only the Unicode and JSON-number cases")
    ap.add_argument("--replay", help="JSONL of {id, category, format, result}: add BFCL's verdicts (to --out)")
    a = ap.parse_args()
    if a.replay:
        entries, answers = {}, {}
        for cat in CATEGORIES:
            qf = Path(a.bfcl_dir) / f"BFCL_v4_{cat}.json"
            if qf.exists():
                entries.update({e["id"]: e for e in load(qf)})
            af = Path(a.bfcl_dir) / "possible_answer" / f"BFCL_v4_{cat}.json"
            if af.exists():
                answers.update({x["id"]: x for x in load(af)})
        with open(a.out, "w") as f:
            for c in load(a.replay):
                c["valid"], c["error_type"] = bfcl_verdict(entries[c["id"]], answers.get(c["id"]), c["category"], c["format"], c["result"])
                f.write(json.dumps(c) + "\n")
        return
    if a.out:
        n = 0
        with open(a.out, "w") as f:
            only = a.categories.split(",") if a.categories else None
            for c in cases(a.bfcl_dir, a.seed, a.per_entry, only, a.unicode):
                f.write(json.dumps(c) + "\n")
                n += 1
        print(f"wrote {n} cases to {a.out}")
    if a.prompts_out:
        with open(a.prompts_out, "w") as f:
            for p in prompts(a.bfcl_dir, a.ids_per_category, a.seed):
                f.write(json.dumps(p) + "\n")


if __name__ == "__main__":
    main()
