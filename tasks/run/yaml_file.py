"""Reading a YAML file that must hold a mapping (a run config, a select overrides file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def read_yaml_mapping(path: str | Path, what: str, holds: str, error: type[Exception]) -> dict[str, Any]:
    """The mapping in the YAML file `path` (an empty file: {}). Raises `error` saying which `what` file is
    missing, is not YAML, or does not hold a mapping (`holds` says what it should hold)."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise error(f"{what} file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise error(f"{what} file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise error(f"{what} file {path} must hold a mapping {holds}")
    return data
