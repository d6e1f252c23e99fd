"""deploy/k8s: manifests valid against the Kubernetes schemas, and wired together correctly."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib

import kubernetes_validate
import pytest
import yaml

from support import (
    ADMIN_PORT,
    DRAIN_SECONDS,
    GLOBAL_LLMESH_ENV,
    K8S,
    MESH_TOML,
    SERVICES,
    k8s_manifests,
    k8s_objects,
    load_toml,
    load_yaml,
    load_yaml_all,
    metric_contract,
    redis_urls,
)

# The plaintext grpc.health.v1 port of every service (tls.health_listen): kubelet cannot speak TLS.
PROBE_PORT = 50060
# Secrets made outside the kustomization (cert-manager/, or `llmesh certs new` and kubectl).
TLS_SECRETS = {f"llmesh-tls-{n}" for n in [*SERVICES, "client", "redis"]}

# The oldest Kubernetes version the manifests must be valid for (native gRPC probes are GA in 1.27,
# autoscaling/v2 and policy/v1 long before).
KUBERNETES_VERSION = "1.30.0"

KUSTOMIZATION = load_yaml(K8S / "kustomization.yaml")
DEPLOYMENTS = {d["metadata"]["name"]: d for d in k8s_objects("Deployment")}
K8S_SERVICES = {s["metadata"]["name"]: s for s in k8s_objects("Service")}


def container(deployment: dict) -> dict:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def preStop_seconds(c: dict) -> int:
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    return int(command[1])


def validate(obj: dict) -> None:
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {e.message}")
    except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as e:
        pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {e.message}")


# ------------------------------------------------------------------------------------------------
# Files and kustomization


def test_kustomization_lists_every_file():
    listed = set(KUSTOMIZATION["resources"])
    generated = {f for g in KUSTOMIZATION.get("configMapGenerator", []) for f in g.get("files", [])}
    on_disk = {p.name for p in K8S.iterdir() if p.is_file()} - {"kustomization.yaml"}
    assert listed | generated == on_disk, (
        f"not in kustomization.yaml: {sorted(on_disk - listed - generated)}; "
        f"listed but missing: {sorted((listed | generated) - on_disk)}"
    )
    assert KUSTOMIZATION["namespace"] == "llmesh"


@pytest.mark.parametrize("path", sorted(k8s_manifests()), ids=lambda p: p.name)
def test_every_manifest_has_apiversion_kind_metadata(path):
    for doc in k8s_manifests()[path]:
        assert doc.get("apiVersion") and doc.get("kind"), f"{path.name}: a document without apiVersion/kind"
        assert doc.get("metadata", {}).get("name"), f"{path.name}: {doc['kind']} without metadata.name"
        if doc["kind"] != "Namespace":
            assert "namespace" not in doc["metadata"], "the namespace comes from kustomization.yaml"
        assert doc["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") == "llmesh"


@pytest.mark.parametrize(
    "obj", k8s_objects(), ids=lambda o: f"{o['kind']}/{o['metadata']['name']}"
)
def test_manifest_is_valid_against_the_kubernetes_schema(obj):
    validate(obj)


def kubectl_kustomize() -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the rendered kustomization was not checked "
                    "(the manifests themselves were)")
    result = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kubectl kustomize failed:\n{result.stderr}"
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def test_rendered_kustomization_is_valid_and_consistent():
    rendered = kubectl_kustomize()
    for obj in rendered:
        validate(obj)
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "llmesh"
    configmaps = {o["metadata"]["name"] for o in rendered if o["kind"] == "ConfigMap"}
    secrets = {o["metadata"]["name"] for o in rendered if o["kind"] == "Secret"} | TLS_SECRETS
    (config,) = [o for o in rendered if o["kind"] == "ConfigMap"]
    assert config["data"]["mesh.toml"] == (K8S / "mesh.toml").read_text()
    for obj in rendered:
        if obj["kind"] not in ("Deployment", "StatefulSet"):
            continue
        text = yaml.safe_dump(obj["spec"]["template"]["spec"])
        for volume in obj["spec"]["template"]["spec"].get("volumes", []):
            sources = volume.get("projected", {}).get("sources", [volume])
            for source in sources:
                if "configMap" in source:
                    assert source["configMap"]["name"] in configmaps, text
                if "secret" in source:
                    assert source["secret"].get("name", source["secret"].get("secretName")) in secrets
        for c in obj["spec"]["template"]["spec"]["containers"]:
            if obj["metadata"]["name"] in SERVICES:
                assert c["image"] == _kustomize_image(), "the kustomization's images: entry applies"


def _kustomize_image() -> str:
    (image,) = KUSTOMIZATION["images"]
    return f"{image['newName']}:{image['newTag']}"


# ------------------------------------------------------------------------------------------------
# Deployments


def test_every_service_has_a_deployment_and_a_service():
    assert set(DEPLOYMENTS) == set(SERVICES)
    assert set(SERVICES) <= set(K8S_SERVICES)
    assert {"redis"} <= set(K8S_SERVICES)
    assert [s["metadata"]["name"] for s in k8s_objects("StatefulSet")] == ["redis"]


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_deployment_probes_are_native_grpc(name):
    port, grpc_service, _ = SERVICES[name]
    c = container(DEPLOYMENTS[name])
    grpc_ports = [p["containerPort"] for p in c["ports"] if p["name"] == "grpc"]
    assert grpc_ports == [port]
    probe_ports = [p["containerPort"] for p in c["ports"] if p["name"] == "probes"]
    assert probe_ports == [PROBE_PORT]
    assert load_toml(MESH_TOML)[name]["tls"]["health_listen"].endswith(f":{PROBE_PORT}")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        # The service port speaks TLS, which kubelet's gRPC probes cannot: the plaintext probe port
        # answers the same grpc.health.v1 statuses.
        assert c[probe]["grpc"]["port"] == PROBE_PORT, f"{name}: {probe} must be a gRPC probe on {PROBE_PORT}"
    assert c["readinessProbe"]["grpc"]["service"] == grpc_service
    if name == "health":
        # Its "" is the whole mesh: a probe on it would restart the reporter for others' outages.
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"].get("service") == grpc_service


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_deployment_resources_and_security(name):
    d = DEPLOYMENTS[name]
    pod = d["spec"]["template"]["spec"]
    c = container(d)
    for kind in ("requests", "limits"):
        assert c["resources"][kind].get("cpu") and c["resources"][kind].get("memory"), f"{name}: {kind}"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    assert c["command"] == [f"/usr/local/bin/{name}"]


def test_generation_keeps_the_seeds_limits():
    c = container(DEPLOYMENTS["generation"])
    assert c["resources"]["limits"] == {"cpu": "500m", "memory": "512Mi"}
    assert DEPLOYMENTS["generation"]["spec"]["replicas"] == 3


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_graceful_termination_outlasts_prestop_and_drain(name):
    d = DEPLOYMENTS[name]
    c = container(d)
    grace = d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    sleep = preStop_seconds(c)
    assert sleep >= 3, "endpoints and DNS need a few seconds to drop the pod"
    assert grace > sleep + DRAIN_SECONDS[name], f"{name}: {grace}s < preStop {sleep}s + drain {DRAIN_SECONDS[name]}s"
    strategy = d["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0, "roll out without losing capacity"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_deployment_environment(name):
    c = container(DEPLOYMENTS[name])
    env = env_of(c)
    prefix = f"LLMESH_{name.upper()}_"
    for var in env:
        if var.startswith("LLMESH_") and var not in GLOBAL_LLMESH_ENV:
            assert var.startswith(prefix), f"{name}: {var} is not read by {name}"
    assert env["LLMESH_CONFIG"]["value"] == "/etc/llmesh/mesh.toml"
    assert env[f"{prefix}ADMIN__LISTEN"]["value"] == f"0.0.0.0:{ADMIN_PORT}"
    # Reachable from the monitoring namespace: a bearer token besides the NetworkPolicy.
    assert env[f"{prefix}ADMIN__BEARER_TOKEN_FILE"]["value"] == "/etc/llmesh/secrets/admin-token"
    assert env["OTEL_SERVICE_NAME"]["value"] == SERVICES[name][2]
    assert env["OTEL_METRICS_EXPORTER"]["value"] == "none"
    # $(VAR) references only reach variables defined earlier in the list.
    names = [e["name"] for e in c["env"]]
    for i, e in enumerate(c["env"]):
        for ref in re.findall(r"\$\((\w+)\)", e.get("value", "")):
            assert ref in names[:i], f"{name}: {e['name']} uses $({ref}) before it is defined"
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/etc/llmesh", "/tmp"} <= mounts


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_deployment_is_scraped(name):
    d = DEPLOYMENTS[name]
    annotations = d["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(ADMIN_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"
    labels = d["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == name  # prometheus-k8s.yml builds job from it
    assert labels["app.kubernetes.io/part-of"] == "llmesh"
    assert ADMIN_PORT in [p["containerPort"] for p in container(d)["ports"]]


def config_sources(deployment: dict) -> list[dict]:
    (config,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"]
    return config["projected"]["sources"]


def projected_files(deployment: dict) -> dict[str, tuple[str, str]]:
    """Path under /etc/llmesh -> (source name, key)."""
    files = {}
    for source in config_sources(deployment):
        kind = "configMap" if "configMap" in source else "secret"
        for item in source[kind]["items"]:
            files[item["path"]] = (source[kind]["name"], item["key"])
    return files


def test_gateway_mounts_its_keys_from_the_secret():
    d = DEPLOYMENTS["gateway"]
    env = env_of(container(d))
    assert env["LLMESH_GATEWAY_AUTH__KEYS_FILE"]["value"] == "/etc/llmesh/secrets/keys.toml"
    assert projected_files(d)["secrets/keys.toml"] == ("llmesh-secrets", "keys.toml")
    assert projected_files(d)["mesh.toml"] == ("llmesh-config", "mesh.toml")


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_certificates_and_secrets_are_where_mesh_toml_looks(name):
    """One projected volume at /etc/llmesh: swapped atomically when a Secret changes (the services
    re-read it), and every file mesh.toml names is in it, from the right Secret."""
    d = DEPLOYMENTS[name]
    files = projected_files(d)
    assert files["tls/tls.crt"] == (f"llmesh-tls-{name}", "tls.crt")
    assert files["tls/tls.key"] == (f"llmesh-tls-{name}", "tls.key")
    assert files["tls/ca.crt"] == (f"llmesh-tls-{name}", "ca.crt")
    client = {"client/tls.crt": ("llmesh-tls-client", "tls.crt"), "client/tls.key": ("llmesh-tls-client", "tls.key")}
    if name in ("gateway", "health"):
        assert client.items() <= files.items()
    else:
        assert not set(client) & set(files), f"{name} needs no client certificate: it calls no mesh service"
    assert files["secrets/redis-password"] == ("llmesh-secrets", "redis-password")
    assert files["secrets/admin-token"] == ("llmesh-secrets", "admin-token")
    if name != "gateway":
        assert "secrets/keys.toml" not in files, f"{name} can read the API keys"
    config = load_toml(MESH_TOML)[name]
    paths = [v for section in ("tls", "client_tls") for k, v in config.get(section, {}).items() if k in ("cert", "key", "ca", "client_ca")]
    for url in redis_urls(config):
        query = dict(p.split("=", 1) for p in url.split("?", 1)[1].split("&"))
        paths += [query["tls_ca"], query["password_file"]]
    for path in paths:
        assert path.removeprefix("/etc/llmesh/") in files, f"{name}: mesh.toml names {path}, which is not mounted"
    config_volume = [v for v in d["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"][0]
    assert config_volume["projected"]["defaultMode"] == 0o440, "private keys readable by the pod's group only"


def test_generation_reads_the_openai_key_from_the_secret():
    env = env_of(container(DEPLOYMENTS["generation"]))
    ref = env["OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == "llmesh-secrets" and ref["key"] == "openai-api-key"


def test_secret_holds_placeholders_only():
    (secret,) = k8s_objects("Secret")
    data = {**secret.get("stringData", {}), **secret.get("data", {})}
    assert set(data) == {"keys.toml", "openai-api-key", "redis-password", "admin-token"}
    # Empty: Redis and the services refuse to start on an empty password or token (fail closed).
    for key in ("openai-api-key", "redis-password", "admin-token"):
        assert data[key] == "", f"{key}: never commit a secret"
    keys = tomllib.loads(data["keys.toml"])["keys"]
    assert keys, "keep one placeholder [[keys]] table to show the format"
    for key in keys:
        assert set(key) >= {"id", "prefix", "sha256"}
        for field in ("prefix", "sha256"):
            assert key[field] == "REPLACE-ME", "never commit a real API key (or its hash)"


def test_configmap_is_generated_from_mesh_toml():
    (generator,) = KUSTOMIZATION["configMapGenerator"]
    assert generator["name"] == "llmesh-config"
    assert generator["files"] == ["mesh.toml"]
    for name, d in DEPLOYMENTS.items():
        text = yaml.safe_dump(d["spec"]["template"]["spec"]["volumes"])
        assert "llmesh-config" in text, f"{name} does not mount the configuration"


# ------------------------------------------------------------------------------------------------
# Services, autoscaling, disruption budgets


def test_generation_service_is_headless():
    assert K8S_SERVICES["generation"]["spec"]["clusterIP"] == "None"


@pytest.mark.parametrize("name", sorted(K8S_SERVICES))
def test_services_select_pods_and_named_ports(name):
    service = K8S_SERVICES[name]
    selector = service["spec"]["selector"]
    workloads = [w for w in k8s_objects("Deployment") + k8s_objects("StatefulSet")
                 if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
    assert len(workloads) == 1, f"Service {name} selects {len(workloads)} workloads"
    ports = {p["name"]: p["containerPort"] for c in workloads[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
    for port in service["spec"]["ports"]:
        target = port["targetPort"]
        assert target in ports or target in ports.values(), f"Service {name}: no container port {target}"
    if name in SERVICES:
        assert [p["port"] for p in service["spec"]["ports"]] == [SERVICES[name][0]]


def test_hpas_target_existing_deployments():
    hpas = {h["metadata"]["name"]: h for h in k8s_objects("HorizontalPodAutoscaler")}
    assert set(hpas) == {"gateway", "generation"}
    contract = metric_contract()
    for name, hpa in hpas.items():
        assert hpa["apiVersion"] == "autoscaling/v2"
        ref = hpa["spec"]["scaleTargetRef"]
        assert ref["kind"] == "Deployment" and ref["apiVersion"] == "apps/v1"
        assert ref["name"] in DEPLOYMENTS
        assert hpa["spec"]["minReplicas"] >= DEPLOYMENTS[ref["name"]]["spec"]["replicas"] - 1
        assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
        metrics = hpa["spec"]["metrics"]
        assert {"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}} in metrics
        pods = [m["pods"] for m in metrics if m["type"] == "Pods"]
        assert pods and pods[0]["metric"]["name"] == "llm_active_requests"
        assert pods[0]["metric"]["name"] in contract
        # The CPU target only means something with a CPU request.
        assert container(DEPLOYMENTS[ref["name"]])["resources"]["requests"]["cpu"]
    assert hpas["generation"]["spec"]["minReplicas"] == 3


def test_pdbs_select_existing_workloads():
    pdbs = k8s_objects("PodDisruptionBudget")
    assert {p["metadata"]["name"] for p in pdbs} >= {"gateway", "generation", "cache"}
    for pdb in pdbs:
        selector = pdb["spec"]["selector"]["matchLabels"]
        matches = [d for d in DEPLOYMENTS.values()
                   if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matches) == 1, f"PDB {pdb['metadata']['name']} selects {len(matches)} Deployments"
        assert matches[0]["spec"]["replicas"] > 1, "a budget on a single replica blocks node drains"
        assert pdb["spec"].get("maxUnavailable") == 1


def test_redis_is_persistent_and_never_evicts_the_queue():
    (redis,) = k8s_objects("StatefulSet")
    (c,) = redis["spec"]["template"]["spec"]["containers"]
    assert c["image"] == "redis:7-alpine"
    script = c["command"][-1]
    assert "--maxmemory-policy volatile-lru" in script
    assert "--appendonly yes" in script
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert {"name": "data", "mountPath": "/data"} in c["volumeMounts"]
    assert redis["spec"]["serviceName"] in K8S_SERVICES
    assert K8S_SERVICES[redis["spec"]["serviceName"]]["spec"]["clusterIP"] == "None"
    assert redis["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_namespace_enforces_restricted_pod_security():
    (ns,) = k8s_objects("Namespace")
    assert ns["metadata"]["name"] == KUSTOMIZATION["namespace"]
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_redis_speaks_tls_only_with_an_acl_password_from_the_secret():
    (redis,) = k8s_objects("StatefulSet")
    (c,) = redis["spec"]["template"]["spec"]["containers"]
    assert c["command"][:2] == ["sh", "-c"]
    script = c["command"][-1]
    # The password goes on stdin (a here-document); tests/deploy/test_redis_start.py runs the script.
    assert re.search(r"exec redis-server - .*<<CONF\n\s*user default off\n\s*user llmesh on >\$password ~\* &\* \+@all\n\s*CONF",
                     script, re.S)
    assert "cat /etc/llmesh/secrets/redis-password" in script
    assert "--port 0" in script and "--tls-port 6379" in script
    files = projected_files(redis)
    assert files["tls/tls.crt"] == ("llmesh-tls-redis", "tls.crt")
    assert files["tls/ca.crt"] == ("llmesh-tls-redis", "ca.crt")
    assert files["secrets/redis-password"] == ("llmesh-secrets", "redis-password")
    probe = " ".join(c["readinessProbe"]["exec"]["command"])
    assert "REDISCLI_AUTH" in probe and "--tls" in probe and "--user llmesh" in probe
    for service in SERVICES:
        for url in redis_urls(load_toml(MESH_TOML)[service]):
            assert url.startswith("rediss://llmesh@redis:6379/"), url


# ------------------------------------------------------------------------------------------------
# NetworkPolicies

POLICIES = {p["metadata"]["name"]: p for p in k8s_objects("NetworkPolicy")}
WORKLOADS = {w["metadata"]["name"]: w for w in k8s_objects("Deployment") + k8s_objects("StatefulSet")}


def pod_labels(name: str) -> dict:
    return WORKLOADS[name]["spec"]["template"]["metadata"]["labels"]


def policies_of(name: str) -> list[dict]:
    labels = pod_labels(name)
    return [p for p in POLICIES.values() if p["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items()]


def allowed(target: str, port: int, source: str | None, namespace: str = "llmesh") -> bool:
    """Whether a pod of `source` (a workload of the mesh; None: a pod of no workload of the
    mesh) in `namespace` may connect to `target`'s `port`, by the policies that select `target`."""
    labels = pod_labels(source) if source else {}
    for policy in policies_of(target):
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        for rule in policy["spec"].get("ingress", []):
            if not any(p["port"] == port for p in rule.get("ports", [])):
                continue
            peers = rule.get("from")
            if peers is None:
                return True
            for peer in peers:
                if "namespaceSelector" in peer:
                    wanted = peer["namespaceSelector"]["matchLabels"].get("kubernetes.io/metadata.name")
                    if wanted == namespace and "podSelector" not in peer:
                        return True
                elif "podSelector" in peer and namespace == "llmesh":
                    if peer["podSelector"]["matchLabels"].items() <= labels.items():
                        return True
    return False


def test_every_pod_is_denied_by_default():
    deny = POLICIES["default-deny-ingress"]
    assert deny["spec"]["podSelector"] == {} and deny["spec"]["policyTypes"] == ["Ingress"]
    assert not deny["spec"].get("ingress")
    for name in WORKLOADS:
        assert len(policies_of(name)) >= 2, f"{name} has no policy of its own"


def test_only_the_gateway_is_reachable_from_outside_the_namespace():
    assert allowed("gateway", 50051, None, namespace="elsewhere")
    for name, port in [("generation", 50052), ("cache", 50053), ("health", 50054), ("redis", 6379)]:
        assert not allowed(name, port, None, namespace="elsewhere"), f"{name} is reachable from outside"
        assert not allowed(name, port, None), f"{name} is reachable from any pod of the namespace"


def test_generation_and_cache_only_from_the_gateway_and_health():
    for name, port in [("generation", 50052), ("cache", 50053)]:
        assert allowed(name, port, "gateway") and allowed(name, port, "health")
        for other in ("generation", "cache", "redis"):
            if other != name:
                assert not allowed(name, port, other), f"{other} reaches {name}"


def test_redis_only_from_the_mesh():
    for name in SERVICES:
        assert allowed("redis", 6379, name), f"{name} cannot reach Redis"
    assert not allowed("redis", 6379, None)


def test_admin_listeners_only_from_the_monitoring_namespace():
    for name in SERVICES:
        assert allowed(name, ADMIN_PORT, None, namespace="monitoring"), f"Prometheus cannot scrape {name}"
        assert not allowed(name, ADMIN_PORT, None, namespace="elsewhere")
        assert not allowed(name, ADMIN_PORT, "gateway" if name != "gateway" else "generation")


def test_policy_ports_are_ports_of_the_pods():
    for policy in POLICIES.values():
        selector = policy["spec"]["podSelector"].get("matchLabels")
        if not selector:
            continue
        (workload,) = [w for w in WORKLOADS.values() if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        ports = {p["containerPort"] for c in workload["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        for rule in policy["spec"]["ingress"]:
            for port in rule["ports"]:
                assert port["port"] in ports, f"{policy['metadata']['name']}: no container port {port['port']}"


# ------------------------------------------------------------------------------------------------
# cert-manager (optional)

CERT_MANAGER = K8S / "cert-manager"


def test_cert_manager_makes_exactly_the_secrets_the_pods_mount():
    objects = load_yaml_all(CERT_MANAGER / "certificates.yaml")
    kustomization = load_yaml(CERT_MANAGER / "kustomization.yaml")
    assert kustomization["resources"] == ["certificates.yaml"] and kustomization["namespace"] == "llmesh"
    certificates = {o["spec"]["secretName"]: o for o in objects if o["kind"] == "Certificate"}
    issuers = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Issuer"}
    mounted = {source["secret"]["name"] for w in WORKLOADS.values() for source in config_sources(w) if "secret" in source}
    assert set(certificates) - {"llmesh-ca"} == mounted - {"llmesh-secrets"} == TLS_SECRETS
    assert certificates["llmesh-ca"]["spec"]["isCA"] is True
    # Its renewal keeps the key, so what it signed still verifies against the renewed CA.
    assert certificates["llmesh-ca"]["spec"]["privateKey"]["rotationPolicy"] == "Never"
    assert "selfSigned" in issuers[certificates["llmesh-ca"]["spec"]["issuerRef"]["name"]]["spec"]
    for name, certificate in certificates.items():
        assert certificate["metadata"]["labels"]["app.kubernetes.io/part-of"] == "llmesh"
        if name == "llmesh-ca":
            continue
        spec = certificate["spec"]
        assert issuers[spec["issuerRef"]["name"]]["spec"]["ca"]["secretName"] == "llmesh-ca"
        assert spec["privateKey"]["rotationPolicy"] == "Always", "a renewal brings a new key"
        if name == "llmesh-tls-client":
            assert "client auth" in spec["usages"] and "server auth" not in spec["usages"]
        else:
            service = name.removeprefix("llmesh-tls-")
            assert "server auth" in spec["usages"] and "client auth" not in spec["usages"]
            # The names the mesh dials: mesh.toml's short names, and server_name for generation.
            assert service in spec["dnsNames"], f"{name} does not name {service}"
