"""A model named by a local path that is not there is reported as missing, not as a hub download problem."""

from __future__ import annotations

from pathlib import Path


def looks_local(name: str) -> bool:
    """True for '/models/sd15', './sd15', '~/sd15', 'C:\\\\sd15' or 'a/b/c': never a Hugging Face id ('org/name')."""
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1


def missing_path(name: str, what: str) -> str | None:
    """"<what> '<name>' does not exist (...)" when `name` is a local path that is not there, else None."""
    path = Path(name).expanduser()
    if looks_local(name) and not path.exists():
        return f"{what} '{name}' does not exist (no file or folder at {path.resolve()})"
    return None
