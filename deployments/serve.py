"""Serve every deployment in `deployments/prefect.yaml` from one process; start a local UI.

    episode2lora serve            # against the Prefect API in PREFECT_API_URL
    episode2lora ui               # start a local Prefect server on 127.0.0.1, then serve
    python -m deployments.serve   # same as `episode2lora serve`

The YAML file is the one source of the deployments (names, entrypoints, default parameters,
schedules, work pool): served from here, or registered with the work pool by Prefect's own
`prefect deploy --all --prefect-file deployments/prefect.yaml` (README). Served runs execute in
the project folder, as a worker's runs do, so relative paths mean the same under both.
"""

from __future__ import annotations

import importlib
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from deployments.api_server import dies_with_parent, server_settings, stop, uvicorn_command, wait_healthy

PROJECT = Path(__file__).resolve().parents[1]
CONFIG = PROJECT / "deployments" / "prefect.yaml"
PREFECT_HOME = Path(os.environ.get("PREFECT_HOME") or PROJECT / ".cache" / "prefect")
"""Where `ui` keeps the local server's database: $PREFECT_HOME, else .cache/prefect in the project."""


class DeploymentConfigError(ValueError):
    """The deployments file is missing something or names something that does not exist."""


def read_config(path: Path | str = CONFIG) -> list[dict[str, Any]]:
    """The `deployments:` entries of a prefect.yaml, each checked for a name and an entrypoint."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise DeploymentConfigError(f"deployments file not found: {path}") from None
    entries = data.get("deployments") if isinstance(data, dict) else None
    if not entries:
        raise DeploymentConfigError(f"{path} has no 'deployments:' list")
    for i, entry in enumerate(entries):
        for field in ("name", "entrypoint"):
            if not entry.get(field):
                raise DeploymentConfigError(f"{path}: deployments[{i}].{field} is missing")
        if ":" not in entry["entrypoint"]:
            raise DeploymentConfigError(
                f"{path}: deployments[{i}].entrypoint must look like 'flows/file.py:flow', got {entry['entrypoint']!r}")
    return entries


def load_flow(entrypoint: str) -> Any:
    """Import the flow named by 'flows/episode_to_lora.py:episode_to_lora' as a module attribute."""
    file, _, attr = entrypoint.partition(":")
    module = importlib.import_module(Path(file).with_suffix("").as_posix().replace("/", "."))
    try:
        return getattr(module, attr)
    except AttributeError:
        raise DeploymentConfigError(f"entrypoint {entrypoint!r}: {module.__name__} has no flow {attr!r}") from None


def build_deployments(path: Path | str = CONFIG) -> list[Any]:
    """RunnerDeployments for `prefect.serve`, one per entry of the file."""
    from prefect.schedules import Cron, Interval
    from prefect.types.entrypoint import EntrypointType

    deployments = []
    for entry in read_config(path):
        schedules = []
        for spec in entry.get("schedules") or []:
            if "cron" in spec:
                schedules.append(Cron(spec["cron"], timezone=spec.get("timezone"), active=spec.get("active", True)))
            elif "interval" in spec:
                schedules.append(Interval(spec["interval"], timezone=spec.get("timezone"), active=spec.get("active", True)))
            else:
                raise DeploymentConfigError(f"{path}: schedule of {entry['name']!r} needs 'cron' or 'interval'")
        deployments.append(load_flow(entry["entrypoint"]).to_deployment(
            name=entry["name"],
            description=entry.get("description"),
            tags=entry.get("tags"),
            parameters=entry.get("parameters") or {},
            schedules=schedules,
            entrypoint_type=EntrypointType.MODULE_PATH,
        ))
    return deployments


def serve_all(path: Path | str = CONFIG, limit: int | None = None) -> None:
    """Serve all deployments until interrupted; their runs execute in subprocesses of this one.

    The runs execute in the project folder (relative paths in parameters resolve there, as they
    do for a worker's runs), whichever folder this was started from.
    """
    from prefect import serve

    deployments = build_deployments(path)
    os.chdir(PROJECT)
    serve(*deployments, limit=limit)


# ---- a local Prefect server ----------------------------------------------------------------

def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def start_server(port: int, home: Path = PREFECT_HOME, log: Path | None = None, host: str = "127.0.0.1",
                 auth_string: str | None = None) -> subprocess.Popen:
    """Prefect's server (API, UI and services, as `prefect server start` runs them) on `host`:`port` as a child
    process that dies with this one, state kept in `home`, locked to its own UI (deployments/api_server.py:
    the Host check, CSRF, CORS; an auth string off 127.0.0.1)."""
    settings = server_settings(port, host, auth_string)  # ValueError: beyond 127.0.0.1 without an auth string
    if not port_free(port, "127.0.0.1" if host == "0.0.0.0" else host):
        raise OSError(f"port {port} on {host} is in use; pick another with --port")
    home.mkdir(parents=True, exist_ok=True)
    browser_host = "127.0.0.1" if host == "0.0.0.0" else host
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               PREFECT_SERVER_API_HOST=host, PREFECT_SERVER_API_PORT=str(port),
               PREFECT_UI_API_URL=f"http://{browser_host}:{port}/api",  # the browser talks to this port
               PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT="false", **settings)
    env.pop("PREFECT_API_URL", None)
    out = open(log or home / "server.log", "ab")
    env["PREFECT__SERVER_FINAL"] = "1"
    return subprocess.Popen(uvicorn_command(host, port, "warning"), env=env, stdout=out, stderr=subprocess.STDOUT,
                            preexec_fn=dies_with_parent, cwd=PROJECT)


def ui(port: int = 4200, path: Path | str = CONFIG, limit: int | None = None, home: Path = PREFECT_HOME,
       host: str = "127.0.0.1", auth_string: str | None = None) -> None:
    """Start a local server, serve the deployments against it; Ctrl-C stops both."""
    if "prefect" in sys.modules:
        raise RuntimeError("ui() must run before prefect is imported (it sets PREFECT_API_URL)")
    api_url = f"http://127.0.0.1:{port}/api"
    server = start_server(port, home, host=host, auth_string=auth_string)
    try:
        wait_healthy(api_url, server)
        os.environ.update(PREFECT_API_URL=api_url, PREFECT_HOME=str(home), **server_settings(port, host, auth_string))
        print(f"Prefect UI: http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}  (server log: {home / 'server.log'})",
              flush=True)
        serve_all(path, limit)
    except KeyboardInterrupt:
        pass
    finally:
        stop(server)


if __name__ == "__main__":  # pragma: no cover
    serve_all(sys.argv[1] if len(sys.argv) > 1 else CONFIG)
