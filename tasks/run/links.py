"""Links on the Prefect run page to the files a person opens next: reports and LoRA files.

`publish_outputs(store)` looks for the cluster report, the evaluation report and every LoRA
file of a run and publishes each as a link artifact (`file://` when the Prefect server runs on
this machine, so the link opens; otherwise a markdown artifact naming the path on the machine
that ran it). Outside a Prefect run it does nothing.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from urllib.parse import urlparse

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


def server_is_local() -> bool:
    """True when the Prefect API is on this machine (or is the temporary in-process server)."""
    from prefect.settings import PREFECT_API_URL

    host = urlparse(PREFECT_API_URL.value() or "http://127.0.0.1").hostname or ""
    return host in LOCAL_HOSTS or host == socket.gethostname()


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
    local = server_is_local()
    for key, path, description in outputs:
        path = path.resolve()
        if local:
            create_link_artifact(path.as_uri(), link_text=str(path), key=artifact_key(key), description=description)
        else:
            create_markdown_artifact(f"**{description}**: `{path}` (on the machine that ran this flow)",
                                     key=artifact_key(key), description=description)
    return len(outputs)
