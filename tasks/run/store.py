"""The run store: one folder per run, one folder per stage, markers that say what is done.

Layout of a run (``<runs-dir>/<name>/``)::

    run.json                    inputs and resolved parameters (what `resume` replays)
    .lock                       held by the process writing the run
    <stage>/manifest.parquet    the stage's manifest (paths relative to the run folder)
    <stage>/params.json         the parameters the stage ran with
    <stage>/_DONE.json          marker: fingerprint + manifest digest, written last
    <stage>/plan.json           shard keys the stage will write (for `status`)
    <stage>/shards/<key>/       one committed shard: files + rows.parquet + _DONE.json

Every write goes to a temporary name first and is renamed into place, so a crash never
leaves a half output that looks done.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import unicodedata
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

MARKER = "_DONE.json"


MANIFEST = "manifest.parquet"
QUARANTINE = "quarantine: "
"""Prefix of `drop_reason` for items that could not be read; every stage uses it."""


class RunLockedError(RuntimeError):
    """Another process is writing this run."""


class StageNotDoneError(RuntimeError):
    """A stage's output was asked for before the stage finished."""


class RunNameError(ValueError):
    """A run name outside RUN_NAME_ALPHABET."""


class RunChangedError(ValueError):
    """A command would change an existing run's inputs or parameters."""


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}")
RUN_NAME_ALPHABET = "1-80 characters of A-Z a-z 0-9 . _ -, starting with a letter or a digit"
"""What a run name may be: a single folder name, used as typed (never rewritten)."""


def check_run_name(name: str) -> str:
    """`name` unchanged when it is a valid run name; else RunNameError saying the alphabet."""
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name):
        raise RunNameError(f"run name {name!r} is not allowed: use {RUN_NAME_ALPHABET}")
    return name


def record_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two run records, as dotted names ('inputs', 'params.frames.mode');
    `until` (how far to go) is not a change."""
    changes = []

    def walk(a: Any, b: Any, path: str, depth: int) -> None:
        if a == b:
            return
        if isinstance(a, dict) and isinstance(b, dict) and depth < 3:
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{path}.{key}" if path else str(key), depth + 1)
        else:
            changes.append(path)

    for key in ("flow", "inputs", "params"):
        walk(old.get(key), new.get(key), key, 1)
    return changes


def safe_name(name: str, *, max_len: int = 80) -> str:
    """Turn any user text into a safe single path component (ASCII, no separators, no dots-only).

    >>> safe_name("../My Hero ü!")
    'My_Hero_u'
    """
    text = unicodedata.normalize("NFKD", str(name)).encode("ascii", "ignore").decode()
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")
    text = re.sub(r"_+", "_", text)[:max_len].strip("._-")
    if not text:
        text = "x" + hashlib.sha256(str(name).encode()).hexdigest()[:8]
    return text


def fingerprint(stage: str, version: int, params: dict[str, Any], inputs: dict[str, str]) -> str:
    """Hash of what determines a stage's output: name, version, parameters, input digests."""
    payload = json.dumps(
        {"stage": stage, "version": version, "params": params, "inputs": inputs},
        sort_keys=True, default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def file_digest(path: Path, *, chunk: int = 1 << 20) -> str:
    """sha256 of a whole file (manifests are small)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def _read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _count_files(folder: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(folder))


ROW_GROUP_BYTES = 4 << 20
"""Row groups of about this many (uncompressed) bytes, so a reader can decode a part of a big
manifest (one episode's embeddings) without decoding all of it."""


def write_table(table: pa.Table, path: Path) -> None:
    """Write a Parquet file atomically (temporary name, then rename), in row groups of ~ROW_GROUP_BYTES."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    row_bytes = table.nbytes / max(table.num_rows, 1)
    pq.write_table(table, tmp, compression="zstd", row_group_size=max(64, int(ROW_GROUP_BYTES / max(row_bytes, 1))))
    os.replace(tmp, path)


FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


def write_error(path: Path) -> OSError:
    """The error for a file a library could not write (it said only "failed"), naming the likely cause."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    if free is not None and free < (1 << 20):
        return OSError(errno.ENOSPC, f"could not write {path}: the disk is full ({free} bytes free)")
    if path.parent.is_dir() and not os.access(path.parent, os.W_OK):
        return OSError(errno.EACCES, f"could not write {path}: its folder is not writable")
    return OSError(errno.EIO, f"could not write {path}")


def storage_cause(exc: BaseException) -> str | None:
    """'disk full' or 'read-only' when `exc` (or what caused it) is a write failing for that reason."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in FULL_DISK or "No space left" in str(exc):
            return "disk full"
        if isinstance(exc, OSError) and exc.errno in READ_ONLY:
            return "read-only"
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


class RunStore:
    """One run's folder: stage outputs, shard and stage markers, and the run lock."""

    def __init__(self, runs_dir: Path | str, name: str):
        self.name = check_run_name(name)
        self.root = Path(runs_dir).resolve() / self.name
        self._lock_fh = None

    # ---- lock -------------------------------------------------------------------------
    @contextmanager
    def lock(self) -> Iterator["RunStore"]:
        """Hold the run for writing; a second process gets RunLockedError at once."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / ".lock"
        fh = open(path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise RunLockedError(
                f"run '{self.name}' is being written by {holder} (lock {path}); "
                "wait for it to finish or stop it first"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        self._lock_fh = fh
        try:
            yield self
        finally:
            self._lock_fh = None
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()

    # ---- run record -------------------------------------------------------------------
    def write_run_record(self, record: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        _write_json(self.root / "run.json", record)

    def check_run_record(self, record: dict[str, Any], *, new_attempt: bool = False) -> None:
        """Raise RunChangedError when the run exists with other inputs or parameters than `record`
        (unless `new_attempt`: then `record_run` keeps the old record under attempts/)."""
        old = _read_json(self.root / "run.json")
        changes = record_changes(old, record) if old is not None else []
        if changes and not new_attempt:
            shown = ", ".join(changes[:6]) + (", ..." if len(changes) > 6 else "")
            raise RunChangedError(
                f"run '{self.name}' already exists with other {shown}; nothing was changed. Continue it as it was "
                f"with `episode2lora resume {self.name}`, pick a new --name, or pass --new-attempt to run it with "
                f"these (the old record is kept in {self.root / 'attempts'})")

    def record_run(self, record: dict[str, Any], *, new_attempt: bool = False) -> None:
        """Write run.json once `record` is checked (check_run_record); a replaced record is kept as
        attempts/<n>.json. Call under the lock."""
        self.check_run_record(record, new_attempt=new_attempt)
        old = _read_json(self.root / "run.json")
        if old is not None and record_changes(old, record):
            attempts = self.root / "attempts"
            attempts.mkdir(exist_ok=True)
            _write_json(attempts / f"{len(list(attempts.glob('*.json'))) + 1:03d}.json", old)
        self.write_run_record(record)

    def read_run_record(self) -> dict[str, Any]:
        record = _read_json(self.root / "run.json")
        if record is None:
            raise FileNotFoundError(f"no run named '{self.name}' in {self.root.parent} (missing run.json)")
        return record

    # ---- stages -----------------------------------------------------------------------
    def stage_dir(self, stage: str) -> Path:
        """A stage's folder (the store knows no stage list: the pipelines do, tasks/pipelines.py)."""
        if not stage or safe_name(stage) != stage:
            raise KeyError(f"'{stage}' is not a stage name (a single folder name)")
        return self.root / stage

    def manifest_path(self, stage: str) -> Path:
        return self.stage_dir(stage) / MANIFEST

    def marker(self, stage: str) -> dict[str, Any] | None:
        return _read_json(self.stage_dir(stage) / MARKER)

    def is_done(self, stage: str, fp: str | None = None) -> bool:
        """True when the stage's marker matches `fp` (any, if None) and its manifest is intact."""
        marker = self.marker(stage)
        if marker is None or (fp is not None and marker.get("fingerprint") != fp):
            return False
        path = self.manifest_path(stage)
        if not path.is_file() or file_digest(path) != marker.get("manifest_digest"):
            return False
        if not all((self.root / rel).exists() for rel in marker.get("outputs", [])):
            return False
        return self._referenced_files_exist(path)

    def _referenced_files_exist(self, manifest: Path) -> bool:
        """Every file a manifest points at (columns named `path` or `*_path`) is still there."""
        schema = pq.read_schema(manifest)
        columns = [n for n in schema.names if (n == "path" or n.endswith("_path")) and schema.field(n).type == pa.string()]
        if not columns:
            return True
        table = pq.read_table(manifest, columns=columns)
        return all(os.path.exists(self.root / rel) for col in columns for rel in table.column(col).to_pylist() if rel)

    def begin_stage(self, stage: str, params: dict[str, Any], shard_keys: list[str] | None = None) -> Path:
        """Mark a stage as in progress: drop its marker and manifest, record params and plan."""
        folder = self.stage_dir(stage)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MARKER).unlink(missing_ok=True)
        (folder / MANIFEST).unlink(missing_ok=True)
        _write_json(folder / "params.json", params)
        if shard_keys is not None:
            _write_json(folder / "plan.json", {"shards": list(shard_keys)})
        return folder

    def commit_stage(
        self, stage: str, table: pa.Table, fp: str, *, outputs: list[str] = (), summary: dict | None = None
    ) -> str:
        """Write the stage manifest, then its marker. Returns the manifest digest."""
        path = self.manifest_path(stage)
        write_table(table, path)
        digest = file_digest(path)
        _write_json(
            self.stage_dir(stage) / MARKER,
            {"fingerprint": fp, "manifest_digest": digest, "rows": table.num_rows,
             "outputs": list(outputs), "summary": summary or {}},
        )
        return digest

    def read_manifest(self, stage: str) -> pa.Table:
        if not self.is_done(stage):
            raise StageNotDoneError(f"stage '{stage}' of run '{self.name}' is not done; run it first")
        return pq.read_table(self.manifest_path(stage))

    def manifest_digest(self, stage: str) -> str:
        marker = self.marker(stage)
        if marker is None:
            raise StageNotDoneError(f"stage '{stage}' of run '{self.name}' is not done; run it first")
        return marker["manifest_digest"]

    def clean(self, stage: str, stages: Sequence[str]) -> list[str]:
        """Remove a stage and every stage after it in `stages` (run order). Returns the stages removed."""
        if stage not in stages:
            raise KeyError(f"unknown stage '{stage}'; known stages: {', '.join(stages)}")
        removed = []
        for name in stages[list(stages).index(stage):]:
            folder = self.root / name
            if folder.exists():
                shutil.rmtree(folder)
                removed.append(name)
        return removed

    # ---- shards -----------------------------------------------------------------------
    def shard_dir(self, stage: str, key: str) -> Path:
        return self.stage_dir(stage) / "shards" / safe_name(key)

    def shard_done(self, stage: str, key: str, fp: str) -> bool:
        """The shard is committed with this fingerprint and none of its files went missing."""
        folder = self.shard_dir(stage, key)
        marker = _read_json(folder / MARKER)
        if not marker or marker.get("fingerprint") != fp or not (folder / "rows.parquet").is_file():
            return False
        return _count_files(folder) == marker.get("files", -1)

    @contextmanager
    def writing_shard(self, stage: str, key: str, fp: str) -> Iterator[Path]:
        """Yield a temporary folder for one shard; on success it is committed under its key.

        Files inside are addressed by their final run-relative path via `shard_prefix`.
        On an exception the temporary folder is removed and the previous shard (if any) kept.
        """
        final = self.shard_dir(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
            _write_json(tmp / MARKER, {"fingerprint": fp, "files": _count_files(tmp) + 1})
            if final.exists():
                trash = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
                os.rename(final, trash)
                os.rename(tmp, final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def shard_prefix(self, stage: str, key: str) -> str:
        """Run-relative folder of a shard, for paths stored in manifests."""
        return self.shard_dir(stage, key).relative_to(self.root).as_posix()

    def shard_reports(self, stage: str) -> dict[str, dict[str, Any]]:
        """The `report.json` of every committed shard of a stage, by shard folder (any fingerprint)."""
        shards = self.stage_dir(stage) / "shards"
        reports = {}
        for path in sorted(shards.glob("*/report.json")) if shards.is_dir() else []:
            if (path.parent / MARKER).is_file():
                reports[path.parent.name] = _read_json(path) or {}
        return reports

    def read_shard(self, stage: str, key: str) -> pa.Table:
        return pq.read_table(self.shard_dir(stage, key) / "rows.parquet")

    def sweep_temporaries(self, stage: str) -> int:
        """Delete leftovers of killed writers (temporary shard folders). Call under the lock."""
        shards = self.stage_dir(stage) / "shards"
        count = 0
        if shards.is_dir():
            for leftover in shards.glob(".*-*"):
                shutil.rmtree(leftover, ignore_errors=True)
                count += 1
        return count

    def stage_status(self, stage: str) -> dict[str, Any]:
        """Done / partial (n of m shards) / missing, with counts, for `episode2lora status`."""
        folder = self.root / stage
        marker = self.marker(stage) if folder.exists() else None
        plan = _read_json(folder / "plan.json") or {}
        planned = plan.get("shards", [])
        finished = sum((self.shard_dir(stage, k) / MARKER).is_file() for k in planned)
        if marker is not None and self.is_done(stage):
            state = "done"
        elif folder.exists() and (finished or planned):
            state = "partial"
        else:
            state = "missing"
        summary = (marker or {}).get("summary", {})
        return {
            "stage": stage, "state": state, "shards_done": finished, "shards": len(planned),
            "rows": (marker or {}).get("rows"), "kept": summary.get("kept"),
            "quarantined": summary.get("quarantined"),
            "fingerprint": ((marker or {}).get("fingerprint") or "")[:12],
        }

    def quarantine_report(self, stages: Sequence[str] | None = None) -> list[str]:
        """One line per quarantined item of every finished stage (`drop_reason` 'quarantine: ...').

        `stages` gives the order (default: the run's stage folders by name).
        """
        lines = []
        if stages is None:
            stages = sorted(p.parent.name for p in self.root.glob(f"*/{MARKER}"))
        for stage in stages:
            if not (self.root / stage).exists() or not self.is_done(stage):
                continue
            table = pq.read_table(self.manifest_path(stage))
            if "drop_reason" not in table.column_names:
                continue
            for item, reason in zip(table.column("item_id").to_pylist(), table.column("drop_reason").to_pylist()):
                if reason and reason.startswith(QUARANTINE):
                    lines.append(f"{stage} {item}: {reason[len(QUARANTINE):]}")
        return lines
