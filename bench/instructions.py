#!/usr/bin/env python3
"""The gateway's CPU cost per call as instructions, counted by valgrind's callgrind: the same
figure for the same binary and calls whatever else the machine is doing, so two builds compare
without the noise of wall-clock or CPU-time figures on a shared machine.

    bench/instructions.py --bin-dir target/production [--bin-dir OTHER ...] [--calls 1000]

For each `--bin-dir`, starts that directory's generation and cache normally and its gateway under
`valgrind --tool=callgrind`, sends `--calls` and then 3 × `--calls` calls through it with `llmesh
load` (closed loop, 4 in flight) in two fresh gateways, and reports the difference of the two
instruction totals divided by the difference of the calls: start-up and shutdown cancel out. Three
workloads: a cache miss (`--unique`, through to generation), a near-cache hit (one prompt), and a
cache miss with the cache off. The `llmesh` client of the first `--bin-dir` drives every run.
Everything on 127.0.0.1; every wait is bounded. Python 3 standard library only.
"""

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

WORKLOADS = {
    "miss": {"unique": True, "cache": True},
    "near-hit": {"unique": False, "cache": True},
    "miss, cache off": {"unique": True, "cache": False},
}
# With --http: the same cache miss as OpenAI chat completions over HTTP/1.1 (`llmesh load --protocol http`).
HTTP_WORKLOADS = {"miss over HTTP (OpenAI)": {"unique": True, "cache": True, "protocol": "http"}}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(proc, log, seconds=120):
    """The address a service logs it listens on (bounded)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with open(log) as f:
            m = re.search(r"listening on (\S+)", f.read())
        if m:
            return m.group(1)
        if proc.poll() is not None:
            raise SystemExit(f"{log}: exited before listening")
        time.sleep(0.1)
    raise SystemExit(f"{log}: not listening within {seconds} s")


def start(cmd, env, log):
    full = dict(os.environ, LLMESH_WORKER_THREADS="1", LLMESH_LOG_FORMAT="text", **env)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=full, stdout=out, stderr=subprocess.STDOUT)
    return proc, wait_listening(proc, log)


def stop(proc, seconds=60):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def callgrind_total(path):
    """The `summary:` (or `totals:`) instruction count of a callgrind output file."""
    with open(path) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise SystemExit(f"{path}: no instruction total")


def gateway_instructions(bins, client, gen_addr, cache_addr, calls, workload, work):
    out = os.path.join(work, f"callgrind.{time.monotonic_ns()}")
    env = {
        "LLMESH_GATEWAY_GENERATION__ENDPOINTS": json.dumps([f"http://{gen_addr}"]),
        "LLMESH_GATEWAY_CACHE__ENDPOINT": f"http://{cache_addr}" if workload["cache"] else "",
        "LLMESH_GATEWAY_STARTUP_TIMEOUT_MS": "60000",
    }
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", os.path.join(bins, "gateway"),
           "--listen", "127.0.0.1:0"]
    gw, addr = start(cmd, env, out + ".log")
    prompts = os.path.join(work, "prompt.txt")
    with open(prompts, "w") as f:
        f.write("instructions per call: the same prompt every time\n")
    load = [client, "load", "--service", "gateway", "--target", f"http://{addr}", "--requests", str(calls),
            "--concurrency", "4", "--timeout", "60s", "--max-tokens", "64", "--prompts", prompts]
    if workload["unique"]:
        load.append("--unique")
    if workload.get("protocol"):
        load += ["--protocol", workload["protocol"]]
    # One call first, so a hit workload has its entry (and every workload its connections).
    warm = [a if a != str(calls) else "1" for a in load]
    subprocess.run(warm, check=True, capture_output=True, timeout=300)
    done = subprocess.run(load, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"llmesh load failed: {done.stdout}\n{done.stderr}")
    stop(gw)
    return callgrind_total(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin-dir", action="append", required=True, help="a directory of built binaries (repeat to compare)")
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--http", action="store_true", help="also a cache miss over the gateway's HTTP ingress (builds that have one)")
    args = parser.parse_args()
    workloads = dict(WORKLOADS, **(HTTP_WORKLOADS if args.http else {}))
    client = os.path.join(os.path.abspath(args.bin_dir[0]), "llmesh")
    results = {}
    with tempfile.TemporaryDirectory(prefix="llmesh-instructions-") as work:
        for bins in args.bin_dir:
            bins = os.path.abspath(bins)
            gen, gen_addr = start([os.path.join(bins, "generation"), "--listen", "127.0.0.1:0"], {}, os.path.join(work, "generation.log"))
            cache, cache_addr = start([os.path.join(bins, "cache"), "--listen", "127.0.0.1:0"], {}, os.path.join(work, "cache.log"))
            try:
                for name, workload in workloads.items():
                    small = gateway_instructions(bins, client, gen_addr, cache_addr, args.calls, workload, work)
                    large = gateway_instructions(bins, client, gen_addr, cache_addr, 3 * args.calls, workload, work)
                    per_call = (large - small) / (2 * args.calls)
                    results[(bins, name)] = per_call
                    print(f"{bins}: {name}: {per_call:,.0f} instructions per call", flush=True)
            finally:
                stop(cache)
                stop(gen)
    print()
    print("| workload | " + " | ".join(args.bin_dir) + (" | ratio (last / first) |" if len(args.bin_dir) > 1 else " |"))
    print("|---|" + "---:|" * len(args.bin_dir) + ("---:|" if len(args.bin_dir) > 1 else ""))
    for name in workloads:
        figures = [results[(os.path.abspath(b), name)] for b in args.bin_dir]
        row = f"| {name} | " + " | ".join(f"{x:,.0f}" for x in figures) + " |"
        if len(figures) > 1:
            row += f" {figures[-1] / figures[0]:.2f}× |"
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
