"""The monitoring seed's Locust scenario (section 4), over gRPC against the llmesh gateway.

Three prompts, short, medium and long, as tasks weighted 3:2:1; every call carries `x-api-key`
metadata (`test-key`, as in the seed); each user waits between 1 and 3 seconds between calls.
Every call is reported to Locust's request event (request_type "grpc", name the RPC method), so
Locust's statistics, charts, CSV and exit code work as they do for HTTP.

Run (host is the gateway's host:port, as `llmesh up` prints it):

    locust -f bench/locust/locustfile.py --host 127.0.0.1:50051
    locust -f bench/locust/locustfile.py --headless -u 50 -r 10 -t 1m --host 127.0.0.1:50051

The Python stubs are generated from proto/ (found relative to this file, or $LLMESH_PROTO_DIR)
into a temporary directory when the file is imported, so there is nothing to build first.

Settings, from the environment:
    LLMESH_LOCUST_WAIT_MIN, LLMESH_LOCUST_WAIT_MAX  seconds between a user's calls (default 1, 3)
    LLMESH_LOCUST_MODEL    model to ask for (default sim)
    LLMESH_LOCUST_STREAM   1 to call GenerateStream instead of Generate (default 0)
    LLMESH_LOCUST_UNIQUE   1 to make each prompt unique, so every call misses the cache (default 0)
    LLMESH_LOCUST_TIMEOUT  deadline of each call in seconds (default 30)
    LLMESH_API_KEY         the x-api-key sent (default test-key)
"""

from __future__ import annotations

# Locust first: it patches the standard library for gevent on import, and grpc is made to
# cooperate with gevent below, before any channel exists.
from locust import User, between, task
from locust.exception import StopUser

import atexit
import importlib
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc
import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

log = logging.getLogger(__name__)

PROTO_DIR = Path(os.environ.get("LLMESH_PROTO_DIR", Path(__file__).resolve().parents[2] / "proto"))

# The seed's three prompts and their task weights.
SHORT_PROMPT = "简单提示词"
MEDIUM_PROMPT = "中等长度的提示词示例"
LONG_PROMPT = "较长的提示词带有上下文信息的示例"


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"${name} must be a number of seconds, not {raw!r}") from None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


WAIT_MIN = _env_float("LLMESH_LOCUST_WAIT_MIN", 1.0)
WAIT_MAX = _env_float("LLMESH_LOCUST_WAIT_MAX", 3.0)
if not 0 <= WAIT_MIN <= WAIT_MAX:
    raise ValueError(f"wait time bounds must satisfy 0 <= min <= max, not {WAIT_MIN}, {WAIT_MAX}")
MODEL = os.environ.get("LLMESH_LOCUST_MODEL", "sim")
STREAM = _env_flag("LLMESH_LOCUST_STREAM")
UNIQUE = _env_flag("LLMESH_LOCUST_UNIQUE")
TIMEOUT_S = _env_float("LLMESH_LOCUST_TIMEOUT", 30.0)
API_KEY = os.environ.get("LLMESH_API_KEY", "test-key")


def _generate_stubs() -> Path:
    """Runs grpc_tools.protoc over every .proto under PROTO_DIR into a fresh temporary directory."""
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(str(p) for p in PROTO_DIR.rglob("*.proto"))
    if not protos:
        raise RuntimeError(f"no .proto files under {PROTO_DIR} (set $LLMESH_PROTO_DIR)")
    out = Path(tempfile.mkdtemp(prefix="llmesh-locust-stubs-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"--proto_path={PROTO_DIR}",
            f"--proto_path={well_known}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            *protos,
        ]
    )
    if code != 0:
        raise RuntimeError(f"grpc_tools.protoc failed with exit code {code} on {PROTO_DIR}")
    # Regular packages, so that `llmesh` cannot merge with a namespace package elsewhere on sys.path.
    for directory in [out / "llmesh", *(p for p in (out / "llmesh").rglob("*") if p.is_dir())]:
        (directory / "__init__.py").touch()
    return out


def _import_stubs():
    out = _generate_stubs()
    sys.path.insert(0, str(out))
    for name in [n for n in sys.modules if n == "llmesh" or n.startswith("llmesh.")]:
        del sys.modules[name]
    importlib.invalidate_caches()
    return (
        importlib.import_module("llmesh.gateway.v1.gateway_pb2"),
        importlib.import_module("llmesh.gateway.v1.gateway_pb2_grpc"),
    )


gateway_pb2, gateway_pb2_grpc = _import_stubs()


class RpcFailure(Exception):
    """A failed call as Locust shows it: the gRPC code name and the details, without grpc's
    per-call debug string (which would make every failure a row of its own)."""

    def __init__(self, error: grpc.RpcError) -> None:
        code = error.code() if hasattr(error, "code") else None
        details = error.details() if hasattr(error, "details") else str(error)
        super().__init__(f"{code.name if code else 'UNKNOWN'}: {details}")
        self.code = code


class StreamIncomplete(Exception):
    """The stream ended without its final chunk (the one carrying finish_reason)."""


def _target(host: str) -> str:
    """Locust's --host as a grpc target: `127.0.0.1:50051`; an http:// prefix is dropped."""
    for scheme in ("http://", "grpc://", "dns:///"):
        if host.startswith(scheme):
            return host[len(scheme) :].rstrip("/")
    return host.rstrip("/")


class GatewayUser(User):
    """One simulated client of the gateway: the seed's LoadTest, over gRPC."""

    wait_time = between(WAIT_MIN, WAIT_MAX)

    def on_start(self) -> None:
        if not self.host:
            log.error("no host: pass --host HOST:PORT (the gateway, e.g. 127.0.0.1:50051)")
            raise StopUser()
        self.channel = grpc.insecure_channel(_target(self.host))
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)
        # The seed's X-API-Key header; gRPC metadata keys are lower case.
        self.metadata = (("x-api-key", API_KEY),)

    def on_stop(self) -> None:
        channel = getattr(self, "channel", None)
        if channel is not None:
            channel.close()

    @task(3)
    def short_prompt(self) -> None:
        self.generate(SHORT_PROMPT)

    @task(2)
    def medium_prompt(self) -> None:
        self.generate(MEDIUM_PROMPT)

    @task(1)
    def long_prompt(self) -> None:
        self.generate(LONG_PROMPT)

    def generate(self, prompt: str) -> None:
        """One Generate (or GenerateStream) call, timed and reported to Locust."""
        if UNIQUE:
            prompt = f"{prompt} [locust {uuid.uuid4().hex}]"
        name = "GenerateStream" if STREAM else "Generate"
        response = None
        length = 0
        exception: Exception | None = None
        start = time.perf_counter()
        try:
            if STREAM:
                request = gateway_pb2.GenerateStreamRequest(model=MODEL, prompt=prompt)
                chunks = list(self.stub.GenerateStream(request, metadata=self.metadata, timeout=TIMEOUT_S))
                length = sum(len(chunk.delta.encode()) for chunk in chunks)
                response = chunks[-1] if chunks else None
                if response is None or response.finish_reason == 0:
                    exception = StreamIncomplete(f"{len(chunks)} chunks and no final chunk")
            else:
                request = gateway_pb2.GenerateRequest(model=MODEL, prompt=prompt)
                response = self.stub.Generate(request, metadata=self.metadata, timeout=TIMEOUT_S)
                length = len(response.text.encode())
        except grpc.RpcError as error:
            exception = RpcFailure(error)
        self.environment.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=(time.perf_counter() - start) * 1000.0,
            response_length=length,
            response=response,
            context={"prompt_chars": len(prompt), "cached": bool(response is not None and response.cached)},
            exception=exception,
        )
