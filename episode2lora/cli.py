"""`episode2lora`: run, inspect, resume and clean runs from the terminal.

This module only assembles the app; the commands live in run_commands.py (episode runs),
sources_cli.py (render folders, photo sets), training_commands.py (train-only, versions) and
deploy_commands.py (Prefect deployments), their shared helpers in common.py.
"""

from __future__ import annotations

import sys

import typer

from episode2lora import deploy_commands, run_commands, sources_cli, training_commands
from episode2lora.common import quiet_prefect

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="`episode2lora`: run, inspect, resume and clean runs from the terminal.")

COMMANDS = [
    (run_commands, ["run", "resume", "status", "clean", "report"]),
    (deploy_commands, ["serve", "ui"]),
    (run_commands, ["validate"]),
    (training_commands, ["train", "versions"]),
    (sources_cli, ["renders", "photos"]),
]
for module, names in COMMANDS:
    for command in names:
        app.command(command)(getattr(module, command))


@app.callback()
def _defaults() -> None:
    """Prefect's offline, quiet defaults before any command imports Prefect."""
    quiet_prefect()


def main() -> None:  # pragma: no cover - `python -m episode2lora`
    app(prog_name="episode2lora")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
