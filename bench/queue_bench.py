"""bench/run's `queue` scenario (issue 30, item 6): llmesh's job queue side by side with Celery.

One Redis (started by the harness, no persistence) for both, flushed before every block. For each
worker count of `--queue-workers` (default 1, 2, 4), first llmesh, then Celery:

1. **Backlog**: `--queue-jobs` jobs are submitted while no worker runs. Redis's `used_memory`
   before and after, divided by the jobs, is its memory per queued job. llmesh: `SubmitJob`
   through a gateway (auth off, `queue.options.max_unfinished_per_owner` at 100,000,000 so that
   the owner bound, and its bookkeeping, stays on without refusing), sent by h2load (a fixed
   `SubmitJobRequest`: model `sim`, a prompt of `--queue-prompt-bytes`, max_tokens 64). Celery:
   `apply_async` of an equivalent task (same model, prompt and max_tokens; sleep-free; returns a
   fixed 24-word completion, as the sim does) from bench/queue_celery.py.
2. **Saturation**: the workers start and drain the backlog. llmesh: a generation process with
   `queue.workers` = N and N Tokio worker threads; Celery: `celery worker --pool prefork
   --concurrency N` (N processes). Jobs per second = (jobs − 1) / (last finish − first finish),
   read from the stores (llmesh: each job record's `updated_at_ms` at SUCCEEDED, Redis's clock;
   Celery: each result's `date_done`). CPU per job of the workers and of Redis, from /proc.
3. **Paced**: at 50% and 90% of that rate, `--queue-duration` seconds of submissions on a
   timetable (llmesh: h2load `--rps`; Celery: the submitter's own timetable) while the workers
   run; then, once every job has ended, the time from submit to SUCCEEDED of each, p50 and p99,
   and the wait in the queue alone (submit → start). llmesh: `created_at_ms` → `updated_at_ms`
   of the record (Redis's clock, whole ms): the wait in the queue plus the sub-millisecond run of
   a sim job; the wait alone is `created_at_ms` → `started_at_ms` (the latest attempt's start: a
   sim job is not retried, so its only one). Celery: the submitter's clock before `apply_async`
   → `date_done`; the wait alone from the start the task notes.

Nothing lost: every block counts the jobs submitted (the gateway's SubmitJob calls answered OK,
or the ids Celery returned) against the records that reached SUCCEEDED; any difference is reported and the run is not counted.
Every process (h2load or the Python submitter, the gateway, the workers, Redis) shares the cores.

Celery needs a Python with `celery[redis]`: `--celery-python`, else bench/.venv-celery, else the
harness's own Python when it has celery; else, unless `--no-install`, bench/run makes
bench/.venv-celery from bench/requirements-celery.txt. When none works, Celery's side is skipped
with a note, and llmesh's is measured alone.

The harness's helpers come in as `H` (bench/run itself).
"""

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SUBMIT_PATH = "/llmesh.gateway.v1.Gateway/SubmitJob"
STREAM = "llmesh:jobs"
TARGET_RATIO = 5.0
SUCCEEDED = b"JOB_STATE_SUCCEEDED"
PACED_SHARES = (0.5, 0.9)


def add_arguments(parser):
    parser.add_argument("--queue-workers", default="1,2,4", help="the queue scenario's worker counts [default: 1,2,4]")
    parser.add_argument("--queue-jobs", type=int, help="jobs of each backlog of the queue scenario [default: 5000; --quick: 200]")
    parser.add_argument("--queue-duration", type=float, help="seconds of each paced run of the queue scenario [default: 10; --quick: 1]")
    parser.add_argument("--queue-prompt-bytes", type=int, default=256, help="the prompt of each job, bytes [default: 256]")
    parser.add_argument("--celery-python", help="a Python with celery[redis] for the queue scenario [default: bench/.venv-celery, "
                                                "else this Python, else bench/.venv-celery made from bench/requirements-celery.txt]")


# --------------------------------------------------------------------------------------------
# A small Redis client (RESP), so that bench/run stays on the standard library.

class Redis:
    def __init__(self, url, timeout=10.0):
        hostport = url.split("://", 1)[1].split("/", 1)[0]
        host, port = hostport.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.buf = b""

    def close(self):
        self.sock.close()

    @staticmethod
    def encode(args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            a = a if isinstance(a, bytes) else str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(a), a))
        return b"".join(out)

    def _line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n):
        while len(self.buf) < n + 2:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def _reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            raise RuntimeError(f"redis: {rest.decode(errors='replace')}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(n)
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._reply() for _ in range(n)]
        raise RuntimeError(f"redis: unexpected reply {line[:40]!r}")

    def call(self, *args):
        self.sock.sendall(self.encode(args))
        return self._reply()

    def pipeline(self, commands, batch=1000):
        replies = []
        for i in range(0, len(commands), batch):
            part = commands[i:i + batch]
            self.sock.sendall(b"".join(self.encode(c) for c in part))
            replies.extend(self._reply() for _ in part)
        return replies

    def used_memory(self):
        info = self.call("INFO", "memory").decode()
        for line in info.splitlines():
            if line.startswith("used_memory:"):
                return int(line.split(":", 1)[1])
        raise RuntimeError("INFO memory has no used_memory")

    def command_stats(self):
        """INFO commandstats: {command: (calls, usec)} since the last CONFIG RESETSTAT."""
        out = {}
        for line in self.call("INFO", "commandstats").decode().splitlines():
            if not line.startswith("cmdstat_"):
                continue
            name, fields = line[len("cmdstat_"):].split(":", 1)
            values = dict(f.split("=", 1) for f in fields.split(","))
            out[name] = (int(values["calls"]), int(values["usec"]))
        return out

    def scan(self, pattern):
        cursor, keys = b"0", []
        while True:
            cursor, part = self.call("SCAN", cursor, "MATCH", pattern, "COUNT", 2000)
            keys.extend(part)
            if cursor == b"0":
                return keys


# --------------------------------------------------------------------------------------------
# Figures

def percentile(values, q):
    """Nearest rank: the smallest value at or below which a share `q` of them are."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(q * len(ordered) + 0.999999) - 1))]


def drain_rate(finishes):
    """Jobs a second between the first and the last finish (seconds): (n − 1) / span."""
    if len(finishes) < 2:
        return None
    span = max(finishes) - min(finishes)
    return (len(finishes) - 1) / span if span > 0 else None


def group_cpu_seconds(pgid):
    """User + system CPU seconds of every live process of a process group (Celery's worker and its
    prefork children), from /proc."""
    total, tick = 0.0, os.sysconf("SC_CLK_TCK")
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def submit_job_request(H, prompt_bytes):
    """A SubmitJobRequest (model 1, prompt 2, max_tokens 4, as GenerateRequest's) as one gRPC frame."""
    prompt = ("benchmark job " * (prompt_bytes // 14 + 1))[:prompt_bytes]
    return H.grpc_generate_request(prompt, model="sim", max_tokens=64)


# --------------------------------------------------------------------------------------------
# The scenario

def run(bench, H):
    h2load = shutil.which("h2load")
    if not h2load:
        raise H.BenchError("h2load is not installed (apt-get install nghttp2-client)")
    if not bench.redis_bin:
        raise H.BenchError("redis-server is not installed (apt-get install redis-server)")
    args = bench.args
    quick = args.quick
    workers = [int(w) for w in args.queue_workers.split(",") if w.strip()]
    if not workers or not all(1 <= w <= 64 for w in workers):
        raise H.BenchError(f"--queue-workers {args.queue_workers!r}: worker counts from 1 to 64")
    data = {"workers": workers, "jobs": args.queue_jobs or (200 if quick else 5000),
            "duration": args.queue_duration or (1.0 if quick else 10.0), "prompt_bytes": args.queue_prompt_bytes,
            "llmesh": [], "celery": [], "h2load": H.h2load_version(h2load)}
    bench.results["queue"] = data
    body = os.path.join(bench.out, "queue-submit-request.bin")
    with open(body, "wb") as f:
        f.write(submit_job_request(H, data["prompt_bytes"]))
    redis = bench.start_redis("redis-queue")
    data["redis_url"] = redis.url
    db = Redis(redis.url)
    try:
        celery_py, why = find_celery(bench, H)
        if not celery_py:
            data["celery_skipped"] = why
            bench.note("queue", f"Celery not measured: {why}")
        data["celery_python"] = celery_py
        # The gateway needs a generation for its catalog; this one runs no workers.
        catalog = bench.start_generation("generation-catalog")
        for n in workers:
            bench.check_time(60)
            data["llmesh"].append(llmesh_block(bench, H, h2load, body, db, redis, catalog, n, data))
            if celery_py:
                bench.check_time(60)
                data["celery"].append(celery_block(bench, H, celery_py, db, redis, n, data))
        bench.procs.stop(catalog)
    finally:
        db.close()
    bench.procs.stop(redis)


def find_celery(bench, H):
    """A Python that imports celery and redis: (path, None), or (None, why not)."""
    def works(py):
        try:
            return subprocess.run([py, "-c", "import celery, redis"], capture_output=True, timeout=60).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    venv = os.path.join(HERE, ".venv-celery")
    venv_py = os.path.join(venv, "bin", "python")
    candidates = [bench.args.celery_python] if bench.args.celery_python else [venv_py, sys.executable]
    for py in candidates:
        if py and os.path.exists(py) and works(py):
            return py, None
    if bench.args.celery_python:
        return None, f"--celery-python {bench.args.celery_python} cannot import celery and redis"
    if bench.args.no_install:
        return None, "celery[redis] is not installed (bench/.venv-celery) and --no-install was given"
    requirements = os.path.join(HERE, "requirements-celery.txt")
    H.log(f"$ python3 -m venv {venv} && {venv}/bin/pip install -r {requirements}")
    try:
        subprocess.run([sys.executable, "-m", "venv", venv], check=True, capture_output=True, timeout=120)
        subprocess.run([os.path.join(venv, "bin", "pip"), "install", "-q", "--disable-pip-version-check", "-r", requirements],
                       check=True, capture_output=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as error:
        return None, f"installing celery[redis] into bench/.venv-celery failed: {str(error)[:300]}"
    return (venv_py, None) if works(venv_py) else (None, "bench/.venv-celery was made but cannot import celery")


def redis_time_ms(db):
    seconds, micros = db.call("TIME")
    return int(seconds) * 1000 + int(micros) // 1000


def llmesh_records(db, since_ms=None):
    """Every job record: [(state, created_ms, updated_ms, started_ms or None)], those created at or
    after `since_ms`. `started_at_ms` is the latest attempt's start; absent until one starts (and in
    records of a queue from before it was kept)."""
    keys = [k for k in db.scan(f"{STREAM}:job:*") if k.count(b":") == 3]
    rows = db.pipeline([("HMGET", k, "state", "created_at_ms", "updated_at_ms", "started_at_ms") for k in keys])
    out = []
    for state, created, updated, started in rows:
        if state is None or created is None:
            continue
        created, updated = int(created), int(updated or 0)
        if since_ms is None or created >= since_ms:
            out.append((state, created, updated, int(started) if started else None))
    return out


def paced_times(records):
    """From llmesh's records: (submit→done ms of each SUCCEEDED job, its wait in the queue alone in
    ms: created → started, or None when no record has a start, a queue that does not keep it)."""
    done = [r for r in records if r[0] == SUCCEEDED]
    sojourn = [updated - created for _, created, updated, _ in done]
    wait = [started - created for _, created, _, started in done if started is not None]
    return sojourn, (wait if wait else None)


def wait_until(H, what, check, timeout):
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if time.monotonic() > deadline:
            raise H.BenchError(f"{what}: not done within {timeout:.0f} s")
        time.sleep(0.1)


def h2load_submit(bench, H, h2load, gw, body, label, jobs=None, rate=None, duration=None):
    """SubmitJob through the gateway with h2load: `jobs` as fast as it goes (4 connections × 16
    streams) or `rate` a second for `duration` s (4 connections, `--rps` each). Returns the jobs
    the gateway accepted: its `llm_requests_total{endpoint="SubmitJob",status="OK"}` over the run.
    Not h2load's count of HTTP 200s: a gRPC error (a refusal the client was told of, such as
    UNAVAILABLE when Redis did not answer in time on a busy host) comes with HTTP 200 too, and is
    not a lost job."""
    argv = [h2load, "-t", "1", "-H", "content-type: application/grpc", "-H", "te: trailers", "-d", body, "-c", "4"]
    if rate:
        argv += ["-m", "16", "--rps", f"{rate / 4:.3f}", "-D", f"{duration:g}"]
    else:
        argv += ["-m", "16", "-n", str(jobs)]
    argv.append(f"http://{gw.addr}{SUBMIT_PATH}")
    cmd = " ".join(shlex.quote(a) for a in argv)
    H.log(f"$ {cmd}")
    bench.commands.append(cmd)
    before = H.scrape(gw.admin)
    run = subprocess.run(argv, capture_output=True, text=True, timeout=(duration or 0) + 120)
    after = H.scrape(gw.admin)
    bench.load_counter += 1
    with open(os.path.join(bench.raw, f"{bench.load_counter:03d}-queue-{label}.h2load.txt"), "w") as f:
        f.write(f"$ {cmd}\n{run.stdout}{run.stderr}")
    summary = H.h2load_summary(run.stdout)
    if run.returncode != 0 or not summary:
        raise H.BenchError(f"h2load ({label}) failed (exit {run.returncode}):\n{run.stdout[-1500:]}{run.stderr[-800:]}")
    if before is None or after is None:
        raise H.BenchError(f"cannot read the gateway's /metrics at {gw.admin} ({label})")

    def calls(samples, **status):
        return H.metric_sum(samples, "llm_requests_total", endpoint="SubmitJob", **status)

    accepted = round(calls(after, status="OK") - calls(before, status="OK"))
    refused = round(calls(after) - calls(before)) - accepted
    if refused:
        H.log(f"  ({label}: the gateway refused {refused} of {accepted + refused} SubmitJob calls; not counted as sent)")
    return accepted


def llmesh_block(bench, H, h2load, body, db, redis, catalog, n, data):
    tag = f"{n}w"
    H.log(f"--- llmesh, {n} worker(s) ---")
    db.call("FLUSHALL")
    queue_env = {"LLMESH_GATEWAY_QUEUE__REDIS_URL": redis.url,
                 "LLMESH_GATEWAY_QUEUE__OPTIONS__MAX_UNFINISHED_PER_OWNER": "100000000"}
    gw = bench.start_gateway(f"gateway-queue-{tag}", [catalog], None, extra=queue_env)
    block = {"workers": n}
    try:
        jobs = data["jobs"]
        mem0 = db.used_memory()
        sent = h2load_submit(bench, H, h2load, gw, body, f"llmesh-backlog-{tag}", jobs=jobs)
        queued = db.call("XLEN", STREAM)
        mem1 = db.used_memory()
        block.update(submitted=sent, queued=queued, bytes_per_job=(mem1 - mem0) / max(1, queued))
        worker = bench.start_generation(f"generation-workers-{tag}", {
            "LLMESH_GENERATION_QUEUE__REDIS_URL": redis.url, "LLMESH_GENERATION_QUEUE__WORKERS": str(n),
            "LLMESH_WORKER_THREADS": str(n)})
        cpu0, rcpu0 = H.cpu_seconds(worker.pid), H.cpu_seconds(redis.pid)
        db.call("CONFIG", "RESETSTAT")
        wait_until(H, f"llmesh backlog of {queued} jobs, {n} worker(s)", lambda: all_ended(db), 60 + jobs / 50)
        cpu1, rcpu1 = H.cpu_seconds(worker.pid), H.cpu_seconds(redis.pid)
        commands = db.command_stats()
        records = llmesh_records(db)
        done = [u / 1000 for s, _, u, _ in records if s == SUCCEEDED]
        block.update(redis_commands=redis_commands_per_job(H, commands, len(done)))
        block.update(succeeded=len(done), rate=drain_rate(done),
                     worker_cpu_us=H.diff(cpu1, cpu0) * 1e6 / max(1, len(done)) if cpu0 is not None and cpu1 is not None else None,
                     redis_cpu_us=(rcpu1 - rcpu0) * 1e6 / max(1, len(done)))
        H.log(f"  -> backlog {queued} jobs, {block['bytes_per_job']:.0f} bytes each in Redis; drained "
              f"{len(done)} SUCCEEDED at {H.fmt(block['rate'], 0)} jobs/s; worker {H.fmt(block['worker_cpu_us'], 1)} "
              f"µs/job, Redis {H.fmt(block['redis_cpu_us'], 1)} µs/job")
        block["paced"] = []
        for share in PACED_SHARES:
            if not block["rate"]:
                break
            rate = share * block["rate"]
            since = redis_time_ms(db)
            sent = h2load_submit(bench, H, h2load, gw, body, f"llmesh-paced-{int(share * 100)}-{tag}",
                                 rate=rate, duration=data["duration"])
            stopped = redis_time_ms(db)
            wait_until(H, f"llmesh paced run at {rate:.0f}/s", lambda: all_ended(db), 60 + sent / 50)
            records = llmesh_records(db, since)
            sojourn, wait = paced_times(records)
            drain_s = max(0, max((u for _, _, u, _ in records), default=stopped) - stopped) / 1000
            block["paced"].append(paced_row(H, share, rate, sent, len(records), sojourn, wait, drain_s))
        bench.procs.stop(worker)
    finally:
        bench.procs.stop(gw)
    return block


def redis_commands_per_job(H, commands, jobs):
    """What Redis ran for the workers while they drained the backlog, a job at a time: {command:
    {"calls": calls a job, "usec": Redis's own µs a job}}, busiest first; logged in one line. The
    harness's own polls (XLEN, ZCARD, INFO) are in it too, a few a second."""
    jobs = max(1, jobs)
    out = {name: {"calls": calls / jobs, "usec": usec / jobs}
           for name, (calls, usec) in sorted(commands.items(), key=lambda item: -item[1][1])}
    H.log("  Redis a job, by command (calls, µs): " + ", ".join(
        f"{name} {row['calls']:.2f} {row['usec']:.1f}" for name, row in out.items() if row["calls"] >= 0.01))
    return out


def all_ended(db):
    """No job queued, running or waiting for a retry: the stream is empty (entries are deleted
    when acknowledged) and the delayed set too."""
    return db.call("XLEN", STREAM) == 0 and db.call("ZCARD", f"{STREAM}:delayed") == 0


def lost(sent, found, succeeded):
    """Jobs lost: those the client saw accepted that have no record, and those recorded that did
    not succeed. h2load's count is a lower bound of the jobs submitted: the calls in flight when
    its time is up are left out of it, though the gateway may have queued them (they have records)."""
    return max(0, sent - found) + (found - succeeded)


def paced_row(H, share, rate, sent, found, sojourn_ms, wait_ms, drain_s):
    row = {"share": share, "rate": rate, "submitted": sent, "records": found, "succeeded": len(sojourn_ms),
           "lost": lost(sent, found, len(sojourn_ms)), "sojourn_p50_ms": percentile(sojourn_ms, 0.5),
           "sojourn_p99_ms": percentile(sojourn_ms, 0.99), "drain_after_s": drain_s}
    if wait_ms is not None:
        row.update(wait_p50_ms=percentile(wait_ms, 0.5), wait_p99_ms=percentile(wait_ms, 0.99))
    H.log(f"  -> paced {share:.0%} = {rate:.0f}/s: {sent} submitted, {len(sojourn_ms)} SUCCEEDED, submit→done p50 "
          f"{H.fmt(row['sojourn_p50_ms'])} ms p99 {H.fmt(row['sojourn_p99_ms'])} ms"
          + (f", wait p50 {H.fmt(row['wait_p50_ms'])} p99 {H.fmt(row['wait_p99_ms'])} ms" if wait_ms is not None else "")
          + f"; the last ended {drain_s:.1f} s after the submitter stopped")
    return row


def celery(bench, H, py, label, argv, timeout):
    """Runs queue_celery.py (submit or collect) to its end; returns its JSON output."""
    bench.load_counter += 1
    name = f"{bench.load_counter:03d}-queue-{label}"
    out = os.path.join(bench.raw, name + ".json")
    full = [py, os.path.join(HERE, "queue_celery.py"), *argv, "--out", out]
    cmd = " ".join(shlex.quote(a) for a in full)
    H.log(f"$ {cmd}")
    bench.commands.append(cmd)
    err = os.path.join(bench.logs, name + ".stderr")
    with open(err, "wb") as e:
        popen = subprocess.Popen(full, cwd=HERE, env=H.clean_env(), stdin=subprocess.DEVNULL, stdout=e, stderr=e,
                                 preexec_fn=H._die_with_parent)
        proc = bench.procs.adopt(name, popen, err)
        try:
            popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise H.BenchError(f"queue_celery.py {argv[0]} did not finish within {timeout:.0f} s")
        finally:
            bench.procs.stop(proc)
    if popen.returncode != 0:
        raise H.BenchError(f"queue_celery.py {argv[0]} failed (exit {popen.returncode}):\n{proc.log_tail()}")
    with open(out) as f:
        return json.load(f), out


def celery_block(bench, H, py, db, redis, n, data):
    tag = f"{n}w"
    H.log(f"--- Celery, {n} worker process(es) ---")
    db.call("FLUSHALL")
    jobs = data["jobs"]
    block = {"workers": n}
    mem0 = db.used_memory()
    ids, ids_path = celery(bench, H, py, f"celery-submit-{tag}", ["submit", "--redis", redis.url, "--jobs", str(jobs),
                                                         "--prompt-bytes", str(data["prompt_bytes"])], 60 + jobs / 20)
    queued = db.call("LLEN", "bench")
    mem1 = db.used_memory()
    block.update(submitted=len(ids["ids"]), queued=queued, bytes_per_job=(mem1 - mem0) / max(1, queued),
                 submit_rate=len(ids["ids"]) / ids["elapsed_s"] if ids["elapsed_s"] else None)
    worker = bench.procs.start(f"celery-worker-{tag}", [py, os.path.join(HERE, "queue_celery.py"), "worker",
                                                        "--redis", redis.url, "--concurrency", str(n)])
    try:
        cpu0, rcpu0 = group_cpu_seconds(worker.pid), H.cpu_seconds(redis.pid)
        got, _ = celery(bench, H, py, f"celery-collect-{tag}", ["collect", "--redis", redis.url, "--ids", ids_path,
                                                              "--timeout", str(60 + jobs / 20)], 120 + jobs / 20)
        cpu1, rcpu1 = group_cpu_seconds(worker.pid), H.cpu_seconds(redis.pid)
        done = [j["done"] for j in got["jobs"] if j["state"] == "SUCCESS"]
        block.update(succeeded=len(done), rate=drain_rate(done),
                     worker_cpu_us=(cpu1 - cpu0) * 1e6 / max(1, len(done)),
                     redis_cpu_us=(rcpu1 - rcpu0) * 1e6 / max(1, len(done)))
        H.log(f"  -> backlog {queued} tasks, {block['bytes_per_job']:.0f} bytes each in Redis; drained {len(done)} "
              f"SUCCESS at {H.fmt(block['rate'], 0)} jobs/s; workers {H.fmt(block['worker_cpu_us'], 1)} µs/job, "
              f"Redis {H.fmt(block['redis_cpu_us'], 1)} µs/job")
        block["paced"] = []
        for share in PACED_SHARES:
            if not block["rate"]:
                break
            rate = share * block["rate"]
            count = max(1, int(rate * data["duration"]))
            ids, ids_path = celery(bench, H, py, f"celery-paced-{int(share * 100)}-{tag}",
                         ["submit", "--redis", redis.url, "--jobs", str(count), "--rate", f"{rate:.3f}",
                          "--prompt-bytes", str(data["prompt_bytes"])], data["duration"] * 3 + 60)
            got, _ = celery(bench, H, py, f"celery-paced-collect-{int(share * 100)}-{tag}",
                         ["collect", "--redis", redis.url, "--ids", ids_path, "--timeout", str(60 + count / 20)],
                         120 + count / 20)
            ok = [j for j in got["jobs"] if j["state"] == "SUCCESS"]
            drain_s = max((j["done"] for j in ok), default=0) - max((j["submitted"] for j in got["jobs"]), default=0)
            sojourn = [(j["done"] - j["submitted"]) * 1000 for j in ok]
            wait = [(j["started"] - j["submitted"]) * 1000 for j in ok if j.get("started")]
            row = paced_row(H, share, rate, len(ids["ids"]), len(got["jobs"]), sojourn, wait, max(0.0, drain_s))
            row["submit_rate"] = len(ids["ids"]) / ids["elapsed_s"] if ids["elapsed_s"] else None
            block["paced"].append(row)
    finally:
        bench.procs.stop(worker)
    return block


# --------------------------------------------------------------------------------------------
# The report

def report(add, R, verdicts, H):
    if "queue" not in R:
        return
    d = R["queue"]
    add("## 8. The job queue against Celery (issue 30)\n")
    add(f"One Redis for both, flushed before each block. Per worker count: a backlog of {d['jobs']} jobs submitted "
        "with no worker running (Redis's `used_memory` after − before, ÷ jobs: bytes per queued job), drained by the "
        "workers (jobs/s = (jobs − 1) ÷ (last finish − first finish), from the stores: llmesh's records' "
        "`updated_at_ms`, Celery's results' `date_done`), then paced submissions at 50% and 90% of that rate for "
        f"{d['duration']:g} s each, while the workers run. llmesh: `SubmitJob` through a gateway (auth off) by h2load "
        f"{d.get('h2load') or '?'}; workers: one generation process with `queue.workers` = N and N Tokio threads, "
        "model `sim`. Celery: `apply_async` of an equivalent sleep-free task (same model, prompt and max_tokens; "
        "a fixed 24-word result), `task_acks_late`, Redis as broker and result backend, `celery worker --pool "
        f"prefork --concurrency N`. Prompt: {d['prompt_bytes']} bytes. *submitted*: jobs the queue accepted (its "
        "records; the gateway's count of SubmitJob calls answered OK leaves out the calls in flight when h2load's "
        "time is up, and a call refused with a gRPC error is not a job). *submit→done*: llmesh's record's "
        "`created_at_ms` → `updated_at_ms` at SUCCEEDED (Redis's clock, whole ms: the wait in the queue plus a "
        "sub-millisecond run); Celery's submitter's clock before `apply_async` → `date_done`; *wait*: the wait in "
        "the queue alone, llmesh's record's `created_at_ms` → `started_at_ms` (Redis's clock, whole ms), Celery's "
        "task start − submit. CPU per job: the workers' (all of Celery's worker processes) and Redis's user + "
        "system time over the drain, from /proc. *lost*: jobs the client saw accepted that have no record, plus "
        "records that did not reach SUCCEEDED.\n")
    if d.get("celery_skipped"):
        add(f"Celery not measured: {d['celery_skipped']}\n")
    celery_by_n = {b["workers"]: b for b in d["celery"]}
    add("| workers | llmesh jobs/s | Celery jobs/s | llmesh / Celery | llmesh bytes/queued job | Celery bytes/queued job | "
        "llmesh worker µs/job | Celery workers µs/job | llmesh Redis µs/job | Celery Redis µs/job | lost (llmesh / Celery) |")
    add("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    ratios = []
    for b in d["llmesh"]:
        c = celery_by_n.get(b["workers"]) or {}
        r = H.ratio(b.get("rate"), c.get("rate"), 1) if c else "–"
        if c.get("rate") and b.get("rate"):
            ratios.append((b["workers"], b["rate"] / c["rate"]))
        lost_l = lost(b.get("submitted", 0), b.get("queued", 0), b.get("succeeded", 0))
        lost_c = lost(c.get("submitted", 0), c.get("queued", 0), c.get("succeeded", 0)) if c else None
        add(f"| {b['workers']} | {H.fmt(b.get('rate'), 0)} | {H.fmt(c.get('rate'), 0)} | {r} | "
            f"{H.fmt(b.get('bytes_per_job'), 0)} | {H.fmt(c.get('bytes_per_job'), 0)} | {H.fmt(b.get('worker_cpu_us'), 1)} | "
            f"{H.fmt(c.get('worker_cpu_us'), 1)} | {H.fmt(b.get('redis_cpu_us'), 1)} | {H.fmt(c.get('redis_cpu_us'), 1)} | "
            f"{lost_l} / {lost_c if lost_c is not None else '–'} |")
    add("")
    add("Paced runs (ms; *after*: seconds from the submitter's end to the last job's end; *sent/s*: the rate the "
        "submitter achieved, jobs over its run, which is below *rate* when the submitter could not keep up):\n")
    add("| system | workers | share | rate jobs/s | submitted | SUCCEEDED | lost | submit→done p50 | submit→done p99 | "
        "wait p50 | wait p99 | after s | sent/s |")
    add("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    any_lost = False
    for system in ("llmesh", "celery"):
        for b in d[system]:
            for p in b.get("paced", []):
                gone = lost(p["submitted"], p["records"], p["succeeded"])
                any_lost = any_lost or gone != 0
                add(f"| {system} | {b['workers']} | {p['share']:.0%} | {p['rate']:.0f} | {max(p['submitted'], p['records'])} | "
                    f"{p['succeeded']} | {gone} | {H.fmt(p['sojourn_p50_ms'])} | {H.fmt(p['sojourn_p99_ms'])} | "
                    f"{H.fmt(p.get('wait_p50_ms'))} | {H.fmt(p.get('wait_p99_ms'))} | {H.fmt(p['drain_after_s'], 1)} | "
                    f"{H.fmt(p.get('submit_rate') or p['submitted'] / d['duration'], 0)} |")
    add("")
    for b in d["llmesh"] + d["celery"]:
        any_lost = any_lost or lost(b.get("submitted", 0), b.get("queued", 0), b.get("succeeded", 0)) != 0
    name = f"The queue: at least {TARGET_RATIO:g}× Celery's jobs/s with nothing lost (issue 30)"
    if ratios:
        met = all(x >= TARGET_RATIO for _, x in ratios) and not any_lost
        some = any(x >= TARGET_RATIO for _, x in ratios)
        verdict = "met" if met else ("partly met" if some and not any_lost else "not met")
        figs = ", ".join(f"{x:.1f}× with {n} worker{'s' if n != 1 else ''}" for n, x in ratios) + \
            ("; nothing lost" if not any_lost else "; JOBS LOST")
        add(f"- target (issue 30): at least {TARGET_RATIO:g}× Celery's jobs per second, nothing lost: **{verdict}** ({figs})\n")
        verdicts.append((name, verdict, figs))
    else:
        verdicts.append((name, "not measured", d.get("celery_skipped") or "no Celery run"))
