"""Links on the Prefect run page to the files a person opens next: reports and LoRA files.

`publish_outputs(store)` looks for the cluster report, the evaluation report and every LoRA
file of a run and publishes each as a link artifact to the file served by the Prefect server itself
(`http://<server>/episode2lora/files/<path>`: the servers this project starts serve the run folders'
files read-only, deployments/api_server.py; a browser refuses `file://` links from an http page). Where
the server does not serve the file (another server, another machine) it is a markdown artifact naming
the path on the machine that ran the flow. Outside a Prefect run it does nothing.
"""

from __future__ import annotations

import re
import socket
import urllib.request
from pathlib import Path
from urllib.parse import quote, urlparse

from tasks.run.store import RunStore

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}


def run_outputs(store: RunStore) -> list[tuple[str, Path, str]]:
    """(artifact key, file, description) of the run's reports and LoRA files that exist, in that order."""
    root = store.root
    found = [("cluster-report", root / "report" / "cluster_report.html", "cluster report: tiers, map, contact sheets"),
             ("evaluation-report", root / "evaluate" / "report.md", "evaluation report: scores per checkpoint")]
    outputs = [item for item in found if item[1].is_file()]
    for stage, what in (("train", "LoRA (last checkpoint)"), ("evaluate", "LoRA (best checkpoint)")):
        for lora in sorted((root / stage / "shards").glob("*/*.safetensors")):
            outputs.append((f"lora-{stage}-{lora.stem}", lora, f"{what} of {lora.stem}, kohya format"))
    return outputs


FILES_ROUTE = "/episode2lora/files"
"""The route of the run folders' files on the servers this project starts (deployments/api_server.py)."""


def served_url(path: Path) -> str | None:
    """The URL at which the Prefect server of this run serves `path` (it runs on this machine and answers a
    HEAD request for it), else None."""
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value() or ""
    host = urlparse(api).hostname or ""
    if not api or not (host in LOCAL_HOSTS or host == socket.gethostname()):
        return None
    url = api.rstrip("/").removesuffix("/api") + FILES_ROUTE + quote(str(path))
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=5) as response:
            return url if response.status == 200 else None
    except OSError:
        return None


def artifact_key(text: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:60]


def publish_outputs(store: RunStore) -> int:
    """Publish a link artifact per report and LoRA file of the run; returns how many (0 outside a run)."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact
    from prefect.context import FlowRunContext, TaskRunContext

    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return 0
    outputs = run_outputs(store)
    for key, path, description in outputs:
        path = path.resolve()
        url = served_url(path)
        if url:
            create_link_artifact(url, link_text=str(path), key=artifact_key(key), description=description)
        else:
            create_markdown_artifact(f"**{description}**: `{path}` (on the machine that ran this flow)",
                                     key=artifact_key(key), description=description)
    return len(outputs)
