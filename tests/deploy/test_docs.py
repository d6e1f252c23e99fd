"""docs/OPERATIONS.md: a runbook per alert, working links, every service's scaling explained."""

from __future__ import annotations

import re

import pytest

from support import OPERATIONS_MD, REPO, SERVICES, alerting_rules, github_anchor, markdown_anchors

TEXT = OPERATIONS_MD.read_text()


def section(heading: str) -> str:
    """The text under a heading, up to the next heading of the same or a higher level."""
    m = re.search(rf"^(#+) {re.escape(heading)}\s*$", TEXT, re.M)
    assert m, f"no heading {heading!r}"
    level = len(m.group(1))
    rest = TEXT[m.end():]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.M)
    return rest[: end.start()] if end else rest


@pytest.mark.parametrize("rule", alerting_rules(), ids=lambda r: r["alert"])
def test_every_alert_has_a_runbook_with_steps(rule):
    body = section(rule["alert"])
    assert re.search(r"^1\. ", body, re.M), f"the runbook for {rule['alert']} has no steps"


def test_runbooks_are_the_alerts_and_nothing_else():
    runbooks = re.findall(r"^### (\w+)\s*$", section("Runbooks"), re.M)
    assert sorted(runbooks) == sorted(r["alert"] for r in alerting_rules())


def test_internal_links_resolve():
    anchors = markdown_anchors(OPERATIONS_MD)
    for target in re.findall(r"\]\(#([^)]+)\)", TEXT):
        assert target in anchors, f"broken link #{target}"


def test_relative_links_resolve():
    for target in re.findall(r"\]\(((?!https?:|#)[^)#]+)(?:#[^)]*)?\)", TEXT):
        assert (OPERATIONS_MD.parent / target).exists(), f"broken link {target}"


# Made by the operator before the first `up` (git-ignored): only their directories are in the repository.
OPERATOR_MADE = ("deploy/certs/", "deploy/secrets/")


def test_repository_paths_mentioned_exist():
    for path in set(re.findall(r"`((?:deploy|otel-collector|docs|tests)/[\w./-]+)`", TEXT)):
        if path.startswith(OPERATOR_MADE) and path not in OPERATOR_MADE:
            assert (REPO / path).parent.is_dir(), f"docs/OPERATIONS.md mentions {path} in a missing directory"
            continue
        assert (REPO / path.rstrip("/")).exists(), f"docs/OPERATIONS.md mentions missing {path}"


def test_scaling_covers_every_service_and_redis():
    body = section("Scaling")
    for name in [*SERVICES, "redis"]:
        assert re.search(rf"^\*\*{name}\*\*", body, re.M | re.I), f"no scaling paragraph for {name}"
    assert "headless" in body and "dns://generation:50052" in body


def test_limits_table_names_what_each_limit_protects():
    # The table before the section's subsections (those have tables of their own).
    body = re.split(r"^### ", section("Limits and what they protect"), flags=re.M)[0]
    rows = [line for line in body.splitlines() if line.startswith("| ") and not line.startswith("| limit")]
    assert len(rows) >= 10
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 3 and all(cells), f"incomplete row: {row}"


def test_anchor_function_matches_github():
    assert github_anchor("Limits and what they protect") == "limits-and-what-they-protect"
    assert github_anchor("LlmeshHighErrorRate") == "llmeshhigherrorrate"
    assert github_anchor("The seed's checklist, and where each item lives") == "the-seeds-checklist-and-where-each-item-lives"
