"""Shared fixtures of the deployment tests (tests/deploy). Helpers live in support.py."""

from __future__ import annotations

import pytest

import support


@pytest.fixture(scope="session")
def promtool_bin() -> str:
    """promtool, or a failure that says how to install it (never a silent skip)."""
    return support.promtool_path()


@pytest.fixture(scope="session")
def contract():
    return support.metric_contract()


@pytest.fixture(scope="session")
def recorded_names() -> set[str]:
    return {r["record"] for r in support.recording_rules()}


@pytest.fixture(scope="session")
def compose() -> dict:
    return support.load_yaml(support.COMPOSE)


@pytest.fixture(scope="session")
def mesh_config() -> dict:
    return support.load_toml(support.MESH_TOML)
