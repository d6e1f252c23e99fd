"""The README's runnable blocks: which they are, how their addresses are rewritten, how one is run.

A fenced block is runnable when its info string carries the word `runnable` after the language:

    ```sh runnable
    ```python runnable
    ```toml runnable

(GitHub and other renderers take the first word as the language and ignore the rest.) A block
marked `runnable tls` runs against a second mesh, `llmesh up --tls certs` on the certificates an
earlier block made in the working directory (`llmesh certs new --out certs`). Blocks run in
the order of the README, one after another, in one working directory, so a file a block makes
(keys.toml, certs/, generated stubs) is there for the blocks after it. The README's addresses are
those of a mesh on its default ports; `substitute` rewrites them to the mesh the runner started:

    127.0.0.1:50051 .. 50054     gateway, generation, cache, health (gRPC and HTTP)
    127.0.0.1:9464 .. 9467       their admin listeners (/metrics, pprof)
    redis://127.0.0.1:6379       the mesh's Redis (`llmesh up --redis-url`)

A `sh` block runs under `bash -euo pipefail`, a `python` block with the runner's interpreter; a
`toml` block is a config file, checked by `llmesh serve <section> --config FILE --check-config` for
each of its sections (gateway, generation, cache, health). Each must exit 0 within `BLOCK_TIMEOUT_S`; curl runs with `--fail-with-body` (a `.curlrc` in the
working directory), so an HTTP error fails the block too. The PATH puts the llmesh binaries and the runner's Python
environment (python, pip, grpcurl, locust) first, as a reader's activated venv and built binaries
would.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

# A fence's opening line: ``` then the language, then the rest of the info string.
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,})(?P<info>[^`]*)$")
LANGUAGES = {"sh": "sh", "bash": "sh", "shell": "sh", "python": "python", "py": "python", "toml": "toml"}
SECTIONS = ("gateway", "generation", "cache", "health")
MARKER = "runnable"
BLOCK_TIMEOUT_S = 120

DEFAULT_PORTS = {"gateway": 50051, "generation": 50052, "cache": 50053, "health": 50054}
DEFAULT_ADMIN_PORTS = {"gateway": 9464, "generation": 9465, "cache": 9466, "health": 9467}
DEFAULT_REDIS = "redis://127.0.0.1:6379"


@dataclasses.dataclass(frozen=True)
class Block:
    language: str  # "sh", "python" or "toml"
    line: int  # 1-based line of the opening fence
    text: str
    tls: bool = False  # `runnable tls`: against the TLS mesh

    @property
    def name(self) -> str:
        first = next((line.strip() for line in self.text.splitlines() if line.strip()), "")
        return f"README.md:{self.line} {self.language}: {first[:60]}"


def runnable_blocks(markdown: str) -> list[Block]:
    """Every fenced block marked runnable, in order. A marked block in a language the runner
    cannot run is an error (its mark would otherwise be silently ignored)."""
    blocks = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, words = match["fence"], match["info"].split()
        body, j = [], i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            body.append(lines[j][len(match["indent"]) :] if lines[j].startswith(match["indent"]) else lines[j])
            j += 1
        if MARKER in words[1:]:
            language = LANGUAGES.get(words[0]) if words else None
            if language is None:
                raise ValueError(f"README.md:{i + 1}: a runnable block must be sh, python or toml, not {words[:1]}")
            blocks.append(Block(language, i + 1, "\n".join(body) + "\n", tls="tls" in words[1:]))
        i = j + 1
    return blocks


@dataclasses.dataclass(frozen=True)
class Mesh:
    """Where the runner's mesh is: service -> host:port, service -> admin host:port, Redis URL."""

    addresses: dict[str, str]
    admin: dict[str, str]
    redis: str | None


def substitute(text: str, mesh: Mesh) -> str:
    """`text` with the README's default addresses replaced by `mesh`'s."""
    for service, port in DEFAULT_PORTS.items():
        text = re.sub(rf"\b127\.0\.0\.1:{port}\b", mesh.addresses[service], text)
    for service, port in DEFAULT_ADMIN_PORTS.items():
        if service in mesh.admin:
            text = re.sub(rf"\b127\.0\.0\.1:{port}\b", mesh.admin[service], text)
    if mesh.redis is not None:
        text = re.sub(rf"{re.escape(DEFAULT_REDIS)}\b/?", mesh.redis.rstrip("/") + "/", text)
    return text


class BlockFailed(AssertionError):
    pass


def run(block: Block, mesh: Mesh, cwd: Path, bin_dir: Path, timeout_s: float = BLOCK_TIMEOUT_S) -> str:
    """Runs `block` (addresses substituted) in `cwd`; its output, or BlockFailed with it."""
    text = substitute(block.text, mesh)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("RUST_LOG", None)
    (cwd / ".curlrc").write_text("fail-with-body\n")
    env["CURL_HOME"] = str(cwd)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(cwd), env.get("PYTHONPATH", "")] if p)
    if block.language == "toml":
        return _check_config(block, text, cwd, bin_dir, env, timeout_s)
    if block.language == "sh":
        command = ["bash", "-euo", "pipefail", "-c", text]
    else:
        command = [sys.executable, "-c", text]
    try:
        result = subprocess.run(
            command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as error:
        raise BlockFailed(f"{block.name} did not finish within {timeout_s:.0f} s:\n{text}\n{error.stdout}\n{error.stderr}")
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    if result.returncode != 0:
        raise BlockFailed(f"{block.name} exited {result.returncode}:\n--- as run ---\n{text}\n{output}")
    return output


def _check_config(block: Block, text: str, cwd: Path, bin_dir: Path, env: dict[str, str], timeout_s: float) -> str:
    """`llmesh serve <section> --config FILE --check-config` for each section of the block."""
    try:
        sections = list(tomllib.loads(text))
    except tomllib.TOMLDecodeError as error:
        raise BlockFailed(f"{block.name} is not TOML: {error}\n{text}")
    unknown = [name for name in sections if name not in SECTIONS]
    if not sections or unknown:
        raise BlockFailed(f"{block.name}: sections {unknown or sections} are not those of {SECTIONS}")
    path = cwd / f"readme-{block.line}.toml"
    path.write_text(text)
    outputs = []
    for section in sections:
        command = [str(bin_dir / "llmesh"), "serve", section, "--config", str(path), "--check-config"]
        result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)
        if result.returncode != 0:
            raise BlockFailed(f"{block.name}: [{section}] is refused:\n{text}\n{result.stderr}")
        outputs.append(result.stderr)
    return "\n".join(outputs)
