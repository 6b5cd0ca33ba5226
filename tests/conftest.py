"""Shared fixtures: offline environment, a Prefect API for flow tests, generated footage."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("EPISODE2LORA_NO_PROGRESS", "1")
os.environ.setdefault("U2NET_HOME", str(ROOT / ".cache" / "u2net"))
ARTIFACTS = ROOT / "test-artifacts"

from tests.live_prefect import prefect_ui  # noqa: E402,F401  (session fixture: `episode2lora ui` for e2e tests)


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """A temporary Prefect server for the whole session; yields its API URL.

    In-process flows use it through the harness; subprocesses get it via `cli_env`.
    """
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    os.environ["PREFECT_HOME"] = str(home)
    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture
def cli_env(prefect_api):
    """Environment for running `python -m episode2lora` against the session's Prefect server."""
    env = dict(os.environ)
    env["PREFECT_API_URL"] = prefect_api
    env["PYTHONPATH"] = str(ROOT)
    return env


def run_cli(args: list[str], env: dict, **kwargs) -> subprocess.CompletedProcess:
    """Run the CLI in a subprocess, capturing text output."""
    return subprocess.run([sys.executable, "-m", "episode2lora", *args], env=env, text=True,
                          capture_output=True, cwd=ROOT, **kwargs)


@pytest.fixture(scope="session")
def episode(tmp_path_factory) -> Path:
    """A short generated episode with ground truth beside it (see tests/footage.py)."""
    from tests.footage import render_episode

    out = tmp_path_factory.mktemp("footage") / "ep01.mp4"
    render_episode(out, seed=3)
    return out


@pytest.fixture(scope="session")
def two_episodes(tmp_path_factory) -> list[Path]:
    """Two generated episodes that share a repeated shot (an opening seen in both)."""
    from tests.footage import render_episode

    folder = tmp_path_factory.mktemp("footage2")
    paths = []
    for seed in (4, 5):
        out = folder / f"ep{seed:02d}.mp4"
        render_episode(out, seed=seed)
        paths.append(out)
    return paths
