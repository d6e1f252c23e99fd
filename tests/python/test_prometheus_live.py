"""A real Prometheus server (Debian's `prometheus`) scraping a running mesh with the project's own
scrape configuration, recording rules and alerts (deploy/prometheus), and every PromQL query of the
Grafana dashboards (deploy/grafana/dashboards) asked of it.

What is the project's and what the test changes:
- the scrape configuration is deploy/prometheus/prometheus.yml with each llmesh job's DNS discovery
  replaced by the admin listeners of this mesh (static targets, the operator's token from a file as
  in compose), the collector's jobs left out (no collector runs here), and the scrape and rule
  intervals shortened to 1 s;
- the rules are deploy/prometheus/rules/llmesh.rules.yml unchanged except each alert's `for`,
  which the test's copy sets to FOR (the rules' own 1 to 15 minutes do not fit a test bounded to
  two minutes); the expressions, thresholds and labels are the project's;
- the dashboards' template variables are resolved as Grafana resolves "All" (their `allValue`),
  `$__rate_interval` and `$__range` to the windows below.

One test, in the order an operator would meet things: targets up, traffic, the faults (a generation
replica killed, an upstream failing, a key past 80% of its budget) and their alerts, every recording
rule and dashboard query answering, then Redis stopped and the rate-limiter alert.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest
import yaml

import live_mesh
from conftest import BIN_DIR, REPO
from live_mesh import Background, Load, http_get, wait_for

DEPLOY = REPO / "deploy"
# Each alert's `for` in the test's copy of the rules (see the module docs).
FOR = "2s"
SCRAPE = "1s"
# Grafana's `$__rate_interval` and `$__range` for the dashboards' queries: the whole test's traffic.
RATE_INTERVAL = "2m"
RANGE = "5m"
# How long an alert may take to fire once its fault is made: the scrape, a window's worth of
# samples for rate(), FOR, one evaluation, and room for a loaded machine.
ALERT_WITHIN_S = 30.0


class Prometheus:
    def __init__(self, url: str, process: subprocess.Popen, log: Path) -> None:
        self.url = url
        self.process = process
        self.log = log

    def api(self, path: str, **params) -> dict:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        status, body = http_get(f"{self.url}/api/v1/{path}{query}", timeout_s=10)
        answer = json.loads(body or b"{}")
        assert status == 200 and answer.get("status") == "success", f"{path} {params}: {status} {body[:500]!r}"
        return answer["data"]

    def query(self, expr: str) -> list:
        return self.api("query", query=expr)["result"]

    def firing(self, name: str) -> list[dict]:
        return [a for a in self.api("alerts")["alerts"] if a["labels"].get("alertname") == name and a["state"] == "firing"]


def scrape_config(mesh: live_mesh.LiveMesh, rules: Path, prometheus_port: int) -> dict:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = SCRAPE
    config["global"]["evaluation_interval"] = SCRAPE
    config["rule_files"] = [str(rules)]
    targets = {
        "llmesh-gateway": [mesh.admin["gateway"]],
        "llmesh-generation": [mesh.admin["generation"], mesh.extra_generation_admin],
        "llmesh-cache": [mesh.admin["cache"]],
        "llmesh-health": [mesh.admin["health"]],
    }
    jobs = []
    for job in config["scrape_configs"]:
        name = job["job_name"]
        if name in targets:
            assert "dns_sd_configs" in job and job["authorization"]["credentials_file"], job
            del job["dns_sd_configs"]
            job["static_configs"] = [{"targets": targets.pop(name)}]
            job["authorization"]["credentials_file"] = str(mesh.token_file)
            job["scrape_timeout"] = SCRAPE
            jobs.append(job)
        elif name == "prometheus":
            job["static_configs"] = [{"targets": [f"127.0.0.1:{prometheus_port}"]}]
            jobs.append(job)
        else:
            assert name.startswith("otel-collector"), f"a scrape job the test does not know: {name}"
    assert not targets, f"prometheus.yml has no job for {sorted(targets)}"
    config["scrape_configs"] = jobs
    return config


def rules_copy(directory: Path) -> tuple[Path, dict]:
    """The project's rules with every alert's `for` set to FOR; also returns the original rules."""
    original = yaml.safe_load((DEPLOY / "prometheus" / "rules" / "llmesh.rules.yml").read_text())
    copy = yaml.safe_load(json.dumps(original))
    for group in copy["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                rule["for"] = FOR
    path = directory / "llmesh.rules.yml"
    path.write_text(yaml.safe_dump(copy))
    return path, original


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    with live_mesh.running_mesh(BIN_DIR, tmp_path_factory.mktemp("observed-mesh")) as mesh:
        yield mesh


@pytest.fixture(scope="module")
def prometheus(mesh, tmp_path_factory):
    binary = shutil.which("prometheus")
    assert binary, "the prometheus server is missing (Debian package `prometheus`; scripts/test installs it)"
    directory = tmp_path_factory.mktemp("prometheus")
    rules, _ = rules_copy(directory)
    port = live_mesh.free_port()
    config = directory / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config(mesh, rules, port)))
    check = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, f"promtool check config:\n{check.stdout}\n{check.stderr}"
    log = directory / "prometheus.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    server = Prometheus(f"http://127.0.0.1:{port}", process, log)
    try:
        wait_for("prometheus is ready", lambda: _ready(server), 30)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def _ready(server: Prometheus) -> bool:
    if server.process.poll() is not None:
        raise AssertionError(f"prometheus exited ({server.process.returncode}):\n{live_mesh.mesh_process.tail(server.log)}")
    try:
        return http_get(f"{server.url}/-/ready", timeout_s=2)[0] == 200
    except OSError:
        return False


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, PromQL with its variables resolved) for every Prometheus
    query of every panel."""
    queries = []
    files = sorted(DEPLOY.glob("**/dashboards/*.json"))
    assert files, "no dashboards under deploy/"
    for path in files:
        dashboard = json.loads(path.read_text())
        variables = {}
        for variable in dashboard.get("templating", {}).get("list", []):
            assert variable.get("includeAll") and "allValue" in variable, (
                f"{path.name}: variable {variable['name']} has no All value to resolve it with"
            )
            variables[variable["name"]] = variable["allValue"]

        def panels(items):
            for panel in items:
                yield panel
                yield from panels(panel.get("panels", []))

        for panel in panels(dashboard.get("panels", [])):
            source = (panel.get("datasource") or {}).get("type", "prometheus")
            for target in panel.get("targets", []):
                kind = (target.get("datasource") or {}).get("type", source)
                if kind != "prometheus":
                    continue  # Loki's log panels
                expr = target["expr"].replace("$__rate_interval", RATE_INTERVAL).replace("$__range", RANGE)
                for name, value in variables.items():
                    expr = expr.replace(f"${{{name}}}", value).replace(f"${name}", value)
                assert "$" not in expr, f"{path.name} / {panel.get('title')}: unresolved variable in {expr}"
                queries.append((path.name, panel.get("title", "?"), expr))
    return queries


def dashboard_variables() -> list[tuple[str, str, str]]:
    """(dashboard file, variable, metric) for each `label_values(metric, label)` variable."""
    found = []
    for path in sorted(DEPLOY.glob("**/dashboards/*.json")):
        for variable in json.loads(path.read_text()).get("templating", {}).get("list", []):
            match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable.get("definition", ""))
            assert match, f"{path.name}: variable {variable['name']} is not a label_values() query"
            found.append((path.name, match.group(2), match.group(1)))
    return found


def test_prometheus_scrapes_the_mesh_and_the_alerts_fire(mesh, prometheus, pb):
    started = time.monotonic()

    # Every target up: the four services, the second generation replica, Prometheus itself.
    def all_up():
        targets = prometheus.api("targets")["activeTargets"]
        return len(targets) == 6 and all(t["health"] == "up" for t in targets) and targets

    try:
        wait_for("every scrape target up", all_up, 20, 0.5)
    except AssertionError:
        targets = prometheus.api("targets")["activeTargets"]
        pytest.fail(f"targets not all up: {[(t['scrapeUrl'], t['health'], t['lastError']) for t in targets]}")

    load = Load(pb, mesh)
    try:
        load.mixed()
        # A key past 80% of its budget (and below 100%): LlmeshBudgetNearlySpent.
        spent = load.budget_to(live_mesh.BUDGET_KEY, 0.8, live_mesh.BUDGET_USD)
        assert spent < 1.0, spent
        # The upstream failing: sim-error fails every call; the gateway's breaker for that model
        # opens (LlmeshModelBreakerOpen), and its callers get fallback answers.
        failing = Background(lambda: load.generate("alice", model="sim-error"), pause_s=0.05)
        # A generation replica killed: LlmeshInstanceDown for it.
        mesh.kill_extra_generation()
        faulted = time.monotonic()
        try:
            for alert, labels in (
                ("LlmeshInstanceDown", {"job": "llmesh-generation", "instance": mesh.extra_generation_admin}),
                ("LlmeshModelBreakerOpen", {"model": "sim-error"}),
                ("LlmeshBudgetNearlySpent", {"scope": "key", "name": live_mesh.BUDGET_KEY}),
            ):
                wait_for(
                    f"{alert} {labels} firing",
                    lambda alert=alert, labels=labels: [
                        a for a in prometheus.firing(alert) if labels.items() <= a["labels"].items()
                    ],
                    ALERT_WITHIN_S,
                    0.5,
                )
                print(f"{alert} firing {time.monotonic() - faulted:.1f} s after the faults")
            load.mixed(rounds=1)
        finally:
            failing.stop()

        # Redis stopped: the cache service loses its change channel (the gateways' near caches
        # reset), and the gateway decides rate limits locally (LlmeshRateLimiterDegraded).
        mesh.redis.stop()
        faulted = time.monotonic()
        calls = Background(lambda: load.generate("bob"), pause_s=0.05)
        try:
            wait_for(
                "LlmeshRateLimiterDegraded firing",
                lambda: [a for a in prometheus.firing("LlmeshRateLimiterDegraded") if a["labels"]["job"] == "llmesh-gateway"],
                ALERT_WITHIN_S,
                0.5,
            )
            print(f"LlmeshRateLimiterDegraded firing {time.monotonic() - faulted:.1f} s after Redis stopped")
        finally:
            calls.stop()

        # Every recording rule returns series.
        groups = prometheus.api("rules", type="record")["groups"]
        records = [rule["name"] for group in groups for rule in group["rules"]]
        assert len(records) >= 10, records
        empty = [name for name in records if not prometheus.query(name)]
        assert not empty, f"recording rules without series: {empty}"

        # Every dashboard variable finds values, and every dashboard query returns data.
        for dashboard, label, metric in dashboard_variables():
            values = prometheus.api(f"label/{label}/values", **{"match[]": metric})
            assert values, f"{dashboard}: label_values({metric}, {label}) is empty"
        queries = dashboard_queries()
        assert len(queries) > 40, len(queries)
        # Some panels show what the Redis fault caused (the near cache's feed ended): a few seconds
        # for the last scrape of them.
        empty = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            empty = [(d, title, expr) for d, title, expr in queries if not prometheus.query(expr)]
            if not empty:
                break
            time.sleep(1)
        assert not empty, "dashboard queries without data:\n" + "\n".join(f"  {d} / {t}: {e}" for d, t, e in empty)
    finally:
        load.close()
    print(f"prometheus test body: {time.monotonic() - started:.1f} s")
