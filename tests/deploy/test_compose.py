"""deploy/docker-compose.yml: the seed's docker-compose, grown into the whole mesh and its telemetry."""

from __future__ import annotations

import json
import re
from importlib import resources

import jsonschema
import pytest

from support import (
    BINARIES,
    COLLECTOR_CONFIG,
    DEPLOY,
    GLOBAL_LLMESH_ENV,
    SERVICES,
    load_yaml,
)

LLMESH = sorted(SERVICES)
OBSERVABILITY = ["otel-collector", "prometheus", "grafana", "jaeger", "loki"]


def binary_of(service: dict) -> str | None:
    command = service.get("command")
    if isinstance(command, list) and command and command[0] in BINARIES:
        return command[0]
    return None


def test_compose_file_matches_the_compose_specification(compose):
    schema_file = resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
    schema = json.loads(schema_file.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_the_whole_stack_is_there(compose):
    assert set(compose["services"]) == set(LLMESH) | set(OBSERVABILITY) | {"redis"}


@pytest.mark.parametrize("name", LLMESH + OBSERVABILITY + ["redis"])
def test_every_service_has_a_healthcheck(compose, name):
    check = compose["services"][name].get("healthcheck")
    assert check and not check.get("disable"), f"{name} has no healthcheck"
    test = check["test"]
    assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL") and len(test) > 1
    assert check.get("interval") and check.get("retries")


@pytest.mark.parametrize("name", LLMESH)
def test_llmesh_healthchecks_connect_to_the_services_port(compose, name):
    port = SERVICES[name][0]
    assert compose["services"][name]["healthcheck"]["test"] == [
        "CMD", "bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}"]


def test_generation_is_the_seeds_three_replicas(compose):
    deploy = compose["services"]["generation"]["deploy"]
    assert deploy["replicas"] == 3
    assert str(deploy["resources"]["limits"]["cpus"]) == "0.5"
    assert deploy["resources"]["limits"]["memory"] == "512M"


@pytest.mark.parametrize("name", LLMESH + ["redis"] + OBSERVABILITY)
def test_every_container_has_resource_limits(compose, name):
    limits = compose["services"][name]["deploy"]["resources"]["limits"]
    assert limits.get("cpus") and limits.get("memory")


def test_depends_on_names_defined_services(compose):
    services = compose["services"]
    for name, service in services.items():
        depends = service.get("depends_on", {})
        names = depends if isinstance(depends, list) else list(depends)
        for dep in names:
            assert dep in services, f"{name} depends on undefined service {dep}"
            assert dep != name
            if isinstance(depends, dict) and depends[dep].get("condition") == "service_healthy":
                assert services[dep].get("healthcheck"), f"{name} waits for {dep} to be healthy, which has no check"


def test_gateway_waits_for_what_it_checks_at_start_up(compose):
    # The gateway exits if generation and the cache do not answer within startup_timeout_ms.
    depends = compose["services"]["gateway"]["depends_on"]
    assert depends["generation"]["condition"] == "service_healthy"
    assert depends["cache"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", LLMESH)
def test_llmesh_services_run_their_binary_from_one_image(compose, name):
    service = compose["services"][name]
    assert binary_of(service) == name
    assert service["image"] == compose["services"]["gateway"]["image"]
    assert service["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert service["read_only"] is True
    assert int(re.match(r"(\d+)s", service["stop_grace_period"]).group(1)) > 10, "longer than the 10 s drain"


@pytest.mark.parametrize("name", LLMESH)
def test_llmesh_env_vars_follow_the_service_scheme(compose, name):
    env = compose["services"][name]["environment"]
    assert isinstance(env, dict)
    prefix = f"LLMESH_{name.upper()}_"
    for var in env:
        if var.startswith("LLMESH_") and var not in GLOBAL_LLMESH_ENV:
            assert var.startswith(prefix), f"{name}: {var} is not read by {name} (expected {prefix}...)"
            key = var.removeprefix(prefix)
            assert re.fullmatch(r"[A-Z0-9]+(_[A-Z0-9]+)*(__[A-Z0-9]+(_[A-Z0-9]+)*)*", key), f"{var}: bad key"


@pytest.mark.parametrize("name", LLMESH)
def test_llmesh_telemetry_settings(compose, name):
    env = compose["services"][name]["environment"]
    assert env["OTEL_SERVICE_NAME"] == SERVICES[name][2]
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317"
    assert env["OTEL_METRICS_EXPORTER"] == "none", "metrics are scraped; pushing them too counts them twice"
    assert env["LLMESH_LOG_FORMAT"] == "json"
    assert env["LLMESH_CONFIG"] == "/etc/llmesh/mesh.toml"
    assert env[f"LLMESH_{name.upper()}_ADMIN__LISTEN"] == "0.0.0.0:9464"
    assert "./config/mesh.toml:/etc/llmesh/mesh.toml:ro" in compose["services"][name]["volumes"]


def test_gateway_keys_file_is_mounted(compose):
    gateway = compose["services"]["gateway"]
    path = gateway["environment"]["LLMESH_GATEWAY_AUTH__KEYS_FILE"]
    assert f"./config/keys.toml:{path}:ro" in gateway["volumes"]


def test_generation_gets_the_openai_key_from_the_host(compose):
    assert compose["services"]["generation"]["environment"]["OPENAI_API_KEY"] == "${OPENAI_API_KEY:-}"


def test_published_ports(compose):
    def published(name):
        return {str(p) for p in compose["services"][name].get("ports", [])}

    assert "50051:50051" in published("gateway")
    assert "3000:3000" in published("grafana")
    assert "9090:9090" in published("prometheus")
    assert "16686:16686" in published("jaeger")
    assert not published("generation"), "replicas cannot share a host port"


def test_redis_keeps_its_data_on_a_volume(compose):
    redis = compose["services"]["redis"]
    assert redis["image"] == "redis:7-alpine"
    assert "redis_data:/data" in redis["volumes"]
    assert "redis_data" in compose["volumes"]
    command = redis["command"]
    assert command[command.index("--maxmemory-policy") + 1] == "volatile-lru", "never evict the job queue"
    assert command[command.index("--appendonly") + 1] == "yes"


def test_named_volumes_are_declared(compose):
    for name, service in compose["services"].items():
        for mount in service.get("volumes", []):
            source = mount.split(":", 1)[0]
            if not source.startswith((".", "/")):
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"


def test_bind_mounts_exist(compose):
    for name, service in compose["services"].items():
        for mount in service.get("volumes", []):
            source = mount.split(":", 1)[0]
            if source.startswith("."):
                assert (DEPLOY / source).resolve().exists(), f"{name} mounts missing {source}"


def test_collector_mounts_the_repository_config(compose):
    collector = compose["services"]["otel-collector"]
    mount = "../otel-collector/config.yaml:/etc/otelcol-contrib/config.yaml:ro"
    assert mount in collector["volumes"]
    assert (DEPLOY / "../otel-collector/config.yaml").resolve() == COLLECTOR_CONFIG
    config = load_yaml(COLLECTOR_CONFIG)
    grpc = config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    assert grpc.endswith(":4317")


def test_images_are_pinned(compose):
    for name, service in compose["services"].items():
        image = service["image"]
        if name in SERVICES:
            continue
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image version ({image})"


def test_observability_images(compose):
    services = compose["services"]
    assert services["otel-collector"]["image"].startswith("otel/opentelemetry-collector-contrib:")
    assert services["jaeger"]["image"].startswith("jaegertracing/all-in-one:")
    assert services["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    assert services["loki"]["image"].startswith("grafana/loki:3")
    assert "./prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
