"""deploy/Dockerfile: one multi-stage image with every binary, built from the repository root."""

from __future__ import annotations

import fnmatch
import re
import tomllib

import pytest

from support import BINARIES, DOCKERFILE, DOCKERIGNORE, REPO

TEXT = DOCKERFILE.read_text()
# Instructions with their continuation lines joined.
INSTRUCTIONS = [
    re.sub(r"\\\n\s*", " ", block).strip()
    for block in re.split(r"\n(?=[A-Z]+\s)", re.sub(r"^\s*#.*\n", "", TEXT, flags=re.M))
    if block.strip()
]


def instructions(keyword: str) -> list[str]:
    return [i for i in INSTRUCTIONS if i.split(None, 1)[0] == keyword]


def copied_sources() -> set[str]:
    """Sources of the COPY instructions that read the build context (not another stage)."""
    sources = set()
    for copy in instructions("COPY"):
        args = [a for a in copy.split()[1:] if not a.startswith("--")]
        if "--from" not in copy:
            sources |= {a.rstrip("/") for a in args[:-1]}
    return sources


def workspace() -> dict:
    with (REPO / "Cargo.toml").open("rb") as f:
        return tomllib.load(f)["workspace"]


def test_multi_stage_build_on_a_slim_runtime():
    stages = instructions("FROM")
    assert len(stages) >= 2
    assert re.search(r"rust:\$\{RUST_VERSION\}", stages[0])
    assert "debian" in stages[-1] and "slim" in stages[-1]
    assert "rust" not in stages[-1].split()[1]


def test_rust_toolchain_is_new_enough():
    version = re.search(r"ARG RUST_VERSION=(\d+)\.(\d+)", TEXT)
    assert version, "ARG RUST_VERSION=<major>.<minor>"
    minimum = tuple(int(x) for x in workspace()["package"]["rust-version"].split(".")[:2])
    assert (int(version.group(1)), int(version.group(2))) >= minimum
    assert (int(version.group(1)), int(version.group(2))) >= (1, 95)


def test_cargo_build_uses_cache_mounts_and_builds_every_binary():
    (build,) = [i for i in instructions("RUN") if "cargo build" in i]
    assert "--profile production" in build and "--workspace" in build and "--bins" in build and "--locked" in build
    # The binaries are copied from the profile's own directory, and the profile exists.
    assert "target/production/$bin" in build
    with (REPO / "Cargo.toml").open("rb") as f:
        assert tomllib.load(f)["profile"]["production"]["inherits"] == "release"
    for target in ("/usr/local/cargo/registry", "/usr/local/cargo/git", "/src/target"):
        assert re.search(rf"--mount=type=cache,[^ ]*target={re.escape(target)}", build), target
    for binary in BINARIES:
        assert binary in build, f"{binary} is not copied out of the build"
    assert any(re.match(r"COPY --from=build /out/ /usr/local/bin/", i) for i in instructions("COPY"))


def test_every_workspace_member_is_in_the_build_context():
    copied = copied_sources()
    for member in workspace()["members"]:
        top = member.split("/", 1)[0]
        assert top in copied or member in copied, f"workspace member {member} is not copied into the build stage"
    assert {"Cargo.toml", "Cargo.lock", "proto"} <= copied


def test_dockerignore_keeps_the_context_small_but_complete():
    patterns = [p.strip() for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")]
    for needed in ("**/target", ".git", ".venv"):
        assert needed in patterns
    for path in copied_sources():
        for pattern in patterns:
            assert not fnmatch.fnmatch(path, pattern), f"{path} is copied but excluded by {pattern}"
    for member in workspace()["members"]:
        for pattern in patterns:
            assert not fnmatch.fnmatch(member, pattern), f"workspace member {member} excluded by {pattern}"
            assert not (member + "/").startswith(pattern.rstrip("*") + "/") or pattern.startswith("**"), (
                f"workspace member {member} excluded by {pattern}")


def test_runs_as_a_non_root_numeric_user():
    (user,) = instructions("USER")
    uid = user.split()[1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric, so Kubernetes' runAsNonRoot can check it"
    assert "10001" in user


def test_runtime_has_only_ca_certificates_and_bash():
    runtime = TEXT.split("AS runtime", 1)[1]
    (install,) = re.findall(r"apt-get install[^\n]*\n?[^\n]*", runtime) or [""]
    assert "ca-certificates" in install
    packages = set(re.findall(r"\b[a-z0-9][a-z0-9.+-]+\b", install.split("--no-install-recommends", 1)[1]))
    assert packages <= {"ca-certificates", "rm", "rf", "var", "lib", "apt", "lists"}


@pytest.mark.parametrize("port", [50051, 50052, 50053, 50054, 9464])
def test_exposes_the_service_and_admin_ports(port):
    (expose,) = instructions("EXPOSE")
    assert str(port) in expose.split()
