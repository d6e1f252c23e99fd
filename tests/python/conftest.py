"""Fixtures for the cross-language tests: Python stubs generated from proto/, and one running mesh.

The mesh is started once per session with `llmesh up --base-port 0` (binaries from $LLMESH_BIN_DIR,
default <repo>/target/debug) and stopped with SIGTERM at the end (mesh_process.py). Tests use prompts unique to
themselves, so sharing one mesh (and its cache) does not couple them.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path

import grpc
import pytest

import mesh_process

REPO = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO / "proto"
BIN_DIR = Path(os.environ.get("LLMESH_BIN_DIR", REPO / "target" / "debug"))


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


@pytest.fixture(scope="session")
def mesh(tmp_path_factory: pytest.TempPathFactory):
    """A running mesh: yields {"gateway": "127.0.0.1:PORT", "generation": ..., "cache": ..., "health": ...}."""
    try:
        with mesh_process.running(BIN_DIR / "llmesh", tmp_path_factory.mktemp("mesh")) as addresses:
            yield addresses
    except mesh_process.MeshError as error:
        pytest.fail(str(error))


@pytest.fixture(scope="session")
def tls_mesh(tmp_path_factory: pytest.TempPathFactory):
    """A second mesh, with TLS on every port and mTLS inside (`llmesh up --tls`): yields its
    addresses and the directory of its certificates (ca.pem, client.pem, client-key.pem, ...)."""
    binary = BIN_DIR / "llmesh"
    try:
        certs = mesh_process.certificates(binary, tmp_path_factory.mktemp("certs"))
        with mesh_process.running(binary, tmp_path_factory.mktemp("tls-mesh"), args=["--tls", str(certs)]) as addresses:
            yield addresses, certs
    except mesh_process.MeshError as error:
        pytest.fail(str(error))


def tls_credentials(certs: Path, member: bool) -> grpc.ChannelCredentials:
    """Trusts the mesh's CA; a `member` also presents the mesh's client certificate (mTLS)."""
    root = (certs / "ca.pem").read_bytes()
    if not member:
        return grpc.ssl_channel_credentials(root_certificates=root)
    return grpc.ssl_channel_credentials(
        root_certificates=root,
        private_key=(certs / "client-key.pem").read_bytes(),
        certificate_chain=(certs / "client.pem").read_bytes(),
    )


def _channel(address: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    channel = grpc.insecure_channel(address) if credentials is None else grpc.secure_channel(address, credentials)
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
