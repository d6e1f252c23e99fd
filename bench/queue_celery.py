#!/usr/bin/env python3
"""Celery's side of bench/run's `queue` scenario: the app, its task, a submitter and a collector.

Runs under a Python that has `celery[redis]` (bench/requirements-celery.txt); bench/run finds or
makes one. Everything talks to the Redis given by `--redis` (broker and result backend both, as
the seed's Celery did), and only ever to 127.0.0.1.

The task stands in for a `sim` generation, sleep-free: it takes the job's model, prompt and
max_tokens (the fields a llmesh job's request carries) and returns a fixed 24-word completion with
its usage, and the time it started (so that the wait in the queue can be read apart from the run).
The app is configured like llmesh's queue behaves: a task is acknowledged after it ran and its
result is stored (`task_acks_late`), results are kept a day.

    queue_celery.py worker  --redis URL --concurrency N
    queue_celery.py submit  --redis URL --jobs N [--rate R] --prompt-bytes B --out ids.json
    queue_celery.py collect --redis URL --ids ids.json --timeout S --out results.json

`submit` sends N tasks (as fast as it can, or R a second on a timetable) and writes their ids and
submit times; `collect` waits until every one has a result (or the timeout), then writes, per
task, submitted / started / done (Unix seconds) and its state.
"""

import argparse
import datetime
import json
import os
import sys
import time

WORDS = ("the mesh answers with a simulated reply about your prompt and every token is "
         "deterministic so caches tests benchmarks agree on what came back from model").split()
TEXT = " ".join(WORDS[:24])
QUEUE = "bench"


def make_app(redis_url):
    from celery import Celery

    app = Celery("queue_celery", broker=redis_url, backend=redis_url)
    app.conf.update(
        task_acks_late=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=24 * 3600,
        task_default_queue=QUEUE,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        # The result's date_done in UTC, as an aware ISO time.
        enable_utc=True,
    )

    @app.task(name="bench.generate")
    def generate(model, prompt, max_tokens):
        started = time.time()
        return {"model": model, "text": TEXT, "finish_reason": "stop",
                "usage": {"prompt_tokens": max(1, len(prompt) // 4), "completion_tokens": 24}, "started": started}

    return app, generate


def worker(args):
    app, _ = make_app(args.redis)
    app.worker_main(["worker", "--concurrency", str(args.concurrency), "--pool", "prefork", "--queues", QUEUE,
                     "--loglevel", "WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat",
                     "--hostname", f"bench{os.getpid()}@localhost"])


def prompt_of(size):
    return ("benchmark job " * (size // 14 + 1))[:size]


def submit(args):
    _, generate = make_app(args.redis)
    prompt = prompt_of(args.prompt_bytes)
    ids, times = [], []
    start = time.monotonic()
    for i in range(args.jobs):
        if args.rate:
            due = start + i / args.rate
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
        submitted = time.time()
        result = generate.apply_async(("sim", prompt, 64))
        ids.append(result.id)
        times.append(submitted)
    elapsed = time.monotonic() - start
    with open(args.out, "w") as f:
        json.dump({"ids": ids, "submitted": times, "elapsed_s": elapsed}, f)
    print(f"submitted {len(ids)} in {elapsed:.2f} s", file=sys.stderr)


def collect(args):
    import redis

    client = redis.Redis.from_url(args.redis)
    with open(args.ids) as f:
        sent = json.load(f)
    ids, submitted = sent["ids"], sent["submitted"]
    deadline = time.monotonic() + args.timeout
    metas = [None] * len(ids)
    missing = list(range(len(ids)))
    while missing and time.monotonic() < deadline:
        pipe = client.pipeline(transaction=False)
        for i in missing:
            pipe.get(f"celery-task-meta-{ids[i]}")
        still = []
        for i, raw in zip(missing, pipe.execute()):
            meta = json.loads(raw) if raw else None
            if meta and meta.get("status") in ("SUCCESS", "FAILURE", "REVOKED"):
                metas[i] = meta
            else:
                still.append(i)
        missing = still
        if missing:
            time.sleep(0.2)
    rows = []
    for i, meta in enumerate(metas):
        if not meta:
            rows.append({"state": "MISSING", "submitted": submitted[i]})
            continue
        done = datetime.datetime.fromisoformat(meta["date_done"])
        if done.tzinfo is None:
            done = done.replace(tzinfo=datetime.timezone.utc)
        result = meta.get("result") if isinstance(meta.get("result"), dict) else {}
        rows.append({"state": meta["status"], "submitted": submitted[i], "started": result.get("started"),
                     "done": done.timestamp()})
    with open(args.out, "w") as f:
        json.dump({"jobs": rows}, f)
    print(f"collected {len(ids) - len(missing)} of {len(ids)}", file=sys.stderr)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker")
    w.add_argument("--redis", required=True)
    w.add_argument("--concurrency", type=int, default=1)
    s = sub.add_parser("submit")
    s.add_argument("--redis", required=True)
    s.add_argument("--jobs", type=int, required=True)
    s.add_argument("--rate", type=float)
    s.add_argument("--prompt-bytes", type=int, default=100)
    s.add_argument("--out", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--redis", required=True)
    c.add_argument("--ids", required=True)
    c.add_argument("--timeout", type=float, default=120)
    c.add_argument("--out", required=True)
    args = parser.parse_args()
    if not args.redis.startswith(("redis://127.0.0.1:", "redis://localhost:")):
        parser.error("--redis: a local Redis only (redis://127.0.0.1:PORT/DB)")
    {"worker": worker, "submit": submit, "collect": collect}[args.command](args)


if __name__ == "__main__":
    main()
