"""The local Prefect API is not open to every web page, takes no program paths from flow parameters,
and never outlives the CLI run that started it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.live_prefect import csrf_headers

EVIL = "http://evil.example"


def _post(url: str, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    request = urllib.request.Request(url, data=b'{"limit": 1}', method="POST",
                                     headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}


def _preflight(url: str, origin: str) -> dict[str, str]:
    request = urllib.request.Request(url, method="OPTIONS", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as exc:
        return {k.lower(): v for k, v in exc.headers.items()}


def test_ui_server_rejects_a_cross_origin_post(prefect_ui):
    url = f"{prefect_ui.api_url}/flow_runs/filter"
    status, headers = _post(url, {"Origin": EVIL})
    assert status == 403  # no CSRF token: refused
    assert headers.get("access-control-allow-origin") not in (EVIL, "*")
    assert _preflight(url, EVIL).get("access-control-allow-origin") not in (EVIL, "*")
    assert _preflight(url, prefect_ui.url).get("access-control-allow-origin") == prefect_ui.url  # the UI's own page
    status, _ = _post(url, csrf_headers(prefect_ui.api_url))  # with a token (as the UI sends) it answers
    assert status == 200


def test_program_parameters_are_refused_in_runs_started_through_the_api(monkeypatch):
    from flows.params import RunParams
    from flows.sources import refuse_programs_from_api
    from tasks.train import TrainParams

    params = RunParams.model_validate({"train": {"trainer": "kohya", "kohya_scripts": "/tmp/evil-scripts"}})
    refuse_programs_from_api(params)  # the CLI: allowed
    monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__ID", "3f1b7f52-0000-4000-8000-000000000000")
    with pytest.raises(ValueError, match=r"train\.kohya_scripts.*command line"):
        refuse_programs_from_api(params)
    with pytest.raises(ValueError, match="evil-scripts"):
        refuse_programs_from_api({"train": TrainParams(trainer="kohya", kohya_scripts="/tmp/evil-scripts")})
    refuse_programs_from_api(RunParams())  # nothing to run: allowed


def test_a_server_beyond_loopback_needs_an_auth_string():
    from deployments.api_server import server_settings

    with pytest.raises(ValueError, match="auth"):
        server_settings(4200, "0.0.0.0")
    settings = server_settings(4200, "0.0.0.0", "me:secret")
    assert settings["PREFECT_SERVER_API_AUTH_STRING"] == "me:secret"
    local = server_settings(4200)
    assert local["PREFECT_SERVER_CSRF_PROTECTION_ENABLED"] == "true"
    assert local["PREFECT_SERVER_CORS_ALLOWED_ORIGINS"] == "http://127.0.0.1:4200,http://localhost:4200"


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_killed_run_leaves_no_prefect_server(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), PREFECT_HOME=str(tmp_path / "home"), EPISODE2LORA_NO_PROGRESS="1")
    env.pop("PREFECT_API_URL", None)  # the run starts its own server, as for a user
    proc = subprocess.Popen([sys.executable, "-m", "episode2lora", "run", str(ROOT / "data" / "sample" / "episode01.mp4"),
                             "--name", "k", "--until", "frames", "--runs-dir", str(tmp_path / "runs")],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and not (tmp_path / "runs" / "k" / "frames").exists():
        time.sleep(0.05)
    servers = [c for c in _children(proc.pid) if b"uvicorn" in Path(f"/proc/{c}/cmdline").read_bytes()]
    assert proc.poll() is None and servers, "the run should be under way, with its server"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 60
    while any(_alive(s) for s in servers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(s) for s in servers), f"server processes {servers} outlived the killed run"


def test_a_config_restricts_the_webhook_hosts(monkeypatch):
    from flows.notify import HOSTS_ENV, post_json
    from tests.live_prefect import WebhookReceiver

    monkeypatch.setenv(HOSTS_ENV, "127.0.0.1, hooks.example.org")
    with pytest.raises(ValueError, match="'evil.example' is not in EPISODE2LORA_WEBHOOK_HOSTS"):
        post_json("http://evil.example/hook", {"run": "x"})
    with WebhookReceiver() as receiver:
        assert post_json(receiver.url, {"run": "x"}) == 204
        assert receiver.payloads == [{"run": "x"}]
