"""Webhook notifications: when a run completes or fails, POST a JSON summary to a URL.

The payload (like the ActorMaker training callback)::

    {"run": "<run name>", "status": "completed" | "failed" | "crashed",
     "flow_run_id": "...", "run_dir": "/abs/path/of/the/run",
     "stages": {"frames": {"state": "done", "rows": 51, "kept": 40, "quarantined": 0}, ...},
     "loras": ["/abs/path/to/name.safetensors", ...],
     "error": null | "what went wrong"}

Attach `webhook_hooks()` to a flow whose parameters include `name`, `runs_dir` and
`webhook_url`; nothing is sent when `webhook_url` is empty.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from typing import Any

from tasks.store import STAGES, RunStore

log = logging.getLogger("episode2lora.notify")


def run_payload(store: RunStore, status: str, *, error: str | None = None, flow_run_id: str | None = None) -> dict[str, Any]:
    """The JSON body describing a run: per-stage counts from the run store and the LoRA files."""
    stages = {}
    for stage in STAGES:
        s = store.stage_status(stage)
        if s["state"] != "missing":
            stages[stage] = {k: s[k] for k in ("state", "rows", "kept", "quarantined")}
    train = store.root / "train"
    loras = sorted(str(p) for p in train.rglob("*.safetensors")) if train.is_dir() else []
    return {"run": store.name, "status": status, "flow_run_id": flow_run_id, "run_dir": str(store.root),
            "stages": stages, "loras": loras, "error": error}


def post_json(url: str, payload: dict[str, Any], *, attempts: int = 3, timeout: float = 10.0) -> int:
    """POST `payload` as JSON; retries on network errors and 5xx. Returns the HTTP status.

    Raises ValueError for a URL that is not http(s), and the last error when every attempt failed.
    """
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"webhook_url must start with http:// or https://, got {url!r}")
    body = json.dumps(payload, default=str).encode()
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "episode2lora"})
    for attempt in range(1, attempts + 1):
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            if exc.code < 500 or attempt == attempts:
                raise
        except (urllib.error.URLError, TimeoutError, ConnectionError):
            if attempt == attempts:
                raise
        time.sleep(2 ** (attempt - 1))
    raise AssertionError("unreachable")


def notify(flow_run: Any, state: Any, status: str) -> None:
    """Send the run's payload to its `webhook_url` parameter, if any; never raises."""
    params = flow_run.parameters or {}
    url = params.get("webhook_url")
    if not url or not params.get("name"):
        return
    store = RunStore(params.get("runs_dir") or "data/runs", params["name"])
    error = None if status == "completed" else (state.message or status)
    try:
        post_json(url, run_payload(store, status, error=error, flow_run_id=str(flow_run.id)))
    except Exception as exc:  # a notification must never change the run's outcome
        log.warning("webhook %s failed: %s", url, exc)


def _on_completion(flow: Any, flow_run: Any, state: Any) -> None:
    notify(flow_run, state, "completed")


def _on_failure(flow: Any, flow_run: Any, state: Any) -> None:
    notify(flow_run, state, "failed")


def _on_crashed(flow: Any, flow_run: Any, state: Any) -> None:
    notify(flow_run, state, "crashed")


def webhook_hooks() -> dict[str, list]:
    """Keyword arguments for `@flow(...)` that send the webhook on completion, failure and crash."""
    return {"on_completion": [_on_completion], "on_failure": [_on_failure], "on_crashed": [_on_crashed]}

