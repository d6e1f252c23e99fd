"""Runs a whole mesh with `llmesh up --base-port 0` for the Python tests and the Locust run.

`certificates(binary, directory)` makes a development CA and the mesh's certificates there
(`llmesh certs new`); `running(..., args=["--tls", directory])` runs the mesh with TLS on every port.

`running(binary, log_dir)` starts it, waits for the banner it prints once every service is
SERVING, yields the services' addresses ({"gateway": "127.0.0.1:PORT", "generation": ...,
"cache": ..., "health": ...}) and stops it with SIGTERM (SIGKILL to its process group after a
timeout). A mesh that does not come up, or does not stop cleanly, raises MeshError with its output.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

SERVICES = ("generation", "cache", "gateway", "health")
# One line of the banner `llmesh up` prints once every service is SERVING: "  gateway    127.0.0.1:4000".
BANNER_LINE = re.compile(r"^\s*(generation|cache|gateway|health)\s+(\S+:\d+)\s*$")


class MeshError(Exception):
    """The mesh did not come up, or did not stop cleanly."""


def tail(path: Path, lines: int = 40) -> str:
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
                # "llmesh is up:", or "llmesh is up (TLS on every port, ...):".
                if line.startswith("llmesh is up") and line.rstrip().endswith(":"):
                    in_banner = True
                    continue
                match = BANNER_LINE.match(line) if in_banner else None
                if match:
                    self.addresses[match.group(1)] = match.group(2)
                    if all(name in self.addresses for name in SERVICES):
                        self.up.set()
        finally:
            self.closed.set()


@contextlib.contextmanager
def running(
    binary: Path,
    log_dir: Path,
    startup_timeout_s: float = 60.0,
    stop_timeout_s: float = 15.0,
    env: dict[str, str] | None = None,
    args: list[str] | None = None,
) -> Iterator[dict[str, str]]:
    """A running mesh from `binary` (the `llmesh` CLI), its stderr in `log_dir`; `env` is added to
    the environment it inherits (e.g. `LLMESH_GATEWAY_AUTH__KEYS`), `args` to `llmesh up`'s."""
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        raise MeshError(f"{binary} is missing or not executable: build it (cargo build) or set LLMESH_BIN_DIR")
    log_path = log_dir / "llmesh-up.stderr.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(binary), "up", "--base-port", "0", *(args or [])],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            env={**os.environ, **(env or {})},
            # Its own process group: a Ctrl-C at the terminal reaches the test runner only, which
            # stops the mesh on its way out.
            start_new_session=True,
        )
    reader = _StdoutReader(process.stdout)
    reader.start()
    try:
        _wait_up(process, reader, log_path, startup_timeout_s, stop_timeout_s)
        yield dict(reader.addresses)
    finally:
        # Reported only when nothing else went wrong first (a failed start-up, a failed test body).
        stopped = _stop(process, log_path, stop_timeout_s)
        reader.join(timeout=5)
        process.stdout.close()
    if stopped is not None:
        raise MeshError(stopped)


def certificates(binary: Path, directory: Path) -> Path:
    """`llmesh certs new --out directory`: ca.pem, a certificate per service, client.pem."""
    result = subprocess.run(
        [str(binary), "certs", "new", "--out", str(directory)], capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0:
        raise MeshError(f"llmesh certs new failed ({result.returncode}):\n{result.stderr}")
    return directory


def _wait_up(
    process: subprocess.Popen, reader: _StdoutReader, log_path: Path, startup_s: float, stop_s: float
) -> None:
    deadline = time.monotonic() + startup_s
    while not reader.up.wait(timeout=0.1):
        if process.poll() is not None or reader.closed.is_set():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=stop_s)
            why = f"`llmesh up` exited ({process.returncode}) before the mesh was up"
        elif time.monotonic() > deadline:
            why = f"the mesh was not up within {startup_s:.0f} s"
        else:
            continue
        stdout = "\n".join(reader.lines)
        raise MeshError(f"{why}.\nstdout:\n{stdout}\nstderr ({log_path}):\n{tail(log_path)}")


def _stop(process: subprocess.Popen, log_path: Path, stop_s: float) -> str | None:
    """SIGTERM, then SIGKILL to the group after `stop_s`; what went wrong, or None on a clean stop."""
    if process.poll() is not None:
        return f"`llmesh up` exited early ({process.returncode}).\nstderr:\n{tail(log_path)}"
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=stop_s)
    except subprocess.TimeoutExpired:
        # Kill the whole group: the up process and any service it left behind.
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=5)
        return f"`llmesh up` did not stop within {stop_s:.0f} s of SIGTERM.\nstderr:\n{tail(log_path)}"
    if code != 0:
        return f"`llmesh up` exited {code} after SIGTERM (expected 0).\nstderr:\n{tail(log_path)}"
    return None
