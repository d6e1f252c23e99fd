"""The monitoring seed's two Locust scripts (section 4), over HTTP, as the page writes them.

`LLMUser` posts the seed's single prompt; `LoadTest` posts its three prompts, short, medium and
long, as tasks weighted 3:2:1. Both `POST /generate` with `{"prompt": ...}` and an `X-API-Key`
header to the llmesh gateway's own port, which serves that route beside its gRPC API: a
locustfile written from the page works against llmesh by changing only the host and the key.

The one addition: each request is named after its prompt (`/generate short`, ...), so Locust's
statistics count the mix; the page's own file, without names, counts them all under `/generate`.

Run (host is the gateway, as `llmesh up` prints it, with http://):

    locust -f bench/locust/locustfile_http.py --host http://127.0.0.1:50051
    locust -f bench/locust/locustfile_http.py --headless -u 50 -r 10 -t 1m --host http://127.0.0.1:50051

Settings, from the environment (the defaults are the page's):
    LLMESH_LOCUST_WAIT_MIN, LLMESH_LOCUST_WAIT_MAX  seconds between a user's calls (default: LLMUser
                                                    1 to 5, LoadTest 1 to 3, as on the page)
    LLMESH_API_KEY          the X-API-Key sent (default test-key, the page's)
"""

from __future__ import annotations

import os
from typing import Any, Dict

from locust import HttpUser, between, task

# The seed's prompts: LLMUser's one, and LoadTest's three.
SEED_PROMPT = "测试提示词"
SHORT_PROMPT = "简单提示词"
MEDIUM_PROMPT = "中等长度的提示词示例"
LONG_PROMPT = "较长的提示词带有上下文信息的示例"

API_KEY = os.environ.get("LLMESH_API_KEY", "test-key")


def _wait(default_min: float, default_max: float):
    """The page's wait_time, unless the environment sets both bounds (the test runs faster)."""
    low, high = os.environ.get("LLMESH_LOCUST_WAIT_MIN"), os.environ.get("LLMESH_LOCUST_WAIT_MAX")
    if low is None or high is None:
        return between(default_min, default_max)
    low_s, high_s = float(low), float(high)
    if not 0 <= low_s <= high_s:
        raise ValueError(f"wait time bounds must satisfy 0 <= min <= max, not {low_s}, {high_s}")
    return between(low_s, high_s)


class LLMUser(HttpUser):
    """The page's first script."""

    wait_time = _wait(1, 5)

    @task
    def generate_text(self):
        self.client.post(
            "/generate",
            json={"prompt": SEED_PROMPT},
            headers={"X-API-Key": API_KEY},
            name="/generate seed",
        )


class LoadTest(HttpUser):
    """The page's stress-test configuration: three prompts at 3:2:1."""

    wait_time = _wait(1, 3)

    def on_start(self):
        self.headers = {"X-API-Key": API_KEY}
        self.test_prompts = [SHORT_PROMPT, MEDIUM_PROMPT, LONG_PROMPT]

    @task(3)
    def test_short_prompt(self):
        self._send_request(self.test_prompts[0], "short")

    @task(2)
    def test_medium_prompt(self):
        self._send_request(self.test_prompts[1], "medium")

    @task(1)
    def test_long_prompt(self):
        self._send_request(self.test_prompts[2], "long")

    def _send_request(self, prompt: str, size: str) -> Dict[str, Any]:
        return self.client.post(
            "/generate",
            json={"prompt": prompt},
            headers=self.headers,
            name=f"/generate {size}",
        )
