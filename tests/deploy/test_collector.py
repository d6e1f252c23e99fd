"""otel-collector/config.yaml: the pipelines llmesh's telemetry goes through."""

from __future__ import annotations

import pytest

from support import COLLECTOR_CONFIG, load_yaml


@pytest.fixture(scope="module")
def config() -> dict:
    return load_yaml(COLLECTOR_CONFIG)


def component_type(name: str) -> str:
    """`otlp_grpc/jaeger` -> `otlp_grpc`."""
    return name.split("/", 1)[0]


def exporters_of(config, pipeline: str) -> list[tuple[str, dict]]:
    names = config["service"]["pipelines"][pipeline]["exporters"]
    return [(n, config["exporters"][n] or {}) for n in names]


def test_required_pipelines(config):
    assert {"traces", "metrics", "logs"} <= set(config["service"]["pipelines"])


@pytest.mark.parametrize("kind", ["receivers", "processors", "exporters"])
def test_pipelines_reference_defined_components(config, kind):
    defined = set(config.get(kind) or {})
    for name, pipeline in config["service"]["pipelines"].items():
        used = pipeline.get(kind, [])
        if kind != "processors":
            assert used, f"pipeline {name} has no {kind}"
        missing = set(used) - defined
        assert not missing, f"pipeline {name} uses undefined {kind}: {sorted(missing)}"


def test_every_defined_component_but_debug_is_used(config):
    for kind in ("receivers", "processors", "exporters"):
        used = {n for p in config["service"]["pipelines"].values() for n in p.get(kind, [])}
        unused = set(config.get(kind) or {}) - used - {"debug"}
        assert not unused, f"{kind} defined but in no pipeline: {sorted(unused)}"


def test_memory_limiter_first_and_batch_last(config):
    for name, pipeline in config["service"]["pipelines"].items():
        processors = [component_type(p) for p in pipeline["processors"]]
        assert processors[0] == "memory_limiter", f"{name}: memory_limiter must come first"
        assert processors[-1] == "batch", f"{name}: batch must come last"


def test_otlp_receiver_on_the_standard_ports(config):
    protocols = config["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"] == "0.0.0.0:4317"
    assert protocols["http"]["endpoint"] == "0.0.0.0:4318"
    for pipeline in config["service"]["pipelines"].values():
        assert "otlp" in pipeline["receivers"]


def test_traces_go_to_jaeger_over_otlp(config):
    exporters = exporters_of(config, "traces")
    jaeger = [(n, e) for n, e in exporters if component_type(n) in ("otlp", "otlp_grpc")]
    assert jaeger, "traces need an OTLP gRPC exporter"
    for _, exporter in jaeger:
        assert exporter["endpoint"] == "jaeger:4317"
        assert exporter["tls"]["insecure"] is True


def test_metrics_go_to_a_prometheus_endpoint(config):
    exporters = exporters_of(config, "metrics")
    prom = [e for n, e in exporters if component_type(n) == "prometheus"]
    assert len(prom) == 1
    assert prom[0]["endpoint"] == "0.0.0.0:8889"
    assert prom[0]["resource_to_telemetry_conversion"]["enabled"] is True


def test_logs_go_to_loki_native_otlp(config):
    exporters = exporters_of(config, "logs")
    names = [component_type(n) for n, _ in exporters]
    assert "loki" not in names, "the loki exporter is deprecated: Loki 3 takes OTLP on /otlp"
    loki = [e for n, e in exporters if component_type(n) in ("otlphttp", "otlp_http")]
    assert loki and loki[0]["endpoint"] == "http://loki:3100/otlp"


def test_health_check_extension_enabled(config):
    assert "health_check" in config["extensions"]
    assert config["service"]["extensions"] == ["health_check"]
    assert set(config["service"]["extensions"]) <= set(config["extensions"])


def test_memory_limiter_is_bounded(config):
    limiter = config["processors"]["memory_limiter"]
    assert "check_interval" in limiter
    assert 0 < limiter["limit_percentage"] <= 90
    assert 0 < limiter["spike_limit_percentage"] < limiter["limit_percentage"]
