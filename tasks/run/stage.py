"""What stages share: the run reference, results, fingerprints, the global/sharded commit protocol,
artifacts. Their Prefect tasks and cache keys are made from their specs (tasks/run/spec.py)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from pydantic import BaseModel

if TYPE_CHECKING:
    import pyarrow as pa

from tasks.run.links import artifact_key
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
    key = artifact_key(f"{result.stage}-{result.key}")
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


def stage_fingerprint(stage: str, version: int, settings: dict[str, Any], upstream: dict[str, StageResult]) -> str:
    """Fingerprint of a global stage: the parameters it reads and the digests of its input manifests."""
    return fingerprint(stage, version, settings,
                       {name: result.manifest_digest for name, result in sorted(upstream.items())})


def commit_global(store: RunStore, stage: str, fp: str, settings: dict[str, Any],
                  build: Callable[[Path], tuple["pa.Table", dict[str, Any], list[str]]]) -> StageResult:
    """Run a whole-run stage once per fingerprint `fp`.

    `build(stage_folder)` writes the stage's files and returns (manifest table, or its parts as
    `RunStore.commit_parts` takes them; summary; run-relative paths of extra outputs that must exist
    for the stage to count as done). The marker is written last, so an interrupted build is simply redone.
    """
    done = reused(store, stage, fp)
    if done is not None:
        return done
    say_why_recomputed(store, stage, settings)
    folder = store.begin_stage(stage, settings)
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


def say_why_recomputed(store: RunStore, stage: str, settings: dict[str, Any]) -> None:
    """Say, as a warning (the terminal and the run's logs), why a stage done before is computed again:
    which of its settings changed, that it now reads other parameters (a newer version of this project),
    or that its inputs did. A first run, or one after `clean`, says nothing."""
    if store.marker(stage) is None:
        return
    before = read_json_object(store.stage_dir(stage) / "params.json") or {}
    settings = json.loads(json.dumps(settings, default=str))  # as params.json holds them: tuples are lists there
    changed = sorted(key for key in {*before, *settings} if before.get(key) != settings.get(key))
    if set(before) != set(settings):
        why = f"it now reads other parameters ({', '.join(sorted(set(settings) - set(before))[:6]) or 'fewer'}) " \
              "than the version that made it; once"
    elif changed:
        why = f"its settings changed ({', '.join(changed[:6])})"
    else:
        why = "its inputs or its version changed"
    warn(f"{stage}: recomputed, {why}")


def warn(line: str) -> None:
    """A warning line: in the run's logs inside a Prefect run (and so in the terminal), else on stderr."""
    try:
        from prefect.context import FlowRunContext, TaskRunContext
        from prefect.logging import get_run_logger

        if FlowRunContext.get() or TaskRunContext.get():
            get_run_logger().warning(line)
            return
    except ImportError:  # pragma: no cover
        pass
    print(f"warning: {line}", file=sys.stderr)


def reused(store: RunStore, stage: str, fp: str) -> Optional[StageResult]:
    """The result of a stage done on disk with fingerprint `fp` (as a rerun would return it), else None."""
    if not store.is_done(stage, fp):
        return None
    marker = store.marker(stage)
    return StageResult(stage=stage, fingerprint=fp, manifest_digest=marker["manifest_digest"],
                       summary=marker.get("summary", {}), recomputed=False)


# ---- sharded stages (plan -> shards -> merge) ------------------------------------------------

class Shard(BaseModel):
    """One unit of a sharded stage's work (an episode, a character, a phase): its folder key, its
    fingerprint, what it works on, and the key of the shard it starts from (a fine-tune), if any."""

    key: str
    fingerprint: str
    payload: Any = None
    after: str = ""


class Plan(BaseModel):
    """What a sharded stage will do: its shards and what they share; `fingerprint` and `settings` are
    filled in by the stage's spec (from the parameters it reads and the shards' fingerprints)."""

    shards: list[Shard] = []
    payload: Any = None
    fingerprint: str = ""
    settings: dict[str, Any] = {}

    def shard_fingerprints(self) -> dict[str, str]:
        return {shard.key: shard.fingerprint for shard in self.shards}


def rows_by_character(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Manifest rows grouped by their `character`, characters sorted, each group in `item_id` order (a
    per-character shard's payload)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["character"], []).append(row)
    return {name: sorted(groups[name], key=lambda r: r["item_id"]) for name in sorted(groups)}


def rows_digest(rows: list[dict[str, Any]]) -> str:
    """A digest of manifest rows (for a shard's fingerprint)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()


def start_sharded(store: RunStore, stage: str, plan: Plan) -> None:
    """Start a sharded stage unless it is done: record its plan (for `status`) and sweep temporaries left
    by killed writers; committed shards are kept for reuse."""
    if store.is_done(stage, plan.fingerprint):
        return
    say_why_recomputed(store, stage, plan.settings)
    store.begin_stage(stage, plan.settings, shard_keys=list(plan.shard_fingerprints()))
    store.sweep_temporaries(stage)


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


def settle(futures: list[Any]) -> list[Any]:
    """Wait for submitted tasks and return their results; a failed one raises its own error.

    (A task called with `wait_for=` on a failed future silently returns None in Prefect 3,
    so flows settle their fan-out first and fail with the real cause.)
    """
    from prefect.futures import wait

    wait(futures)
    return [future.result() for future in futures]
