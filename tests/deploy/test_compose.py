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
    MESH_TOML,
    SERVICES,
    load_toml,
    load_yaml,
    redis_urls,
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


def mounts(service: dict) -> dict[str, str]:
    """Path in the container -> path on the host, for the service's bind mounts."""
    return {m.split(":")[1]: m.split(":")[0] for m in service.get("volumes", []) if m.startswith(".")}


def host_path(service: dict, path: str) -> str | None:
    """The host file a container path comes from: its own mount, or one of a directory above it."""
    for target, source in mounts(service).items():
        if path == target:
            return source
        if path.startswith(target + "/"):
            return source + path[len(target):]
    return None


@pytest.mark.parametrize("name", LLMESH)
def test_admin_listeners_on_the_network_want_a_token(compose, name):
    """Reachable from every container of the stack: a bearer token (Prometheus has it)."""
    env = compose["services"][name]["environment"]
    token = env[f"LLMESH_{name.upper()}_ADMIN__BEARER_TOKEN_FILE"]
    assert token == "/etc/llmesh/secrets/admin-token"
    assert host_path(compose["services"][name], token) == "./secrets/admin-token"


@pytest.mark.parametrize("name", LLMESH)
def test_only_the_gateway_sees_the_api_keys(compose, name):
    """Each service mounts the secrets it reads: the keys file only the gateway."""
    service = compose["services"][name]
    keys = host_path(service, "/etc/llmesh/secrets/keys.toml")
    if name == "gateway":
        assert keys == "./secrets/keys.toml"
    else:
        assert keys is None, f"{name} can read the API keys file"
        assert host_path(service, "/etc/llmesh/secrets/redis-password") == "./secrets/redis-password"


def test_gateway_keys_file_is_the_operators(compose):
    """No demo keys: the gateway reads the keys file the operator made with `llmesh keys new`, in
    the git-ignored deploy/secrets (a directory mount, so that edits reach the gateway)."""
    gateway = compose["services"]["gateway"]
    assert gateway["environment"]["LLMESH_GATEWAY_AUTH__KEYS_FILE"] == "/etc/llmesh/secrets/keys.toml"
    assert "./secrets:/etc/llmesh/secrets:ro" in gateway["volumes"]
    assert not (DEPLOY / "config" / "keys.toml").exists(), "a keys file (with usable keys) ships with compose"
    assert not list((DEPLOY / "secrets").glob("*.toml")), "keys in deploy/secrets are the operator's, never committed"
    text = (DEPLOY / "docker-compose.yml").read_text()
    assert not re.search(r"lk_[0-9a-f]{8}_\w{20,}", text), "an API key is written in the compose file"


@pytest.mark.parametrize("name", LLMESH)
def test_each_service_mounts_its_own_certificate(compose, name):
    volumes = compose["services"][name]["volumes"]
    assert f"./certs/{name}.pem:/etc/llmesh/tls/tls.crt:ro" in volumes
    assert f"./certs/{name}-key.pem:/etc/llmesh/tls/tls.key:ro" in volumes
    assert "./certs/ca.pem:/etc/llmesh/tls/ca.crt:ro" in volumes
    client = {"./certs/client.pem:/etc/llmesh/client/tls.crt:ro", "./certs/client-key.pem:/etc/llmesh/client/tls.key:ro"}
    if name in ("gateway", "health"):
        assert client <= set(volumes), f"{name} calls the mesh: it needs the client certificate"
    else:
        assert not client & set(volumes), f"{name} calls no one in the mesh: it needs no client certificate"
    mounted = {m.split(":")[1] for m in volumes}
    config = load_toml(MESH_TOML)[name]
    for section in ("tls", "client_tls"):
        for key, path in config.get(section, {}).items():
            if key in ("cert", "key", "client_ca", "ca"):
                assert path in mounted, f"{name}: mesh.toml's {section}.{key} {path} is not mounted"


def test_redis_speaks_tls_only_with_a_password_from_the_secret(compose):
    redis = compose["services"]["redis"]
    script = redis["command"][-1]
    assert redis["command"][:2] == ["sh", "-c"]
    assert "user default off" in script, "the default user (no password) must be off"
    # From the file, through stdin (a here-document): never on the command line, never in the
    # compose file. tests/deploy/test_redis_start.py runs the script.
    assert re.search(r"exec redis-server - .*<<CONF\n\s*user default off\n\s*user llmesh on >\$\$password ~\* &\* \+@all\n\s*CONF",
                     script, re.S)
    assert "cat /etc/llmesh/secrets/redis-password" in script
    assert redis["user"] == "redis", "the image's entrypoint drops root only for a bare redis-server"
    assert "--port 0" in script and "--tls-port 6379" in script
    for option, path in [("--tls-cert-file", "/etc/llmesh/tls/tls.crt"), ("--tls-key-file", "/etc/llmesh/tls/tls.key"),
                         ("--tls-ca-cert-file", "/etc/llmesh/tls/ca.crt")]:
        assert f"{option} {path}" in script
    assert {"./secrets/redis-password:/etc/llmesh/secrets/redis-password:ro", "./certs/redis.pem:/etc/llmesh/tls/tls.crt:ro",
            "./certs/redis-key.pem:/etc/llmesh/tls/tls.key:ro"} <= set(redis["volumes"])
    health = redis["healthcheck"]["test"]
    assert health[0] == "CMD-SHELL" and "REDISCLI_AUTH" in health[1] and "--tls" in health[1] and "--user llmesh" in health[1]
    assert not redis.get("ports"), "Redis is published"


@pytest.mark.parametrize("name", LLMESH)
def test_redis_clients_get_the_password_file_and_the_ca(compose, name):
    service = compose["services"][name]
    for url in redis_urls(load_toml(MESH_TOML)[name]):
        query = dict(p.split("=", 1) for p in url.split("?", 1)[1].split("&"))
        assert host_path(service, query["tls_ca"]) == "./certs/ca.pem", f"{name}: {url}"
        assert host_path(service, query["password_file"]) == "./secrets/redis-password", f"{name}: {url}"
    assert host_path(compose["services"]["redis"], "/etc/llmesh/secrets/redis-password") == "./secrets/redis-password"


def test_operator_files_are_git_ignored():
    for directory in ("certs", "secrets"):
        ignore = (DEPLOY / directory / ".gitignore").read_text().split()
        assert "*" in ignore and "!.gitignore" in ignore, f"deploy/{directory} may be committed"


def test_grafana_has_no_default_password_and_no_anonymous_access(compose):
    env = compose["services"]["grafana"]["environment"]
    assert env["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?"), "a default password"
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert env.get("GF_USERS_ALLOW_SIGN_UP") == "false"
    assert not any(k.startswith("GF_AUTH_ANONYMOUS_ORG_ROLE") for k in env)


def test_prometheus_has_no_lifecycle_api(compose):
    command = compose["services"]["prometheus"]["command"]
    assert not [c for c in command if "enable-lifecycle" in c or "enable-admin-api" in c]


def test_generation_gets_the_openai_key_from_the_host(compose):
    assert compose["services"]["generation"]["environment"]["OPENAI_API_KEY"] == "${OPENAI_API_KEY:-}"


def test_published_ports(compose):
    """Only the gateway's port on every interface; the observability stack's on the host's loopback
    only (a laptop's browser); nothing of generation, the cache, health or Redis."""

    def published(name):
        return {str(p) for p in compose["services"][name].get("ports", [])}

    assert published("gateway") == {"50051:50051"}
    assert "127.0.0.1:3000:3000" in published("grafana")
    assert "127.0.0.1:9090:9090" in published("prometheus")
    assert "127.0.0.1:16686:16686" in published("jaeger")
    for name in ("generation", "cache", "health", "redis"):
        assert not published(name), f"{name} is published"
    for name in compose["services"]:
        if name != "gateway":
            for port in published(name):
                assert port.startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


def test_redis_keeps_its_data_on_a_volume(compose):
    redis = compose["services"]["redis"]
    assert redis["image"] == "redis:7-alpine"
    assert "redis_data:/data" in redis["volumes"]
    assert "redis_data" in compose["volumes"]
    script = redis["command"][-1]
    assert "--maxmemory-policy volatile-lru" in script, "never evict the job queue"
    assert "--appendonly yes" in script


def test_named_volumes_are_declared(compose):
    for name, service in compose["services"].items():
        for mount in service.get("volumes", []):
            source = mount.split(":", 1)[0]
            if not source.startswith((".", "/")):
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"


# What the operator makes before the first `up` (certificates, keys, passwords), never committed.
OPERATOR_MADE = ("./certs/", "./secrets/", "./secrets")


def test_bind_mounts_exist(compose):
    for name, service in compose["services"].items():
        for mount in service.get("volumes", []):
            source = mount.split(":", 1)[0]
            if source.startswith(OPERATOR_MADE):
                assert (DEPLOY / source).resolve().parent.exists(), f"{name} mounts {source} from a missing directory"
            elif source.startswith("."):
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
