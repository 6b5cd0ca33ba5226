"""The local Prefect API servers this project starts: the one a CLI run talks to, and `ui`'s.

Both are locked to this machine with Prefect's own settings (`server_settings`): CSRF protection
on, CORS limited to the UI's own origin, and an API auth string when the server listens beyond
127.0.0.1. Both run Prefect's app behind a Host check (`create_app`): a request whose `Host` is
not a loopback name or the configured host is refused with 400, so a web page that rebinds its
own DNS name to 127.0.0.1 cannot reach the API. Both die with the process that started them (Linux parent-death signal), so a killed
`episode2lora run` leaves no server behind.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from tasks.run.links import FILES_ROUTE

PR_SET_PDEATHSIG = 1
ALLOWED_HOSTS = "EPISODE2LORA_ALLOWED_HOSTS"
"""Environment variable: the comma-separated Host names the server answers (set by `server_settings`)."""
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def dies_with_parent() -> None:
    """`preexec_fn` of a child server: SIGTERM it when the process that started it dies (even by SIGKILL).

    Start the child from the main thread: the signal follows the thread that forked it.
    """
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def server_settings(port: int, host: str = "127.0.0.1", auth_string: Optional[str] = None) -> dict[str, str]:
    """Prefect settings of a server on `host:port` that a web page of another origin cannot drive.

    Raises ValueError when `host` is not 127.0.0.1 and no `auth_string` is given.
    """
    local = host in LOOPBACK_NAMES
    if not local and not auth_string:
        raise ValueError(f"a server on {host} is reachable from other machines: give it an auth string "
                         "(--auth user:password, or PREFECT_SERVER_API_AUTH_STRING)")
    browser_hosts = ["127.0.0.1", "localhost"] + ([] if local or host == "0.0.0.0" else [host])
    if host == "0.0.0.0":
        browser_hosts.append(socket.gethostname())
    settings = {
        ALLOWED_HOSTS: ",".join(allowed_hosts(host)),
        "PREFECT_SERVER_CSRF_PROTECTION_ENABLED": "true",
        "PREFECT_CLIENT_CSRF_SUPPORT_ENABLED": "true",
        "PREFECT_SERVER_CORS_ALLOWED_ORIGINS": ",".join(f"http://{h}:{port}" for h in browser_hosts),
    }
    if auth_string:
        settings.update(PREFECT_SERVER_API_AUTH_STRING=auth_string, PREFECT_API_AUTH_STRING=auth_string)
    return settings


def allowed_hosts(host: str) -> list[str]:
    """The `Host` names a server listening on `host` answers: the loopback names and `host` itself;
    for 0.0.0.0 (every interface, behind an auth string) this machine's names and addresses."""
    names = list(LOOPBACK_NAMES)
    if host == "0.0.0.0":
        fqdn = socket.getfqdn()
        names += [socket.gethostname(), fqdn]
        try:
            names += socket.gethostbyname_ex(fqdn)[2]
        except OSError:
            pass
    elif host not in names:
        names.append(host)
    return list(dict.fromkeys(n.lower() for n in names if n))




def run_file_path(path: str) -> Optional[Path]:
    """The file `path` names when it may be served: a regular file inside a run folder (one of its parents
    holds run.json), no hidden part (`.prefect-results`, `.lock`), after symlinks and `..` are resolved;
    else None."""
    target = Path("/" + path.lstrip("/")).resolve()
    if not target.is_file() or any(part.startswith(".") for part in target.parts):
        return None
    return target if any((parent / "run.json").is_file() for parent in target.parents) else None


async def serve_run_file(request):
    """GET a file of a run folder (read-only): its report, its LoRA file; 404 for anything else."""
    from starlette.responses import FileResponse, PlainTextResponse

    target = run_file_path(request.path_params["path"])
    if target is None:
        return PlainTextResponse("not a file of a run folder", status_code=404)
    return FileResponse(target)


def create_app():
    """Prefect's server app (API, and the UI where enabled) with the run folders' files beside it
    (read-only, `FILES_ROUTE`), behind a Host check: uvicorn's `--factory`.

    The allowed names come from `EPISODE2LORA_ALLOWED_HOSTS` (loopback names when unset).
    """
    from prefect.server.api.server import create_app as prefect_app
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.routing import Route

    names = [n for n in os.environ.get(ALLOWED_HOSTS, "").split(",") if n] or list(LOOPBACK_NAMES)
    app = prefect_app()
    app.router.routes.insert(0, Route(FILES_ROUTE + "/{path:path}", serve_run_file, methods=["GET", "HEAD"]))
    return TrustedHostMiddleware(app, allowed_hosts=names, www_redirect=False)


def uvicorn_command(host: str, port: int, log_level: str = "error") -> list[str]:
    """The command that serves `create_app` on `host`:`port` (the caller sets the environment)."""
    return [sys.executable, "-m", "uvicorn", "--factory", "deployments.api_server:create_app", "--host", host,
            "--port", str(port), "--log-level", log_level, "--lifespan", "on"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(api_url: str, process: subprocess.Popen | None = None, timeout: float = 120.0) -> None:
    """Block until `<api_url>/health` answers; raises if the server process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"prefect server exited with code {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"prefect server at {api_url} not healthy after {timeout:.0f} s")


def stop(process: subprocess.Popen, grace: float = 15.0) -> None:
    """Terminate a child process, killing it if it does not exit within `grace` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def run_api() -> Iterator[Optional[str]]:
    """The API server of one CLI run: Prefect's temporary server (uvicorn, no UI) as a child that dies
    with this process (stopped at exit), PREFECT_API_URL pointing at it. Yields its URL, or None (and starts nothing)
    when PREFECT_API_URL is set already or Prefect is imported (its settings are fixed then)."""
    if os.environ.get("PREFECT_API_URL") or "prefect" in sys.modules:
        yield None
        return
    if os.environ.get("PREFECT_HOME"):  # the server's database lives there; Prefect makes only the last folder
        os.makedirs(os.path.expanduser(os.environ["PREFECT_HOME"]), exist_ok=True)
    port = free_port()
    env = {**os.environ, **server_settings(port), "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
           "PREFECT__SERVER_FINAL": "1"}
    timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", 180))
    process = subprocess.Popen(uvicorn_command("127.0.0.1", port), env=env, preexec_fn=dies_with_parent,
                               stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_healthy(url, process, timeout)
    except BaseException:
        stop(process)
        raise
    os.environ["PREFECT_API_URL"] = url
    atexit.register(stop, process)  # after Prefect's own exit handlers (they send the last logs) have run
    yield url
