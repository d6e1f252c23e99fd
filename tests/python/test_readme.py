"""The README, kept honest: every block marked runnable runs against a mesh of its own.

The mesh is `llmesh up --base-port 0` with a redis-server of its own (`--redis-url`) and admin
listeners on four free ports in a row (`--admin-base-port`); the blocks' default addresses are
rewritten to it (readme_blocks.py says how). Blocks run in the README's order in one temporary
directory, where the repository's proto/ and bench/ are linked, as a reader runs them from a clone.
A command that stops working fails its test, named after the block's line in README.md.
"""

from __future__ import annotations

import http.server
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

import mesh_process
import readme_blocks
from conftest import BIN_DIR, REPO

README = REPO / "README.md"
BLOCKS = readme_blocks.runnable_blocks(README.read_text())


def _free_port_run(count: int, tries: int = 50) -> int:
    """The first of `count` consecutive free loopback ports."""
    for _ in range(tries):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count > 65535:
            continue
        sockets = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    pytest.fail(f"no {count} consecutive free ports in {tries} tries")


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (scripts/test installs it)")
    port = _free_port_run(1)
    directory = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(directory)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"redis-server did not answer on {port}")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/"
    finally:
        process.kill()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def readme_mesh(tmp_path_factory, redis_url):
    admin_base = _free_port_run(4)
    args = ["--admin-base-port", str(admin_base), "--redis-url", redis_url]
    try:
        with mesh_process.running(BIN_DIR / "llmesh", tmp_path_factory.mktemp("readme-mesh"), args=args) as addresses:
            admin = {service: f"127.0.0.1:{admin_base + i}" for i, service in enumerate(readme_blocks.DEFAULT_ADMIN_PORTS)}
            yield readme_blocks.Mesh(addresses=addresses, admin=admin, redis=redis_url)
    except mesh_process.MeshError as error:
        pytest.fail(str(error))


@pytest.fixture(scope="module")
def tls_readme_mesh(tmp_path_factory, workdir):
    """A second mesh, with TLS, on the certificates the README's own block made in `workdir`."""
    certs = workdir / "certs"
    if not (certs / "ca.pem").is_file():
        pytest.fail(f"no {certs}/ca.pem: the README's `llmesh certs new --out certs` block must come first")
    try:
        with mesh_process.running(BIN_DIR / "llmesh", tmp_path_factory.mktemp("readme-tls-mesh"), args=["--tls", str(certs)]) as addresses:
            yield readme_blocks.Mesh(addresses=addresses, admin={}, redis=None)
    except mesh_process.MeshError as error:
        pytest.fail(str(error))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Where the blocks run: a clone's view (proto/, bench/) without writing into the repository."""
    directory = tmp_path_factory.mktemp("readme")
    for name in ("proto", "bench"):
        (directory / name).symlink_to(REPO / name)
    return directory


def test_the_readme_has_runnable_blocks():
    languages = {block.language for block in BLOCKS}
    assert len(BLOCKS) >= 10 and languages == {"sh", "python", "toml"}, [block.name for block in BLOCKS]


@pytest.mark.parametrize("block", BLOCKS, ids=[f"README.md:{block.line}" for block in BLOCKS])
def test_readme_block(block, workdir, request):
    mesh = request.getfixturevalue("tls_readme_mesh" if block.tls else "readme_mesh")
    readme_blocks.run(block, mesh, workdir, BIN_DIR)


# --- the runner itself -----------------------------------------------------------------------------


MESH = readme_blocks.Mesh(
    addresses={"gateway": "127.0.0.1:4001", "generation": "127.0.0.1:4002", "cache": "127.0.0.1:4003", "health": "[::1]:4004"},
    admin={"gateway": "127.0.0.1:5001"},
    redis="redis://127.0.0.1:7000/",
)


def test_only_marked_blocks_are_found_and_a_bad_mark_is_refused():
    markdown = "\n".join(
        [
            "```sh",
            "not me",
            "```",
            "```sh runnable",
            "echo one",
            "```",
            "  ```python runnable",
            "  print(2)",
            "  ```",
            "````sh runnable tls",
            "```",
            "echo nested",
            "````",
        ]
    )
    blocks = readme_blocks.runnable_blocks(markdown)
    assert [(b.language, b.line, b.text) for b in blocks] == [
        ("sh", 4, "echo one\n"),
        ("python", 7, "print(2)\n"),
        ("sh", 10, "```\necho nested\n"),
    ]
    assert [b.tls for b in blocks] == [False, False, True]
    with pytest.raises(ValueError, match="README.md:1"):
        readme_blocks.runnable_blocks("```yaml runnable\ngateway: {}\n```\n")


def test_default_addresses_become_the_meshs():
    text = (
        "grpcurl 127.0.0.1:50051 x; http://127.0.0.1:50054/y; 127.0.0.1:500510; "
        "http://127.0.0.1:9464/metrics; --redis redis://127.0.0.1:6379 and redis://127.0.0.1:6379/"
    )
    assert readme_blocks.substitute(text, MESH) == (
        "grpcurl 127.0.0.1:4001 x; http://[::1]:4004/y; 127.0.0.1:500510; "
        "http://127.0.0.1:5001/metrics; --redis redis://127.0.0.1:7000/ and redis://127.0.0.1:7000/"
    )


def test_a_config_block_is_checked_by_every_service_it_configures(tmp_path):
    good = readme_blocks.Block("toml", 1, '[gateway]\nrequest_timeout_ms = 1000\n[cache]\nttl_ms = 5\n')
    readme_blocks.run(good, MESH, tmp_path, BIN_DIR)
    for bad, why in [
        ('[gateway]\nbogus_key = 1\n', "gateway.bogus_key"),
        ('[cache]\nttl_ms = "soon"\n', "cache.ttl_ms"),
        ('[gateway\n', "not TOML"),
        ('[proxy]\nlisten = "x"\n', "not those of"),
    ]:
        with pytest.raises(readme_blocks.BlockFailed, match=why):
            readme_blocks.run(readme_blocks.Block("toml", 2, bad), MESH, tmp_path, BIN_DIR)


def test_a_failing_block_fails(tmp_path):
    failing = readme_blocks.Block("sh", 1, "true\nfalse\necho never\n")
    with pytest.raises(readme_blocks.BlockFailed, match="exited 1"):
        readme_blocks.run(failing, MESH, tmp_path, BIN_DIR)
    broken_pipe = readme_blocks.Block("sh", 2, "false | cat\n")
    with pytest.raises(readme_blocks.BlockFailed):
        readme_blocks.run(broken_pipe, MESH, tmp_path, BIN_DIR)
    python = readme_blocks.Block("python", 3, "raise SystemExit(3)\n")
    with pytest.raises(readme_blocks.BlockFailed, match="exited 3"):
        readme_blocks.run(python, MESH, tmp_path, BIN_DIR)
    slow = readme_blocks.Block("sh", 4, "sleep 5\n")
    with pytest.raises(readme_blocks.BlockFailed, match="did not finish"):
        readme_blocks.run(slow, MESH, tmp_path, BIN_DIR, timeout_s=0.5)
    # An HTTP error fails a curl the README shows without --fail.
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        not_found = readme_blocks.Block("sh", 5, f"curl -s http://127.0.0.1:{server.server_port}/no-such-file\n")
        with pytest.raises(readme_blocks.BlockFailed, match="exited 22"):
            readme_blocks.run(not_found, MESH, tmp_path, BIN_DIR)
    finally:
        server.shutdown()
    ok = readme_blocks.Block("sh", 6, "echo 127.0.0.1:50051\n")
    assert "127.0.0.1:4001" in readme_blocks.run(ok, MESH, tmp_path, BIN_DIR)
