#!/usr/bin/env python3
"""A tiny, fast mock of an OpenAI-compatible chat completions endpoint, for the benchmarks.

Stdlib only: a raw asyncio protocol speaking HTTP/1.1 with keep-alive, so that the mock costs as
little CPU as possible and the proxies in front of it (LiteLLM, llmesh's gateway with an `openai`
provider model) are what is measured. Every POST to `.../chat/completions` gets the same fixed
completion (24 tokens, with `usage`); `"stream": true` gets the same text as Server-Sent Events
with a final usage chunk. `GET .../models` lists one model; anything else is a 404.

    python3 bench/mock_openai.py --port 0      # prints "listening on 127.0.0.1:PORT" to stderr

With `--delay-ms D --slots K` it stands in for a model server of fixed capacity: at most K
completions are in service at once, each takes D ms, and the rest wait their turn (FIFO), as on a
GPU-backed replica with K batch slots. bench/run uses that to show what replicas buy.

Only ever binds 127.0.0.1.
"""

import argparse
import asyncio
import json
import signal
import sys
import time

WORDS = ("the mesh answers with a simulated reply about your prompt and every token is "
         "deterministic so caches tests benchmarks agree on what came back from model").split()
TEXT = " ".join(WORDS[:24])
USAGE = {"prompt_tokens": 8, "completion_tokens": 24, "total_tokens": 32}


def completion_body(model: str) -> bytes:
    return json.dumps({
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": TEXT},
                     "finish_reason": "stop"}],
        "usage": USAGE,
    }, separators=(",", ":")).encode()


def stream_body(model: str) -> bytes:
    chunks = []
    base = {"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model}
    for i, word in enumerate(WORDS[:24]):
        delta = {"content": (word if i == 0 else " " + word)}
        if i == 0:
            delta["role"] = "assistant"
        chunks.append(dict(base, choices=[{"index": 0, "delta": delta, "finish_reason": None}]))
    chunks.append(dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}]))
    chunks.append(dict(base, choices=[], usage=USAGE))
    out = b"".join(b"data: " + json.dumps(c, separators=(",", ":")).encode() + b"\n\n" for c in chunks)
    return out + b"data: [DONE]\n\n"


_BODIES: dict = {}


def body_for(model: str, stream: bool) -> bytes:
    key = (model, stream)
    if key not in _BODIES:
        if len(_BODIES) > 64:
            _BODIES.clear()
        _BODIES[key] = stream_body(model) if stream else completion_body(model)
    return _BODIES[key]


class Http(asyncio.Protocol):
    __slots__ = ("transport", "buf", "stats", "capacity")

    def __init__(self, stats, capacity=None):
        self.stats = stats
        self.capacity = capacity  # (semaphore, seconds) or None
        self.buf = b""
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].decode("latin-1")
            lines = head.split("\r\n")
            try:
                method, path, _ = lines[0].split(" ", 2)
            except ValueError:
                self.transport.close()
                return
            length = 0
            close = False
            chunked = False
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value.strip())
                elif name == "connection" and value.strip().lower() == "close":
                    close = True
                elif name == "transfer-encoding" and "chunked" in value.lower():
                    chunked = True
            if chunked:
                # Rare for JSON clients; decode the whole chunked body once it has arrived.
                rest = self.buf[end + 4:]
                term = rest.find(b"0\r\n\r\n")
                if term < 0:
                    return
                raw, self.buf = rest[:term], rest[term + 5:]
                body = b""
                while raw:
                    size_line, _, raw = raw.partition(b"\r\n")
                    size = int(size_line.split(b";")[0], 16)
                    body += raw[:size]
                    raw = raw[size + 2:]
            else:
                if len(self.buf) < end + 4 + length:
                    return
                body = self.buf[end + 4:end + 4 + length]
                self.buf = self.buf[end + 4 + length:]
            self.respond(method, path, body, close)
            if close:
                return

    def respond(self, method, path, body, close):
        self.stats["requests"] += 1
        path = path.split("?", 1)[0]
        if method == "POST" and path.endswith("/chat/completions"):
            try:
                request = json.loads(body or b"{}")
            except ValueError:
                request = {}
            model = str(request.get("model", "mock"))
            stream = bool(request.get("stream"))
            payload = body_for(model, stream)
            ctype = b"text/event-stream" if stream else b"application/json"
            status = b"200 OK"
        elif method == "GET" and path.endswith("/models"):
            payload = json.dumps({"object": "list", "data": [
                {"id": "mock", "object": "model", "created": 0, "owned_by": "bench"}]}).encode()
            ctype, status = b"application/json", b"200 OK"
        else:
            payload, ctype, status = b'{"error":{"message":"not found"}}', b"application/json", b"404 Not Found"
        if self.capacity and status == b"200 OK" and method == "POST":
            asyncio.ensure_future(self.respond_later(status, ctype, payload, close))
            return
        self.write(status, ctype, payload, close)

    async def respond_later(self, status, ctype, payload, close):
        slots, seconds = self.capacity
        async with slots:
            await asyncio.sleep(seconds)
        if self.transport is not None and not self.transport.is_closing():
            self.write(status, ctype, payload, close)

    def write(self, status, ctype, payload, close):
        head = (b"HTTP/1.1 " + status + b"\r\ncontent-type: " + ctype + b"\r\ncontent-length: "
                + str(len(payload)).encode() + (b"\r\nconnection: close" if close else b"") + b"\r\n\r\n")
        self.transport.write(head + payload)
        if close:
            self.transport.close()


async def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="time each completion takes (0: none)")
    parser.add_argument("--slots", type=int, default=0, help="completions in service at once with --delay-ms (0: unbounded)")
    args = parser.parse_args()
    stats = {"requests": 0}
    capacity = None
    if args.delay_ms > 0:
        slots = asyncio.Semaphore(args.slots) if args.slots > 0 else asyncio.Semaphore(1 << 30)
        capacity = (slots, args.delay_ms / 1000.0)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Http(stats, capacity), "127.0.0.1", args.port, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    print(f"listening on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    print(f"mock served {stats['requests']} requests", file=sys.stderr, flush=True)


if __name__ == "__main__":
    asyncio.run(main())
