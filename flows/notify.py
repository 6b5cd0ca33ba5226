"""Webhook notifications: when a run completes or fails, POST a JSON summary to a URL.

The payload (like the ActorMaker training callback)::

    {"run": "<run name>", "status": "completed" | "failed" | "crashed",
     "flow_run_id": "...", "run_dir": "/abs/path/of/the/run",
     "stages": {"frames": {"state": "done", "rows": 51, "kept": 40, "quarantined": 0}, ...},
     "loras": ["/abs/path/to/name.safetensors", ...],
     "error": null | "what went wrong"}

Webhooks go to any http(s) host unless EPISODE2LORA_WEBHOOK_HOSTS lists the allowed ones; a
redirect is followed only to the same host, and logs show the URL with its secrets redacted.

Attach `webhook_hooks()` to a flow whose parameters include `name`, `runs_dir` and
`webhook_url` (or pass `describe` to build the payload from other parameters); nothing is
sent when `webhook_url` is empty.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable

from tasks.pipelines import STAGES
from tasks.run.store import RunStore

log = logging.getLogger("episode2lora.notify")


def lora_paths(store: RunStore) -> list[str]:
    """The run's final LoRA files: evaluate's choice per character, else train's output."""
    for stage, column in (("evaluate", "final_lora"), ("train", "lora_path")):
        if store.is_done(stage):
            table = store.read_manifest(stage)
            if column in table.column_names:
                return sorted(str(store.root / p) for p in table.column(column).to_pylist() if p)
    return []


def run_payload(store: RunStore, status: str, *, error: str | None = None, flow_run_id: str | None = None) -> dict[str, Any]:
    """The JSON body describing a run: per-stage counts from the run store and the LoRA files."""
    stages = {}
    for stage in STAGES:
        s = store.stage_status(stage)
        if s["state"] != "missing":
            stages[stage] = {k: s[k] for k in ("state", "rows", "kept", "quarantined")}
    return {"run": store.name, "status": status, "flow_run_id": flow_run_id, "run_dir": str(store.root),
            "stages": stages, "loras": lora_paths(store), "error": error}


def run_store_payload(parameters: dict[str, Any], status: str, error: str | None, flow_run_id: str) -> dict | None:
    """Payload of a flow whose parameters name a run (`name`, `runs_dir`)."""
    if not parameters.get("name"):
        return None
    store = RunStore(parameters.get("runs_dir") or "data/runs", parameters["name"])
    return run_payload(store, status, error=error, flow_run_id=flow_run_id)


HOSTS_ENV = "EPISODE2LORA_WEBHOOK_HOSTS"
"""Comma-separated host names webhooks may be sent to (unset: any http(s) host). An environment
setting of the process that runs the flows, so flow parameters from the API cannot widen it."""


def allowed_hosts() -> set[str] | None:
    """The hosts of HOSTS_ENV, or None when every host is allowed."""
    value = os.environ.get(HOSTS_ENV, "").strip()
    return {h.strip().lower() for h in value.split(",") if h.strip()} if value else None


_TOKEN = re.compile(r"[A-Za-z0-9_\-]{20,}")
"""A path segment this long is taken for a secret (Slack and Discord hooks keep theirs in the path)."""


def redact(url: str) -> str:
    """`url` fit for a log: query values, a password and token-like path segments replaced by '***'."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    netloc = f"***@{netloc}" if "@" in parts.netloc else netloc
    query = "&".join(f"{key}=***" for key, _ in urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    path = "/".join("***" if _TOKEN.fullmatch(segment) else segment for segment in parts.path.split("/"))
    return urllib.parse.urlunsplit((parts.scheme, netloc, path, query, ""))


class _SameHostRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to the same host and port (or its https port): a redirect must not carry
    the payload past the host allow-list."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        old, new = urllib.parse.urlsplit(req.full_url), urllib.parse.urlsplit(newurl)
        if new.hostname != old.hostname or (new.scheme, new.port) not in {(old.scheme, old.port), ("https", None)}:
            raise urllib.error.HTTPError(redact(req.full_url), code, f"redirect to another host not followed "
                                         f"({redact(newurl)})", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_SameHostRedirects)


def post_json(url: str, payload: dict[str, Any], *, attempts: int = 3, timeout: float = 10.0) -> int:
    """POST `payload` as JSON; retries on network errors and 5xx; follows redirects only on the same host.
    Returns the HTTP status.

    Raises ValueError for a URL that is not http(s), and the last error when every attempt failed.
    """
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"webhook_url must start with http:// or https://, got {redact(url)!r}")
    allowed = allowed_hosts()
    host = urllib.parse.urlsplit(url).hostname or ""
    if allowed is not None and host not in allowed:
        raise ValueError(f"webhook host {host!r} is not in {HOSTS_ENV} ({', '.join(sorted(allowed))})")
    body = json.dumps(payload, default=str).encode()
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "episode2lora"})
    for attempt in range(1, attempts + 1):
        try:
            with _OPENER.open(request, timeout=timeout) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            if exc.code < 500 or attempt == attempts:
                raise
        except (urllib.error.URLError, TimeoutError, ConnectionError):
            if attempt == attempts:
                raise
        time.sleep(2 ** (attempt - 1))
    raise AssertionError("unreachable")


Describe = Callable[[dict[str, Any], str, "str | None", str], "dict | None"]


def notify(flow_run: Any, state: Any, status: str, describe: Describe = run_store_payload) -> None:
    """Send the payload `describe` builds to the run's `webhook_url` parameter, if any; never raises."""
    params = flow_run.parameters or {}
    url = params.get("webhook_url")
    if not url:
        return
    error = None if status == "completed" else (state.message or status)
    try:
        from prefect.logging.loggers import flow_run_logger

        logger = flow_run_logger(flow_run)
    except Exception:  # pragma: no cover - outside Prefect
        logger = log
    try:
        payload = describe(params, status, error, str(flow_run.id))
        if payload is not None:
            code = post_json(url, payload)
            logger.info("webhook: run %s %s, POSTed to %s (HTTP %s)", payload.get("run"), status, redact(url), code)
    except Exception as exc:  # a notification must never change the run's outcome
        logger.warning("webhook %s failed: %s", redact(url), exc)


def webhook_hooks(describe: Describe = run_store_payload) -> dict[str, list]:
    """Keyword arguments for `@flow(...)` that POST `describe(...)` on completion, failure and crash."""
    def on_completion(flow: Any, flow_run: Any, state: Any) -> None:
        notify(flow_run, state, "completed", describe)

    def on_failure(flow: Any, flow_run: Any, state: Any) -> None:
        notify(flow_run, state, "failed", describe)

    def on_crashed(flow: Any, flow_run: Any, state: Any) -> None:
        notify(flow_run, state, "crashed", describe)

    return {"on_completion": [on_completion], "on_failure": [on_failure], "on_crashed": [on_crashed]}
