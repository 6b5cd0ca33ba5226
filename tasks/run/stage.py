"""What stages share: the run reference, results, fingerprints, the global/sharded commit protocol,
artifacts. Their Prefect tasks and cache keys are made from their specs (tasks/run/spec.py)."""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

from pydantic import BaseModel

if TYPE_CHECKING:
    import pyarrow as pa

from tasks.run.store import RunStore, fingerprint, read_json_object


class RunRef(BaseModel):
    """Where a run lives; passed to every task instead of an open store."""

    runs_dir: str
    name: str

    def store(self) -> RunStore:
        return RunStore(self.runs_dir, self.name)


class StageResult(BaseModel):
    """What a finished stage (or shard) hands to the next: enough to fingerprint downstream."""

    stage: str
    key: str = ""
    fingerprint: str
    manifest_digest: str = ""
    summary: dict[str, Any] = {}
    recomputed: bool = True


def bind_to_run(task: Any, run: RunRef) -> Any:
    """The task with results persisted inside the run folder (not ~/.prefect)."""
    storage = Path(run.runs_dir).resolve() / run.store().name / ".prefect-results"
    return task.with_options(result_storage=storage, persist_result=True)


def publish(result: StageResult, title: str, rows: list[dict[str, Any]] | None = None) -> None:
    """Table and markdown artifacts for the Prefect UI (no-op outside a Prefect run)."""
    try:
        from prefect.artifacts import create_markdown_artifact, create_table_artifact
        from prefect.context import TaskRunContext
    except ImportError:  # pragma: no cover
        return
    if TaskRunContext.get() is None:
        return
    key = re.sub(r"[^a-z0-9-]+", "-", f"{result.stage}-{result.key}".lower()).strip("-")[:60]
    lines = [f"### {title}", "", "| measure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in result.summary.items()]
    lines += ["", f"fingerprint `{result.fingerprint[:12]}`, recomputed: {result.recomputed}"]
    run = (TaskRunContext.get().parameters or {}).get("run")
    if isinstance(run, RunRef) and run.store().manifest_path(result.stage).exists():  # where its manifest and report are
        lines += ["", f"report: `{run.store().stage_dir(result.stage)}`"]
    counts = [{"measure": k, "value": v} for k, v in result.summary.items() if isinstance(v, (int, float, str, bool))]
    _log_stage_line(title, result, counts, lines[-1] if lines[-1].startswith("report:") else "")
    try:
        create_markdown_artifact("\n".join(lines), key=key, description=title)
        create_table_artifact(counts, key=f"{key}-counts", description=f"{title}: counts")
        if rows:
            create_table_artifact(rows, key=f"{key}-table", description=f"{title}: per item")
    except Exception:
        pass


def _log_stage_line(title: str, result: StageResult, counts: list[dict[str, Any]], where: str) -> None:
    """One INFO line per stage or shard in the run's logs (the UI's Logs tab): its counts and folder."""
    from prefect.logging import get_run_logger

    measures = ", ".join(f"{c['measure']}={c['value']}" for c in counts[:8])
    state = "computed" if result.recomputed else "reused"
    get_run_logger().info("%s (%s): %s %s", title, state, measures, where.replace("`", ""))


def stage_fingerprint(stage: str, version: int, params: BaseModel, upstream: dict[str, StageResult]) -> str:
    """Fingerprint of a global stage: its parameters and the digests of its input manifests."""
    return fingerprint(stage, version, params.model_dump(mode="json"),
                       {name: result.manifest_digest for name, result in sorted(upstream.items())})


def run_global_stage(
    store: RunStore,
    stage: str,
    version: int,
    params: BaseModel,
    upstream: dict[str, StageResult],
    build: Callable[[Path], tuple["pa.Table", dict[str, Any], list[str]]],
) -> StageResult:
    """Run a whole-run stage once per fingerprint.

    `build(stage_folder)` writes the stage's files and returns (manifest table, or its parts as
    `RunStore.commit_parts` takes them; summary; run-relative paths of extra outputs that must exist
    for the stage to count as done).
    The marker is written last, so an interrupted build is simply redone.
    """
    fp = stage_fingerprint(stage, version, params, upstream)
    done = reused(store, stage, fp)
    if done is not None:
        return done
    folder = store.begin_stage(stage, params.model_dump(mode="json"))
    before = set(os.listdir(folder))
    try:
        table, summary, outputs = build(folder)
    except BaseException:
        store.remove_new_temporaries(stage, before)  # e.g. a half-written folder on a full disk
        raise
    if isinstance(table, dict):  # a manifest in parts: key -> table, or None to keep that part as committed
        digest, summary = store.commit_parts(stage, table, fp, outputs=outputs, summarize=lambda totals: summary)
    else:
        digest = store.commit_stage(stage, table, fp, outputs=outputs, summary=summary)
    return StageResult(stage=stage, fingerprint=fp, manifest_digest=digest, summary=summary)


def reused(store: RunStore, stage: str, fp: str) -> Optional[StageResult]:
    """The result of a stage done on disk with fingerprint `fp` (as a rerun would return it), else None."""
    if not store.is_done(stage, fp):
        return None
    marker = store.marker(stage)
    return StageResult(stage=stage, fingerprint=fp, manifest_digest=marker["manifest_digest"],
                       summary=marker.get("summary", {}), recomputed=False)


# ---- sharded stages (plan -> shards -> merge), shared by the per-episode stages --------------

_DRY = ContextVar("dry_plans", default=False)


@contextmanager
def dry_plans() -> Iterator[None]:
    """Plans made inside only read the run: a stage that is not done is not started (no files written)."""
    token = _DRY.set(True)
    try:
        yield
    finally:
        _DRY.reset(token)


def plan_sharded_stage(store: RunStore, stage: str, version: int, settings: dict[str, Any],
                       shard_fingerprints: dict[str, str]) -> str:
    """Fingerprint a sharded stage from its shards' fingerprints; start it unless it is done.

    Returns the stage fingerprint. Starting records the plan (for `status`) and sweeps
    temporaries left by killed writers; committed shards are kept for reuse.
    """
    fp = fingerprint(stage, version, settings, shard_fingerprints)
    if not _DRY.get() and not store.is_done(stage, fp):
        store.begin_stage(stage, settings, shard_keys=list(shard_fingerprints))
        store.sweep_temporaries(stage)
    return fp


def run_shard(store: RunStore, stage: str, key: str, fp: str,
              build: Callable[[Path, str], tuple["pa.Table", dict[str, Any]]]) -> StageResult:
    """Build one shard unless it is already committed with this fingerprint.

    `build(folder, prefix)` writes files into `folder` (whose run-relative path will be
    `prefix`) and returns (rows, report); rows go to `rows.parquet`, the report to `report.json`.
    """
    import json

    from tasks.run.store import write_table

    if store.shard_done(stage, key, fp):
        report = read_json_object(store.shard_dir(stage, key) / "report.json") or {}
        return StageResult(stage=stage, key=key, fingerprint=fp, summary=report, recomputed=False)
    with store.writing_shard(stage, key, fp) as tmp:
        table, report = build(tmp, store.shard_prefix(stage, key))
        write_table(table, tmp / "rows.parquet")
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return StageResult(stage=stage, key=key, fingerprint=fp, summary=report)


def _committed_reports(store: RunStore, stage: str, shard_fingerprints: dict[str, str]) -> list[dict[str, Any]]:
    """The reports of a stage's shards, in order; StageNotDoneError naming the shards not committed."""
    from tasks.run.store import StageNotDoneError

    missing = [k for k, shard_fp in shard_fingerprints.items() if not store.shard_done(stage, k, shard_fp)]
    if missing:
        raise StageNotDoneError(f"{stage} shards not finished: {', '.join(missing)}")
    return [read_json_object(store.shard_dir(stage, k) / "report.json") or {} for k in shard_fingerprints]


def merge_shards(
    store: RunStore, stage: str, fp: str, shard_fingerprints: dict[str, str],
    merge: Callable[[list["pa.Table"], list[dict[str, Any]]], tuple["pa.Table", dict[str, Any], list[str]]],
) -> StageResult:
    """Merge committed shards into the stage manifest (once per fingerprint).

    `merge(tables, reports)` returns (manifest, summary, extra run-relative outputs).
    Raises StageNotDoneError naming the shards that are not committed.
    """
    done = reused(store, stage, fp)
    if done is not None:
        return done
    reports = _committed_reports(store, stage, shard_fingerprints)
    table, summary, outputs = merge([store.read_shard(stage, k) for k in shard_fingerprints], reports)
    digest = store.commit_stage(stage, table, fp, outputs=outputs, summary=summary)
    return StageResult(stage=stage, fingerprint=fp, manifest_digest=digest, summary=summary)


def merge_shard_parts(
    store: RunStore, stage: str, fp: str, shard_fingerprints: dict[str, str], schema: "pa.Schema",
    summarize: Callable[[dict[str, int], list[dict[str, Any]]], dict[str, Any]],
    count: Optional[Callable[["pa.Table"], dict[str, int]]] = None,
) -> StageResult:
    """Commit the shards' rows as the parts of the stage manifest (once per fingerprint): no rows are
    rewritten, so adding a shard costs that shard (for a merge that only concatenates shards).

    `summarize(totals, reports)`: the summary from the parts' summed `count`s and the shards' reports.
    Raises StageNotDoneError naming the shards that are not committed.
    """
    done = reused(store, stage, fp)
    if done is not None:
        return done
    reports = _committed_reports(store, stage, shard_fingerprints)
    parts = {k: store.shard_dir(stage, k) / "rows.parquet" for k in shard_fingerprints}
    digest, summary = store.commit_parts(stage, parts, fp, schema=schema, count=count,
                                         summarize=lambda totals: summarize(totals, reports))
    return StageResult(stage=stage, fingerprint=fp, manifest_digest=digest, summary=summary)


def finished(store: RunStore, stage: str) -> StageResult:
    """The StageResult of a stage already done on disk (for plain calls without a flow).

    Raises StageNotDoneError naming the stage when it is not done.
    """
    from tasks.run.store import StageNotDoneError

    marker = store.marker(stage)
    if marker is None or not store.is_done(stage):
        raise StageNotDoneError(f"stage '{stage}' of run '{store.name}' is not done; run it first")
    return StageResult(stage=stage, fingerprint=marker["fingerprint"], manifest_digest=marker["manifest_digest"],
                       summary=marker.get("summary", {}), recomputed=False)


def settle(futures: list[Any]) -> list[Any]:
    """Wait for submitted tasks and return their results; a failed one raises its own error.

    (A task called with `wait_for=` on a failed future silently returns None in Prefect 3,
    so flows settle their fan-out first and fail with the real cause.)
    """
    from prefect.futures import wait

    wait(futures)
    return [future.result() for future in futures]
