"""Keeps bench/locust/locustfile.py working: the seed's task weights, and short headless Locust
runs against a real mesh (`llmesh up --base-port 0`, binary from $LLMESH_BIN_DIR, default
<repo>/target/debug) that must send requests and see no failure.

Locust runs in a child process (as a user runs it), so its gevent patching never touches pytest.
Run: .venv/bin/python -m pytest -q bench/locust
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
LOCUSTFILE = HERE / "locustfile.py"
BIN_DIR = Path(os.environ.get("LLMESH_BIN_DIR", REPO / "target" / "debug"))

# The mesh fixture is the Python tests' own (tests/python/mesh_process.py).
sys.path.insert(0, str(REPO / "tests" / "python"))
import mesh_process  # noqa: E402

STARTUP_TIMEOUT_S = 20.0
# A headless run may take this long beyond its -t (start-up, stub generation, shutdown).
RUN_SLACK_S = 20.0


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory):
    """A running mesh; yields the gateway's host:port. Stopped with SIGTERM afterwards."""
    try:
        mesh = mesh_process.running(BIN_DIR / "llmesh", tmp_path_factory.mktemp("mesh"), STARTUP_TIMEOUT_S)
        with mesh as addresses:
            yield addresses["gateway"]
    except mesh_process.MeshError as error:
        pytest.fail(str(error))


def test_tasks_are_the_seeds_prompts_weighted_3_2_1() -> None:
    script = """
import json, collections, locustfile as lf
counts = collections.Counter(t.__name__ for t in lf.GatewayUser.tasks)
prompts = [lf.SHORT_PROMPT, lf.MEDIUM_PROMPT, lf.LONG_PROMPT]
wait = [lf.GatewayUser.wait_time(None) for _ in range(200)]
print(json.dumps({"counts": counts, "prompts": prompts, "wait": [min(wait), max(wait)], "key": lf.API_KEY}))
"""
    env = {**os.environ, "LLMESH_LOCUST_WAIT_MIN": "0.5", "LLMESH_LOCUST_WAIT_MAX": "0.75"}
    env.pop("LLMESH_API_KEY", None)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=HERE, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["counts"] == {"short_prompt": 3, "medium_prompt": 2, "long_prompt": 1}
    assert found["prompts"] == ["简单提示词", "中等长度的提示词示例", "较长的提示词带有上下文信息的示例"]
    assert 0.5 <= found["wait"][0] <= found["wait"][1] <= 0.75, found["wait"]
    assert found["key"] == "test-key"


@pytest.mark.parametrize(("stream", "seconds"), [("0", 5), ("1", 3)], ids=["Generate", "GenerateStream"])
def test_a_headless_run_sends_requests_without_failures(
    gateway: str, tmp_path: Path, stream: str, seconds: int
) -> None:
    env = {
        **os.environ,
        "LLMESH_LOCUST_WAIT_MIN": "0.05",
        "LLMESH_LOCUST_WAIT_MAX": "0.2",
        "LLMESH_LOCUST_STREAM": stream,
    }
    csv_prefix = tmp_path / "locust"
    command = [
        sys.executable, "-m", "locust",
        "-f", str(LOCUSTFILE),
        "--headless", "-u", "5", "-r", "5", "-t", f"{seconds}s",
        "--host", gateway,
        "--csv", str(csv_prefix),
        "--only-summary",
    ]  # fmt: skip
    # In tmp_path: no locust.conf from the caller's directory applies.
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=seconds + RUN_SLACK_S
    )
    output = f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
    assert result.returncode == 0, output

    with open(f"{csv_prefix}_stats.csv", newline="") as f:
        rows = {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}
    name = "GenerateStream" if stream == "1" else "Generate"
    assert ("grpc", name) in rows, f"{rows}\n{output}"
    total = rows[("", "Aggregated")]
    assert int(total["Request Count"]) > 0, output
    assert int(total["Failure Count"]) == 0, output


LOCUSTFILE_HTTP = HERE / "locustfile_http.py"


def test_the_seeds_http_users_run_headless_against_post_generate(gateway: str, tmp_path: Path) -> None:
    """The seed's two HttpUser scripts, headless: every request succeeds, and LoadTest's three
    prompts are sent about 3:2:1."""
    env = {**os.environ, "LLMESH_LOCUST_WAIT_MIN": "0.02", "LLMESH_LOCUST_WAIT_MAX": "0.1"}
    env.pop("LLMESH_API_KEY", None)
    seconds = 8
    csv_prefix = tmp_path / "locust-http"
    command = [
        sys.executable, "-m", "locust",
        "-f", str(LOCUSTFILE_HTTP),
        "--headless", "-u", "6", "-r", "6", "-t", f"{seconds}s",
        "--host", f"http://{gateway}",
        "--csv", str(csv_prefix),
        "--only-summary",
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=seconds + RUN_SLACK_S
    )
    output = f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
    assert result.returncode == 0, output

    with open(f"{csv_prefix}_stats.csv", newline="") as f:
        rows = {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}
    total = rows[("", "Aggregated")]
    assert int(total["Failure Count"]) == 0, output
    counts = {}
    for size in ("short", "medium", "long", "seed"):
        row = rows.get(("POST", f"/generate {size}"))
        assert row is not None, f"no /generate {size} in {sorted(rows)}\n{output}"
        assert int(row["Failure Count"]) == 0, row
        counts[size] = int(row["Request Count"])
        assert counts[size] > 0, row
    # 3:2:1 within Locust's randomness: each share within five standard deviations of its weight.
    mix = counts["short"] + counts["medium"] + counts["long"]
    print(f"locust http mix: {counts}")
    assert mix >= 30, f"too few requests to judge the mix: {counts}\n{output}"
    for size, weight in (("short", 3 / 6), ("medium", 2 / 6), ("long", 1 / 6)):
        sigma = (weight * (1 - weight) / mix) ** 0.5
        assert abs(counts[size] / mix - weight) <= 5 * sigma, f"{size}: {counts}"


def test_the_http_users_are_the_seeds() -> None:
    script = """
import json, collections, locustfile_http as lf
counts = collections.Counter(t.__name__ for t in lf.LoadTest.tasks)
wait = [lf.LoadTest.wait_time(None) for _ in range(200)] + [lf.LLMUser.wait_time(None) for _ in range(200)]
print(json.dumps({"counts": counts, "prompts": [lf.SEED_PROMPT, lf.SHORT_PROMPT, lf.MEDIUM_PROMPT, lf.LONG_PROMPT],
                  "wait": [min(wait), max(wait)], "key": lf.API_KEY}))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMESH_LOCUST_WAIT") and k != "LLMESH_API_KEY"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=HERE, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["counts"] == {"test_short_prompt": 3, "test_medium_prompt": 2, "test_long_prompt": 1}
    assert found["prompts"] == ["测试提示词", "简单提示词", "中等长度的提示词示例", "较长的提示词带有上下文信息的示例"]
    assert 1 <= found["wait"][0] <= found["wait"][1] <= 5, found["wait"]
    assert found["key"] == "test-key"
