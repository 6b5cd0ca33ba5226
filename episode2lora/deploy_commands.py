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
    port: int = typer.Option(4200, "--port", help="port of the local Prefect server"),
    config: Optional[Path] = DEPLOYMENTS,
    limit: Optional[int] = LIMIT,
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on; anything but 127.0.0.1 (e.g. "
                             "0.0.0.0: every machine that can reach this one) needs --auth"),
    auth: Optional[str] = typer.Option(None, "--auth", envvar="PREFECT_SERVER_API_AUTH_STRING",
                                       help="user:password the API and UI ask for (Prefect's API auth string)"),
) -> None:
    """Start a local Prefect server (UI on 127.0.0.1) and serve the deployments; Ctrl-C stops both."""
    from deployments.serve import CONFIG, DeploymentConfigError, ui as start_ui

    try:
        start_ui(port, config or CONFIG, limit, host=host, auth_string=auth)
    except (DeploymentConfigError, OSError, RuntimeError, ValueError) as exc:
        fail(str(exc))
