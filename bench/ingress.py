"""bench/run's `ingress` scenario (issue 30, item 5): HTTP ingress against a real upstream shape.

An OpenAI chat completion request of about 1 KiB, over HTTP/1.1 keep-alive on 32 connections
(h2load `--h1`, one thread, one request at a time per connection), sent for `--ingress-duration`
seconds, in turn:

- *direct*: straight to the upstream, `bench/floor --mode openai` (hyper alone, HTTP/1.1, one
  thread, a fixed chat completion): the ceiling of this client and a bare server on this machine;
- *mesh*: through the gateway's `POST /v1/chat/completions` (auth on: the `loadtest` key as a
  bearer token; `x-llmesh-cache: bypass`, so every call goes on) to generation's OpenAI-compatible
  provider (model `mock`, `provider = "openai"`, `base_url` at the same floor);
- *mock_openai.py directly*: the same client straight to bench/mock_openai.py (Python asyncio),
  the upstream issue 30 measured its 0.34× against.

Figures: req/s of each, the mesh's over the direct's, and CPU per call (user + system time from
/proc over the run, divided by the calls that succeeded) of the gateway, generation, both together
(the mesh's), the upstream and h2load. A run counts only when every call got a 2xx by h2load's
count, generation's `llm_requests_total` shows the calls answered OK (h2load closes its
connections when the time is up: at most one call per connection is cut off then), and the
gateway counted a cache bypass for 99% of them. The anchor (issue 30): agentgateway v1.6.0 did
14,041 req/s on 2 dedicated cores for this request, about 142 µs of CPU a request; the target for
the gateway and generation together is under 50 µs.

The harness's helpers come in as `H` (bench/run itself), so that this module adds no copies.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CONNECTIONS = 32
REQUEST_BYTES = 1024
TARGET_MESH_US = 50.0
ANCHOR_US = 142.0
ANCHOR_RPS = 14041
CHAT_PATH = "/v1/chat/completions"


def add_arguments(parser):
    parser.add_argument("--ingress-duration", type=float,
                        help="seconds of each h2load run of the ingress scenario [default: 10; --quick: 1]")


def chat_request(size=REQUEST_BYTES):
    """An OpenAI chat completion request of exactly `size` bytes (a user message padded to fit)."""
    def body(content):
        return json.dumps({"model": "mock", "max_tokens": 64,
                           "messages": [{"role": "user", "content": content}]}, separators=(",", ":")).encode()

    words = "Summarise the benchmark request that follows in one short sentence please ".split()
    content, i = "", 0
    while len(body(content)) < size:
        content += ("" if not content else " ") + words[i % len(words)]
        i += 1
    # Trim to the exact size: the content is ASCII, one byte a character.
    return body(content[:len(content) - (len(body(content)) - size)])


def status_codes(text):
    """h2load's 'status codes: a 2xx, b 3xx, c 4xx, d 5xx' as a dict, or None."""
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    return dict(zip(("2xx", "3xx", "4xx", "5xx"), (int(x) for x in m.groups()))) if m else None


def run(bench, H):
    h2load = shutil.which("h2load")
    if not h2load:
        raise H.BenchError("h2load is not installed (apt-get install nghttp2-client)")
    duration = bench.args.ingress_duration or (1.0 if bench.args.quick else 10.0)
    data = {"duration": duration, "connections": CONNECTIONS, "request_bytes": REQUEST_BYTES,
            "h2load": H.h2load_version(h2load), "rows": []}
    bench.results["ingress"] = data
    body_path = os.path.join(bench.out, "ingress-request.json")
    with open(body_path, "wb") as f:
        f.write(chat_request())
    key = bench.loadtest_key()

    upstream = bench.procs.start("floor-openai", [bench.bin("floor"), "--listen", "127.0.0.1:0", "--mode", "openai"])
    upstream.addr = H.wait_for_line(upstream, r"listening on (\S+)", 30).group(1)
    gen = bench.start_generation("generation-openai-floor", {
        "LLMESH_GENERATION_MODELS__MOCK__PROVIDER": "openai",
        "LLMESH_GENERATION_MODELS__MOCK__BASE_URL": f"http://{upstream.addr}/v1",
        "LLMESH_GENERATION_MODELS__MOCK__API_KEY_ENV": "LLMESH_BENCH_NO_KEY",
        "LLMESH_GENERATION_ADMIN__LISTEN": "127.0.0.1:0",
    })
    gen.admin = H.wait_for_line(gen, r"admin listening on (\S+)", 30).group(1)
    # A cache service, so that the bypass is the gateway's decision on a mesh that has a cache.
    cache = bench.start_cache("cache-ingress")
    gw = bench.start_gateway("gateway-ingress", [gen], cache, auth=True)
    headers = ["content-type: application/json", f"authorization: Bearer {key}", "x-llmesh-cache: bypass"]

    def h2(case, title, url, measure, served=None):
        data["rows"].append(measure_run(bench, H, h2load, case, title, url, body_path, headers, duration,
                                        measure, served))

    h2("direct", "h2load → floor --mode openai (hyper, HTTP/1.1, one thread)", f"http://{upstream.addr}{CHAT_PATH}",
       {"upstream": upstream})
    h2("mesh", "h2load → gateway (auth, cache bypass) → generation (openai provider) → floor --mode openai",
       f"http://{gw.addr}{CHAT_PATH}", {"gateway": gw, "generation": gen, "upstream": upstream, "cache": cache},
       served=(gw, gen))
    for p in (gw, cache, gen, upstream):
        bench.procs.stop(p)

    mock = bench.procs.start("mock-openai-ingress", [sys.executable, os.path.join(HERE, "mock_openai.py"), "--port", "0"])
    mock.addr = H.wait_for_line(mock, r"listening on (\S+)", 15).group(1)
    h2("mock", "h2load → bench/mock_openai.py (Python asyncio)", f"http://{mock.addr}{CHAT_PATH}", {"upstream": mock})
    bench.procs.stop(mock)


def measure_run(bench, H, h2load, case, title, url, body_path, headers, duration, measure, served):
    """One h2load run (after an unmeasured warm-up) with each process's CPU over it."""
    base = [h2load, "--h1", "-t", "1", "-d", body_path]
    for h in headers:
        base += ["-H", h]
    warm = subprocess.run(base + ["-n", "500", "-c", "4", url], capture_output=True, text=True, timeout=60)
    if warm.returncode != 0:
        raise H.BenchError(f"h2load warm-up of {case} failed (exit {warm.returncode}):\n{warm.stdout[-1500:]}{warm.stderr[-1500:]}")
    argv = base + ["-c", str(CONNECTIONS), "-m", "1", "-D", f"{duration:g}", url]
    bench.check_time(duration + 30)
    cmd = " ".join(shlex.quote(a) for a in argv)
    H.log(f"$ {cmd}")
    bench.commands.append(cmd)
    gw, gen = served or (None, None)
    before = (H.scrape(gw.admin), H.scrape(gen.admin)) if served else None
    run, cpu_s, client_s = bench.cpu_during(
        f"ingress-{case}", measure,
        lambda: subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60))
    after = (H.scrape(gw.admin), H.scrape(gen.admin)) if served else None
    bench.load_counter += 1
    name = f"{bench.load_counter:03d}-ingress-{case}.h2load.txt"
    with open(os.path.join(bench.raw, name), "w") as f:
        f.write(f"$ {cmd}\n{run.stdout}{run.stderr}")
    summary = H.h2load_summary(run.stdout)
    codes = status_codes(run.stdout)
    why = []
    if run.returncode != 0 or not summary:
        why.append(f"h2load exit {run.returncode}")
    calls = codes["2xx"] if codes else 0
    if summary and (summary["succeeded"] != summary["done"] or not codes or calls != summary["done"]):
        why.append(f"of {summary['done']} calls done, {calls} got a 2xx ({codes})")
    if served:
        if None in before or None in after:
            why.append("the services' /metrics could not be read")
        else:
            def delta(i, name, **labels):
                return H.metric_sum(after[i], name, **labels) - H.metric_sum(before[i], name, **labels)

            ok = delta(1, "llm_requests_total", status="OK")
            failed = delta(1, "llm_requests_total") - ok - delta(1, "llm_requests_total", status="CANCELLED")
            if failed > 0 or ok < calls:
                why.append(f"generation answered {ok:.0f} calls OK and {failed:.0f} with an error; h2load counted {calls} 2xx")
            bypass = delta(0, "llmesh_cache_requests_total", result="bypass")
            if bypass < 0.99 * calls:
                why.append(f"the gateway counted {bypass:.0f} cache bypasses for {calls} calls")
    per_call = {n: (None if s is None or not calls else s * 1e6 / calls) for n, s in cpu_s.items()}
    row = {"case": case, "title": title, "rps": summary["rps"] if summary else None, "calls": calls,
           "cpu_us": per_call, "client_us": client_s * 1e6 / calls if calls else None,
           "codes": codes, "why": "; ".join(why) or None, "file": os.path.join("raw", name)}
    if served and per_call.get("gateway") is not None and per_call.get("generation") is not None:
        row["mesh_us"] = per_call["gateway"] + per_call["generation"]
    H.log(f"  -> {H.fmt(row['rps'], 0)} req/s, {calls} calls, CPU µs/call "
          + ", ".join(f"{n} {H.fmt(v, 1)}" for n, v in per_call.items()) + f", h2load {H.fmt(row['client_us'], 1)}"
          + (f"; NOT COUNTED: {row['why']}" if row["why"] else ""))
    return row


def report(add, R, verdicts, H):
    if "ingress" not in R:
        return
    d = R["ingress"]
    rows = {r["case"]: r for r in d["rows"]}
    add("## 7. HTTP ingress against a real upstream shape (issue 30)\n")
    add(f"An OpenAI chat completion request of {d['request_bytes']} bytes, `POST {CHAT_PATH}` over HTTP/1.1 "
        f"keep-alive: h2load {d.get('h2load') or '?'} `--h1`, one thread, {d['connections']} connections, one "
        f"request at a time on each, {d['duration']:g} s a run. *direct*: straight to `bench/floor --mode openai` "
        "(hyper, HTTP/1.1, one thread, a fixed chat completion); *mesh*: the gateway (auth on with the loadtest "
        "key, `x-llmesh-cache: bypass`) → generation's `openai` provider → the same floor; *mock_openai.py*: "
        "straight to bench/mock_openai.py. CPU per call: each process's user + system time over the run (from "
        "/proc) divided by the calls that got a 2xx; *mesh µs* = gateway + generation.\n")
    add("| run | req/s | × direct | gateway µs | generation µs | mesh µs | upstream µs | h2load µs | calls | counted |")
    add("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    direct = rows.get("direct")
    for case in ("direct", "mesh", "mock"):
        r = rows.get(case)
        if not r:
            continue
        c = r["cpu_us"]
        add(f"| {case} | {H.fmt(r['rps'], 0)} | {H.ratio(r['rps'], direct and direct['rps'])} | "
            f"{H.fmt(c.get('gateway'), 1)} | {H.fmt(c.get('generation'), 1)} | {H.fmt(r.get('mesh_us'), 1)} | "
            f"{H.fmt(c.get('upstream'), 1)} | {H.fmt(r.get('client_us'), 1)} | {r['calls']} | "
            f"{'yes' if not r['why'] else 'no: ' + r['why']} |")
    add("")
    mesh = rows.get("mesh")
    if mesh and mesh.get("mesh_us") is not None and not mesh["why"]:
        us = mesh["mesh_us"]
        verdict = "met" if us < TARGET_MESH_US else "not met"
        figs = (f"gateway + generation {us:.1f} µs a call ({us / ANCHOR_US:.2f}× agentgateway's ~{ANCHOR_US:g} µs), "
                f"{H.fmt(mesh['rps'], 0)} req/s ({H.ratio(mesh['rps'], direct and direct['rps'])} of direct)")
        add(f"- target (issue 30): the gateway and generation together under {TARGET_MESH_US:g} µs of CPU a call: "
            f"**{verdict}** ({figs}). Anchor: agentgateway v1.6.0, {ANCHOR_RPS:,} req/s on 2 dedicated cores, "
            f"about {ANCHOR_US:g} µs a request.\n")
        verdicts.append((f"HTTP ingress: gateway + generation under {TARGET_MESH_US:g} µs CPU a call (issue 30)", verdict, figs))
    else:
        verdicts.append((f"HTTP ingress: gateway + generation under {TARGET_MESH_US:g} µs CPU a call (issue 30)",
                         "not measured", (mesh or {}).get("why") or "no mesh run"))
