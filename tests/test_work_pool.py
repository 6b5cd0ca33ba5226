"""Prefect as its users run it on several machines: `prefect deploy` into the work pool, the
server's scheduler creating runs, and a process worker executing them.

A real `prefect server start` (its scheduler services on short loops) in a temporary home;
`prefect work-pool create`, `prefect deploy --all --prefect-file ...` and `prefect worker start`
run as subprocesses exactly as the README says. Server and worker are stopped by pid; scheduled
runs left over are deleted.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from tests.live_prefect import CONFIG, ROOT, csrf_headers, flow_run_logs, free_port, get_json

pytestmark = pytest.mark.e2e

POOL = "episode2lora"
SCHEDULER = {  # the scheduler looks at new deployments every 2 s and keeps at most 3 runs ahead
    "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
    "PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "2",
    "PREFECT_SERVER_SERVICES_SCHEDULER_MAX_RUNS": "3",
    "PREFECT_SERVER_SERVICES_SCHEDULER_MIN_RUNS": "1",
}
INTERVAL_S = 15


class PoolServer:
    """A local server with the work pool; `prefect` commands run against it from the project folder."""

    def __init__(self, tmp: Path) -> None:
        from deployments.serve import start_server, wait_healthy

        self.tmp, self.port = tmp, free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        saved = dict(os.environ)
        os.environ.update(SCHEDULER)
        try:
            self.server = start_server(self.port, tmp / "server-home", log=tmp / "server.log")
        finally:
            os.environ.clear()
            os.environ.update(saved)
        wait_healthy(self.api_url, self.server, timeout=180)
        self.env = dict(os.environ, PREFECT_API_URL=self.api_url, PREFECT_HOME=str(tmp / "client-home"))
        self.env.pop("PYTHONPATH", None)  # a worker finds the flows through its deployment's working directory

    def prefect(self, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", *args], env=self.env, cwd=cwd,
                              text=True, capture_output=True, timeout=300)
        assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        return done

    def post(self, path: str, body: Any) -> Any:
        return get_json(f"{self.api_url}{path}", body)


@pytest.fixture(scope="module")
def pool_server(tmp_path_factory) -> Iterator[PoolServer]:
    from deployments.serve import stop

    live = PoolServer(tmp_path_factory.mktemp("work-pool"))
    try:
        live.prefect("work-pool", "create", POOL, "--type", "process")
        yield live
    finally:
        stop(live.server)


def _deployments(live: PoolServer) -> dict[str, dict]:
    flows = {f["id"]: f["name"] for f in live.post("/flows/filter", {"limit": 50})}
    return {f"{flows[d['flow_id']]}/{d['name']}": d for d in live.post("/deployments/filter", {"limit": 50})}


def test_prefect_deploy_registers_every_deployment_into_the_pool(pool_server):
    """`prefect deploy --all --prefect-file deployments/prefect.yaml`, as Prefect documents it."""
    from deployments.serve import build_deployments, read_config

    done = pool_server.prefect("deploy", "--all", "--prefect-file", str(CONFIG.relative_to(ROOT)))
    registered = _deployments(pool_server)
    served = {f"{d.flow_name}/{d.name}": d for d in build_deployments(CONFIG)}
    assert set(registered) == set(served), done.stdout
    assert len(registered) == len(read_config(CONFIG))
    for name, deployment in registered.items():
        assert deployment["work_pool_name"] == POOL, name
        assert deployment["parameters"] == served[name].parameters, name  # the defaults as `serve` has them
        assert deployment["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
    [cron] = registered["reprocess/reprocess"]["schedules"]
    assert cron["schedule"]["cron"] == "0 3 * * *" and cron["active"]


def _scheduled_copy(tmp: Path, watch: str) -> Path:
    """The reprocess deployment under another name, on a short interval, watching `watch` (relative)."""
    data = yaml.safe_load(CONFIG.read_text())
    [entry] = [dict(d) for d in data["deployments"] if d["name"] == "reprocess"]
    entry.update(name="reprocess-soon", schedules=[{"interval": INTERVAL_S, "active": True}])
    entry["parameters"] = dict(entry["parameters"], watch_folder=watch, name="scheduled", runs_dir=str(tmp / "runs"))
    path = tmp / "prefect.yaml"
    path.write_text(yaml.safe_dump({"name": data["name"], "deployments": [entry]}, sort_keys=False))
    return path


def _runs(live: PoolServer, deployment_id: str) -> list[dict]:
    return live.post("/flow_runs/filter", {"deployments": {"id": {"any_": [deployment_id]}}, "limit": 50})


def test_the_scheduler_creates_reprocess_runs_and_a_worker_executes_one(pool_server, tmp_path):
    """The scheduled path: no run is triggered by hand. The watch folder is given relative to the
    project and the worker starts in another folder: the run resolves it in the project."""
    watch = Path(".cache") / f"test-incoming-{uuid.uuid4().hex[:8]}"
    (ROOT / watch).mkdir(parents=True)
    worker = None
    try:
        pool_server.prefect("deploy", "--all", "--prefect-file", str(_scheduled_copy(tmp_path, str(watch))))
        deployment = _deployments(pool_server)["reprocess/reprocess-soon"]
        deadline = time.monotonic() + 120
        while not (scheduled := _runs(pool_server, deployment["id"])):
            assert time.monotonic() < deadline, "the scheduler created no run"
            time.sleep(1)
        assert all(r["auto_scheduled"] and r["state_type"] == "SCHEDULED" for r in scheduled), scheduled
        print(f"scheduler created {len(scheduled)} runs ahead")

        worker_log = tmp_path / "worker.log"
        worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL],
                                  env=pool_server.env, cwd=tmp_path, stdout=open(worker_log, "wb"),
                                  stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while not (done := [r for r in _runs(pool_server, deployment["id"]) if r["state_type"] in
                            ("COMPLETED", "FAILED", "CRASHED")]):
            assert worker.poll() is None, worker_log.read_text()
            assert time.monotonic() < deadline, f"no scheduled run finished:\n{worker_log.read_text()[-3000:]}"
            time.sleep(2)
        run = done[0]
        assert run["state_type"] == "COMPLETED", f"{run['state']}\n{worker_log.read_text()[-3000:]}"
        assert run["auto_scheduled"] and run["name"] and run["parameters"]["watch_folder"] == str(watch)

        expected = f"no new episodes in {watch}"
        messages = flow_run_logs(pool_server.api_url, run["id"], lambda m: any(expected in line for line in m))
        print(f"worker run: {len(messages)} log lines in the UI")
        assert any(expected in m for m in messages), messages
    finally:
        if worker is not None:
            from deployments.serve import stop

            stop(worker)
        deployment = _deployments(pool_server).get("reprocess/reprocess-soon")
        if deployment:  # no run is left waiting: the deployment goes, then any run still scheduled
            runs = _runs(pool_server, deployment["id"])
            _delete(f"{pool_server.api_url}/deployments/{deployment['id']}")
            for left in runs:
                if left["state_type"] in ("SCHEDULED", "PENDING", "RUNNING"):
                    _delete(f"{pool_server.api_url}/flow_runs/{left['id']}")
        (ROOT / watch).rmdir()


def _delete(url: str) -> None:
    import urllib.error
    import urllib.request

    try:
        headers = csrf_headers(url[:url.index("/api/") + 4])  # the server asks a CSRF token of every change
        urllib.request.urlopen(urllib.request.Request(url, method="DELETE", headers=headers), timeout=10)
    except urllib.error.HTTPError as exc:
        if exc.code != 404:
            raise
