"""Grafana: provisioning files and dashboards; every query is valid PromQL on the metric contract."""

from __future__ import annotations

import itertools

import pytest
import yaml

from support import (
    DASHBOARDS,
    GRAFANA,
    assert_ok,
    dashboard_files,
    grafana_to_promql,
    iter_panels,
    load_dashboard,
    load_yaml,
    metric_names,
    promtool,
    selectors,
)

DASHBOARD_IDS = [p.name for p in dashboard_files()]


@pytest.fixture(scope="module")
def datasources() -> dict[str, dict]:
    sources = []
    for path in sorted((GRAFANA / "provisioning" / "datasources").glob("*.yml")):
        sources += load_yaml(path)["datasources"]
    return {s["uid"]: s for s in sources}


@pytest.fixture(scope="module")
def dashboards() -> dict[str, dict]:
    return {p.name: load_dashboard(p) for p in dashboard_files()}


def prometheus_targets(dashboard: dict, datasources: dict):
    """(panel title, expr) of every Prometheus query in the dashboard, template variables included."""
    for panel in iter_panels(dashboard):
        for target in panel.get("targets", []):
            ds = target.get("datasource") or panel.get("datasource") or {}
            if datasources.get(ds.get("uid"), {}).get("type") == "prometheus" and target.get("expr"):
                yield panel.get("title", "?"), target["expr"]
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            if query.startswith("label_values("):
                inner = query[len("label_values("):-1]
                metric = inner.split(",")[0].strip() if "," in inner else None
                if metric:
                    yield f"variable {var['name']}", metric


# ------------------------------------------------------------------------------------------------
# Provisioning


def test_datasources(datasources, compose):
    by_type = {s["type"]: s for s in datasources.values()}
    assert set(by_type) == {"prometheus", "loki", "jaeger"}
    assert by_type["prometheus"]["url"] == "http://prometheus:9090"
    assert by_type["loki"]["url"] == "http://loki:3100"
    assert by_type["jaeger"]["url"] == "http://jaeger:16686"
    assert by_type["prometheus"].get("isDefault") is True
    for source in datasources.values():
        host = source["url"].split("//", 1)[1].split(":", 1)[0]
        assert host in compose["services"], f"data source {source['name']} points at no compose service"
    # Links between them name provisioned uids.
    for source in datasources.values():
        text = yaml.safe_dump(source.get("jsonData", {}))
        for uid in ("llmesh-prometheus", "llmesh-loki", "llmesh-jaeger"):
            if "datasourceUid" in text and uid in text:
                assert uid in datasources


def test_dashboard_provider_reads_the_mounted_directory(compose):
    (provider,) = load_yaml(GRAFANA / "provisioning" / "dashboards" / "llmesh.yml")["providers"]
    path = provider["options"]["path"]
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{path}:ro" in mounts
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in mounts
    home = compose["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(path + "/") and (DASHBOARDS / home.rsplit("/", 1)[1]).is_file()


# ------------------------------------------------------------------------------------------------
# Dashboards


@pytest.mark.parametrize("name", DASHBOARD_IDS)
def test_dashboard_structure(dashboards, name):
    d = dashboards[name]
    assert d.get("title") and d.get("uid") and d.get("panels")
    assert len(d["uid"]) <= 40, "Grafana uids are at most 40 characters"
    ids = [p["id"] for p in iter_panels(d)]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {name}"
    boxes = []
    for panel in iter_panels(d):
        pos = panel.get("gridPos")
        assert pos and all(isinstance(pos.get(k), int) for k in "hwxy"), f"{panel.get('title')}: gridPos"
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, f"{panel.get('title')}: off the grid"
        assert panel.get("title"), f"panel {panel['id']} has no title"
        if panel["type"] != "row":
            assert panel.get("targets"), f"{panel['title']}: no query"
        boxes.append((panel["title"], pos))
    for (ta, a), (tb, b) in itertools.combinations(boxes, 2):
        overlap = a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"] and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"]
        assert not overlap, f"panels {ta!r} and {tb!r} overlap"


def test_dashboard_uids_and_titles_are_unique(dashboards):
    uids = [d["uid"] for d in dashboards.values()]
    titles = [d["title"] for d in dashboards.values()]
    assert len(uids) == len(set(uids)) and len(titles) == len(set(titles))


@pytest.mark.parametrize("name", DASHBOARD_IDS)
def test_dashboard_datasources_are_provisioned(dashboards, datasources, name):
    for panel in iter_panels(dashboards[name]):
        for ref in [panel.get("datasource")] + [t.get("datasource") for t in panel.get("targets", [])]:
            if ref is None:
                continue
            assert ref.get("uid") in datasources, f"{panel['title']}: unknown data source {ref}"
            assert ref.get("type") == datasources[ref["uid"]]["type"]
    for var in dashboards[name].get("templating", {}).get("list", []):
        if "datasource" in var:
            assert var["datasource"]["uid"] in datasources


def test_every_prometheus_query_is_valid_promql(dashboards, datasources, promtool_bin, tmp_path):
    """promtool parses each query, written as a recording rule (Grafana variables substituted)."""
    rules, where = [], []
    for name, d in dashboards.items():
        for title, expr in prometheus_targets(d, datasources):
            rules.append({"record": f"dashboard:query:{len(rules)}", "expr": grafana_to_promql(expr)})
            where.append(f"{name} / {title}: {expr}")
    assert rules
    path = tmp_path / "dashboards.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}, width=1000))
    result = promtool("check", "rules", str(path))
    if result.returncode != 0:
        listing = "\n".join(f"  {i}: {w}" for i, w in enumerate(where))
        pytest.fail(f"promtool rejected a dashboard query:\n{result.stdout}{result.stderr}\nqueries:\n{listing}")
    assert_ok(result, "promtool check rules (dashboard queries)")


@pytest.mark.parametrize("name", DASHBOARD_IDS)
def test_dashboard_metrics_are_in_the_contract(dashboards, datasources, contract, recorded_names, name):
    for title, expr in prometheus_targets(dashboards[name], datasources):
        promql = grafana_to_promql(expr)
        unknown = metric_names(promql) - set(contract) - recorded_names
        assert not unknown, f"{name} / {title}: not in docs/METRICS.md: {sorted(unknown)}"
        for metric, labels in selectors(promql):
            if metric in contract:
                allowed = contract[metric].labels | {"job", "instance"}
                assert labels <= allowed, f"{name} / {title}: {metric} has no label {sorted(labels - allowed)}"


# What each dashboard is for (the brief), as the metrics it must show.
REQUIRED = {
    "llmesh-overview.json": ["llm_requests_total", "llm_response_time_bucket", "llm_active_requests",
                             "process_cpu_seconds_total", "process_resident_memory_bytes",
                             "llmesh_component_up", "up"],
    "llmesh-llm-usage.json": ["llmesh_tokens_total", "llmesh_cost_usd_total",
                              "gen_ai_server_time_to_first_token_seconds_bucket",
                              "gen_ai_server_time_per_output_token_seconds_bucket",
                              "job:llmesh_cache_hit:ratio_rate5m"],
    "llmesh-resilience.json": ["llmesh_breaker_state", "llmesh_retries_total", "llmesh_fallbacks_total",
                               "llmesh_shed_total", "llmesh_ratelimit_decisions_total", "llmesh_upstream_replicas"],
    "llmesh-queue.json": ["llmesh_queue_jobs", "llmesh_queue_jobs_completed_total"],
}


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_dashboard_shows_what_it_is_for(dashboards, datasources, name):
    assert name in dashboards, f"missing dashboard {name}"
    used = set()
    for _, expr in prometheus_targets(dashboards[name], datasources):
        used |= metric_names(grafana_to_promql(expr))
    missing = set(REQUIRED[name]) - used
    assert not missing, f"{name} does not show {sorted(missing)}"


def test_overview_shows_latency_percentiles_and_errors_by_code(dashboards, datasources):
    exprs = [e for _, e in prometheus_targets(dashboards["llmesh-overview.json"], datasources)]
    for q in ("0.5", "0.9", "0.99"):
        assert any(f"histogram_quantile({q}," in e and "llm_response_time_bucket" in e for e in exprs), q
    assert any("by (job, status)" in e and 'status!="OK"' in e for e in exprs)


def test_queue_gauges_are_not_summed_over_replicas(dashboards, datasources):
    # Every generation replica reports the same shared queue.
    for d in dashboards.values():
        for title, expr in prometheus_targets(d, datasources):
            assert not ("llmesh_queue_jobs{" in expr and "sum" in expr.split("llmesh_queue_jobs{")[0][-12:]), title
