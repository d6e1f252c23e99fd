"""A mesh as an operator runs it, for the tests that watch it: a real redis-server, `llmesh up`
with API keys (teams, budgets, rate limits, a bounded key), prices, the job queue and rate limits in
Redis, an admin listener with /metrics on every service behind the operator's token, and a second
generation replica outside `llmesh up` that a test may kill (killing one `llmesh up` started stops
the whole mesh).

`running_mesh(bin_dir, tmp)` yields a `LiveMesh`; `Load` drives traffic through the gateway.
Everything listens on 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import grpc

import mesh_process

CALL_TIMEOUT_S = 10.0
ADMIN_SERVICES = ("gateway", "generation", "cache", "health")

# Prices per million tokens: whole micro-dollars a token, so the budget figures are exact.
SIM_PRICE = (1000.0, 2000.0)
# The key whose budget the tests fill to 80-100% (the budget alert, the status page's bar). A call
# reserves about $0.15 (its prompt at the byte bound, 64 + 16 + 37 tokens, and 16 output tokens) and
# costs about $0.05, so the budget must leave room for a reservation past 80%: $2.
BUDGET_KEY = "budgeted"
BUDGET_USD = 2.0
# A key with a budget too small for any call: its calls are refused (llmesh_budget_refusals_total).
BROKE_KEY = "broke"
# A key with a tiny request rate (rate-limit rejections).
LIMITED_KEY = "limited"
# A key with one call in flight at a time (load shedding, reason key_concurrency).
SERIAL_KEY = "serial"
# A key with nothing of its own (no team, no budget: it may call unpriced models).
PLAIN_KEY = "plain"
# Keys of the team "research", which has a budget of its own.
TEAM = "research"
TEAM_KEYS = ("alice", "bob")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(what: str, check, within_s: float, interval_s: float = 0.1):
    """Calls `check()` until it returns something truthy (returned), for at most `within_s`."""
    deadline = time.monotonic() + within_s
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"{what}: not within {within_s:.0f} s (last: {last!r})")


def http_get(url: str, token: str | None = None, timeout_s: float = 5.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def answers(url: str, token: str | None = None) -> bool:
    """Whether `url` answers 200 (false while nothing listens there yet)."""
    try:
        return http_get(url, token, timeout_s=2)[0] == 200
    except OSError:
        return False


@dataclasses.dataclass
class Redis:
    port: int
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[Redis]:
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(directory)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    redis = Redis(port, process)
    try:
        def answers() -> bool:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
            return False

        wait_for("redis-server answers PING", answers, 10)
        yield redis
    finally:
        redis.stop()


def api_key(key_id: str) -> tuple[str, str]:
    """A key in the gateway's `lk_<8 hex>_<secret>` shape and its `[[keys]]` entry's first lines."""
    prefix = f"lk_{secrets.token_hex(4)}"
    key = f"{prefix}_{secrets.token_urlsafe(24).replace('-', 'a').replace('_', 'b')}"
    digest = hashlib.sha256(key.encode()).hexdigest()
    return key, f'id = "{key_id}"\nprefix = "{prefix}"\nsha256 = "{digest}"\n'


@dataclasses.dataclass
class LiveMesh:
    addresses: dict[str, str]
    # Each service's admin listener, "127.0.0.1:PORT" (health's also serves the status page).
    admin: dict[str, str]
    # The second generation replica's admin listener (it is scraped as job llmesh-generation too).
    extra_generation_admin: str
    extra_generation: subprocess.Popen
    token: str
    token_file: Path
    keys: dict[str, str]
    redis: Redis
    log_dir: Path

    def kill_extra_generation(self) -> None:
        if self.extra_generation.poll() is None:
            self.extra_generation.send_signal(signal.SIGKILL)
            self.extra_generation.wait(timeout=10)

    def metrics(self, service: str) -> str:
        status, body = http_get(f"http://{self.admin[service]}/metrics", self.token)
        assert status == 200, f"{service} /metrics answered {status}: {body[:200]!r}"
        return body.decode()


def _config(redis: Redis, keys_file: Path) -> str:
    price = f"input_per_million = {SIM_PRICE[0]}\noutput_per_million = {SIM_PRICE[1]}\n"
    return f"""
[gateway.auth]
keys_file = "{keys_file}"

[gateway.rate_limit]
redis_url = "{redis.url}"
redis_timeout_ms = 200
# Every call gets a decision (0 would be unlimited, and undecided).
requests_per_minute = 100000

[gateway.prices.sim]
{price}
[gateway.prices.sim-slow]
{price}
[gateway.prices.sim-error]
{price}
[generation.queue.options]
max_retries = 0
"""


def _keys() -> tuple[dict[str, str], str]:
    keys: dict[str, str] = {}
    text = f'[[teams]]\nname = "{TEAM}"\nbudget = {{ usd = 100.0 }}\n\n'
    extras = {
        BUDGET_KEY: f"budget = {{ usd = {BUDGET_USD} }}\n",
        BROKE_KEY: "budget = { usd = 0.000001 }\n",
        LIMITED_KEY: "requests_per_minute = 2\n",
        SERIAL_KEY: "max_in_flight = 1\n",
        PLAIN_KEY: "",
        **{name: f'team = "{TEAM}"\n' for name in TEAM_KEYS},
    }
    for key_id, extra in extras.items():
        key, entry = api_key(key_id)
        keys[key_id] = key
        text += f"[[keys]]\n{entry}{extra}\n"
    return keys, text


def _service_env(service: str, admin: str, token_file: Path) -> dict[str, str]:
    prefix = f"LLMESH_{service.upper()}_ADMIN__"
    return {f"{prefix}LISTEN": admin, f"{prefix}BEARER_TOKEN_FILE": str(token_file)}


@contextlib.contextmanager
def running_mesh(
    bin_dir: Path, directory: Path, status_page: bool = False, extra_env: dict[str, str] | None = None
) -> Iterator[LiveMesh]:
    binary = bin_dir / "llmesh"
    token = secrets.token_urlsafe(24)
    token_file = directory / "admin-token"
    token_file.write_text(token + "\n")
    keys, keys_text = _keys()
    keys_file = directory / "keys.toml"
    keys_file.write_text(keys_text)
    with redis_server(directory) as redis:
        config = directory / "mesh.toml"
        config.write_text(_config(redis, keys_file))
        admin = {service: f"127.0.0.1:{free_port()}" for service in ADMIN_SERVICES}
        extra_admin = f"127.0.0.1:{free_port()}"
        env = {"LLMESH_CONFIG": str(config), "LLMESH_GENERATION_FAULT_MODELS": "true"}
        for service, address in admin.items():
            env.update(_service_env(service, address, token_file))
        if status_page:
            # Health's status page reads every service's /metrics (the second replica's too).
            sources = [f'{{service="{s}",address="http://{a}"}}' for s, a in admin.items()]
            sources.append(f'{{service="generation",address="http://{extra_admin}"}}')
            env["LLMESH_HEALTH_STATUS__SOURCES"] = f"[{','.join(sources)}]"
        env.update(extra_env or {})
        with mesh_process.running(binary, directory, env=env, args=["--redis-url", redis.url]) as addresses:
            extra_log = open(directory / "extra-generation.log", "wb")
            extra = subprocess.Popen(
                [str(binary), "serve", "generation", "--listen", "127.0.0.1:0"],
                stdin=subprocess.DEVNULL,
                stdout=extra_log,
                stderr=extra_log,
                env={
                    **os.environ,
                    **env,
                    "LLMESH_GENERATION_QUEUE__REDIS_URL": redis.url,
                    **_service_env("generation", extra_admin, token_file),
                },
                start_new_session=True,
            )
            try:
                mesh = LiveMesh(addresses, admin, extra_admin, extra, token, token_file, keys, redis, directory)
                for service, address in [*admin.items(), ("generation (second replica)", extra_admin)]:
                    wait_for(
                        f"{service}'s admin listener {address}",
                        lambda address=address: answers(f"http://{address}/healthz", token),
                        20,
                    )
                yield mesh
            finally:
                if extra.poll() is None:
                    extra.terminate()
                    try:
                        extra.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        extra.kill()
                        extra.wait(timeout=5)
                extra_log.close()


class Load:
    """Traffic through the gateway's gRPC API, with the stubs the `pb` fixture generated."""

    def __init__(self, pb, mesh: LiveMesh) -> None:
        self.pb = pb
        self.mesh = mesh
        self.channel = grpc.insecure_channel(mesh.addresses["gateway"])
        grpc.channel_ready_future(self.channel).result(timeout=10)
        self.stub = pb.gateway_pb2_grpc.GatewayStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def _meta(self, key_id: str):
        return (("x-api-key", self.mesh.keys[key_id]),)

    def generate(self, key_id: str, model: str = "sim", prompt: str | None = None, max_tokens: int = 16):
        """(status code, response or None, trailing metadata)."""
        request = self.pb.gateway_pb2.GenerateRequest(
            model=model, prompt=prompt or f"load {uuid.uuid4().hex}", max_tokens=max_tokens
        )
        try:
            response, call = self.stub.Generate.with_call(request, metadata=self._meta(key_id), timeout=CALL_TIMEOUT_S)
            return grpc.StatusCode.OK, response, dict(call.trailing_metadata() or ()) | dict(call.initial_metadata() or ())
        except grpc.RpcError as error:
            return error.code(), None, dict(error.trailing_metadata() or ())

    def stream(self, key_id: str, model: str = "sim") -> grpc.StatusCode:
        request = self.pb.gateway_pb2.GenerateStreamRequest(model=model, prompt=f"stream {uuid.uuid4().hex}", max_tokens=16)
        try:
            for _ in self.stub.GenerateStream(request, metadata=self._meta(key_id), timeout=CALL_TIMEOUT_S):
                pass
            return grpc.StatusCode.OK
        except grpc.RpcError as error:
            return error.code()

    def jobs(self, key_id: str) -> None:
        """A job that succeeds, one that is dead-lettered (sim-error, no retries), one cancelled."""
        pb = self.pb.gateway_pb2
        meta = self._meta(key_id)
        ok = self.stub.SubmitJob(pb.SubmitJobRequest(model="sim", prompt=f"job {uuid.uuid4().hex}", max_tokens=8),
                                 metadata=meta, timeout=CALL_TIMEOUT_S)
        bad = self.stub.SubmitJob(pb.SubmitJobRequest(model="sim-error", prompt=f"job {uuid.uuid4().hex}", max_tokens=8),
                                  metadata=meta, timeout=CALL_TIMEOUT_S)
        slow = self.stub.SubmitJob(pb.SubmitJobRequest(model="sim-slow", prompt=f"job {uuid.uuid4().hex}", max_tokens=8),
                                   metadata=meta, timeout=CALL_TIMEOUT_S)
        with contextlib.suppress(grpc.RpcError):
            self.stub.CancelJob(pb.CancelJobRequest(job_id=slow.job.id), metadata=meta, timeout=CALL_TIMEOUT_S)
        finished = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_DEAD_LETTERED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)
        for job in (ok, bad):
            wait_for(
                f"job {job.job.id} finished",
                lambda job=job: self.stub.GetJob(pb.GetJobRequest(job_id=job.job.id), metadata=meta,
                                                 timeout=CALL_TIMEOUT_S).job.state in finished,
                30,
                0.2,
            )

    def budget_to(self, key_id: str, share: float, limit_usd: float, calls: int = 200) -> float:
        """Calls until the key's budget has at most `1 - share` of `limit_usd` left; returns the
        share spent (from `x-budget-remaining-usd`)."""
        spent = 0.0
        for _ in range(calls):
            code, _, metadata = self.generate(key_id)
            assert code == grpc.StatusCode.OK, f"{key_id}: {code} before {share:.0%} of its budget was spent"
            remaining = float(metadata.get("x-budget-remaining-usd", "nan"))
            spent = 1 - remaining / limit_usd
            if spent >= share:
                return spent
        raise AssertionError(f"{key_id}: {spent:.0%} of the budget spent after {calls} calls")

    def mixed(self, rounds: int = 3) -> None:
        """A bit of everything the dashboards show: hits and misses (near and service tiers),
        streams, failures, retries, rate-limit rejections, budget refusals, shed calls, jobs."""
        repeated = f"repeated {uuid.uuid4().hex}"
        for _ in range(rounds):
            for key_id in TEAM_KEYS:
                self.generate(key_id)
                self.generate(key_id, prompt=repeated)
                self.stream(key_id)
            self.generate(LIMITED_KEY)
            self.generate(BROKE_KEY)
        time.sleep(0.5)  # the answer to `repeated` is stored in the background
        for _ in range(3):
            self.generate("alice", prompt=repeated)
        # Key concurrency: several slow calls at once on a key that may have one in flight.
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda _: self.generate(SERIAL_KEY, model="sim-slow", max_tokens=4), range(4)))
        # Retries past the key's retry budget (one a second over its 10 s window, plus a fifth of
        # its calls): a burst of calls to a model that fails every third call (too few failures
        # to open its breaker, whose threshold is half of the calls).
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: self.generate(PLAIN_KEY, model="sim-flaky-3"), range(120)))
        self.jobs("alice")


class Background:
    """Keeps calling `work()` on a thread until stopped (bounded by `limit_s`)."""

    def __init__(self, work, limit_s: float = 90.0, pause_s: float = 0.1) -> None:
        self._stop = threading.Event()
        self._work = work
        self._limit = limit_s
        self._pause = pause_s
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + self._limit
        while not self._stop.is_set() and time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                self._work()
            self._stop.wait(self._pause)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)
