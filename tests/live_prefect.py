"""A real Prefect server with the project's deployments served, for the end-to-end tests.

`episode2lora ui --port P` runs in a subprocess exactly as a user starts it: it launches
`prefect server start --host 127.0.0.1 --port P` (PREFECT_HOME in a temporary folder),
waits for /api/health and serves the deployments of a copy of deployments/prefect.yaml
whose paths point into the temporary folder. Ctrl-C (SIGINT) at the end must stop both.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "deployments" / "prefect.yaml"
SAMPLE = ROOT / "data" / "sample"
DEPLOYMENTS = ("episode-to-lora/episode-to-lora", "reprocess/reprocess", "train-package/train")
E2E_INPUT = SAMPLE / "episode01.mp4"
"""The end-to-end runs process one sample episode (about 20 s of 320x180 video)..."""
E2E_CONFIG = ROOT / "data" / "demo.yaml"
E2E_OVERRIDES: dict[str, Any] = {"select.tiers": ["S", "A", "B", "C", "D"], "select.min_images": 6}
"""...with the demo's offline models, training the characters with at least 6 usable layers (one on episode01)."""
QUICK_RUN_UNTIL = "frames"
"""The deployment's default `until` on the test server: the browser's Quick run stops there (the
API tests pass the flow's own default, the whole pipeline)."""


def e2e_parameters() -> dict[str, Any]:
    """Default parameters of the test server's episode-to-lora deployment."""
    from flows.params import load_params

    return {"inputs": [str(E2E_INPUT)], "name": "ui-sample", "until": QUICK_RUN_UNTIL,
            "params": load_params(E2E_CONFIG, E2E_OVERRIDES).model_dump(mode="json")}

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CSRF_CLIENT = f"e2e-tests-{os.getpid()}"
"""This process's client id for the CSRF tokens `ui`'s server asks of every POST (as the UI's own code does)."""


def csrf_headers(api_url: str) -> dict[str, str]:
    """The headers that carry a CSRF token of `api_url`'s server (GET <api>/csrf-token?client=...)."""
    request = urllib.request.Request(f"{api_url}/csrf-token?client={CSRF_CLIENT}")
    with urllib.request.urlopen(request, timeout=10) as response:
        token = json.loads(response.read())["token"]
    return {"Prefect-Csrf-Token": token, "Prefect-Csrf-Client": CSRF_CLIENT}


def get_json(url: str, body: Any = None, timeout: float = 10) -> Any:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if body is not None:  # a POST: with a CSRF token
        headers.update(csrf_headers(url[:url.index("/api/") + 4]))
    request = urllib.request.Request(url, data=data, headers=headers, method="GET" if body is None else "POST")
    for attempt in range(5):  # a busy server answers 503 now and then: ask again
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            if exc.code != 503 or attempt == 4:
                raise
            time.sleep(2)


def flow_run_logs(api_url: str, flow_run_id: str, ready: Callable[[list[str]], bool], timeout: float = 60,
                  level: int = 0) -> list[str]:
    """The log messages of a flow run (those at `level` or above), oldest first, read again until
    `ready(messages)` or `timeout` s: Prefect ships logs in batches, so a run's last lines may reach the
    API after the run has ended."""
    deadline = time.monotonic() + timeout
    messages: list[str] = []
    while True:
        messages = []
        while page := get_json(f"{api_url}/logs/filter", {
                "logs": {"flow_run_id": {"any_": [flow_run_id]}, "level": {"ge_": level}}, "sort": "TIMESTAMP_ASC",
                "limit": 200, "offset": len(messages)}):
            messages += [entry["message"] for entry in page]
        if ready(messages) or time.monotonic() > deadline:
            return messages
        time.sleep(2)


@dataclass
class LivePrefect:
    """The running `episode2lora ui` process and where its runs go."""

    url: str
    process: subprocess.Popen
    home: Path
    runs_dir: Path
    watch_folder: Path
    config: Path
    log: Path

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    @contextmanager
    def api(self) -> Iterator[None]:
        """Point this process's Prefect client at the live server."""
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: self.api_url}):
            yield

    def log_tail(self, n: int = 60) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return "\n".join(lines[-n:])


def write_test_config(tmp: Path) -> tuple[Path, Path, Path]:
    """A copy of deployments/prefect.yaml whose parameters point into `tmp` (schedules unchanged)."""
    runs_dir, watch = tmp / "runs", tmp / "incoming"
    watch.mkdir(parents=True)
    data = yaml.safe_load(CONFIG.read_text())
    for entry in data["deployments"]:
        params = entry.setdefault("parameters", {})
        params["runs_dir"] = str(runs_dir)
        if entry["name"] == "episode-to-lora":
            params.update(e2e_parameters())
        if entry["name"] == "reprocess":
            params.update(watch_folder=str(watch), name="api", params=e2e_parameters()["params"])
    config = tmp / "prefect.yaml"
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    return config, runs_dir, watch


def _like_a_terminal() -> None:
    """Ctrl-C works in the child even when this process runs with SIGINT ignored (background jobs)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_ui(tmp: Path, timeout: float = 180) -> LivePrefect:
    config, runs_dir, watch = write_test_config(tmp)
    home, log, port = tmp / "prefect-home", tmp / "ui.log", free_port()
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               PREFECT_RUNNER_POLL_FREQUENCY="1", PYTHONPATH=str(ROOT), EPISODE2LORA_NO_PROGRESS="1")
    env.pop("PREFECT_API_URL", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "episode2lora", "ui", "--port", str(port), "--config", str(config)],
        cwd=ROOT, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
        preexec_fn=_like_a_terminal,
    )
    live = LivePrefect(f"http://127.0.0.1:{port}", process, home, runs_dir, watch, config, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"`episode2lora ui` exited with {process.returncode}:\n{live.log_tail()}")
        try:
            names = {f"{d['flow_name']}/{d['name']}" for d in _deployments(live)}
            if set(DEPLOYMENTS) <= names:
                return live
        except OSError:
            pass
        time.sleep(1)
    stop_ui(live)
    raise TimeoutError(f"deployments not served after {timeout:.0f} s:\n{live.log_tail()}")


def _deployments(live: LivePrefect) -> list[dict]:
    deployments = get_json(f"{live.api_url}/deployments/filter", {"limit": 50})
    flows = {f["id"]: f["name"] for f in get_json(f"{live.api_url}/flows/filter", {"limit": 50})}
    return [dict(d, flow_name=flows.get(d["flow_id"], "?")) for d in deployments]


def port_open(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, int(port))) == 0


def stop_ui(live: LivePrefect, timeout: float = 60) -> bool:
    """Ctrl-C the `ui` process; True when it and its server stopped in time (else they are killed)."""
    if live.process.poll() is None:
        live.process.send_signal(signal.SIGINT)
    try:
        live.process.wait(timeout)
    except subprocess.TimeoutExpired:
        live.process.kill()
        live.process.wait()
        return False
    deadline = time.monotonic() + 20
    while port_open(live.url) and time.monotonic() < deadline:
        time.sleep(0.5)
    return not port_open(live.url)


@pytest.fixture(scope="session")
def prefect_ui(tmp_path_factory) -> Iterator[LivePrefect]:
    """`episode2lora ui` on a free loopback port for the session; stopped with Ctrl-C at the end."""
    live = start_ui(tmp_path_factory.mktemp("prefect-ui"))
    yield live
    stopped = stop_ui(live)
    assert stopped, f"Ctrl-C did not stop `episode2lora ui` and its server:\n{live.log_tail()}"


# ---- a webhook receiver -------------------------------------------------------------------

@dataclass
class WebhookReceiver:
    """An HTTP server on 127.0.0.1 that keeps every JSON body POSTed to it."""

    payloads: list[dict] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/hook"

    def __enter__(self) -> "WebhookReceiver":
        payloads = self.payloads

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server API
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                payloads.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    def wait_for(self, match: Callable[[dict], bool], timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for payload in list(self.payloads):
                if match(payload):
                    return payload
            time.sleep(0.2)
        raise TimeoutError(f"no matching webhook payload in {timeout:.0f} s; got {self.payloads}")
