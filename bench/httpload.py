#!/usr/bin/env python3
"""A small closed-loop HTTP/1.1 load client for OpenAI-style chat completions (stdlib only).

Used by bench/run to put load on HTTP proxies (LiteLLM's) where `llmesh load` (gRPC) cannot.
N keep-alive connections, each sending one request at a time for a fixed duration; every prompt
carries a nonce (no proxy-side caching). Prints one JSON object with the same field names as
`llmesh load --json` where they mean the same thing (throughput_rps, successes, errors, codes,
latency_ms with p50/p90/p99/p99_9 in milliseconds).

    python3 bench/httpload.py --url http://127.0.0.1:4000/v1/chat/completions \
        --model mock --concurrency 32 --duration 10 --header 'Authorization: Bearer sk-...'

Only http:// URLs on a loopback address are accepted.
"""

import argparse
import asyncio
import json
import sys
import time
import urllib.parse


def percentiles(values):
    if not values:
        return None
    s = sorted(values)
    n = len(s)

    def q(p):
        # Nearest rank, as HDR histograms report (the smallest value with at least p of the data).
        k = max(0, min(n - 1, int(-(-p * n // 1)) - 1))
        return round(s[k], 3)

    return {"count": n, "min": round(s[0], 3), "mean": round(sum(s) / n, 3), "p50": q(0.50),
            "p90": q(0.90), "p99": q(0.99), "p99_9": q(0.999), "max": round(s[-1], 3)}


async def read_response(reader):
    """Reads one HTTP/1.1 response; returns (status, body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length, chunked = None, False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value.strip())
        elif name == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    if chunked:
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            body += await reader.readexactly(size + 2)
        return status, body
    if length is None:
        return status, await reader.read()
    return status, await reader.readexactly(length)


async def worker(index, args, host, port, path, deadline, stats):
    reader = writer = None
    n = 0
    while time.monotonic() < deadline:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            n += 1
            payload = json.dumps({"model": args.model, "max_tokens": args.max_tokens, "messages": [
                {"role": "user", "content": f"{args.prompt} [nonce {index}-{n}-{time.monotonic_ns()}]"}]}).encode()
            request = (f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
                       f"content-length: {len(payload)}\r\n" + "".join(h + "\r\n" for h in args.header)
                       + "\r\n").encode() + payload
            start = time.perf_counter()
            writer.write(request)
            status, body = await asyncio.wait_for(read_response(reader), args.timeout)
            elapsed = (time.perf_counter() - start) * 1000.0
            code = str(status)
            stats["codes"][code] = stats["codes"].get(code, 0) + 1
            if status == 200 and b'"choices"' in body:
                stats["latency"].append(elapsed)
                stats["successes"] += 1
            else:
                stats["errors"] += 1
                if len(stats["samples"]) < 3:
                    stats["samples"].append(body[:300].decode("utf-8", "replace"))
        except (asyncio.TimeoutError, OSError, asyncio.IncompleteReadError, ValueError, IndexError) as error:
            name = type(error).__name__
            stats["codes"][name] = stats["codes"].get(name, 0) + 1
            stats["errors"] += 1
            if writer is not None:
                writer.close()
            reader = writer = None
            await asyncio.sleep(0.01)
    if writer is not None:
        writer.close()


async def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", default="mock")
    parser.add_argument("--prompt", default="简单提示词")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument("--json", default="-", help="where to write the JSON report (- for stdout)")
    args = parser.parse_args()
    url = urllib.parse.urlsplit(args.url)
    if url.scheme != "http" or url.hostname not in ("127.0.0.1", "localhost", "::1"):
        parser.error("only http:// URLs on a loopback address")
    host, port, path = url.hostname, url.port or 80, url.path or "/"
    stats = {"latency": [], "successes": 0, "errors": 0, "codes": {}, "samples": []}
    started = time.monotonic()
    deadline = started + args.duration
    tasks = [asyncio.create_task(worker(i, args, host, port, path, deadline, stats))
             for i in range(args.concurrency)]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), args.duration + args.timeout + 5)
    except asyncio.TimeoutError:
        for task in tasks:
            task.cancel()
    elapsed = time.monotonic() - started
    requests = stats["successes"] + stats["errors"]
    report = {
        "schema": "llmesh.bench.httpload.v1", "target": args.url, "model": args.model,
        "mode": "closed", "concurrency": args.concurrency, "duration_s": round(elapsed, 6),
        "requests": requests, "throughput_rps": round(requests / elapsed, 3) if elapsed else 0.0,
        "successes": stats["successes"], "errors": stats["errors"], "codes": stats["codes"],
        "latency_ms": percentiles(stats["latency"]), "error_samples": stats["samples"],
    }
    text = json.dumps(report, indent=2)
    if args.json == "-":
        print(text)
    else:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(f"httpload: {requests} requests in {elapsed:.3f} s ({report['throughput_rps']} req/s), "
          f"{stats['successes']} ok, codes {stats['codes']}, latency {report['latency_ms']}", file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main())
