#!/usr/bin/env python3
"""Load generator for `fcgpu serve`: compares two server binaries on the same requests.

Usage:
  tools/bench_serve.py --bin NEW_BINARY [--baseline OLD_BINARY] --model MODEL_DIR \\
      [--clients 1,8,64] [--requests-per-client N | --requests TOTAL_PER_LEVEL] \\
      [--max-tokens 32] [--pairs 1] [--extra-args "..."] [--json OUT.json] [--markdown]

Each server is started as `BIN serve --model MODEL_DIR --port 0 --device cpu --max-batch 64
[extra args]`, warmed up with 2 requests (not counted), run through every concurrency level,
then stopped with SIGINT. With --baseline, each of the --pairs runs both binaries, alternating
the order (NEW then OLD, then OLD then NEW, ...), and the report gives the median over pairs.

The requests model function calling (like BFCL): every request has the same long system prompt
listing 6 function JSON schemas (about 1,030 tokens with SmolLM2's tokenizer; the warm-up sends
it too) and a different short user question; temperature 1.0, a fixed seed per request, streamed
(SSE). Request i of a level is the same for every binary and pair.
For each level of c clients (c threads, each sending its requests back to back) it measures:
requests/s (completed / wall time of the level), time to first token (TTFT: send -> first chunk
with non-empty delta content, tool_calls or a finish_reason) median and p90, latency median,
output tokens/s (usage.completion_tokens, or content chunks when the server sends no usage) and
errors (non-200, stream error, timeout or exception). After each level GET /health is recorded,
with the server's CPU seconds for the level (on a shared machine: did it get the cores?).
Only the Python standard library is used.
"""
import argparse, datetime, http.client, json, os, random, re, shlex, signal, statistics, subprocess, sys, threading, time

TIMEOUT = 600.0
FUNCS = [  # (name, description, {param: (type, description)}, required params)
    ("get_weather_forecast", "Daily weather forecast for a location: temperature, rain probability and wind.",
     {"location": ("string", "City and country, e.g. 'Lisbon, Portugal'."), "days": ("integer", "Days to forecast, 1 to 14."),
      "units": ("string", "'metric' (default) or 'imperial'.")}, ["location", "days"]),
    ("book_flight", "Books a one-way or return flight and returns the booking reference and price.",
     {"origin": ("string", "IATA code of the departure airport, e.g. 'JFK'."), "destination": ("string", "IATA code of the arrival airport."),
      "departure_date": ("string", "YYYY-MM-DD."), "return_date": ("string", "YYYY-MM-DD; omit for one-way."),
      "passengers": ("integer", "Adult passengers, 1 to 9.")}, ["origin", "destination", "departure_date"]),
    ("convert_currency", "Converts an amount of money between currencies at the latest rate.",
     {"amount": ("number", "Amount to convert."), "from_currency": ("string", "ISO 4217 code, e.g. 'EUR'."),
      "to_currency": ("string", "ISO 4217 code, e.g. 'JPY'.")}, ["amount", "from_currency", "to_currency"]),
    ("search_restaurants", "Finds restaurants near a location, sorted by distance.",
     {"location": ("string", "Address or city."), "cuisine": ("string", "E.g. 'italian', 'vegan'."),
      "min_rating": ("number", "Minimum rating, 0 to 5.")}, ["location"]),
    ("create_calendar_event", "Creates a calendar event and invites attendees.",
     {"title": ("string", "Title of the event."), "start_time": ("string", "ISO 8601, e.g. '2024-05-03T14:00'."),
      "duration_minutes": ("integer", "Length in minutes."), "attendees": ("array", "Emails of the invitees.")},
     ["title", "start_time", "duration_minutes"]),
    ("calculate_mortgage_payment", "Monthly payment of a fixed-rate mortgage.",
     {"principal": ("number", "Loan amount."), "annual_rate": ("number", "Interest rate in percent, e.g. 4.5."),
      "years": ("integer", "Term in years.")}, ["principal", "annual_rate", "years"]),
]


def schema(name, desc, params, required):
    props = {p: {"type": t, "description": d} | ({"items": {"type": "string"}} if t == "array" else {}) for p, (t, d) in params.items()}
    return {"name": name, "description": desc, "parameters": {"type": "object", "properties": props, "required": required}}


SYSTEM_PROMPT = (
    "You are a careful assistant that answers by calling functions. You are given a question and the functions "
    "below, each described by a JSON schema. Decide which function or functions answer the question and call them "
    "with correct arguments. Answer only with the calls, as a JSON list of objects of the form "
    '[{"name": "function_name", "arguments": {"param": value}}], and nothing else. Use only the functions listed; '
    "if none of them fits, or a required argument is missing from the question, answer with an empty list []. "
    "Several independent calls may be returned in one list, in the order they should run.\n\n"
    "Available functions:\n" + "\n".join(json.dumps(schema(*f)) for f in FUNCS))
TEMPLATES = [  # user questions: template i % 7, its blanks filled from random.Random(i)
    "What will the weather be like in {city} over the next {n} days?", "Convert {amt} {cur} to {cur2}, please.",
    "Book me a flight from {ap} to {ap2} on 2024-{m:02d}-{d:02d} for {p} people.", "Find a {cuisine} restaurant near {city} with at least a {r} star rating.",
    "Schedule a meeting called '{topic}' on 2024-{m:02d}-{d:02d} at {h}:00 for {n}0 minutes.",
    "What is the monthly payment on a {amt}000 mortgage at {r}.{n}% over {y} years?",
    "I'm going to {city} next week: how many {cur2} do I get for {amt} {cur}, and what's the forecast there?"]
FILL = dict(city=["Paris", "Tokyo", "Lagos", "Lima", "Oslo", "Hanoi", "Denver", "Cairo"], cur=["USD", "EUR", "GBP", "CHF"],
            cur2=["JPY", "INR", "BRL", "CAD"], ap=["JFK", "LHR", "CDG", "NRT"], ap2=["SFO", "SIN", "DXB", "GRU"],
            cuisine=["italian", "thai", "vegan", "sushi", "mexican"], topic=["Budget review", "Team sync", "Design critique"])


def question(i):
    rng = random.Random(i)
    vals = {k: rng.choice(v) for k, v in FILL.items()} | dict(
        n=rng.randint(2, 9), amt=rng.randint(20, 900), m=rng.randint(1, 12), d=rng.randint(1, 28), p=rng.randint(1, 4),
        r=rng.randint(3, 4), h=rng.randint(8, 17), y=rng.choice([15, 20, 30]))
    return TEMPLATES[i % len(TEMPLATES)].format(**vals)


class Server:
    def __init__(self, binary, model, extra):
        cmd = [binary, "serve", "--model", model, "--port", "0", "--device", "cpu", "--max-batch", "64", *extra]
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        except OSError as e:
            sys.exit(f"cannot start {binary}: {e}")
        SERVERS.append(self)  # stopped on Ctrl-C even while starting
        self.lines, self.ready, self.addr, self.name = [], threading.Event(), None, None
        threading.Thread(target=self._drain, daemon=True).start()  # drains stderr until the server exits
        deadline = time.time() + TIMEOUT
        while not self.ready.wait(0.2):
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                time.sleep(0.2)  # let the drainer read the rest
                sys.exit(f"server {binary} failed to start (exit {self.proc.returncode}); its stderr:\n" + "".join(self.lines))

    def _drain(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            m = re.search(r"fcgpu serve: model `(.*)` listening on http://(\S+)", line)
            if m and not self.ready.is_set():
                self.name, self.addr = m.groups()
                self.ready.set()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                print("  server still running 30 s after SIGINT: killed", flush=True)
                self.proc.kill()
                self.proc.wait()
        SERVERS[:] = [s for s in SERVERS if s is not self]
        return self.proc.returncode

    def cpu_s(self):  # CPU seconds the server has used (user + system), to see whether it got the cores
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                return sum(map(int, f.read().rsplit(")", 1)[1].split()[11:13])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            return float("nan")

    def conn(self, timeout):
        host, port = self.addr.rsplit(":", 1)
        return http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout)


def request(srv, i, max_tokens):
    """One streamed chat request (a new connection); returns what happened, never raises."""
    body = json.dumps({"model": srv.name, "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question(i)}],
                       "temperature": 1.0, "seed": i, "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}})
    rec = {"i": i, "ok": False, "ttft": None, "latency": None, "tokens": 0, "usage": False, "error": None}
    t0 = time.perf_counter()
    try:
        conn = srv.conn(TIMEOUT)
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
        chunks, usage, done = 0, None, False
        for raw in resp:
            if time.perf_counter() - t0 > TIMEOUT:
                raise TimeoutError(f"request took over {TIMEOUT:.0f} s")
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            if (data := line[5:].strip()) == "[DONE]":
                done = True
                break
            ev = json.loads(data)
            if "error" in ev:
                raise RuntimeError(f"stream error: {ev['error']}")
            usage = ev.get("usage") or usage
            for ch in ev.get("choices") or []:
                delta = ch.get("delta") or {}
                chunks += bool(delta.get("content"))
                if rec["ttft"] is None and (delta.get("content") or delta.get("tool_calls") or ch.get("finish_reason")):
                    rec["ttft"] = time.perf_counter() - t0
        conn.close()
        if not done:
            raise RuntimeError("stream ended without [DONE]")
        rec.update(ok=True, latency=time.perf_counter() - t0, tokens=usage["completion_tokens"] if usage else chunks, usage=bool(usage))
    except Exception as e:  # counted as an error
        rec["error"] = f"{type(e).__name__}: {e}"
    return rec


def health(srv):
    try:
        conn = srv.conn(30)
        conn.request("GET", "/health")
        return json.loads(conn.getresponse().read())
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}


def pct(xs, q):  # linear interpolation between order statistics
    if not xs:
        return float("nan")
    xs, k = sorted(xs), (len(xs) - 1) * q
    return xs[int(k)] + (xs[min(int(k) + 1, len(xs) - 1)] - xs[int(k)]) * (k - int(k))


def run_level(srv, clients, n, base, max_tokens):
    """`clients` threads; thread j sends requests base+j, base+j+clients, ... back to back (n in all)."""
    recs = [None] * n
    def client(j):
        for k in range(j, n, clients):
            recs[k] = request(srv, base + k, max_tokens)
    threads = [threading.Thread(target=client, args=(j,), daemon=True) for j in range(clients)]
    t0, cpu0 = time.perf_counter(), srv.cpu_s()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - t0, srv.cpu_s() - cpu0
    ok = [r for r in recs if r["ok"]]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    return {"clients": clients, "requests": n, "wall_s": wall, "completed": len(ok), "errors": n - len(ok),
            "req_per_s": len(ok) / wall, "ttft_med_ms": 1e3 * pct(ttft, 0.5), "ttft_p90_ms": 1e3 * pct(ttft, 0.9),
            "lat_med_ms": 1e3 * pct([r["latency"] for r in ok], 0.5), "tok_per_s": sum(r["tokens"] for r in ok) / wall,
            "server_cpu_s": cpu, "loadavg": os.getloadavg(),
            "usage_reported": all(r["usage"] for r in ok), "health": health(srv), "records": recs}


def run_binary(label, binary, a, levels):
    print(f"[{label}] starting {binary}", flush=True)
    srv = Server(binary, a.model, shlex.split(a.extra_args))
    try:
        for w in [request(srv, 10**9 + k, a.max_tokens) for k in range(2)]:  # warm-up, not counted
            if not w["ok"]:
                print(f"  warm-up request failed: {w['error']}", flush=True)
        out = []
        for li, c in enumerate(levels):
            lv = run_level(srv, c, a.requests or c * a.requests_per_client, 10**6 * (li + 1), a.max_tokens)
            kv = {k: v for k, v in lv["health"].items() if isinstance(v, (int, float)) and ("prefix" in k or "kv" in k)}
            errs = sorted({r["error"] for r in lv["records"] if r["error"]})
            print(f"  clients={c:<3} {lv['completed']}/{lv['requests']} ok in {lv['wall_s']:.1f} s (server CPU {lv['server_cpu_s']:.0f} s)  {lv['req_per_s']:.2f} req/s  "
                  f"TTFT median {lv['ttft_med_ms']:.0f} ms  /health {kv}" + (f"  errors: {errs[:3]}" if errs else ""), flush=True)
            out.append(lv)
        return out
    finally:
        if (rc := srv.stop()) != 0:
            print(f"  [{label}] server exited with {rc}; its stderr ends:\n" + "".join(srv.lines[-10:]), flush=True)


SERVERS = []
COLS = [("binary", "{}"), ("clients", "{}"), ("requests", "{}"), ("requests/s", "{:.2f}"), ("TTFT median ms", "{:.0f}"),
        ("TTFT p90 ms", "{:.0f}"), ("latency median ms", "{:.0f}"), ("output tokens/s", "{:.1f}"), ("errors", "{}")]
KEYS = ["binary", "clients", "requests", "req_per_s", "ttft_med_ms", "ttft_p90_ms", "lat_med_ms", "tok_per_s", "errors"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", required=True); ap.add_argument("--baseline"); ap.add_argument("--model", required=True)
    ap.add_argument("--clients", default="1,8,64"); ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--requests", type=int, help="requests per level in all (overrides --requests-per-client)")
    ap.add_argument("--max-tokens", type=int, default=32); ap.add_argument("--pairs", type=int, default=1)
    ap.add_argument("--extra-args", default=""); ap.add_argument("--json"); ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C even where SIGINT was inherited ignored
    levels = [int(c) for c in a.clients.split(",")]
    bins = {"new": a.bin} | ({"old": a.baseline} if a.baseline else {})
    env = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "nproc": os.cpu_count(), "loadavg": os.getloadavg()}
    print(f"date {env['date']}  nproc {env['nproc']}  loadavg {' '.join(f'{x:.2f}' for x in env['loadavg'])}", flush=True)
    runs = {k: [] for k in bins}
    try:
        for p in range(a.pairs):  # NEW/OLD, then OLD/NEW, ...
            for label in list(bins)[::1 if p % 2 == 0 else -1]:
                runs[label].append(run_binary(f"{label} {bins[label]}, pair {p + 1}", bins[label], a, levels))
    except KeyboardInterrupt:
        print("interrupted: stopping the server", flush=True)
        for s in list(SERVERS):
            s.stop()
        sys.exit(130)
    rows = [{k: statistics.median(r[li][k] for r in rs) for k in KEYS[3:8]} | {"binary": label, "clients": c,
             "requests": rs[0][li]["requests"], "errors": sum(r[li]["errors"] for r in rs)}
            for label, rs in runs.items() for li, c in enumerate(levels)]
    table = [[f.format(r[k]) for (_, f), k in zip(COLS, KEYS)] for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, (h, _) in enumerate(COLS)]
    print(f"\nmedian over {a.pairs} pair(s), errors summed; new = {a.bin}" + (f", old = {a.baseline}" if a.baseline else ""))
    for line in [[h for h, _ in COLS]] + table:
        print("  ".join(x.rjust(w) for x, w in zip(line, widths)))
    div = lambda x, y: x / y if y else float("nan")
    ratios = [{"clients": n["clients"], "req_per_s_new_over_old": div(n["req_per_s"], o["req_per_s"]),
               "ttft_med_old_over_new": div(o["ttft_med_ms"], n["ttft_med_ms"])} for n, o in zip(rows, rows[len(levels):])]
    for r in ratios:
        print(f"clients={r['clients']}: requests/s NEW/OLD {r['req_per_s_new_over_old']:.3f}   TTFT median OLD/NEW {r['ttft_med_old_over_new']:.3f}")
    if a.markdown:
        print("\n| " + " | ".join(h for h, _ in COLS) + " |\n|" + "---|" * len(COLS))
        print("\n".join("| " + " | ".join(t) + " |" for t in table))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "env": env, "summary": rows, "ratios": ratios, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
