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


def _get(url: str, host: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_ui_server_refuses_a_foreign_host_header(prefect_ui):
    """DNS rebinding: a page whose name now resolves to 127.0.0.1 sends its own name as Host."""
    port = prefect_ui.api_url.rsplit(":", 1)[1].split("/")[0]
    token_url = f"{prefect_ui.api_url}/csrf-token?client=rebind-test"
    assert _get(token_url, f"rebind.evil.example:{port}") == 400
    status, _ = _post(f"{prefect_ui.api_url}/flow_runs/filter", {"Host": f"rebind.evil.example:{port}"})
    assert status == 400
    for name in ("127.0.0.1", "localhost"):
        assert _get(token_url, f"{name}:{port}") == 200
    assert _get(f"http://127.0.0.1:{port}/", f"localhost:{port}") == 200  # the UI page itself


def test_a_cli_runs_server_refuses_a_foreign_host_header(tmp_path):
    """The server `run_api` starts for a CLI run answers loopback names only."""
    script = ("from deployments.api_server import run_api\n"
              "import urllib.request, urllib.error\n"
              "with run_api() as url:\n"
              "    port = url.rsplit(':', 1)[1].split('/')[0]\n"
              "    for host in ('rebind.evil.example', '127.0.0.1', 'localhost'):\n"
              "        request = urllib.request.Request(url + '/csrf-token?client=x', headers={'Host': f'{host}:{port}'})\n"
              "        try:\n"
              "            print(host, urllib.request.urlopen(request, timeout=30).status)\n"
              "        except urllib.error.HTTPError as exc:\n"
              "            print(host, exc.code)\n")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", script], env=env, text=True, capture_output=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:3] == ["rebind.evil.example 400", "127.0.0.1 200", "localhost 200"]


def test_program_parameters_are_refused_in_runs_started_through_the_api(monkeypatch):
    from flows.params import RunParams
    from flows.pipeline_flow import refuse_programs_from_api
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
    assert "0.0.0.0" not in settings["EPISODE2LORA_ALLOWED_HOSTS"].split(",")
    local = server_settings(4200)
    assert local["EPISODE2LORA_ALLOWED_HOSTS"] == "127.0.0.1,localhost,::1"
    assert server_settings(4200, "10.1.2.3", "me:secret")["EPISODE2LORA_ALLOWED_HOSTS"].endswith(",10.1.2.3")
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


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _run_folder(tmp_path: Path) -> Path:
    """A run folder as a run leaves it: run.json, the cluster report, a LoRA file, Prefect's results."""
    run = tmp_path / "runs" / "linked"
    (run / "report").mkdir(parents=True)
    (run / "run.json").write_text("{}")
    (run / "report" / "cluster_report.html").write_text("<html><title>cluster report</title><h1>3 clusters</h1></html>")
    (run / "train" / "shards" / "alice").mkdir(parents=True)
    (run / "train" / "shards" / "alice" / "alice.safetensors").write_bytes(b"lora")
    (run / ".prefect-results").mkdir()
    (run / ".prefect-results" / "result").write_bytes(b"pickle")
    (tmp_path / "outside.txt").write_text("not a run's")
    return run


@pytest.mark.e2e
def test_the_run_page_links_open_in_a_browser_and_only_run_files_are_served(prefect_ui, tmp_path):
    """The report and LoRA links of a run are served by the UI's server (a browser refuses file:// links
    from an http page); files outside run folders, hidden ones and `..` paths are not."""
    from playwright.sync_api import expect, sync_playwright
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from tasks.run.links import FILES_ROUTE, publish_outputs
    from tasks.run.store import RunStore
    from tests.test_browser import CHROMIUM, CHROMIUM_ARGS

    run = _run_folder(tmp_path)

    @flow
    def publish() -> str:
        from prefect.runtime import flow_run

        assert publish_outputs(RunStore(run.parent, run.name)) == 2
        return flow_run.id

    with prefect_ui.api():
        flow_run_id = publish()
        with get_client(sync_client=True) as client:
            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    links = {a.key: a.data for a in artifacts}  # Prefect 3 keeps a link artifact as markdown: [text](url)
    assert set(links) == {"cluster-report", "lora-train-alice"}, links
    report_url = links["cluster-report"].split("](", 1)[1].rstrip(")")
    assert report_url.startswith(f"{prefect_ui.url}{FILES_ROUTE}/"), report_url

    files = f"{prefect_ui.url}{FILES_ROUTE}"
    assert _status(f"{files}{run}/train/shards/alice/alice.safetensors") == 200
    assert _status(f"{files}{tmp_path}/outside.txt") == 404  # not inside a run folder
    assert _status(f"{files}{run}/.prefect-results/result") == 404  # hidden: Prefect's pickled results
    assert _status(f"{files}{run}/../../outside.txt".replace("/../", "/%2E%2E/")) == 404

    with sync_playwright() as p:  # opened from the UI's own page, as a person clicks it on the run page
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{prefect_ui.url}/runs/flow-run/{flow_run_id}")
            page.evaluate("url => { const a = document.createElement('a'); a.href = url; a.id = 'report-link';"
                          " a.textContent = 'report'; document.body.prepend(a); }", report_url)
            page.click("#report-link")
            # the UI's own router may navigate too (same document): wait for the report's URL and its title
            page.wait_for_url(report_url, wait_until="load", timeout=120_000)
            expect(page).to_have_title("cluster report", timeout=120_000)
            assert "3 clusters" in page.content()
        finally:
            browser.close()
