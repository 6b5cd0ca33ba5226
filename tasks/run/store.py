"""The run store: one folder per run, one folder per stage, markers that say what is done.

Layout of a run (``<runs-dir>/<name>/``)::

    run.json                    inputs and resolved parameters (what `resume` replays)
    .lock                       held by the process writing the run
    <stage>/manifest.parquet    the stage's manifest (paths relative to the run folder); for a stage
                                that grows by parts (embed, segment, cluster) a folder of Parquet
                                files, one per part, with `_parts.json` (see `commit_parts`)
    <stage>/params.json         the parameters the stage ran with
    <stage>/_DONE.json          marker: fingerprint + manifest digest, written last
    <stage>/plan.json           shard keys the stage will write (for `status`)
    <stage>/shards/<key>/       one committed shard: files + rows.parquet + _DONE.json

Every write goes to a temporary name first and is renamed into place, so a crash never
leaves a half output that looks done.
"""

from __future__ import annotations

import bisect
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
from typing import Any, Callable, Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

MARKER = "_DONE.json"


MANIFEST = "manifest.parquet"
QUARANTINE = "quarantine: "
"""Prefix of `drop_reason` for items that could not be read; every stage uses it."""


class RunLockedError(RuntimeError):
    """Another process is writing this run."""


class StageNotDoneError(RuntimeError):
    """A stage's output was asked for before the stage finished."""


class ManifestDamagedError(RuntimeError):
    """A committed manifest file cannot be read (damaged on disk)."""


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


def storable_text(path: Any) -> str:
    """`path` as text that Parquet and JSON can store: bytes of a file name that are not UTF-8 are
    shown as backslash escapes (`bad\\xff.mp4`), everything else is unchanged."""
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace")
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


def _read_json(path: Path) -> dict | None:
    """A JSON object the store wrote (marker, plan, parts index, record); None when it is missing or
    broken (not JSON, not an object): a stage whose marker is broken is simply not done."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


read_json_object = _read_json
"""The store's reader of the JSON objects it writes (None when missing or broken), for its callers."""


class RunRecordError(ValueError):
    """A run's run.json exists but is not a run record (damaged or edited by hand)."""


def _broken_record(path: Path) -> str | None:
    """Why the run record at `path` is not one (None when it is valid or missing)."""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return f"it is not valid JSON ({str(exc)[:120]})"
    if not isinstance(data, dict):
        return f"it holds a JSON {type(data).__name__}, not an object"
    if not isinstance(data.get("params", {}), dict):
        return "its 'params' is not an object"
    return None


def _mtime(path: Path) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
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


def committed_identities(root: Path, paths: Sequence[str]) -> list[str]:
    """For fingerprints, each run-relative file's size and the fingerprint of the committed shard holding
    it (else its mtime in whole seconds), never a sub-second time: a run copied or restored from a tar
    archive keeps its fingerprints. 'missing' for a file that is gone."""
    writers: dict[Path, str] = {}
    identities = []
    for rel in paths:
        try:
            st = os.stat(root / rel)
        except OSError:
            identities.append("missing")
            continue
        writer = _shard_writer(root, (root / rel).parent, writers)
        identities.append(f"{st.st_size}:{writer or int(st.st_mtime)}")
    return identities


def _shard_writer(root: Path, folder: Path, cache: dict[Path, str]) -> str:
    """The fingerprint in the nearest shard marker at or above `folder`, inside `root` ('' when none)."""
    if folder not in cache:
        marker = _read_json(folder / MARKER) or {}
        if "files" in marker:  # a shard's marker (a stage's names its manifest instead)
            cache[folder] = str(marker.get("fingerprint", ""))
        else:
            cache[folder] = _shard_writer(root, folder.parent, cache) if root in folder.parents else ""
    return cache[folder]


_VERIFIED: set[tuple] = set()
"""Manifest parts (path, size, mtime, inode, digest) this process has checked against their digest."""

EMPTY_PART = "-empty"
"""The part a parted manifest with no parts holds (an empty table of its schema); no key can be it."""
PARTS_INDEX = "_parts.json"


def _stamp(path: Path) -> dict[str, int]:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def _link_or_copy(source: Path, target: Path) -> None:
    """`target` becomes `source`'s bytes: a hard link where the file system allows, else a copy."""
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copy2(source, tmp)
    os.replace(tmp, target)


def _path_columns(schema: pa.Schema) -> list[str]:
    """Columns that hold run-relative file paths (`path`, `*_path`)."""
    return [n for n in schema.names if (n == "path" or n.endswith("_path")) and schema.field(n).type == pa.string()]


def _parts_digest(index: dict[str, dict]) -> str:
    """A parted manifest's digest: its parts' keys and digests."""
    return hashlib.sha256(json.dumps(sorted((k, e["digest"]) for k, e in index.items())).encode()).hexdigest()


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
            fh.seek(0)
            fh.truncate()  # no pid left behind once the run is let go (the empty file stays: removing it races)
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()

    def locked_by(self) -> str | None:
        """Who holds the run's lock ('pid N'), or None when nobody does; opens nothing for writing."""
        try:
            fh = open(self.root / ".lock", "r")
        except OSError:
            return None
        with fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return fh.read().strip() or "another process"
            fcntl.flock(fh, fcntl.LOCK_UN)
        return None

    # ---- run record -------------------------------------------------------------------
    def write_run_record(self, record: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        _write_json(self.root / "run.json", record)

    def check_record_file(self) -> None:
        """RunRecordError naming run.json and what to do when it exists but is broken."""
        path = self.root / "run.json"
        broken = _broken_record(path)
        if broken:
            attempts = sorted((self.root / "attempts").glob("*.json"))
            hint = f"Restore it from a backup (or from {attempts[-1]})" if attempts else "Restore it from a backup"
            raise RunRecordError(f"run '{self.name}' has a broken record {path}: {broken}; nothing was changed. "
                                 f"{hint}, or remove {self.root} to start the run afresh")

    def check_run_record(self, record: dict[str, Any], *, new_attempt: bool = False) -> None:
        """Raise RunChangedError when the run exists with other inputs or parameters than `record`
        (unless `new_attempt`: then `record_run` keeps the old record under attempts/); RunRecordError
        when its run.json is broken."""
        self.check_record_file()
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
        """The run's record; FileNotFoundError when there is none, RunRecordError when it is broken."""
        self.check_record_file()
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
        if not all((self.root / rel).exists() for rel in marker.get("outputs", [])):
            return False
        if path.is_dir():
            return self._parts_intact(path, marker.get("manifest_digest"))
        if not path.is_file() or file_digest(path) != marker.get("manifest_digest"):
            return False
        return self._referenced_files_exist(path)

    def _referenced_files_exist(self, manifest: Path) -> bool:
        """Every file a manifest points at (columns named `path` or `*_path`) is still there."""
        columns = _path_columns(pq.read_schema(manifest))
        if not columns:
            return True
        table = pq.read_table(manifest, columns=columns)
        return all(os.path.exists(self.root / rel) for col in columns for rel in table.column(col).to_pylist() if rel)

    def _parts_intact(self, folder: Path, digest: str | None) -> bool:
        """A parted manifest is the one its marker names, with no part changed and no file it points at gone.

        Fast where nothing moved: a part whose size and mtime are as committed, and whose files' folders
        have the mtimes they had (removing a file changes its folder's), is not read. Otherwise (a copied
        run) the part's bytes are hashed and its files looked for, as for a one-file manifest.
        """
        index = _read_json(folder / PARTS_INDEX)
        if index is None or _parts_digest(index) != digest:
            return False
        if {e["file"] for e in index.values()} != {n for n in os.listdir(folder) if not n.startswith(("_", "."))}:
            return False
        for entry in index.values():
            path = folder / entry["file"]
            stamp = _stamp(path)
            if (stamp["size"], stamp["mtime_ns"]) != (entry["size"], entry["mtime_ns"]) and file_digest(path) != entry["digest"]:
                return False
            if not all(_mtime(self.root / d) == m for d, m in entry["dirs"].items()) and not self._referenced_files_exist(path):
                return False
        return True

    def begin_stage(self, stage: str, params: dict[str, Any], shard_keys: list[str] | None = None) -> Path:
        """Mark a stage as in progress: drop its marker and manifest, record params and plan.
        (The parts of a parted manifest stay, for `commit_parts` to keep the unchanged ones.)"""
        folder = self.stage_dir(stage)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MARKER).unlink(missing_ok=True)
        if not (folder / MANIFEST / PARTS_INDEX).is_file():
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
        if (path / PARTS_INDEX).is_file():  # the stage kept its manifest in parts before
            shutil.rmtree(path)
        write_table(table, path)
        digest = file_digest(path)
        self._write_marker(stage, fp, digest, table.num_rows, outputs, summary)
        return digest

    def _write_marker(self, stage: str, fp: str, digest: str, rows: int, outputs: Sequence[str], summary: dict | None) -> None:
        _write_json(self.stage_dir(stage) / MARKER, {"fingerprint": fp, "manifest_digest": digest, "rows": rows,
                                                     "outputs": list(outputs), "summary": summary or {}})

    def commit_parts(
        self, stage: str, parts: dict[str, "Path | pa.Table | None"], fp: str, *, schema: pa.Schema | None = None,
        count: Callable[[pa.Table], dict[str, int]] | None = None, outputs: Sequence[str] = (),
        summarize: Callable[[dict[str, int]], dict] = lambda totals: dict(totals),
    ) -> tuple[str, dict]:
        """Commit a manifest made of parts (a folder of Parquet files), writing only the parts that changed.

        `parts`: key -> a Parquet file in the run (a shard's rows: hard-linked, re-linked only when that
        file changed), a table (written), or None (the part committed before under that key, kept as it
        is). Parts no longer named are removed. Per part the index keeps its digest, rows, first and last
        item_id (for `read_items`) and `count(part)` (summed over the parts and handed to `summarize`, so
        the summary of a grown manifest reads only the new parts). Returns (manifest digest, summary).
        """
        folder = self.manifest_path(stage)
        if folder.is_file():
            folder.unlink()
        folder.mkdir(parents=True, exist_ok=True)
        before = _read_json(folder / PARTS_INDEX) or {}
        if not parts and schema is None:
            raise ValueError(f"stage '{stage}': a manifest with no parts needs its schema")
        parts = parts or {EMPTY_PART: schema.empty_table()}
        index: dict[str, dict] = {}
        names = {key: f"{key if key == EMPTY_PART else safe_name(key)}.parquet" for key in parts}
        if len(set(names.values())) < len(names):
            raise ValueError(f"stage '{stage}': part keys {sorted(parts)} do not map to distinct file names")
        for key, part in sorted(parts.items()):
            name, old = names[key], before.get(key)
            if part is None:
                if old is None or not (folder / old["file"]).is_file():
                    raise KeyError(f"part '{key}' of stage '{stage}' was never committed; it cannot be kept")
                stamp = _stamp(folder / old["file"])
                unchanged = (stamp["size"], stamp["mtime_ns"]) == (old["size"], old["mtime_ns"])
                index[key] = old if unchanged else self._part_entry(folder / old["file"], old["source"], count)
                continue
            if isinstance(part, pa.Table):
                write_table(part, folder / name)
                source = None
            else:
                source = {"path": Path(part).relative_to(self.root).as_posix(), **_stamp(Path(part))}
                if old is not None and old.get("source") == source and (folder / name).is_file():
                    index[key] = old
                    continue
                _link_or_copy(Path(part), folder / name)
            index[key] = self._part_entry(folder / name, source, count)
        _write_json(folder / PARTS_INDEX, index)
        for stale in {n for n in os.listdir(folder) if not n.startswith(("_", "."))} - {e["file"] for e in index.values()}:
            (folder / stale).unlink()
        totals: dict[str, int] = {}
        for entry in index.values():
            for name, value in entry["counts"].items():
                totals[name] = totals.get(name, 0) + value
        digest, summary = _parts_digest(index), summarize(totals)
        self._write_marker(stage, fp, digest, sum(e["rows"] for e in index.values()), outputs, summary)
        return digest, summary

    def _part_entry(self, path: Path, source: dict | None, count: Callable[[pa.Table], dict] | None) -> dict:
        """What the parts index keeps of one part (read once, when the part is new)."""
        table = pq.read_table(path)
        ids = table.column("item_id") if "item_id" in table.column_names and table.num_rows else None
        dirs = {os.path.dirname(rel) for col in _path_columns(table.schema) for rel in table.column(col).to_pylist() if rel}
        stamp = _stamp(path)
        return {"file": path.name, "digest": file_digest(path), "rows": table.num_rows, "size": stamp["size"],
                "mtime_ns": stamp["mtime_ns"], "source": source,
                "first": pc.min(ids).as_py() if ids is not None else None,
                "last": pc.max(ids).as_py() if ids is not None else None,
                "dirs": {d: _mtime(self.root / d) for d in sorted(dirs)},
                "counts": {k: int(v) for k, v in (count(table) if count else {}).items()}}

    def verify(self, stage: str) -> list[str]:
        """What is wrong with a stage's committed manifest, read in full (`status --verify`): each file's
        digest against the one committed (the done check trusts an unchanged size and mtime) and its
        Parquet footer. Empty when all hold or the stage has no marker."""
        marker = self.marker(stage)
        path = self.manifest_path(stage)
        if marker is None:
            return []
        if path.is_dir():
            files = {path / e["file"]: e.get("digest") for e in (_read_json(path / PARTS_INDEX) or {}).values()}
        else:
            files = {path: marker.get("manifest_digest")}
        problems = []
        for file, digest in sorted(files.items()):
            rel = file.relative_to(self.root).as_posix()
            if not file.is_file():
                problems.append(f"{rel}: missing")
            elif file_digest(file) != digest:
                problems.append(f"{rel}: its bytes differ from those committed (damaged or edited)")
            else:
                try:
                    pq.read_metadata(file)
                except (pa.ArrowException, OSError) as exc:
                    problems.append(f"{rel}: not a readable Parquet file ({exc})")
        return problems

    def read_manifest(self, stage: str, columns: list[str] | None = None) -> pa.Table:
        """A finished stage's manifest (one file, or its parts in key order); StageNotDoneError if not done."""
        if not self.is_done(stage):
            raise StageNotDoneError(f"stage '{stage}' of run '{self.name}' is not done; run it first")
        return self._read(stage, columns)

    def manifest_columns(self, stage: str) -> list[str]:
        """The column names of a finished stage's manifest (from its file's, or first part's, schema)."""
        path = self.manifest_path(stage)
        if path.is_dir():
            index = _read_json(path / PARTS_INDEX) or {}
            if not index:
                return []
            path = path / index[min(index)]["file"]
        return pq.read_schema(path).names

    def _read(self, stage: str, columns: list[str] | None = None, keys: Sequence[str] | None = None) -> pa.Table:
        path = self.manifest_path(stage)
        if not path.is_dir():
            return self._read_file(stage, path, columns)
        index = _read_json(path / PARTS_INDEX) or {}
        keys = sorted(index) if keys is None else keys
        for key in keys:
            self._check_part(stage, path / index[key]["file"], index[key]["digest"])
        tables = [self._read_file(stage, path / index[k]["file"], columns) for k in keys]
        if not tables:
            return self._read_file(stage, path / index[min(index)]["file"], columns).slice(0, 0)
        return pa.concat_tables(tables)

    def _check_part(self, stage: str, path: Path, digest: str) -> None:
        """A part's bytes against its committed digest, the first time this process reads it (the done
        check trusts an unchanged size and mtime); ManifestDamagedError when they differ."""
        stamp = (str(path), *_stamp(path).values(), digest)
        if stamp in _VERIFIED:
            return
        if file_digest(path) != digest:
            raise ManifestDamagedError(
                f"{path} of run '{self.name}' is damaged: its bytes differ from those committed; redo the stage: "
                f"`episode2lora clean {self.name} --stage {stage}` and `episode2lora resume {self.name}`")
        _VERIFIED.add(stamp)

    def _read_file(self, stage: str, path: Path, columns: list[str] | None) -> pa.Table:
        """One manifest file; ManifestDamagedError naming it and what to do when it cannot be read."""
        try:
            return pq.read_table(path, columns=columns)
        except (pa.ArrowInvalid, OSError) as exc:
            raise ManifestDamagedError(
                f"{path} of run '{self.name}' cannot be read ({str(exc)[:160]}); check the run with `episode2lora "
                f"status {self.name} --verify`, then redo the stage: `episode2lora clean {self.name} --stage {stage}` "
                f"and `episode2lora resume {self.name}`") from None

    def manifest_parts(self, stage: str) -> dict[str, dict]:
        """A finished parted manifest's index (key -> digest, rows, first/last item_id, ...); {} for a one-file one."""
        if not self.is_done(stage):
            raise StageNotDoneError(f"stage '{stage}' of run '{self.name}' is not done; run it first")
        return self.committed_parts(stage)

    def committed_parts(self, stage: str) -> dict[str, dict]:
        """The parts index as last committed, whether or not the stage is done now (for the stage's own
        next build, which may keep them)."""
        path = self.manifest_path(stage)
        return (_read_json(path / PARTS_INDEX) or {}) if path.is_dir() else {}

    def read_parts(self, stage: str, keys: Sequence[str], columns: list[str] | None = None) -> pa.Table:
        """Only the parts `keys` of a finished parted manifest (in the order given)."""
        unknown = set(keys) - set(self.manifest_parts(stage))
        if unknown:
            raise KeyError(f"stage '{stage}' of run '{self.name}' has no part {', '.join(sorted(unknown))}")
        return self._read(stage, columns, keys)

    def read_items(self, stage: str, items: pa.Array, columns: list[str]) -> pa.Table:
        """The rows of `items` (by item_id) of a finished stage, reading only the parts whose id range can
        hold them."""
        columns = list(dict.fromkeys(["item_id", *columns]))
        index = self.manifest_parts(stage)
        keys = None
        if index:
            wanted = sorted(set(items.to_pylist()))
            keys = [k for k, e in sorted(index.items()) if e["first"] is not None
                    and bisect.bisect_left(wanted, e["first"]) < bisect.bisect_right(wanted, e["last"])]
        table = self._read(stage, columns, keys)
        return table.filter(pc.is_in(table.column("item_id"), value_set=items))

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

    def remove_new_temporaries(self, stage: str, before: set[str]) -> list[str]:
        """Remove the temporaries (dot-names) in a stage's folder that are not in `before` (the names it
        held when the build started): what a failed build leaves (a full disk must not stay full)."""
        folder = self.stage_dir(stage)
        removed = []
        for name in sorted(set(os.listdir(folder)) - before) if folder.is_dir() else []:
            if name.startswith("."):
                path = folder / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(name)
        return removed

    def broken_files(self) -> list[str]:
        """Run-relative paths of the store's JSON files (record, markers, plans, parts indexes) that exist
        but are not JSON objects: each makes its stage count as not done."""
        patterns = ["run.json", f"*/{MARKER}", "*/plan.json", f"*/shards/*/{MARKER}", f"*/{MANIFEST}/{PARTS_INDEX}"]
        paths = [p for pattern in patterns for p in sorted(self.root.glob(pattern))]
        return [p.relative_to(self.root).as_posix() for p in paths if p.is_file() and _read_json(p) is None]

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
            try:
                table = self._read(stage)
            except ManifestDamagedError as exc:
                lines.append(f"{stage} (the whole stage): {exc}")
                continue
            if "drop_reason" not in table.column_names:
                continue
            for item, reason in zip(table.column("item_id").to_pylist(), table.column("drop_reason").to_pylist()):
                if reason and reason.startswith(QUARANTINE):
                    lines.append(f"{stage} {item}: {reason[len(QUARANTINE):]}")
        return lines
