"""Fixtures for the cross-language tests: Python stubs generated from proto/, and one running mesh.

The mesh is started once per session with `llmesh up --base-port 0` (binaries from $LLMESH_BIN_DIR,
default <repo>/target/debug) and stopped with SIGTERM at the end. Tests use prompts unique to
themselves, so sharing one mesh (and its cache) does not couple them.
"""

from __future__ import annotations

import collections
import importlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import grpc
import pytest

REPO = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO / "proto"
BIN_DIR = Path(os.environ.get("LLMESH_BIN_DIR", REPO / "target" / "debug"))

STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
SERVICES = ("generation", "cache", "gateway", "health")
# One line of the banner `llmesh up` prints once every service is SERVING: "  gateway    127.0.0.1:4000".
BANNER_LINE = re.compile(r"^\s*(generation|cache|gateway|health)\s+(\S+:\d+)\s*$")

# The generated modules, by short name, as the `pb` fixture exposes them.
STUB_MODULES = {
    "common_pb2": "llmesh.common.v1.common_pb2",
    "generation_pb2": "llmesh.generation.v1.generation_pb2",
    "gateway_pb2": "llmesh.gateway.v1.gateway_pb2",
    "gateway_pb2_grpc": "llmesh.gateway.v1.gateway_pb2_grpc",
    "cache_pb2": "llmesh.cache.v1.cache_pb2",
    "health_pb2": "llmesh.health.v1.health_pb2",
    "health_pb2_grpc": "llmesh.health.v1.health_pb2_grpc",
}


def _generate_stubs(out: Path) -> None:
    """Runs grpc_tools.protoc over every .proto under proto/ into `out` (a package tree)."""
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(str(p) for p in PROTO_DIR.rglob("*.proto"))
    if not protos:
        pytest.fail(f"no .proto files under {PROTO_DIR}")
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
        pytest.fail(f"grpc_tools.protoc failed with exit code {code} for {protos}")
    # Make every generated directory a regular package, so `llmesh` cannot be shadowed by, or merged
    # with, a namespace package of the same name elsewhere on sys.path.
    for directory in [out / "llmesh", *(p for p in (out / "llmesh").rglob("*") if p.is_dir())]:
        (directory / "__init__.py").touch()


@pytest.fixture(scope="session")
def pb(tmp_path_factory: pytest.TempPathFactory) -> types.SimpleNamespace:
    """The generated message and stub modules, e.g. `pb.gateway_pb2`, `pb.gateway_pb2_grpc`."""
    out = tmp_path_factory.mktemp("stubs")
    _generate_stubs(out)
    sys.path.insert(0, str(out))
    try:
        stale = [name for name in sys.modules if name == "llmesh" or name.startswith("llmesh.")]
        for name in stale:
            del sys.modules[name]
        importlib.invalidate_caches()
        return types.SimpleNamespace(**{short: importlib.import_module(full) for short, full in STUB_MODULES.items()})
    except ImportError as error:
        pytest.fail(f"cannot import the stubs generated into {out}: {error}")


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as error:
        return f"(cannot read {path}: {error})"
    return "\n".join(text.splitlines()[-lines:])


class _StdoutReader(threading.Thread):
    """Drains the mesh's stdout for its whole life (so the pipe never fills) and collects the banner."""

    def __init__(self, stream) -> None:
        super().__init__(name="llmesh-up-stdout", daemon=True)
        self._stream = stream
        self.lines: collections.deque[str] = collections.deque(maxlen=200)
        self.addresses: dict[str, str] = {}
        self.up = threading.Event()
        self.closed = threading.Event()

    def run(self) -> None:
        in_banner = False
        try:
            for raw in self._stream:
                line = raw.decode(errors="replace").rstrip("\n")
                self.lines.append(line)
                if self.up.is_set():
                    continue
                if line.strip() == "llmesh is up:":
                    in_banner = True
                    continue
                match = BANNER_LINE.match(line) if in_banner else None
                if match:
                    self.addresses[match.group(1)] = match.group(2)
                    if all(name in self.addresses for name in SERVICES):
                        self.up.set()
        finally:
            self.closed.set()


@pytest.fixture(scope="session")
def mesh(tmp_path_factory: pytest.TempPathFactory):
    """A running mesh: yields {"gateway": "127.0.0.1:PORT", "generation": ..., "cache": ..., "health": ...}."""
    binary = BIN_DIR / "llmesh"
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.fail(f"{binary} is missing or not executable: build it (cargo build) or set LLMESH_BIN_DIR")

    log_path = tmp_path_factory.mktemp("mesh") / "llmesh-up.stderr.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed in the finally below
    process = subprocess.Popen(
        [str(binary), "up", "--base-port", "0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=log,
        # Its own process group: a Ctrl-C at the terminal reaches pytest only, and pytest stops the
        # mesh through the teardown below.
        start_new_session=True,
    )
    reader = _StdoutReader(process.stdout)
    reader.start()
    failure: str | None = None
    try:
        failure = _wait_up(process, reader, log_path)
        if failure is None:
            yield dict(reader.addresses)
    finally:
        if process.poll() is None:
            stop_failure = _stop(process, log_path)
        elif failure is None:
            stop_failure = f"`llmesh up` exited early ({process.returncode}).\nstderr:\n{_tail(log_path)}"
        else:
            stop_failure = None
        reader.join(timeout=5)
        process.stdout.close()
        log.close()
    # Reported after the clean-up, and only one of them: a failed start-up, or a bad stop.
    if failure is not None:
        pytest.fail(failure)
    if stop_failure is not None:
        pytest.fail(stop_failure)


def _wait_up(process: subprocess.Popen, reader: _StdoutReader, log_path: Path) -> str | None:
    """Waits for the banner; returns why the mesh is not up, or None when it is."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not reader.up.wait(timeout=0.1):
        if process.poll() is not None or reader.closed.is_set():
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
            why = f"`llmesh up` exited ({process.returncode}) before the mesh was up"
        elif time.monotonic() > deadline:
            why = f"the mesh was not up within {STARTUP_TIMEOUT_S:.0f} s"
        else:
            continue
        stdout = "\n".join(reader.lines)
        return f"{why}.\nstdout:\n{stdout}\nstderr ({log_path}):\n{_tail(log_path)}"
    return None


def _stop(process: subprocess.Popen, log_path: Path) -> str | None:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT_S; returns what went wrong, or None on a clean stop."""
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # Kill the whole group: the up process and any service it left behind.
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=5)
        return f"`llmesh up` did not stop within {STOP_TIMEOUT_S:.0f} s of SIGTERM.\nstderr:\n{_tail(log_path)}"
    if code != 0:
        return f"`llmesh up` exited {code} after SIGTERM (expected 0).\nstderr:\n{_tail(log_path)}"
    return None


def _channel(address: str) -> grpc.Channel:
    channel = grpc.insecure_channel(address)
    try:
        grpc.channel_ready_future(channel).result(timeout=10)
    except grpc.FutureTimeoutError:
        channel.close()
        pytest.fail(f"cannot connect to {address} within 10 s")
    return channel


@pytest.fixture(scope="session")
def gateway_channel(mesh):
    channel = _channel(mesh["gateway"])
    yield channel
    channel.close()


@pytest.fixture(scope="session")
def health_channel(mesh):
    channel = _channel(mesh["health"])
    yield channel
    channel.close()


@pytest.fixture(scope="session")
def gateway(pb, gateway_channel):
    """A llmesh.gateway.v1.Gateway stub."""
    return pb.gateway_pb2_grpc.GatewayStub(gateway_channel)
