"""Prometheus: the scrape configuration, the rules, their unit tests (all through promtool)."""

from __future__ import annotations

import re

import pytest
import yaml

from support import (
    K8S,
    OPERATIONS_MD,
    PROMETHEUS,
    REPO,
    RULE_TESTS_DIR,
    SERVICES,
    alerting_rules,
    assert_ok,
    bytes_of,
    github_anchor,
    load_yaml,
    load_yaml_all,
    markdown_anchors,
    metric_names,
    promtool,
    recording_rules,
    rule_files,
    selectors,
)

REPOSITORY_URL = re.search(r'^repository\s*=\s*"([^"]+)"', (REPO / "Cargo.toml").read_text(), re.M).group(1)
RUNBOOK_PREFIX = f"{REPOSITORY_URL}/blob/main/docs/OPERATIONS.md#"
SEVERITIES = {"critical", "warning", "info"}


# ------------------------------------------------------------------------------------------------
# promtool


def with_credentials_here(config: dict, directory) -> dict:
    """`config` with each scrape job's credentials_file (a Secret mounted in the container) made a
    file in `directory`: promtool checks that the file exists."""
    for job in config["scrape_configs"]:
        authorization = job.get("authorization")
        if authorization and "credentials_file" in authorization:
            token = directory / f"{job['job_name']}-token"
            token.write_text("token\n")
            authorization["credentials_file"] = str(token)
    return config


def test_promtool_check_config_compose(promtool_bin, tmp_path):
    config = with_credentials_here(load_yaml(PROMETHEUS / "prometheus.yml"), tmp_path)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    (tmp_path / "rules").symlink_to(PROMETHEUS / "rules")
    result = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert_ok(result, "promtool check config prometheus.yml")
    # The rule_files globs must find the rules (relative to the config file, as in the container).
    found = re.search(r"SUCCESS: (\d+) rule files found", result.stdout + result.stderr)
    assert found and int(found.group(1)) == len(rule_files()), result.stdout


def test_promtool_check_config_kubernetes(promtool_bin, tmp_path):
    # Debian's Prometheus is built without Kubernetes service discovery: swap kubernetes_sd_configs
    # for a static target and let promtool check the rest (relabelling regexes, rule files).
    config = with_credentials_here(load_yaml(PROMETHEUS / "prometheus-k8s.yml"), tmp_path)
    for job in config["scrape_configs"]:
        assert job.pop("kubernetes_sd_configs", None) is not None, job["job_name"]
        job["static_configs"] = [{"targets": ["pod.invalid:9464"]}]
    (tmp_path / "prometheus-k8s.yml").write_text(yaml.safe_dump(config))
    (tmp_path / "rules").symlink_to(PROMETHEUS / "rules")
    result = promtool("check", "config", "prometheus-k8s.yml", cwd=tmp_path)
    assert_ok(result, "promtool check config prometheus-k8s.yml")
    assert f"SUCCESS: {len(rule_files())} rule files found" in result.stdout + result.stderr


def test_promtool_check_rules(promtool_bin):
    files = [str(p) for p in rule_files()]
    assert files, "no rule files"
    assert_ok(promtool("check", "rules", *files), "promtool check rules")


def test_promtool_test_rules(promtool_bin):
    tests = sorted(str(p) for p in RULE_TESTS_DIR.glob("*.yml"))
    assert tests, "no promtool rule tests"
    result = promtool("test", "rules", *tests)
    assert_ok(result, "promtool test rules")
    assert "SUCCESS" in result.stdout


# ------------------------------------------------------------------------------------------------
# Scrape configuration


def test_scrape_interval_is_the_seeds():
    assert load_yaml(PROMETHEUS / "prometheus.yml")["global"]["scrape_interval"] == "15s"
    assert load_yaml(PROMETHEUS / "prometheus-k8s.yml")["global"]["scrape_interval"] == "15s"


def test_every_service_is_scraped_on_its_admin_port(compose):
    jobs = {j["job_name"]: j for j in load_yaml(PROMETHEUS / "prometheus.yml")["scrape_configs"]}
    for service, (_, _, job) in SERVICES.items():
        assert job in jobs, f"no scrape job {job}"
        sd = jobs[job]["dns_sd_configs"]
        assert sd == [{"names": [service], "type": "A", "port": 9464, "refresh_interval": "15s"}]
        assert service in compose["services"], f"scrape job {job} names no compose service"
        env = compose["services"][service]["environment"]
        assert env[f"LLMESH_{service.upper()}_ADMIN__LISTEN"] == "0.0.0.0:9464"
        # The admin listeners want a token; Prometheus has the same file.
        token = jobs[job]["authorization"]["credentials_file"]
        assert f"./secrets/admin-token:{token}:ro" in compose["services"]["prometheus"]["volumes"]
        assert env[f"LLMESH_{service.upper()}_ADMIN__BEARER_TOKEN_FILE"].endswith("/admin-token")


def test_collector_exporter_is_scraped_with_its_labels():
    jobs = {j["job_name"]: j for j in load_yaml(PROMETHEUS / "prometheus.yml")["scrape_configs"]}
    exporter = jobs["otel-collector-exporter"]
    assert exporter["static_configs"][0]["targets"] == ["otel-collector:8889"]
    assert exporter["honor_labels"] is True, "keep job/instance from service.name/service.instance.id"


def test_kubernetes_scrape_builds_the_same_job_names():
    config = load_yaml(PROMETHEUS / "prometheus-k8s.yml")
    (job,) = config["scrape_configs"]
    relabels = job["relabel_configs"]
    to_job = [r for r in relabels if r.get("target_label") == "job"]
    assert to_job and to_job[0]["replacement"] == "llmesh-$1"
    assert to_job[0]["source_labels"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_name"]
    for service in SERVICES:
        assert re.fullmatch(to_job[0]["regex"], service)
    assert job["kubernetes_sd_configs"][0]["namespaces"]["names"] == ["llmesh"]
    assert job["authorization"]["credentials_file"], "the admin listeners want a bearer token"


# ------------------------------------------------------------------------------------------------
# Rules


def test_recording_rule_names_follow_the_convention():
    for rule in recording_rules():
        assert re.fullmatch(r"[a-z_]+:[a-z_]+:[a-z0-9_]+", rule["record"]), rule["record"]


@pytest.mark.parametrize("rule", alerting_rules(), ids=lambda r: r["alert"])
def test_alert_has_severity_summary_description_runbook(rule):
    assert rule["labels"]["severity"] in SEVERITIES
    annotations = rule["annotations"]
    assert annotations["summary"].strip()
    assert annotations["description"].strip()
    assert rule.get("for"), "a `for:` keeps a blip from paging"
    url = annotations["runbook_url"]
    assert url.startswith(RUNBOOK_PREFIX), url
    anchor = url.removeprefix(RUNBOOK_PREFIX)
    assert anchor == github_anchor(rule["alert"]), "the anchor is the alert's own heading"
    assert anchor in markdown_anchors(OPERATIONS_MD), f"docs/OPERATIONS.md has no heading for #{anchor}"


def test_alert_names_are_unique():
    names = [r["alert"] for r in alerting_rules()]
    assert len(names) == len(set(names))


def test_metric_names_in_rules_are_in_the_contract(contract, recorded_names):
    for rule in recording_rules() + alerting_rules():
        unknown = metric_names(rule["expr"]) - set(contract) - recorded_names
        assert not unknown, f"{rule.get('alert') or rule['record']}: not in docs/METRICS.md: {sorted(unknown)}"


def test_label_matchers_in_rules_are_in_the_contract(contract):
    for rule in recording_rules() + alerting_rules():
        for name, labels in selectors(rule["expr"]):
            if name not in contract:
                continue  # recording rules
            allowed = contract[name].labels | {"job", "instance"}
            assert labels <= allowed, f"{rule.get('alert') or rule['record']}: {name} has no label {sorted(labels - allowed)}"


# The seed's checklist ("configure alert rules") and the brief: what must be alerted on.
REQUIRED_ALERTS = {
    "LlmeshHighErrorRate": "llm_requests",
    "LlmeshLatencyP99High": "llm_response_time",
    "LlmeshCircuitBreakerOpen": "llmesh_breaker_state",
    "LlmeshCacheHitRateDrop": "llmesh_cache_hit",
    "LlmeshQuotaNearExhaustion": "llmesh_ratelimit_remaining_ratio",
    "LlmeshQueueBacklog": "llmesh_queue_jobs",
    "LlmeshDeadLetters": "dead_lettered",
    "LlmeshInstanceDown": "up",
    "LlmeshServiceDown": "up",
    "LlmeshComponentDown": "llmesh_component_up",
    "LlmeshHighMemory": "process_resident_memory_bytes",
}


def test_required_alerts_exist():
    rules = {r["alert"]: r for r in alerting_rules()}
    for name, needle in REQUIRED_ALERTS.items():
        assert name in rules, f"missing alert {name}"
        assert needle in rules[name]["expr"], f"{name} should watch {needle}"


def _rule_test_cases():
    for path in sorted(RULE_TESTS_DIR.glob("*.yml")):
        yield from load_yaml(path)["tests"]


@pytest.mark.parametrize("rule", alerting_rules(), ids=lambda r: r["alert"])
def test_every_alert_is_unit_tested_firing_and_quiet(rule):
    fires = quiet = False
    for case in _rule_test_cases():
        for check in case.get("alert_rule_test", []):
            if check["alertname"] != rule["alert"]:
                continue
            if check.get("exp_alerts"):
                fires = True
            else:
                quiet = True
    assert fires, f"no promtool test where {rule['alert']} fires"
    assert quiet, f"no promtool test where {rule['alert']} stays quiet"


def test_memory_alert_thresholds_follow_the_container_limits(compose):
    (rule,) = [r for r in alerting_rules() if r["alert"] == "LlmeshHighMemory"]
    thresholds = {
        m.group(1): eval(m.group(2))  # noqa: S307 - a product of literals from our own file
        for m in re.finditer(r'\{job="llmesh-(\w+)"\}\s*>\s*([\d.\s*]+)', rule["expr"])
    }
    assert set(thresholds) == set(SERVICES)
    deployments = {d["metadata"]["name"]: d for d in load_yaml_all(K8S / "gateway.yaml") + load_yaml_all(
        K8S / "generation.yaml") + load_yaml_all(K8S / "cache.yaml") + load_yaml_all(K8S / "health.yaml")
        if d["kind"] == "Deployment"}
    for service, threshold in thresholds.items():
        k8s_limit = bytes_of(deployments[service]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"])
        compose_limit = bytes_of(compose["services"][service]["deploy"]["resources"]["limits"]["memory"])
        assert k8s_limit == compose_limit, f"{service}: compose and Kubernetes memory limits differ"
        assert threshold == pytest.approx(0.8 * k8s_limit), f"{service}: alert at 80% of {k8s_limit} bytes"
