"""Self-test of the benchmark harness: --quick runs of the scenarios against the built binaries.

    cargo build --workspace --bins
    .venv/bin/python -m pytest -q bench/test_bench.py

Binaries from $LLMESH_BIN_DIR (default target/debug). Bounded: the harness gets --max-time (90 s;
150 for the cpu scenario) and the test kills it a minute later. Checks that it exits 0, writes report.md with both sections and a
raw `llmesh load` JSON per run, and leaves no process behind.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
BIN_DIR = Path(os.environ.get("LLMESH_BIN_DIR", ROOT / "target" / "debug"))


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def run_quick(tmp_path, scenarios, max_time=90, extra=()):
    """`bench/run --quick --scenarios SCENARIOS [EXTRA...]` into tmp_path/bench, bounded: fails the
    test when it does not finish within a minute past MAX_TIME or exits non-zero. Returns (out directory, report.md's
    text)."""
    out = tmp_path / "bench"
    argv = [sys.executable, str(BENCH / "run"), "--quick", "--scenarios", scenarios,
            "--bin-dir", str(BIN_DIR), "--out", str(out), "--max-time", str(max_time), *extra]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=max_time + 60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        output, _ = proc.communicate(timeout=20)
        pytest.fail(f"bench/run --quick --scenarios {scenarios} did not finish within {max_time + 60} s:\n{output[-4000:]}")
    assert proc.returncode == 0, f"bench/run exited {proc.returncode}:\n{output[-4000:]}"
    return out, (out / "report.md").read_text()


def assert_nothing_left_running(out):
    """Every process the run started (logs/pids.txt) is gone."""
    time.sleep(0.5)
    pids = [int(line.split()[0]) for line in (out / "logs" / "pids.txt").read_text().splitlines() if line.strip()]
    assert not [pid for pid in pids if alive(pid)]


def test_quick_overhead_cache_and_memory(tmp_path):
    missing = [n for n in ("gateway", "generation", "cache", "health", "llmesh") if not (BIN_DIR / n).exists()]
    assert not missing, f"build the binaries first (cargo build --workspace --bins): {missing} not in {BIN_DIR}"
    out = tmp_path / "bench"
    argv = [sys.executable, str(BENCH / "run"), "--quick", "--scenarios", "overhead,cache,memory",
            "--bin-dir", str(BIN_DIR), "--out", str(out), "--max-time", "120"]
    started = time.monotonic()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        output, _ = proc.communicate(timeout=20)
        pytest.fail(f"bench/run --quick did not finish within 150 s:\n{output[-4000:]}")
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, f"bench/run exited {proc.returncode}:\n{output[-4000:]}"

    report = (out / "report.md").read_text()
    assert "## 1. Gateway overhead" in report, report
    assert "## 2. Cache-hit path" in report, report
    assert "## 5. Memory" in report, report
    # Every `llmesh load` the report lists ran with the services' worker-thread count.
    loads = [line for line in report.splitlines() if "/llmesh load " in line]
    assert loads and all("LLMESH_WORKER_THREADS=1 " in line for line in loads), loads
    assert "load average" in report and "cores" in report
    assert "## Targets" in report

    raws = sorted((out / "raw").glob("*.json"))
    names = [p.name for p in raws]
    assert any("overhead-direct-200" in n for n in names), names
    assert any("overhead-gateway-200" in n for n in names), names
    assert any("cache-hit-memory-200" in n for n in names), names
    assert any("memory-steady" in n and n.endswith("-rss.json") for n in names), names
    for path in (p for p in raws if not p.name.endswith("-rss.json")):
        data = json.loads(path.read_text())
        assert data["schema"] == "llmesh.load.v1", path
        assert data["successes"] > 0, (path, data["codes"])
    # Hits, nearly all: on the loaded debug build a stall past the gateway's 20 ms cache budget
    # turns a burst of lookups into misses (the real cache path was 0.9825 once); a broken one
    # gives no hits at all.
    for run in ("cache-hit-memory-200", "cache-hit-near-200"):
        hits = json.loads(next(p for p in raws if run in p.name).read_text())
        assert hits["cache_hit_share"] > 0.9, hits
    assert "near cache (the default) p99" in report
    # The gateway's own overhead histogram, read around the run, counted every answered call.
    gateway = json.loads(next(p for p in raws if "overhead-gateway-200" in p.name).read_text())
    own = next(line for line in report.splitlines() if line.startswith("| 200 | ") and "%" in line)
    assert own.split("|")[2].strip() == str(gateway["successes"]), own
    direct = json.loads(next(p for p in raws if "overhead-direct-200" in p.name).read_text())
    assert direct["service"] == "generation" and direct["unique"], direct

    summary = json.loads((out / "summary.json").read_text())
    assert summary["facts"]["nproc"] >= 1
    assert any("1 ms" in v["target"] for v in summary["verdicts"]), summary["verdicts"]

    # Everything the harness started is gone.
    time.sleep(0.5)
    pids = [int(line.split()[0]) for line in (out / "logs" / "pids.txt").read_text().splitlines() if line.strip()]
    assert len(pids) >= 6
    left = [pid for pid in pids if alive(pid)]
    assert not left, f"processes left running: {left}"
    print(f"bench/run --quick overhead,cache took {elapsed:.1f} s")


def test_httpload_against_mock(tmp_path):
    """The LiteLLM scenario's HTTP pieces, without LiteLLM: the mock answers, the client counts."""
    mock = subprocess.Popen([sys.executable, str(BENCH / "mock_openai.py"), "--port", "0"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = mock.stderr.readline()
        assert "listening on 127.0.0.1:" in line, line
        addr = line.split("listening on ", 1)[1].strip()
        report_path = tmp_path / "http.json"
        run = subprocess.run([sys.executable, str(BENCH / "httpload.py"), "--url", f"http://{addr}/v1/chat/completions",
                              "--concurrency", "4", "--duration", "1", "--json", str(report_path)],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        report = json.loads(report_path.read_text())
        assert report["successes"] > 10 and report["errors"] == 0, report
        assert report["codes"] == {"200": report["successes"]}
        assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["p99"] <= report["latency_ms"]["max"]
    finally:
        mock.terminate()
        mock.wait(timeout=10)


def test_quick_http_against_grpc(tmp_path):
    """The http scenario: the same load over gRPC and over HTTP through one gateway, with its CPU per call."""
    out, report = run_quick(tmp_path, "http")
    assert "## 3b. gRPC against HTTP" in report, report
    assert "--protocol http" in report, report
    raws = {p.name: json.loads(p.read_text()) for p in (out / "raw").glob("*.json")}
    http = [r for name, r in raws.items() if "-http-http-" in name or "-http-stream-http-" in name]
    grpc = [r for name, r in raws.items() if "-http-grpc-" in name or "-http-stream-grpc-" in name]
    assert len(http) == 2 and len(grpc) == 2, sorted(raws)
    for r in http + grpc:
        assert r["successes"] > 0 and r["errors"] == 0, r["codes"]
    assert all(r["protocol"] == "http" for r in http) and all(r["protocol"] == "grpc" for r in grpc)
    assert all(r["ttft_ms"] for r in http + grpc if r["rpc"] == "GenerateStream")
    # The CPU per call columns are filled (a number of µs, not the dash of a missing figure).
    rows = [line for line in report.splitlines() if line.startswith("| 200 |")]
    assert len(rows) == 2 and all(line.split("|")[8].strip().isdigit() for line in rows), rows
    assert_nothing_left_running(out)


def test_quick_budgets_on_against_off(tmp_path):
    """The budgets scenario: the same key through a gateway with spend budgets and one without."""
    out, report = run_quick(tmp_path, "budgets")
    assert "## 3c. Spend budgets on against off" in report, report
    raws = {p.name: json.loads(p.read_text()) for p in (out / "raw").glob("*.json")}
    on = [r for name, r in raws.items() if "budgets-on-" in name or "budgets-closed1-on" in name]
    off = [r for name, r in raws.items() if "budgets-off-" in name or "budgets-closed1-off" in name]
    assert len(on) == 2 and len(off) == 2, sorted(raws)
    for r in on + off:
        assert r["successes"] > 0 and r["errors"] == 0, r["codes"]
    # The "on" gateway was given the keys file with the budgets.
    assert "budget = { usd = 1000000.0" in (out / "keys-with-budgets.toml").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| 200 |")]
    assert len(rows) == 1 and all(cell.strip() != "" for cell in rows[0].split("|")[1:-1]), rows
    assert_nothing_left_running(out)


def test_quick_tls_against_plaintext(tmp_path):
    """The tls scenario: the same calls through a plaintext mesh and a TLS one (TLS at the gateway,
    mTLS behind it), against generation directly, with CPU per call of the gateway and the mesh."""
    out, report = run_quick(tmp_path, "tls")
    assert "## 3d. TLS on against off" in report, report
    raws = {p.name: json.loads(p.read_text()) for p in (out / "raw").glob("*.json")}

    def runs(kind):
        return [r for name, r in raws.items() if f"tls-{kind}-" in name or f"tls-closed1-{kind}" in name]

    direct, plain, tls = runs("direct"), runs("plain"), runs("tls")
    assert len(direct) == 2 and len(plain) == 2 and len(tls) == 2, sorted(raws)
    for r in direct + plain + tls:
        assert r["successes"] > 0 and r["errors"] == 0, r["codes"]
    # The plaintext runs and the TLS ones went where they say: generation and a gateway in
    # plaintext, a gateway over TLS (the client given the run's CA).
    assert all(r["target"].startswith("http://") for r in direct + plain), [r["target"] for r in direct + plain]
    assert all(r["target"].startswith("https://") and r["service"] == "gateway" for r in tls)
    assert all(r["service"] == "generation" for r in direct)
    assert "--cacert" in report and (out / "certs" / "ca.pem").exists()
    # The TLS mesh is one: the gateway serves TLS and calls over mTLS; generation and the cache
    # (which it reached: it starts only once they answer) take nothing else.
    logs = {name: next((out / "logs").glob(f"*-{name}.log")).read_text()
            for name in ("gateway-tls", "generation-tls", "cache-tls", "gateway-plain")}
    assert "serving TLS client_certificates=false" in logs["gateway-tls"], logs["gateway-tls"][-2000:]
    assert "mesh calls use TLS mutual=true" in logs["gateway-tls"], logs["gateway-tls"][-2000:]
    for name in ("generation-tls", "cache-tls"):
        assert "serving TLS client_certificates=true" in logs[name], logs[name][-2000:]
    assert "serving TLS" not in logs["gateway-plain"]
    # Both tables have their row, every cell filled; the CPU per call cells are numbers.
    rows = [line for line in report.splitlines() if line.startswith("| 200 |")]
    assert len(rows) == 2, rows
    for row in rows:
        assert all(cell.strip() not in ("", "–") for cell in row.split("|")[1:-1]), row
    cpu = rows[1].split("|")[2:-1]
    assert all(cell.strip().lstrip("-").isdigit() for cell in cpu), rows[1]
    assert_nothing_left_running(out)


def test_quick_cpu_against_the_floor(tmp_path):
    """The cpu scenario: every path saturated by h2load (misses by `llmesh load --unique`) against
    the bare HTTP/2 floor, at both log filters, each run counted only when every call was
    answered as expected by the served service's own metrics; --profile saves a flamegraph per
    service and run."""
    assert (BIN_DIR / "floor").exists(), f"build the binaries first (cargo build --workspace --bins): no floor in {BIN_DIR}"
    out, report = run_quick(tmp_path, "cpu", max_time=150, extra=["--profile"])
    assert "## 3e. CPU per call against the bare HTTP/2 floor" in report, report
    blocks = [line for line in report.splitlines() if line.startswith("### 1 worker thread per service, RUST_LOG=")]
    assert blocks == ["### 1 worker thread per service, RUST_LOG=info", "### 1 worker thread per service, RUST_LOG=warn"]
    titles = ["the floor", "generation directly", "near-cache hit", "cache-service hit", "cache bypass", "cache miss",
              "near-cache hit, auth", "cache-service hit, auth", "cache bypass, auth", "cache miss, auth",
              "cache bypass, auth + Redis rate limit + budgets"]
    rows = [line for line in report.splitlines() if line.startswith("| ") and line.endswith(" |") and " yes |" in line]
    for title in titles:
        assert sum(title in row for row in rows) >= 2, (title, report)
    # Every run counted (no "no: why" cell) and every CPU per call cell of the called process is a number.
    assert "| no: " not in report, report
    for row in rows:
        assert float(row.split("|")[3]) > 0, row
    # The floor is the unit of the ratios: the served process's µs over the floor's.
    assert any("Gateway's near-cache hit within 3×" in line for line in report.splitlines())
    summary = json.loads((out / "summary.json").read_text())
    verdicts = {v["target"]: v["verdict"] for v in summary["verdicts"]}
    assert all(verdicts[t] in ("met", "not met") for t in verdicts if "floor" in t or "bypass" in t), verdicts
    # h2load's own output is kept for every saturation run, and the miss runs' JSON reports.
    assert len(list((out / "raw").glob("*-cpu-*.h2load.txt"))) == 18
    assert len(list((out / "raw").glob("*-cpu-miss-*.json"))) == 4
    profiles = sorted(p.name for p in (out / "profiles").glob("*.svg"))
    assert any(n.startswith("near-plain-w1-info-gateway") for n in profiles), profiles
    assert all((out / "profiles" / n).read_text().lstrip().startswith("<?xml") for n in profiles[:3])
    assert_nothing_left_running(out)


def test_quick_ingress_through_the_mesh_and_direct(tmp_path):
    """The ingress scenario: a 1 KiB OpenAI chat request over HTTP/1.1 keep-alive (h2load --h1, 32
    connections) straight to the bare upstream (bench/floor --mode openai), through the gateway and
    generation's openai provider to it, and to bench/mock_openai.py; every run counted, with the CPU
    per call of each process."""
    assert (BIN_DIR / "floor").exists(), f"build the binaries first (cargo build --workspace --bins): no floor in {BIN_DIR}"
    out, report = run_quick(tmp_path, "ingress", extra=["--ingress-duration", "1"])
    assert "## 7. HTTP ingress against a real upstream shape" in report, report
    assert len((out / "ingress-request.json").read_bytes()) == 1024
    rows = {line.split("|")[1].strip(): line for line in report.splitlines()
            if line.startswith(("| direct |", "| mesh |", "| mock |"))}
    assert set(rows) == {"direct", "mesh", "mock"}, report
    for case, row in rows.items():
        assert row.rstrip().endswith("| yes |"), row
        assert float(row.split("|")[2]) > 0, row
    mesh = rows["mesh"].split("|")
    # gateway, generation and mesh µs per call are numbers.
    assert all(float(mesh[i]) > 0 for i in (4, 5, 6)), rows["mesh"]
    assert len(list((out / "raw").glob("*-ingress-*.h2load.txt"))) == 3
    summary = json.loads((out / "summary.json").read_text())
    assert any("HTTP ingress" in v["target"] and v["verdict"] in ("met", "not met") for v in summary["verdicts"])
    assert_nothing_left_running(out)


def celery_python():
    """A Python that has celery[redis] (bench/requirements-celery.txt), or None."""
    for py in (BENCH / ".venv-celery" / "bin" / "python", Path(sys.executable)):
        if py.exists() and subprocess.run([str(py), "-c", "import celery, redis"], capture_output=True).returncode == 0:
            return py
    return None


def test_queue_wait_is_read_from_the_records_start():
    """llmesh's paced figures from its job records: submit→done is created → updated, the wait alone
    created → started, of the SUCCEEDED jobs only; a queue that keeps no start gives no wait."""
    sys.path.insert(0, str(BENCH))
    try:
        import queue_bench
    finally:
        sys.path.remove(str(BENCH))
    ok, queued = queue_bench.SUCCEEDED, b"JOB_STATE_QUEUED"
    records = [(ok, 100, 130, 125), (ok, 200, 204, 203), (queued, 300, 300, None), (b"JOB_STATE_FAILED", 1, 9, 2)]
    assert queue_bench.paced_times(records) == ([30, 4], [25, 3])
    assert queue_bench.paced_times([(ok, 100, 130, None)]) == ([30], None)


def test_quick_queue_against_celery(tmp_path):
    """The queue scenario, small: a backlog drained by 1 and 2 workers of llmesh's queue and of
    Celery on one Redis, then paced runs; nothing lost, every figure filled in."""
    py = celery_python()
    if py is None:
        pytest.skip("celery[redis] is not installed: pip install -r bench/requirements-celery.txt "
                    "(into this venv or bench/.venv-celery)")
    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not installed")
    out, report = run_quick(tmp_path, "queue", max_time=150,
                            extra=["--queue-workers", "1,2", "--queue-jobs", "100", "--queue-duration", "1",
                                   "--celery-python", str(py), "--no-install"])
    assert "## 8. The job queue against Celery" in report, report
    rows = [line for line in report.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert len(rows) == 2, report
    for row in rows:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert all(c not in ("", "–") for c in cells), row
        assert cells[-1] == "0 / 0", row  # nothing lost
    paced = [line for line in report.splitlines() if line.startswith(("| llmesh |", "| celery |"))]
    assert len(paced) == 8, report
    for row in paced:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert cells[6] == "0" and cells[4] == cells[5], row  # lost, submitted = SUCCEEDED
        assert cells[9] != "–" and cells[10] != "–", row  # the wait alone, llmesh's from its records' starts
    summary = json.loads((out / "summary.json").read_text())
    assert any("Celery" in v["target"] and v["verdict"] != "not measured" for v in summary["verdicts"])
    assert_nothing_left_running(out)
