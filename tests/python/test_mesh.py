"""The mesh seen from Python grpcio: the gateway's API, the cache behind it, health and reflection.

Every test runs twice: against the plaintext mesh, and against one with TLS on every port and mTLS
inside (`llmesh up --tls`), through `grpc.secure_channel` with `ssl_channel_credentials` (the CA
for the gateway; the CA and the mesh's client certificate for health, which requires one). Every
test uses prompts unique to itself (see `unique`), so a shared mesh's cache never carries an answer
from one test into another.
"""

from __future__ import annotations

import time
import uuid

import grpc
import pytest
from conftest import _channel, tls_credentials
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

# Every call gets a deadline: a hung server fails a test instead of the run.
CALL_TIMEOUT_S = 10.0
# The gateway stores answers in the background; an identical request is a hit within this long.
CACHE_WAIT_S = 3.0
POLL_INTERVAL_S = 0.05

GATEWAY_SERVICE = "llmesh.gateway.v1.Gateway"


@pytest.fixture(scope="session", params=["plaintext", "tls"])
def transport(request):
    """The plaintext mesh's addresses and no certificates, or the TLS mesh's and its certificates."""
    if request.param == "plaintext":
        return request.getfixturevalue("mesh"), None
    return request.getfixturevalue("tls_mesh")


@pytest.fixture(scope="session")
def gateway_channel(transport):
    addresses, certs = transport
    # The gateway's port is public: the CA is enough, no client certificate.
    channel = _channel(addresses["gateway"], None if certs is None else tls_credentials(certs, member=False))
    yield channel
    channel.close()


@pytest.fixture(scope="session")
def health_channel(transport):
    addresses, certs = transport
    channel = _channel(addresses["health"], None if certs is None else tls_credentials(certs, member=True))
    yield channel
    channel.close()


def test_tls_mesh_refuses_plaintext_and_strangers(tls_mesh):
    addresses, certs = tls_mesh
    plaintext = grpc.insecure_channel(addresses["gateway"])
    with pytest.raises(grpc.FutureTimeoutError):
        grpc.channel_ready_future(plaintext).result(timeout=2)
    plaintext.close()
    # Health is internal: the CA alone (no client certificate) is refused at the handshake.
    stranger = grpc.secure_channel(addresses["health"], tls_credentials(certs, member=False))
    with pytest.raises(grpc.RpcError):
        health_pb2_grpc.HealthStub(stranger).Check(health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT_S)
    stranger.close()


def unique(label: str) -> str:
    """A prompt no other test (and no earlier run against a long-lived mesh) sends."""
    return f"python {label} {uuid.uuid4().hex[:12]}"


def eventually(call, done, within: float = CACHE_WAIT_S):
    """Calls `call()` until `done(result)`, for at most `within` seconds; returns the last result."""
    deadline = time.monotonic() + within
    while True:
        result = call()
        if done(result) or time.monotonic() >= deadline:
            return result
        time.sleep(POLL_INTERVAL_S)


def generate(gateway, pb, **fields):
    fields.setdefault("model", "sim")
    return gateway.Generate(pb.gateway_pb2.GenerateRequest(**fields), timeout=CALL_TIMEOUT_S)


def stream(gateway, pb, **fields):
    """The whole GenerateStream answer as a list of chunks."""
    fields.setdefault("model", "sim")
    return list(gateway.GenerateStream(pb.gateway_pb2.GenerateStreamRequest(**fields), timeout=CALL_TIMEOUT_S))


def check_final_chunk(pb, chunks):
    """Exactly one chunk carries finish_reason, it is the last, and it carries consistent usage."""
    unspecified = pb.common_pb2.FINISH_REASON_UNSPECIFIED
    assert chunks, "the stream sent no chunk"
    finals = [i for i, c in enumerate(chunks) if c.finish_reason != unspecified]
    assert finals == [len(chunks) - 1], f"final chunks at {finals} of {len(chunks)}: {chunks}"
    last = chunks[-1]
    assert last.HasField("usage"), last
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens, last.usage
    return last


def text_of(chunks) -> str:
    return "".join(c.delta for c in chunks)


def test_generate_then_served_from_cache(gateway, pb):
    prompt = unique("generate then cached")
    first = generate(gateway, pb, prompt=prompt)
    assert first.text
    assert first.provider == "sim"
    assert not first.cached
    assert first.model == "sim"
    assert first.finish_reason == pb.common_pb2.FINISH_REASON_STOP
    assert first.HasField("usage")
    assert first.usage.prompt_tokens > 0
    assert first.usage.completion_tokens > 0
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens

    second = eventually(lambda: generate(gateway, pb, prompt=prompt), lambda r: r.cached)
    assert second.cached, f"the identical request was not served from the cache within {CACHE_WAIT_S} s"
    assert second.text == first.text
    assert second.usage == first.usage
    assert second.provider == first.provider
    assert second.finish_reason == first.finish_reason


def test_stream_matches_unary(gateway, pb):
    prompt = unique("stream matches unary")
    chunks = stream(gateway, pb, prompt=prompt)
    last = check_final_chunk(pb, chunks)
    assert last.finish_reason == pb.common_pb2.FINISH_REASON_STOP
    assert not any(c.cached for c in chunks), "a first stream of a new prompt came from the cache"
    assert all(c.provider == "sim" for c in chunks if c.provider), chunks
    streamed = text_of(chunks)
    assert streamed

    # BYPASS: a fresh generation, not the entry the stream just stored.
    unary = generate(gateway, pb, prompt=prompt, cache=pb.common_pb2.CACHE_POLICY_BYPASS)
    assert not unary.cached
    assert streamed == unary.text, "streamed and unary answers differ"
    assert last.usage.prompt_tokens == unary.usage.prompt_tokens
    assert last.usage.completion_tokens == unary.usage.completion_tokens


def test_stream_stops_at_max_tokens(gateway, pb):
    chunks = stream(gateway, pb, prompt=unique("stream max tokens"), max_tokens=3)
    last = check_final_chunk(pb, chunks)
    assert last.finish_reason == pb.common_pb2.FINISH_REASON_LENGTH
    assert last.usage.completion_tokens == 3


def test_stream_replayed_from_cache(gateway, pb):
    prompt = unique("stream replay")
    first = stream(gateway, pb, prompt=prompt)
    first_last = check_final_chunk(pb, first)
    assert not any(c.cached for c in first)

    replay = eventually(lambda: stream(gateway, pb, prompt=prompt), lambda chunks: all(c.cached for c in chunks))
    assert all(c.cached for c in replay), f"the stream was not replayed from the cache within {CACHE_WAIT_S} s"
    replay_last = check_final_chunk(pb, replay)
    assert text_of(replay) == text_of(first)
    assert [c.delta for c in replay] == [c.delta for c in first], "the replay lost the chunk boundaries"
    assert replay_last.finish_reason == first_last.finish_reason
    assert replay_last.usage == first_last.usage


def test_messages_instead_of_prompt(gateway, pb):
    message = pb.common_pb2.ChatMessage(role="user", content=unique("messages"))
    answer = generate(gateway, pb, messages=[message])
    assert answer.text
    assert answer.provider == "sim"
    assert not answer.cached
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens

    chunks = stream(gateway, pb, messages=[message], cache=pb.common_pb2.CACHE_POLICY_BYPASS)
    check_final_chunk(pb, chunks)
    assert text_of(chunks) == answer.text


BAD_INPUT = [
    pytest.param("prompt", {"prompt": ""}, id="empty-prompt"),
    pytest.param("model", {"model": "no-such-model"}, id="unknown-model"),
    pytest.param("max_tokens", {"max_tokens": 128 * 1024 + 1}, id="max-tokens-over-cap"),
    pytest.param("temperature", {"temperature": 3.0}, id="temperature-too-high"),
]


@pytest.mark.parametrize(("field", "bad"), BAD_INPUT)
def test_bad_input_names_the_field(gateway, pb, field, bad):
    fields = {"model": "sim", "prompt": unique(f"bad {field}"), **bad}

    with pytest.raises(grpc.RpcError) as raised:
        gateway.Generate(pb.gateway_pb2.GenerateRequest(**fields), timeout=CALL_TIMEOUT_S)
    error = raised.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    assert error.details().startswith(field), error.details()

    with pytest.raises(grpc.RpcError) as raised:
        list(gateway.GenerateStream(pb.gateway_pb2.GenerateStreamRequest(**fields), timeout=CALL_TIMEOUT_S))
    error = raised.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    assert error.details().startswith(field), error.details()

    # The gateway keeps serving.
    answer = generate(gateway, pb, prompt=unique(f"after bad {field}"))
    assert answer.text


def test_gateway_health(pb, gateway_channel):
    health = health_pb2_grpc.HealthStub(gateway_channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service=GATEWAY_SERVICE), timeout=CALL_TIMEOUT_S)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_mesh_health(pb, health_channel):
    health = health_pb2_grpc.HealthStub(health_channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT_S)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING

    mesh_health = pb.health_pb2_grpc.MeshHealthStub(health_channel)
    status = mesh_health.Status(pb.health_pb2.StatusRequest(), timeout=CALL_TIMEOUT_S)
    assert status.status == pb.health_pb2.SERVING_STATUS_SERVING, status
    components = {c.name: c for c in status.components}
    for name in ("gateway", "generation", "cache"):
        assert name in components, f"{name} missing from {sorted(components)}"
        assert components[name].status == pb.health_pb2.SERVING_STATUS_SERVING, components[name]
    assert components["gateway"].service == GATEWAY_SERVICE


def _reflection_services(channel, method: str) -> set[str]:
    """list_services over ServerReflectionInfo at `method` (v1 and v1alpha share the wire format)."""
    call = channel.stream_stream(
        method,
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    replies = list(call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=CALL_TIMEOUT_S))
    assert len(replies) == 1, replies
    assert replies[0].HasField("list_services_response"), replies[0]
    return {s.name for s in replies[0].list_services_response.service}


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_lists_the_gateway(gateway_channel, version):
    services = _reflection_services(gateway_channel, f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo")
    assert GATEWAY_SERVICE in services, sorted(services)
    assert "grpc.health.v1.Health" in services, sorted(services)


def test_reflection_describes_the_gateway(gateway_channel):
    database = ProtoReflectionDescriptorDatabase(gateway_channel)
    assert GATEWAY_SERVICE in database.get_services()
    # The descriptors it serves are complete enough to build the service with its imports.
    from google.protobuf.descriptor_pool import DescriptorPool

    pool = DescriptorPool(database)
    service = pool.FindServiceByName(GATEWAY_SERVICE)
    methods = {m.name: m for m in service.methods}
    assert {"Generate", "GenerateStream", "ListModels"} <= set(methods), sorted(methods)
    assert methods["GenerateStream"].output_type.full_name == "llmesh.gateway.v1.GenerateStreamResponse"
    usage = methods["Generate"].output_type.fields_by_name["usage"].message_type
    assert usage.full_name == "llmesh.common.v1.Usage"


def test_list_models(gateway, pb):
    reply = gateway.ListModels(pb.gateway_pb2.ListModelsRequest(), timeout=CALL_TIMEOUT_S)
    models = {m.name: m for m in reply.models}
    assert "sim" in models, sorted(models)
    assert models["sim"].provider == "sim"
    assert models["sim"].deterministic
