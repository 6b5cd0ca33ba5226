"""The training versions registry: one row per LoRA training, in `<runs-dir>/versions.parquet`.

Like the ActorMaker document's version history: id, character, parameters, status
(running / completed / failed), start and end, steps, final and best validation loss, artifact
paths, error, and what evaluation chose. Every change rewrites the file atomically under a file
lock, so parallel trainings (threads or processes) never lose each other's rows.
"""

from __future__ import annotations

import fcntl
import json
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.run.store import write_table

FILE = "versions.parquet"
SCHEMA = pa.schema([
    ("version_id", pa.string()),
    ("run", pa.string()),
    ("character", pa.string()),
    ("trigger", pa.string()),
    ("trainer", pa.string()),
    ("base", pa.string()),
    ("profile", pa.string()),
    ("params", pa.string()),            # JSON of the resolved settings
    ("status", pa.string()),            # running / completed / failed
    ("started_at", pa.string()),        # ISO 8601, UTC
    ("ended_at", pa.string()),
    ("steps", pa.int64()),
    ("total_steps", pa.int64()),
    ("final_loss", pa.float64()),
    ("final_val_loss", pa.float64()),
    ("best_val_loss", pa.float64()),
    ("lora_path", pa.string()),
    ("diffusers_path", pa.string()),
    ("checkpoints", pa.string()),       # JSON list of [step, path]
    ("output_dir", pa.string()),
    ("error", pa.string()),
    ("best_checkpoint", pa.string()),   # set by evaluation
    ("eval_score", pa.float64()),
    ("final_lora", pa.string()),
    ("eval_table", pa.string()),
])
STATUSES = ("running", "completed", "failed")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@contextmanager
def _locked(runs_dir: Path) -> Iterator[Path]:
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    with open(runs_dir / f".{FILE}.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield runs_dir / FILE
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    table = pq.read_table(path)
    rows = table.to_pylist()
    return [{name: row.get(name) for name in SCHEMA.names} for row in rows]


def _write(path: Path, rows: list[dict[str, Any]]) -> None:
    write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path)


def start_version(runs_dir: Path | str, *, character: str, run: str = "", trigger: str = "", trainer: str = "diffusers",
                  base: str = "", profile: str = "", params: dict[str, Any] | None = None, output_dir: str = "",
                  total_steps: int | None = None, version_id: str | None = None) -> str:
    """Record a training as running; returns its version id (reuses `version_id` when resuming)."""
    version_id = version_id or f"{character}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    with _locked(Path(runs_dir)) as path:
        rows = [r for r in _read(path) if r["version_id"] != version_id]
        previous = next((r for r in _read(path) if r["version_id"] == version_id), None)
        row = {name: None for name in SCHEMA.names}
        row.update(version_id=version_id, run=run, character=character, trigger=trigger, trainer=trainer, base=base,
                   profile=profile, params=json.dumps(params or {}, sort_keys=True, default=str), status="running",
                   started_at=(previous or {}).get("started_at") or _now(), output_dir=output_dir,
                   total_steps=total_steps)
        _write(path, rows + [row])
    return version_id


def update_version(runs_dir: Path | str, version_id: str, **fields: Any) -> dict[str, Any]:
    """Set fields of one version (unknown field names raise KeyError naming them)."""
    unknown = set(fields) - set(SCHEMA.names)
    if unknown:
        raise KeyError(f"unknown version fields: {', '.join(sorted(unknown))}; known: {', '.join(SCHEMA.names)}")
    if "status" in fields and fields["status"] not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {fields['status']!r}")
    with _locked(Path(runs_dir)) as path:
        rows = _read(path)
        for row in rows:
            if row["version_id"] == version_id:
                row.update({k: (json.dumps(v, default=str) if k == "checkpoints" and not isinstance(v, str) else v)
                            for k, v in fields.items()})
                if fields.get("status") in ("completed", "failed"):
                    row["ended_at"] = _now()
                _write(path, rows)
                return row
    raise KeyError(f"no training version '{version_id}' in {Path(runs_dir) / FILE}")


def finish_version(runs_dir: Path | str, version_id: str, outcome: Any) -> dict[str, Any]:
    """Mark a version completed with a trainer's outcome (models.lora_trainer.TrainOutcome)."""
    return update_version(runs_dir, version_id, status="completed", steps=outcome.steps, total_steps=outcome.steps,
                          final_loss=outcome.final_loss, final_val_loss=outcome.final_val_loss,
                          best_val_loss=outcome.best_val_loss, lora_path=outcome.lora_path,
                          diffusers_path=outcome.diffusers_path, checkpoints=outcome.checkpoints, error=None)


def fail_version(runs_dir: Path | str, version_id: str, error: BaseException | str) -> dict[str, Any]:
    """Mark a version failed with its error (type and message)."""
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return update_version(runs_dir, version_id, status="failed", error=text[:2000])


def read_versions(runs_dir: Path | str) -> pa.Table:
    """Every recorded training, oldest first (an empty table when there are none)."""
    path = Path(runs_dir) / FILE
    if not path.is_file():
        return SCHEMA.empty_table()
    return pa.Table.from_pylist(sorted(_read(path), key=lambda r: r["started_at"] or ""), schema=SCHEMA)
