"""Traces in the terms a Jaeger or Tempo user searches by (docs/TRACING.md), received over OTLP/gRPC
by a receiver built from the official OpenTelemetry protos (PyPI `opentelemetry-proto`, with
grpcio's server): the mesh of live_mesh.py exports its spans there, as it would to Jaeger's or the
collector's port 4317.

What is checked, on one successful call and one whose model fails:
- each service's spans carry `service.name` (llmesh-gateway, llmesh-cache, llmesh-generation) on
  their resource: Jaeger's service list, Tempo's `resource.service.name`;
- server spans are kind SERVER with `rpc.system`, `rpc.service`, `rpc.method` and
  `rpc.grpc.status_code`, named `{service}/{method}` (Jaeger's operation); the gateway's calls to
  generation are kind CLIENT with `rpc.method`;
- the model call is a CLIENT span `chat {model}` with `gen_ai.request.model`, so a search by
  model finds the trace;
- a failed model call has `error.type`, and both it and generation's server span (with its gRPC
  code) status ERROR (Jaeger's `error=true`, Tempo's `status = error`);
- the gateway's server span carries the caller's API key id (`llmesh.api_key.id`), so a search by
  key finds the trace;
- no span holds the prompt, the API key or the operator's token.
"""

from __future__ import annotations

import threading
import uuid
from concurrent import futures

import grpc
import pytest

import live_mesh
from conftest import BIN_DIR
from live_mesh import Load, wait_for

try:
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
    from opentelemetry.proto.trace.v1 import trace_pb2
except ImportError:  # pragma: no cover - scripts/test installs it
    pytest.fail("opentelemetry-proto is missing: pip install -r tests/python/requirements-observability.txt",
                pytrace=False)

SERVER = trace_pb2.Span.SPAN_KIND_SERVER
CLIENT = trace_pb2.Span.SPAN_KIND_CLIENT
ERROR = trace_pb2.Status.STATUS_CODE_ERROR


def value(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


class Span:
    def __init__(self, service: str, span) -> None:
        self.service = service
        self.span = span
        self.name = span.name
        self.kind = span.kind
        self.trace_id = span.trace_id.hex()
        self.attributes = {a.key: value(a.value) for a in span.attributes}

    def __repr__(self) -> str:
        return f"<{self.service} {self.name} kind={self.kind} {self.attributes}>"


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that keeps every span (bounded) with its resource's service.name."""

    LIMIT = 20_000

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans: list[Span] = []
        self.raw: list[bytes] = []

    def Export(self, request, context):  # noqa: N802 (the proto's name)
        with self.lock:
            for resource_spans in request.resource_spans:
                attributes = {a.key: value(a.value) for a in resource_spans.resource.attributes}
                service = attributes.get("service.name", "")
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        if len(self.spans) < self.LIMIT:
                            self.spans.append(Span(service, span))
            if len(self.raw) < 1000:
                self.raw.append(request.SerializeToString())
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str) -> list[Span]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]


@pytest.fixture(scope="module")
def receiver():
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    receiver.endpoint = f"http://127.0.0.1:{port}"
    yield receiver
    server.stop(grace=None)


@pytest.fixture(scope="module")
def mesh(receiver, tmp_path_factory):
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
    }
    with live_mesh.running_mesh(BIN_DIR, tmp_path_factory.mktemp("traced-mesh"), extra_env=env) as mesh:
        yield mesh


def traced_call(load: Load, key_id: str, model: str, prompt: str) -> str:
    """One Generate that starts a trace of the client's (sampled); returns the trace id."""
    trace_id = uuid.uuid4().hex
    request = load.pb.gateway_pb2.GenerateRequest(model=model, prompt=prompt, max_tokens=8)
    metadata = (("x-api-key", load.mesh.keys[key_id]), ("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"))
    load.stub.Generate(request, metadata=metadata, timeout=live_mesh.CALL_TIMEOUT_S)
    return trace_id


def complete(receiver: Receiver, trace_id: str, model: str):
    """The trace's spans once the gateway's, the cache's and generation's server spans and the
    model call's span have all arrived."""
    def ready():
        spans = receiver.trace(trace_id)
        servers = {s.service for s in spans if s.kind == SERVER}
        chat = any(s.name == f"chat {model}" for s in spans)
        return spans if {"llmesh-gateway", "llmesh-cache", "llmesh-generation"} <= servers and chat else None

    return wait_for(f"the spans of trace {trace_id}", ready, 20, 0.2)


def one(spans, **where):
    found = [s for s in spans if all(getattr(s, k) == v for k, v in where.items())]
    assert found, f"no span with {where} in {spans}"
    return found[0]


@pytest.fixture(scope="module")
def traces(mesh, receiver, pb):
    load = Load(pb, mesh)
    try:
        ok = traced_call(load, "alice", "sim", f"trace-secret-prompt {uuid.uuid4().hex}")
        # sim-error fails; the gateway answers with its fallback message, generation's spans fail.
        failed = traced_call(load, live_mesh.PLAIN_KEY, "sim-error", f"trace-secret-prompt {uuid.uuid4().hex}")
    finally:
        load.close()
    return complete(receiver, ok, "sim"), complete(receiver, failed, "sim-error")


def test_spans_carry_the_service_name_and_rpc_attributes(traces):
    spans, _ = traces
    gateway = one(spans, service="llmesh-gateway", kind=SERVER)
    assert gateway.name == "llmesh.gateway.v1.Gateway/Generate"
    assert gateway.attributes["rpc.system"] == "grpc"
    assert gateway.attributes["rpc.service"] == "llmesh.gateway.v1.Gateway"
    assert gateway.attributes["rpc.method"] == "Generate"
    assert gateway.attributes["rpc.grpc.status_code"] == 0
    assert gateway.span.status.code != ERROR
    attempt = one(spans, service="llmesh-gateway", kind=CLIENT, name="generation.attempt")
    assert attempt.attributes["rpc.method"] == "Generate"
    assert one(spans, service="llmesh-generation", kind=SERVER).attributes["rpc.method"] == "Generate"
    assert one(spans, service="llmesh-cache", kind=SERVER).attributes["rpc.service"] == "llmesh.cache.v1.Cache"


def test_the_model_call_is_found_by_its_model(traces, receiver):
    spans, _ = traces
    chat = one(spans, name="chat sim")
    assert chat.service == "llmesh-generation" and chat.kind == CLIENT
    assert chat.attributes["gen_ai.request.model"] == "sim"
    assert chat.attributes["gen_ai.operation.name"] == "chat"
    # Numbers arrive as strings (tracing-opentelemetry 0.34 records u64 fields by Debug): a
    # search by tag matches the text.
    # An integer, not text: TraceQL's `span.gen_ai.usage.output_tokens > 100` compares numbers.
    assert isinstance(chat.attributes["gen_ai.usage.output_tokens"], int), chat.attributes
    assert chat.attributes["gen_ai.usage.output_tokens"] > 0
    assert chat.attributes["gen_ai.request.max_tokens"] == 8
    # What a search by the tag gen_ai.request.model=sim returns includes this trace.
    with receiver.lock:
        by_model = {s.trace_id for s in receiver.spans if s.attributes.get("gen_ai.request.model") == "sim"}
    assert chat.trace_id in by_model


def test_a_failed_model_call_is_an_error(traces):
    _, spans = traces
    chat = one(spans, name="chat sim-error")
    assert chat.attributes.get("error.type") == "UNAVAILABLE", chat.attributes
    server = one(spans, service="llmesh-generation", kind=SERVER)
    assert server.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert server.span.status.code == ERROR, server.span.status


def test_a_failed_model_calls_span_has_status_error(traces):
    _, spans = traces
    assert one(spans, name="chat sim-error").span.status.code == ERROR


def test_no_span_holds_a_prompt_a_key_or_the_token(traces, receiver, mesh):
    with receiver.lock:
        raw = b"".join(receiver.raw)
    assert raw
    for secret in ("trace-secret-prompt", mesh.token, *mesh.keys.values()):
        assert secret.encode() not in raw, f"{secret[:12]}… reached a span"


def test_a_trace_is_found_by_the_api_key_id(traces):
    spans, _ = traces
    server = [s for s in spans if s.service == "llmesh-gateway" and s.kind == SERVER]
    assert any(s.attributes.get("llmesh.api_key.id") == "alice" for s in server), [s.attributes for s in server]
