"""`episode2lora serve | ui`: the Prefect deployments of deployments/prefect.yaml (register them with a work pool by `prefect deploy`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from episode2lora.common import fail


DEPLOYMENTS = typer.Option(None, "--config", help="deployments file (default: deployments/prefect.yaml)")
LIMIT = typer.Option(None, "--limit", help="at most this many runs at once")


def serve(config: Optional[Path] = DEPLOYMENTS, limit: Optional[int] = LIMIT) -> None:
    """Serve every deployment of deployments/prefect.yaml (full run, reprocess schedule, train-only, ...)."""
    from deployments.serve import CONFIG, DeploymentConfigError, serve_all

    try:
        serve_all(config or CONFIG, limit)
    except DeploymentConfigError as exc:
        fail(str(exc))


def ui(
    port: int = typer.Option(4200, "--port", help="port of the local Prefect server on 127.0.0.1"),
    config: Optional[Path] = DEPLOYMENTS,
    limit: Optional[int] = LIMIT,
) -> None:
    """Start a local Prefect server (UI on 127.0.0.1) and serve the deployments; Ctrl-C stops both."""
    from deployments.serve import CONFIG, DeploymentConfigError, ui as start_ui

    try:
        start_ui(port, config or CONFIG, limit)
    except (DeploymentConfigError, OSError, RuntimeError) as exc:
        fail(str(exc))
