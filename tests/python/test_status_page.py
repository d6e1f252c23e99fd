"""The status page as a person sees it: Debian's Chromium, driven by Playwright, opens the health
service's /status against a running mesh (the one of live_mesh.py: Redis, keys with budgets, a
second generation replica) and follows it while traffic flows.

- Without the operator's token every path of the page answers 401; the browser is given the token
  the way a person gives it, as the password of the HTTP Basic dialog the 401 opens.
- It waits for live data (chart points and the services' health).
- A breaker opened by a failing model (sim-error) shows as open within BREAKER_SHOWN_S of the
  gateway reporting it open.
- A key's budget bar moves after calls.
- No request leaves the machine: every request the page makes is intercepted, and only the
  health service's admin listener is let through.
- Nothing secret is on the page: not the token, not an API key, not a prompt or an answer.

A screenshot of the page is saved to $LLMESH_STATUS_SCREENSHOT when set (docs/status-page.png
was made so), else to the test's temporary directory.
"""

from __future__ import annotations

import os
import re
import time
import urllib.parse
from pathlib import Path

import pytest

import live_mesh
from conftest import BIN_DIR
from live_mesh import Background, Load, http_get, wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# The bound: the page shows a breaker open this soon after the gateway reports it.
BREAKER_SHOWN_S = 2.0
# What every prompt this test sends starts with, to look for on the page.
PROMPT_MARK = "status-page-secret-prompt"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    with live_mesh.running_mesh(BIN_DIR, tmp_path_factory.mktemp("status-mesh"), status_page=True) as mesh:
        yield mesh


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright import sync_api
    except ImportError:
        pytest.fail("playwright is missing: pip install -r tests/python/requirements-observability.txt (scripts/test does)")
    assert os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} is missing (Debian package chromium; scripts/test installs it)"
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


def test_the_page_wants_the_operators_token(mesh):
    health = mesh.admin["health"]
    for path in ("/status", "/status/app.js", "/status/api/state"):
        status, _ = http_get(f"http://{health}{path}")
        assert status == 401, f"{path} without the token: {status}"
        status, _ = http_get(f"http://{health}{path}", token="not-the-token")
        assert status == 401, f"{path} with a wrong token: {status}"
    status, body = http_get(f"http://{health}/status", mesh.token)
    assert status == 200 and b"/status/app.js" in body, (status, body[:200])


def breaker_open_in_gateway(mesh, model: str) -> bool:
    pattern = re.compile(r'^llmesh_breaker_state\{[^}]*model="' + re.escape(model) + r'"[^}]*\} 2$', re.M)
    return bool(pattern.search(mesh.metrics("gateway")))


def test_chromium_follows_the_mesh_live(mesh, browser, pb, tmp_path):
    health = mesh.admin["health"]
    origin = f"http://{health}"
    allowed_host = urllib.parse.urlsplit(origin).netloc
    requests: list[str] = []
    refused: list[str] = []

    context = browser.new_context(
        http_credentials={"username": "operator", "password": mesh.token},
        viewport={"width": 1400, "height": 1000},
    )

    def intercept(route):
        url = route.request.url
        requests.append(url)
        if urllib.parse.urlsplit(url).netloc == allowed_host:
            route.continue_()
        else:
            refused.append(url)
            route.abort()

    context.route("**/*", intercept)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    load = Load(pb, mesh)
    try:
        response = page.goto(f"{origin}/status")
        assert response is not None and response.status == 200, (response and response.status, page.content()[:300])
        # Live data: chart points, and every service's health from MeshHealth.
        # (Polled from here: the page's CSP forbids the eval wait_for_function needs.)
        wait_for("chart points on the page", lambda: int(page.get_attribute("#updated", "data-seq") or 0) > 1, 15)
        for component in ("gateway", "generation", "cache", "redis"):
            page.wait_for_selector(f'#components tr[data-component="{component}"][data-status="SERVING"]', timeout=10_000)
        assert page.locator("#charts .chart svg").count() >= 6

        # A budget's bar moves after calls.
        key = live_mesh.BUDGET_KEY
        bar = f'.budget[data-scope="key"][data-name="{key}"]'
        load.generate(key, prompt=f"{PROMPT_MARK} 0")
        page.wait_for_selector(bar, timeout=10_000)
        before = float(page.get_attribute(bar, "data-share") or 0)
        width_before = page.locator(f"{bar} .bar span").bounding_box()["width"]
        for i in range(3):
            load.generate(key, prompt=f"{PROMPT_MARK} {i + 1}")
        wait_for("the budget's bar moved", lambda: float(page.get_attribute(bar, "data-share") or 0) > before, 10)
        page.wait_for_timeout(500)  # the bar's width eases over 0.3 s
        width_after = page.locator(f"{bar} .bar span").bounding_box()["width"]
        assert width_after > width_before, (width_before, width_after)

        # Traffic for the other figures: hits, streams, rate limits, shedding, jobs.
        load.mixed(rounds=1)

        # A failing model: its breaker opens in the gateway, and the page shows it soon after.
        failing = Background(lambda: load.generate("alice", model="sim-error", prompt=f"{PROMPT_MARK} x"), pause_s=0.05)
        try:
            wait_for("the gateway's breaker for sim-error open", lambda: breaker_open_in_gateway(mesh, "sim-error"), 30, 0.05)
            opened = time.monotonic()
            page.wait_for_selector(
                '#models tr[data-model="sim-error"][data-breaker="open"]', timeout=BREAKER_SHOWN_S * 1000
            )
            print(f"the page showed the breaker open {time.monotonic() - opened:.2f} s after the gateway reported it")
        finally:
            failing.stop()
        page.wait_for_selector('#models tr[data-model="sim"]', timeout=10_000)

        screenshot = Path(os.environ.get("LLMESH_STATUS_SCREENSHOT", tmp_path / "status-page.png"))
        page.screenshot(path=str(screenshot), full_page=True)
        assert screenshot.stat().st_size > 10_000

        # Nothing secret on the page, nor in what it was sent.
        shown = page.content()
        status, state = http_get(f"{origin}/status/api/state", mesh.token)
        assert status == 200
        for secret in (mesh.token, *mesh.keys.values(), PROMPT_MARK):
            assert secret not in shown, f"the page shows {secret[:12]}…"
            assert secret.encode() not in state, f"the page's data holds {secret[:12]}…"
        assert not errors, errors
    finally:
        load.close()
        context.close()
    # Nothing left the machine: every request went to the health service's admin listener.
    assert requests, "the page made no requests?"
    assert not refused, f"requests to elsewhere: {refused}"
