"""Every configuration file parses, and the shared mesh.toml says what the manifests assume."""

from __future__ import annotations

import json

import pytest
import yaml

from support import (
    DASHBOARDS,
    DEPLOY,
    K8S,
    MESH_TOML,
    REPO,
    SERVICES,
    dashboard_files,
    load_toml,
    redis_urls,
    yaml_files,
)


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_yaml_parses(path):
    with path.open() as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    assert docs, f"{path} is empty"


def test_there_is_something_to_check():
    names = {str(p.relative_to(REPO)) for p in yaml_files()}
    for expected in (
        "otel-collector/config.yaml",
        "deploy/docker-compose.yml",
        "deploy/prometheus/prometheus.yml",
        "deploy/k8s/kustomization.yaml",
    ):
        assert expected in names
    assert len(dashboard_files()) >= 4, f"dashboards missing in {DASHBOARDS}"


@pytest.mark.parametrize("path", dashboard_files(), ids=lambda p: p.name)
def test_dashboard_json_parses(path):
    assert isinstance(json.loads(path.read_text()), dict)


def test_mesh_toml_is_the_same_for_compose_and_kubernetes():
    compose_copy = MESH_TOML.read_text()
    k8s_copy = (K8S / "mesh.toml").read_text()
    assert compose_copy == k8s_copy, (
        "deploy/config/mesh.toml and deploy/k8s/mesh.toml differ: edit one, copy it over the other "
        "(kustomize cannot read files outside deploy/k8s)"
    )


def test_mesh_toml_has_a_section_per_service(mesh_config):
    assert set(mesh_config) == set(SERVICES), "one [section] per service, nothing else"


@pytest.mark.parametrize("service", SERVICES)
def test_services_listen_on_all_interfaces_on_their_port(mesh_config, service):
    port = SERVICES[service][0]
    assert mesh_config[service]["listen"] == f"0.0.0.0:{port}"


def test_gateway_discovers_every_generation_replica_by_dns(mesh_config):
    gateway = mesh_config["gateway"]
    assert gateway["generation"]["endpoints"] == ["dns://generation:50052"]
    assert gateway["cache"]["endpoint"] == "https://cache:50053"


def test_cache_and_queue_share_one_redis(mesh_config):
    assert mesh_config["cache"]["redis_url"] == mesh_config["generation"]["queue"]["redis_url"]
    assert mesh_config["cache"]["redis_url"].startswith("rediss://llmesh@redis:6379/")


@pytest.mark.parametrize("service", SERVICES)
def test_every_redis_url_is_tls_with_a_password_from_a_file(mesh_config, service):
    for url in redis_urls(mesh_config[service]):
        scheme, rest = url.split("://", 1)
        assert scheme == "rediss", f"{service}: {url} is plaintext"
        userinfo = rest.split("@", 1)[0] if "@" in rest.split("/", 1)[0] else ""
        assert userinfo == "llmesh", f"{service}: {url}: the ACL user, and no password in the URL"
        query = dict(p.split("=", 1) for p in url.split("?", 1)[1].split("&"))
        assert query["tls_ca"] == "/etc/llmesh/tls/ca.crt"
        assert query["password_file"] == "/etc/llmesh/secrets/redis-password"


@pytest.mark.parametrize("service", SERVICES)
def test_every_port_speaks_tls_and_internal_ones_require_the_mesh(mesh_config, service):
    tls = mesh_config[service]["tls"]
    assert tls["cert"] == "/etc/llmesh/tls/tls.crt" and tls["key"] == "/etc/llmesh/tls/tls.key"
    if service == "gateway":
        assert "client_ca" not in tls, "the public port takes callers with API keys, not certificates"
    else:
        assert tls["client_ca"] == "/etc/llmesh/tls/ca.crt", f"{service} must require a mesh client certificate"
    # Kubelet's gRPC probes speak plaintext: a health-only port for them.
    assert tls["health_listen"] == "0.0.0.0:50060"


@pytest.mark.parametrize("service", SERVICES)
def test_callers_inside_the_mesh_present_the_client_certificate(mesh_config, service):
    client = mesh_config[service].get("client_tls")
    if service not in ("gateway", "health"):
        assert client is None, f"{service} calls no mesh service"
        return
    assert client == {
        "ca": "/etc/llmesh/tls/ca.crt",
        "cert": "/etc/llmesh/client/tls.crt",
        "key": "/etc/llmesh/client/tls.key",
        # Replicas found by DNS are IP addresses; their certificates name `generation`.
        "server_name": "generation",
    }


def test_models_take_keys_from_the_environment_only(mesh_config):
    for name, model in mesh_config["generation"].get("models", {}).items():
        assert "api_key" not in model, f"model {name}: keys come from api_key_env / api_key_file, never the file"
        if model.get("provider") == "openai":
            assert model.get("api_key_env", "OPENAI_API_KEY") == "OPENAI_API_KEY"


def test_fault_injection_models_are_off_in_deployments(mesh_config):
    """sim-error and friends fail on purpose: no deployed mesh may serve them."""
    assert mesh_config["generation"].get("fault_models", False) is False
    models = mesh_config["generation"].get("models", {})
    assert not {"sim-slow", "sim-error", "sim-429"} & set(models), "fault models configured by name"
    for path in [DEPLOY / "docker-compose.yml", *sorted(K8S.glob("*.yaml")), *sorted(K8S.glob("*.toml"))]:
        lines = [line.split("#")[0] for line in path.read_text().splitlines()]
        for line in lines:
            assert "LLMESH_GENERATION_FAULT_MODELS" not in line, f"{path} sets the fault models: {line}"
            assert "fault_models" not in line, f"{path} sets the fault models: {line}"


def test_health_watches_every_other_service(mesh_config):
    targets = mesh_config["health"]["targets"]
    by_name = {t["name"]: t for t in targets}
    assert set(by_name) == {"gateway", "generation", "cache", "redis"}
    for name, target in by_name.items():
        if name == "redis":
            assert target["address"] == mesh_config["cache"]["redis_url"]
            continue
        port, grpc_service, _ = SERVICES[name]
        assert target["service"] == grpc_service
        assert target["address"].endswith(f"://{name}:{port}")
    assert by_name["generation"]["address"].startswith("dns://"), "each generation replica, not one of them"
    # The mesh answers without its cache: degraded, not down.
    assert by_name["cache"]["required"] is False and by_name["redis"]["required"] is False
    assert by_name["gateway"].get("required", True) and by_name["generation"].get("required", True)


def test_gateway_shares_rate_limits_and_the_queue_through_redis(mesh_config):
    gateway = mesh_config["gateway"]
    redis = mesh_config["cache"]["redis_url"]
    assert gateway["rate_limit"]["redis_url"] == redis
    assert gateway["queue"]["redis_url"] == redis


def test_no_keys_file_ships_in_deploy():
    assert not list(DEPLOY.rglob("keys.toml")), "usable API keys in deploy/"


def test_the_tests_keys_file_matches_the_gateways_format():
    """tests/fixtures/keys.toml: public keys for the tests and the benchmarks, never deployed."""
    import hashlib
    import re

    fixture = REPO / "tests" / "fixtures" / "keys.toml"
    text = fixture.read_text()
    keys = load_toml(fixture)["keys"]
    documented = dict(re.findall(r"^# x-api-key: (\S+).*\n\[\[keys\]\]\nid = \"([^\"]+)\"", text, re.M))
    assert {k["id"] for k in keys} == set(documented.values())
    for key in keys:
        assert set(key) <= {"id", "prefix", "sha256", "requests_per_minute", "tokens_per_minute", "models"}
        secret = next(k for k, i in documented.items() if i == key["id"])
        assert key["sha256"] == hashlib.sha256(secret.encode()).hexdigest(), key["id"]
        assert secret.startswith(key["prefix"])


def test_mesh_toml_parses_with_tomllib():
    # Also the copy kustomize turns into the ConfigMap.
    load_toml(K8S / "mesh.toml")
