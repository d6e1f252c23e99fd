"""The Redis start-up script of deploy/k8s/redis.yaml (the same as compose's), run against a real
redis-server: TLS only, the ACL user's password from the Secret's file and on no command line, the
default user off, redis-server itself in the container's first process (so SIGTERM reaches it), and
a certificate replaced on disk loaded without a restart (the hourly loop, here shortened).

Certificates are made with openssl, the way cert-manager makes them: the server's names only
(`redis`), no IP address, so the readiness probe must work without a name check.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from support import COMPOSE, K8S, load_yaml, load_yaml_all

PASSWORD = "p4ss-from-the-secret"


def container(path: Path) -> dict:
    (redis,) = [o for o in load_yaml_all(path) if o["kind"] == "StatefulSet"]
    (c,) = redis["spec"]["template"]["spec"]["containers"]
    return c


def k8s_script() -> str:
    c = container(K8S / "redis.yaml")
    assert c["command"][:2] == ["sh", "-c"]
    return c["command"][2]


def test_compose_runs_the_same_script():
    compose = load_yaml(COMPOSE)["services"]["redis"]
    assert compose["command"][:2] == ["sh", "-c"]
    # Compose interpolates $VAR: the script writes $$ for a shell's $.
    script = compose["command"][2].replace("$$", "$")
    assert script.replace("deploy/secrets/redis-password is empty", "MESSAGE") == k8s_script().replace(
        "llmesh-secrets has no redis-password", "MESSAGE"
    )
    # Its user is the image's redis: the image's entrypoint drops root only for `redis-server ...`.
    assert compose["user"] == "redis"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(directory: Path, name: str) -> None:
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
            "-subj", f"/CN={name}", "-keyout", f"{name}-key.pem", "-out", f"{name}.pem", cwd=directory)


def make_server(directory: Path, ca: str, name: str) -> None:
    (directory / "ext").write_text("subjectAltName=DNS:redis\nextendedKeyUsage=serverAuth\n")
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=redis",
            "-keyout", f"{name}-key.pem", "-out", f"{name}.csr", cwd=directory)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}-key.pem", "-CAcreateserial",
            "-days", "2", "-extfile", "ext", "-out", f"{name}.pem", cwd=directory)


class Files:
    """/etc/llmesh of the Redis pod, in a temporary directory."""

    def __init__(self, root: Path):
        self.root = root
        (root / "tls").mkdir(parents=True)
        (root / "secrets").mkdir()
        self.work = root / "work"
        self.work.mkdir()

    def install(self, cert: str, key: str, *cas: str) -> None:
        shutil.copy(self.work / cert, self.root / "tls" / "tls.crt")
        shutil.copy(self.work / key, self.root / "tls" / "tls.key")
        (self.root / "tls" / "ca.crt").write_text("".join((self.work / ca).read_text() for ca in cas))


def localized(script: str, root: Path, port: int) -> str:
    """The script with the pod's paths and port made this test's, the reload loop's hour a second,
    and no files written outside the temporary directory."""
    assert "sleep 3600" in script and "--tls-port 6379" in script and "redis-cli $tls" in script
    return (
        script.replace("/etc/llmesh", str(root))
        .replace("sleep 3600", "sleep 1")
        .replace("--tls-port 6379", f"--tls-port {port} --bind 127.0.0.1 --dir {root / 'work'} --save ''")
        .replace("redis-cli $tls", f"redis-cli -p {port} $tls")
    )


def redis_cli(port: int, ca: Path, *args: str, password: str | None = PASSWORD, tls: bool = True):
    env = {k: v for k, v in os.environ.items() if k != "REDISCLI_AUTH"}
    if password is not None:
        env["REDISCLI_AUTH"] = password
    command = ["redis-cli", "-p", str(port)]
    if tls:
        command += ["--tls", "--cacert", str(ca)]
    if password is not None:
        command += ["--user", "llmesh"]
    result = subprocess.run([*command, *args], env=env, capture_output=True, text=True, timeout=10)
    return (result.stdout + result.stderr).strip()


def wait_for(check, what: str, seconds: float = 15.0):
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {seconds} s")
        time.sleep(0.1)


@pytest.fixture
def tools():
    for tool in ("redis-server", "redis-cli", "openssl"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is not installed (apt-get install redis-server openssl)")


def start(script: str, log: Path) -> subprocess.Popen:
    """The script in a process group of its own (its reload loop outlives redis-server here, where
    no container ends with it), its output to `log` (a pipe would stay open as long as the loop)."""
    with log.open("w") as out:
        return subprocess.Popen(["sh", "-c", script], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    """Ends what is left of the script's process group: the loop, and redis-server if it runs."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


def test_redis_starts_tls_only_with_the_password_and_reloads_its_certificate(tools, tmp_path):
    files = Files(tmp_path / "etc")
    make_ca(files.work, "ca1")
    make_ca(files.work, "ca2")
    make_server(files.work, "ca1", "first")
    make_server(files.work, "ca2", "second")
    files.install("first.pem", "first-key.pem", "ca1.pem")
    (files.root / "secrets" / "redis-password").write_text(PASSWORD + "\n")
    port = free_port()
    ca1, ca2 = files.work / "ca1.pem", files.work / "ca2.pem"
    log = tmp_path / "redis.log"
    process = start(localized(k8s_script(), files.root, port), log)
    try:
        # The readiness probe of the manifest, as kubelet runs it (with this test's paths and port).
        probe = " ".join(container(K8S / "redis.yaml")["readinessProbe"]["exec"]["command"][2:])
        probe = probe.replace("/etc/llmesh", str(files.root)).replace("redis-cli", f"redis-cli -p {port}")
        wait_for(lambda: subprocess.run(["sh", "-c", probe], capture_output=True, timeout=10).returncode == 0,
                 "the readiness probe never passed")
        assert redis_cli(port, ca1, "ping") == "PONG"

        # The password is nowhere on a command line, and redis-server is the script's own process
        # (exec): the container's SIGTERM reaches it.
        cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        assert cmdline.startswith("redis-server"), f"the script's process runs {cmdline!r}, not redis-server"
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    assert PASSWORD.encode() not in (proc / "cmdline").read_bytes(), f"the password is in {proc}"
                except (FileNotFoundError, ProcessLookupError, PermissionError):
                    pass

        # TLS only; the default user off; the password checked.
        assert "PONG" not in redis_cli(port, ca1, "ping", tls=False)
        assert "NOAUTH" in redis_cli(port, ca1, "ping", password=None)
        assert "WRONGPASS" in redis_cli(port, ca1, "ping", password="not-it")
        assert redis_cli(port, ca2, "ping") != "PONG", "a client trusting another CA connected"

        # A renewal by another CA (both trusted meanwhile): the loop loads it, no restart.
        files.install("second.pem", "second-key.pem", "ca1.pem", "ca2.pem")
        wait_for(lambda: redis_cli(port, ca2, "ping") == "PONG", "the replaced certificate was not loaded")
        assert process.poll() is None

        # SIGTERM: redis-server shuts down by itself.
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        assert "ready to exit" in log.read_text().lower(), log.read_text()
    finally:
        stop(process)


def test_redis_does_not_start_without_a_password(tools, tmp_path):
    files = Files(tmp_path / "etc")
    make_ca(files.work, "ca1")
    make_server(files.work, "ca1", "first")
    files.install("first.pem", "first-key.pem", "ca1.pem")
    (files.root / "secrets" / "redis-password").write_text("")
    log = tmp_path / "redis.log"
    process = start(localized(k8s_script(), files.root, free_port()), log)
    try:
        assert process.wait(timeout=15) != 0
        assert "has no redis-password" in log.read_text(), log.read_text()
    finally:
        stop(process)
