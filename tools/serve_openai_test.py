#!/usr/bin/env python3
"""`fcgpu serve` driven by the official `openai` client (a client fcgpu did not write).

Usage: serve_openai_test.py FCGPU_BINARY MODEL_DIR            (the checks; exit 1 on a failure)
       serve_openai_test.py FCGPU_BINARY MODEL_DIR --bench    (requests/s and time to first token)

Starts the server on a free loopback port, runs chat, tools, streaming, n > 1, seed
reproducibility, errors as the client's exception types, and a bounded load test (32 concurrent
clients x 10 requests: every request answered, resident memory flat), then stops the server with
SIGINT and checks that it exits cleanly.
"""
import os
import re
import signal
import subprocess
import sys
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


def main():
    global MAX_TOKENS
    binary, model_dir = sys.argv[1], sys.argv[2]
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


if __name__ == "__main__":
    main()
