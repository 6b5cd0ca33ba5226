"""`episode2lora`: run, inspect, resume and clean runs from the terminal.

This module only assembles the app; the commands live in run_commands.py (episode runs),
sources_cli.py (render folders, photo sets), training_commands.py (train-only, versions) and
deploy_commands.py (Prefect deployments), their shared helpers in common.py.
"""

from __future__ import annotations

import re
import sys
from typing import Any

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

from episode2lora import deploy_commands, run_commands, sources_cli, training_commands
from episode2lora.common import quiet_prefect


def shown_type(param: Any, ctx: Any) -> str | None:
    """The type `--help` shows for `param`: nothing for a flag (it takes no value), the item type of a
    list (`<str>` after `inputs...`, `<str>, repeatable` for an option); None: typer's own."""
    if getattr(param, "is_flag", False):
        return ""
    item = re.fullmatch(r"<list\[(.+)\]>", param.display_type(ctx) or "")
    if item is None:
        return None
    return f"<{item[1]}>" if isinstance(param, TyperArgument) else f"<{item[1]}>, repeatable"


class _ShownTypes:
    """`--help` shows a type only where a value is given (`shown_type`)."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            shown = shown_type(param, ctx)
            if shown is not None:
                param.display_type_rich = lambda ctx, shown=shown: shown
        return params


class Command(_ShownTypes, TyperCommand):
    """A command of the app."""


class Group(_ShownTypes, TyperGroup):
    """The app's group of commands."""


app = typer.Typer(add_completion=False, no_args_is_help=True, cls=Group,
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
        app.command(command, cls=Command)(getattr(module, command))


@app.callback()
def _defaults() -> None:
    """Prefect's offline, quiet defaults before any command imports Prefect."""
    quiet_prefect()


def main() -> None:  # pragma: no cover - `python -m episode2lora`
    app(prog_name="episode2lora")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
