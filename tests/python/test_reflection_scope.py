"""Each service's server reflection lists the services it serves, not every service of the contract.

grpcurl's `list` and any reflection client see what they can call on that port: generation lists
`llmesh.generation.v1.Generation`, not the gateway's, the cache's or MeshHealth; every service lists
`grpc.health.v1.Health` and reflection itself. Describing a type of the contract still works everywhere.
"""

from __future__ import annotations

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2

from conftest import _channel

CALL_TIMEOUT_S = 10
COMMON = {
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
}
OWN = {
    "gateway": {"llmesh.gateway.v1.Gateway", "llmesh.health.v1.MeshHealth"},
    "generation": {"llmesh.generation.v1.Generation"},
    "cache": {"llmesh.cache.v1.Cache"},
    "health": {"llmesh.health.v1.MeshHealth"},
}


def _ask(channel: grpc.Channel, version: str, request: reflection_pb2.ServerReflectionRequest):
    call = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    replies = list(call(iter([request]), timeout=CALL_TIMEOUT_S))
    assert len(replies) == 1, replies
    return replies[0]


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
@pytest.mark.parametrize("service", sorted(OWN))
def test_each_service_lists_its_own_services(mesh, service, version):
    channel = _channel(mesh[service])
    try:
        reply = _ask(channel, version, reflection_pb2.ServerReflectionRequest(list_services=""))
        listed = {s.name for s in reply.list_services_response.service}
        assert listed == OWN[service] | COMMON, sorted(listed)
        # A service it does not list is still described (its types are the contract's).
        described = _ask(
            channel, version, reflection_pb2.ServerReflectionRequest(file_containing_symbol="llmesh.gateway.v1.Gateway")
        )
        assert described.HasField("file_descriptor_response"), described
    finally:
        channel.close()
