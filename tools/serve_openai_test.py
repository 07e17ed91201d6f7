#!/usr/bin/env python3
"""`fcgpu serve` driven by the official `openai` client (a client fcgpu did not write).

Usage: serve_openai_test.py FCGPU_BINARY MODEL_DIR [FC_MODEL_DIR]  (the checks; exit 1 on a failure)
       serve_openai_test.py FCGPU_BINARY MODEL_DIR --bench    (requests/s and time to first token)
       serve_openai_test.py FCGPU_BINARY MODEL_DIR --real     (a real model: chat, streamed, tools)

Starts the server on a free loopback port, runs chat, tools, streaming, n > 1, seed
reproducibility, errors as the client's exception types, and a bounded load test (32 concurrent
clients x 10 requests: every request answered, resident memory flat), then stops the server with
SIGINT and checks that it exits cleanly. With FC_MODEL_DIR (a model trained on the embedded task,
such as assets/fc-tiny), a second server with `--style compact` shows tool calls coming back as
OpenAI `tool_calls`, a named `tool_choice` forcing its function, and tool-call streaming.
"""
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import openai

MAX_TOKENS = 8


def start(binary, model, *extra):
    p = subprocess.Popen([binary, "serve", "--model", model, "--port", "0", "--device", "cpu", *extra],
                         stderr=subprocess.PIPE, text=True)
    line = p.stderr.readline()
    m = re.search(r"listening on (http://\S+)", line)
    if not m:
        p.kill()
        sys.exit(f"server did not start: {line}{p.stderr.read()}")
    # Keep draining stderr so the server never blocks on a full pipe.
    threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
    client = openai.OpenAI(base_url=m.group(1) + "/v1", api_key="none", max_retries=0, timeout=120)
    return p, client


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def chat(client, model, **kw):
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        max_tokens=kw.pop("max_tokens", MAX_TOKENS), **kw)


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def check_chat(client, model):
    r = chat(client, model, temperature=0)
    assert r.object == "chat.completion" and r.model == model, r
    c = r.choices[0]
    assert c.finish_reason in ("stop", "length"), c
    assert isinstance(c.message.content, str)
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= MAX_TOKENS
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def check_tools(client, model):
    # A conversation with an earlier call and its result, tools offered, three tool_choice forms.
    msgs = [{"role": "system", "content": "You call functions."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21}"},
            {"role": "user", "content": "And in Rome?"}]
    for choice in ["auto", "none", {"type": "function", "function": {"name": "get_weather"}}]:
        r = client.chat.completions.create(model=model, messages=msgs, tools=TOOLS, tool_choice=choice,
                                           max_tokens=MAX_TOKENS, temperature=0)
        c = r.choices[0]
        assert c.finish_reason in ("stop", "length", "tool_calls"), c
        if c.finish_reason == "tool_calls":
            assert c.message.tool_calls[0].type == "function"
    try:
        client.chat.completions.create(model=model, messages=msgs, tools=TOOLS, max_tokens=4,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
        raise AssertionError("an unknown tool_choice name was accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "tool_choice", e.body


def check_stream(client, model):
    want = chat(client, model, temperature=0).choices[0].message.content
    parts, finish, usage = [], None, None
    for ch in chat(client, model, temperature=0, stream=True, stream_options={"include_usage": True}):
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(parts) == want, ("".join(parts), want)
    assert finish in ("stop", "length") and usage is not None and usage.completion_tokens > 0


def check_n_and_seed(client, model):
    a = chat(client, model, n=3, seed=1234, temperature=1.0)
    b = chat(client, model, n=3, seed=1234, temperature=1.0)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    texts = {c.message.content for c in a.choices}
    c = chat(client, model, n=3, seed=99, temperature=1.0)
    assert texts != {x.message.content for x in c.choices} or len(texts) == 1, "seed changes nothing"
    t = client.completions.create(model=model, prompt="def add(a, b):", max_tokens=6, seed=5, n=2)
    u = client.completions.create(model=model, prompt="def add(a, b):", max_tokens=6, seed=5, n=2)
    assert [x.text for x in t.choices] == [x.text for x in u.choices]


def check_errors(client, model):
    cases = [
        (openai.NotFoundError, lambda: client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}])),
        (openai.BadRequestError, lambda: chat(client, model, temperature=7)),
        (openai.BadRequestError, lambda: chat(client, model, max_tokens=10 ** 6)),
        (openai.BadRequestError, lambda: client.completions.create(model=model, prompt="x " * 5000)),
        (openai.BadRequestError, lambda: client.chat.completions.create(model=model, messages=[])),
    ]
    for kind, call in cases:
        try:
            call()
            raise AssertionError(f"expected {kind.__name__}")
        except kind as e:
            assert isinstance(e.body, dict) and e.body.get("message"), e.body
    assert client.models.list().data[0].id == model


# The embedded task's tools, as `fcgpu train` trains on them; served with `--style compact`, the
# shipped base `assets/fc-tiny` answers these with calls (the values copied from the request).
FC_TOOLS = {t["name"]: {"type": "function", "function": t} for t in [
    {"name": "calculate_tip", "description": "Calculate the tip for a bill.", "parameters": {
        "type": "dict", "properties": {
            "bill_amount": {"type": "float", "description": "Bill total"},
            "tip_percent": {"type": "integer", "description": "Tip percentage"},
            "split": {"type": "integer", "description": "Number of people"}},
        "required": ["bill_amount", "tip_percent"]}},
    {"name": "find_restaurants", "description": "Find restaurants in a city.", "parameters": {
        "type": "dict", "properties": {
            "city": {"type": "string", "description": "City name"},
            "cuisine": {"type": "string", "description": "Type of food",
                        "enum": ["Italian", "Japanese", "Mexican", "Indian", "Thai", "French"]},
            "max_price": {"type": "integer", "description": "Price level 1-4"}},
        "required": ["city", "cuisine"]}},
    {"name": "search_flights", "description": "Search for flights between two cities on a date.", "parameters": {
        "type": "dict", "properties": {
            "origin": {"type": "string", "description": "Departure city"},
            "destination": {"type": "string", "description": "Arrival city"},
            "date": {"type": "string", "description": "Date, YYYY-MM-DD"},
            "cabin": {"type": "string", "description": "Cabin class", "enum": ["economy", "business", "first"]}},
        "required": ["origin", "destination", "date"]}},
]}
TIP = "Calculate a 14% tip on a bill of 1729.39."
FLIGHTS = "Find flights from Kavin to Corsel on 2026-02-20 in first class."


def fc_chat(client, model, text, tools, **kw):
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], tools=[FC_TOOLS[t] for t in tools],
        max_tokens=kw.pop("max_tokens", 96), temperature=0, **kw)


def check_fc_tool_calls(client, model):
    """Calls come back as OpenAI tool_calls, reasoning as reasoning_content."""
    import json
    for text, tools, name, args in [
        (TIP, ["calculate_tip"], "calculate_tip", {"bill_amount": 1729.39, "tip_percent": 14}),
        (FLIGHTS, ["find_restaurants", "search_flights"], "search_flights",
         {"origin": "Kavin", "destination": "Corsel", "date": "2026-02-20", "cabin": "first"}),
    ]:
        c = fc_chat(client, model, text, tools).choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None, c
        call = c.message.tool_calls[0]
        assert call.type == "function" and call.function.name == name, c
        assert json.loads(call.function.arguments) == args, call.function.arguments
        assert name in getattr(c.message, "reasoning_content", ""), c.message


def check_fc_named_choice(client, model):
    """A named tool_choice makes the answer a call of that function, even the wrong one."""
    for name in ["search_flights", "find_restaurants"]:
        c = fc_chat(client, model, FLIGHTS, ["find_restaurants", "search_flights"],
                    tool_choice={"type": "function", "function": {"name": name}}).choices[0]
        if c.message.tool_calls:
            assert [t.function.name for t in c.message.tool_calls] == [name], c
        else:  # the tiny model's arguments did not parse: still a call of `name` in the text
            assert c.message.content.lstrip().startswith(f"[{name}("), c
    c = fc_chat(client, model, "Tell me a joke about penguins.", ["calculate_tip"], tool_choice="required",
                max_tokens=48).choices[0]
    assert c.message.tool_calls or c.message.content.lstrip().startswith("["), c


def check_fc_stream(client, model):
    """Streamed: reasoning arrives in pieces before the calls; a text answer with tools offered
    streams as content deltas; both assemble to the non-streamed answer."""
    want = fc_chat(client, model, TIP, ["calculate_tip"]).choices[0]
    reasoning, calls, finish, call_chunk, last_reasoning_chunk = [], {}, None, None, None
    for i, ch in enumerate(fc_chat(client, model, TIP, ["calculate_tip"], stream=True)):
        for c in ch.choices:
            r = getattr(c.delta, "reasoning_content", None)
            if r:
                reasoning.append(r)
                last_reasoning_chunk = i
            for t in c.delta.tool_calls or []:
                calls[t.index] = (t.function.name, t.function.arguments)
                call_chunk = i
            finish = c.finish_reason or finish
    assert len(reasoning) > 3 and "".join(reasoning) == want.message.reasoning_content, reasoning
    assert call_chunk is not None and last_reasoning_chunk < call_chunk, (last_reasoning_chunk, call_chunk)
    assert calls == {0: (want.message.tool_calls[0].function.name, want.message.tool_calls[0].function.arguments)}
    assert finish == "tool_calls"
    text = "Tell me a joke about penguins."
    want = fc_chat(client, model, text, ["calculate_tip"]).choices[0]
    assert want.message.tool_calls is None and want.message.content, want
    pieces = [c.delta.content for ch in fc_chat(client, model, text, ["calculate_tip"], stream=True)
              for c in ch.choices if c.delta.content]
    assert len(pieces) > 3 and "".join(pieces) == want.message.content, pieces


def load(client, model, clients, per_client, stream=False):
    """Every client sends `per_client` requests; returns (errors, seconds, first-token times)."""
    errors, ttft = [], []
    lock = threading.Lock()

    def worker(k):
        for i in range(per_client):
            t0 = time.perf_counter()
            try:
                if stream:
                    first = None
                    for ch in chat(client, model, stream=True, seed=k * 1000 + i):
                        if first is None and ch.choices and (ch.choices[0].delta.content or ch.choices[0].finish_reason):
                            first = time.perf_counter() - t0
                    with lock:
                        ttft.append(first)
                else:
                    r = chat(client, model, seed=k * 1000 + i)
                    assert r.choices[0].finish_reason in ("stop", "length")
            except Exception as e:  # every failure is reported, none stops the others
                with lock:
                    errors.append(repr(e))

    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return errors, time.perf_counter() - t0, ttft


def check_load(client, model, pid):
    errors, _, _ = load(client, model, 32, 2)  # warm-up: allocator pools and buffers settle
    assert not errors, errors[:3]
    before = rss_kib(pid)
    errors, secs, _ = load(client, model, 32, 10)
    after = rss_kib(pid)
    assert not errors, f"{len(errors)} of 320 requests failed: {errors[:3]}"
    growth = after - before
    print(f"load: 320 requests from 32 clients in {secs:.1f}s; RSS {before} -> {after} KiB")
    assert growth < max(16384, before // 4), f"RSS grew by {growth} KiB"


def bench(client, model):
    for clients, per in [(1, 20), (32, 4)]:
        errors, secs, ttft = load(client, model, clients, per, stream=True)
        assert not errors, errors[:3]
        ttft.sort()
        n = clients * per
        print(f"{clients:>2} clients x {per} streamed requests (max_tokens {MAX_TOKENS}): "
              f"{n / secs:.1f} requests/s, time to first token median {1000 * ttft[n // 2]:.0f} ms, "
              f"p90 {1000 * ttft[int(n * 0.9)]:.0f} ms")


def with_tool_template(model_dir, tmp):
    """`model_dir` as is when its chat template reads `tools`; else a copy (files linked) whose
    template is fcgpu's built-in Qwen ChatML, since fcgpu refuses tools a template never shows."""
    template = os.path.join(model_dir, "chat_template.jinja")
    if os.path.exists(template) and "tools" in open(template).read():
        return model_dir
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in os.listdir(model_dir):
        if name != "chat_template.jinja":
            os.symlink(os.path.abspath(os.path.join(model_dir, name)), os.path.join(tmp, name))
    with open(os.path.join(root, "prompts/templates/qwen-chatml.jinja")) as f:
        text = f.read()
    with open(os.path.join(tmp, "chat_template.jinja"), "w") as f:
        f.write(text)
    return tmp


def real_model(binary, model_dir):
    """A real model: chat, streamed chat and tools each answered, then a clean exit."""
    p, client = start(binary, model_dir, "--served-model-name", "real")
    try:
        msgs = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
        r = client.chat.completions.create(model="real", messages=msgs, max_tokens=24, temperature=0)
        text = r.choices[0].message.content
        assert r.choices[0].finish_reason in ("stop", "length") and re.search(r"[A-Za-z]{3,}", text), r
        assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 24, r.usage
        print(f"ok chat: {text!r}")
        parts = [c.delta.content or "" for ch in client.chat.completions.create(
            model="real", messages=msgs, max_tokens=24, temperature=0, stream=True) for c in ch.choices]
        assert "".join(parts) == text, ("".join(parts), text)
        print(f"ok stream: {len(parts)} chunks")
        try:
            r = client.chat.completions.create(
                model="real", messages=[{"role": "user", "content": "What is the weather in Paris?"}],
                tools=TOOLS, max_tokens=48, temperature=0)
        except openai.BadRequestError as e:
            # A chat template that never reads `tools` (SmolLM2's) is refused, naming the field.
            assert e.body.get("param") == "tools" and e.body.get("message"), e.body
            print(f"ok tools: refused: {e.body['message']}")
        else:
            c = r.choices[0]
            assert c.finish_reason in ("stop", "length", "tool_calls"), c
            assert c.message.tool_calls or c.message.content, c
            print(f"ok tools: {c.finish_reason}, {c.message.tool_calls or c.message.content!r}")
    finally:
        p.send_signal(signal.SIGINT)
        code = p.wait(timeout=60)
    assert code == 0, f"the server exited with {code} after SIGINT"


def main():
    global MAX_TOKENS
    binary = sys.argv[1]
    if "--real" in sys.argv[3:]:
        return real_model(binary, sys.argv[2])
    tmp = tempfile.TemporaryDirectory()
    model_dir = with_tool_template(sys.argv[2], tmp.name)
    is_bench = "--bench" in sys.argv[3:]
    if is_bench:
        MAX_TOKENS = 32
    p, client = start(binary, model_dir, "--served-model-name", "fixture")
    try:
        if is_bench:
            bench(client, "fixture")
        else:
            t0 = time.perf_counter()
            for check in [check_chat, check_tools, check_stream, check_n_and_seed, check_errors]:
                check(client, "fixture")
                print(f"ok {check.__name__}")
            check_load(client, "fixture", p.pid)
            print(f"all openai-client checks passed in {time.perf_counter() - t0:.1f}s")
    finally:
        p.send_signal(signal.SIGINT)
        code = p.wait(timeout=60)
    assert code == 0, f"the server exited with {code} after SIGINT"
    if is_bench or len(sys.argv) < 4 or sys.argv[3].startswith("--"):
        return
    # A model that calls functions: the shipped base, with the prompt it was trained on.
    p, client = start(binary, sys.argv[3], "--served-model-name", "fc-tiny", "--style", "compact")
    try:
        for check in [check_fc_tool_calls, check_fc_named_choice, check_fc_stream]:
            check(client, "fc-tiny")
            print(f"ok {check.__name__}")
    finally:
        p.send_signal(signal.SIGINT)
        code = p.wait(timeout=60)
    assert code == 0, f"the fc-tiny server exited with {code} after SIGINT"


if __name__ == "__main__":
    main()
