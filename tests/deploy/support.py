"""Helpers for the deployment tests: paths, loaders, the metric contract, PromQL scanning, promtool.

Everything here reads files of the repository; nothing needs Docker, a cluster or the network.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COLLECTOR_CONFIG = REPO / "otel-collector" / "config.yaml"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"
PROMETHEUS = DEPLOY / "prometheus"
RULES_DIR = PROMETHEUS / "rules"
RULE_TESTS_DIR = PROMETHEUS / "tests"
GRAFANA = DEPLOY / "grafana"
DASHBOARDS = GRAFANA / "dashboards"
K8S = DEPLOY / "k8s"
MESH_TOML = DEPLOY / "config" / "mesh.toml"
METRICS_MD = REPO / "docs" / "METRICS.md"
OPERATIONS_MD = REPO / "docs" / "OPERATIONS.md"

# The four services: binary name -> (gRPC port, gRPC service, Prometheus job / OTEL_SERVICE_NAME).
SERVICES = {
    "gateway": (50051, "llmesh.gateway.v1.Gateway", "llmesh-gateway"),
    "generation": (50052, "llmesh.generation.v1.Generation", "llmesh-generation"),
    "cache": (50053, "llmesh.cache.v1.Cache", "llmesh-cache"),
    "health": (50054, "llmesh.health.v1.MeshHealth", "llmesh-health"),
}
ADMIN_PORT = 9464
BINARIES = ("gateway", "generation", "cache", "health", "llmesh")
# Environment variables every service reads that are not scoped to one service.
GLOBAL_LLMESH_ENV = {"LLMESH_CONFIG", "LLMESH_LOG_FORMAT"}
# Each service drains in-flight calls for this long after SIGTERM (shutdown_grace_ms defaults).
DRAIN_SECONDS = {"gateway": 10, "generation": 10, "cache": 10, "health": 5}


# --------------------------------------------------------------------------------------------
# Loading


def load_yaml(path: Path):
    with path.open() as f:
        return yaml.safe_load(f)


def load_yaml_all(path: Path) -> list:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def load_toml(path: Path) -> dict:
    with path.open("rb") as f:
        return tomllib.load(f)


def yaml_files() -> list[Path]:
    roots = [REPO / "otel-collector", DEPLOY]
    return sorted(p for root in roots for p in root.rglob("*") if p.suffix in (".yml", ".yaml"))


def dashboard_files() -> list[Path]:
    return sorted(DASHBOARDS.glob("*.json"))


def load_dashboard(path: Path) -> dict:
    return json.loads(path.read_text())


def rule_files() -> list[Path]:
    return sorted(RULES_DIR.glob("*.yml"))


@cache
def rule_groups() -> list[dict]:
    return [g for path in rule_files() for g in load_yaml(path)["groups"]]


def alerting_rules() -> list[dict]:
    return [r for g in rule_groups() for r in g["rules"] if "alert" in r]


def recording_rules() -> list[dict]:
    return [r for g in rule_groups() for r in g["rules"] if "record" in r]


@cache
def k8s_manifests() -> dict[Path, list[dict]]:
    """Parsed once per session: tests read, never modify, these objects."""
    return {p: load_yaml_all(p) for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml"}


def k8s_objects(kind: str | None = None) -> list[dict]:
    objs = [doc for docs in k8s_manifests().values() for doc in docs]
    return [o for o in objs if kind is None or o.get("kind") == kind]


def redis_urls(section: dict) -> list[str]:
    """Every Redis URL a service's section of mesh.toml holds (redis_url settings, health targets)."""
    urls = []

    def walk(value):
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, str) and value.startswith(("redis://", "rediss://")):
            urls.append(value)

    walk(section)
    return urls


def iter_panels(dashboard: dict):
    """Every panel, including those nested in collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


# --------------------------------------------------------------------------------------------
# The metric contract (docs/METRICS.md)


@dataclass
class Metric:
    name: str
    type: str
    labels: set[str] = field(default_factory=set)


def _table_cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _label_names(cell: str) -> set[str]:
    """`endpoint` (RPC method: `Generate`, ...), `status` (...) -> {endpoint, status}.

    Parenthesised text describes values; so does a list after a colon (`result`: `hit`, `miss`).
    """
    if cell.strip() in ("—", "-", ""):
        return set()
    while True:  # nested parentheses, innermost first
        stripped = re.sub(r"\([^()]*\)", "", cell)
        if stripped == cell:
            break
        cell = stripped
    cell = re.sub(r"`([^`]+)`\s*:\s*(`[^`]*`\s*,?\s*)+", r"`\1`", cell)
    return set(re.findall(r"`([a-z_][a-z0-9_]*)`", cell))


@cache
def metric_contract() -> dict[str, Metric]:
    """The metrics docs/METRICS.md promises, by Prometheus name (histograms add their series)."""
    metrics: dict[str, Metric] = {}
    header: list[str] | None = None
    for line in METRICS_MD.read_text().splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = _table_cells(line)
        if header is None:
            header = [c.lower() for c in cells]
            continue
        if set("".join(cells)) <= set("-: "):
            continue  # the separator row
        m = re.fullmatch(r"`([a-zA-Z_:][a-zA-Z0-9_:]*)`", cells[0])
        if not m:
            continue
        row = dict(zip(header, cells))
        metric = Metric(m.group(1), row.get("type", ""), _label_names(row.get("labels", "")))
        metrics[metric.name] = metric
        if "histogram" in metric.type:
            for suffix in ("_bucket", "_sum", "_count"):
                series = Metric(metric.name + suffix, "histogram series", set(metric.labels))
                if suffix == "_bucket":
                    series.labels.add("le")
                metrics[series.name] = series
    # The process_* metrics are listed in prose.
    process = METRICS_MD.read_text().split("## Process", 1)[1]
    for name in re.findall(r"`(process_[a-z_]+)`", process):
        metrics[name] = Metric(name, "process")
    metrics["up"] = Metric("up", "scrape")
    return metrics


# --------------------------------------------------------------------------------------------
# PromQL scanning (enough for the expressions we write; promtool checks the syntax itself)

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
             "unless", "offset", "inf", "nan"}


def grafana_to_promql(expr: str) -> str:
    """Replaces Grafana's variables so that promtool can parse a panel's query."""
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$__range", "1h")
    expr = expr.replace("${__rate_interval}", "5m").replace("${__range}", "1h")
    expr = re.sub(r"\$\{(\w+)(:\w+)?\}|\[\[(\w+)\]\]|\$(\w+)", ".*", expr)
    return expr


def _strip_strings(expr: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names matched) for each `name{...}` selector in the expression."""
    out = []
    for m in re.finditer(r'(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{((?:[^}"]|"(?:[^"\\]|\\.)*")*)\}', expr):
        if m.group(1) in _KEYWORDS:
            continue
        labels = set(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)', _strip_strings(m.group(2))))
        out.append((m.group(1), labels))
    return out


def metric_names(expr: str) -> set[str]:
    """The metric (and recording rule) names a PromQL expression reads."""
    e = _strip_strings(expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\boffset\s+-?\w+", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", e):
        name, call = m.group(1), m.group(2)
        if call or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


# --------------------------------------------------------------------------------------------
# promtool (Debian's `prometheus` package)


def promtool_path() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not installed: the Prometheus configuration, rules and rule tests cannot be "
            "checked. Install it with Debian's `prometheus` package: apt-get install -y prometheus "
            "(it provides /usr/bin/promtool).",
            pytrace=False,
        )
    return path


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([promtool_path(), *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def assert_ok(result: subprocess.CompletedProcess, what: str) -> None:
    assert result.returncode == 0, f"{what} failed:\n{result.stdout}\n{result.stderr}"


# --------------------------------------------------------------------------------------------
# Markdown anchors, as GitHub makes them


def github_anchor(heading: str) -> str:
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def markdown_anchors(path: Path) -> set[str]:
    anchors = set()
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if not in_code and (m := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)):
            anchors.add(github_anchor(m.group(1)))
    return anchors


# --------------------------------------------------------------------------------------------
# Memory sizes as compose and Kubernetes write them


def bytes_of(size: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]i?)?[bB]?", str(size).strip())
    assert m, f"not a memory size: {size!r}"
    number, unit = float(m.group(1)), m.group(2) or ""
    # Compose's 512M and Kubernetes' 512Mi are both 512 * 1024 * 1024; Kubernetes' 512M is 512e6.
    powers = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4,
              "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4}
    return int(number * powers[unit])
