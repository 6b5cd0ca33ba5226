"""Scheduled reprocessing: add the episodes that appeared in a watch folder to a run.

The per-episode stages are keyed per episode, so running the full flow on the run's inputs
plus the new files processes only the new episodes there; the global stages then rerun on
the union (clusters are matched to the previous run's, so names and triggers persist).

An episode stays **pending** until a run that took it in succeeds: its path is then added to
`reprocess.json` in the run folder. A failed run leaves it pending, so the next scheduled run
(or Retry) takes it again and fails again, red, until the cause is fixed or the user drops the
episode by removing it from the watch folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.params import LAST_STAGE, RunParams, Stage
from flows.pipeline_flow import OptionalText, failure_line, told_in_one_line
from tasks.sources.episodes import VIDEO_SUFFIXES
from tasks.run.store import RunStore

PROCESSED = "reprocess.json"
"""In the run folder: {"processed": [video, ...]}, the watch-folder videos of runs that succeeded."""


class PendingEpisodesError(RuntimeError):
    """The run that took in the pending episodes failed: they stay pending."""


def processed_videos(store: RunStore) -> set[str]:
    """The videos (real paths) that a successful reprocess run of `store` took in."""
    try:
        return set(json.loads((store.root / PROCESSED).read_text())["processed"])
    except FileNotFoundError:
        return set()


def mark_processed(store: RunStore, videos: list[Path]) -> None:
    """Add `videos` to the run's processed list (written to a temporary name, then renamed)."""
    done = sorted(processed_videos(store) | {os.path.realpath(v) for v in videos})
    temporary = store.root / f".{PROCESSED}.tmp"
    temporary.write_text(json.dumps({"processed": done}, indent=1))
    temporary.replace(store.root / PROCESSED)


def pending_episodes(store: RunStore, watch_folder: str | Path) -> list[Path]:
    """Video files under `watch_folder` that no successful run has taken in yet, sorted.

    Raises NotADirectoryError when the watch folder does not exist.
    """
    folder = Path(watch_folder).expanduser()
    if not folder.is_dir():
        raise NotADirectoryError(f"watch_folder '{watch_folder}' is not a folder")
    videos = sorted(p.resolve() for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
    done = processed_videos(store)
    return [v for v in videos if str(v) not in done]


def run_inputs(previous: list[str], pending: list[Path], watch_folder: str | Path, done: set[str]) -> list[str]:
    """The run's inputs: the previous ones, less the pending episodes the user removed from the
    watch folder (dropped), then the pending ones."""
    folder = Path(watch_folder).expanduser().resolve()

    def dropped(text: str) -> bool:
        path = Path(os.path.realpath(text))
        return path.is_relative_to(folder) and not path.exists() and str(path) not in done

    return list(dict.fromkeys([*(i for i in previous if not dropped(i)), *(str(v) for v in pending)]))


@flow(name="reprocess", log_prints=True)
@told_in_one_line
def reprocess(
    watch_folder: str,
    name: str,
    until: Stage = LAST_STAGE,
    runs_dir: str = "data/runs",
    params: RunParams = RunParams(),
    webhook_url: OptionalText = "",
) -> dict[str, Any]:
    """Run the episodes pending in `watch_folder` through run `name`, with `params`; fails (red) while
    any episode is pending and its run fails.

    Args:
        watch_folder: folder of episode videos (relative: to the project folder); remove a video
            from it to drop a pending episode.
        name: the run the episodes join (created by the first reprocess when missing).
        until: the last stage to run.
        runs_dir: folder holding all runs.
        params: the run's parameters (a run with other ones gets a new attempt, as `run --new-attempt`).
        webhook_url: POST a JSON summary here when the run completes or fails (optional).
    """
    from flows.episode_to_lora import episode_to_lora

    logger = get_run_logger()
    store = RunStore(runs_dir, name)
    pending = pending_episodes(store, watch_folder)
    if not pending:
        logger.info("no new episodes in %s for run %s", watch_folder, store.name)
        return {"new_episodes": [], "stages": {}}
    logger.info("pending episodes for run %s: %s", store.name, ", ".join(v.name for v in pending))
    try:
        previous = store.read_run_record()["inputs"]
    except FileNotFoundError:
        previous = []
    inputs = run_inputs(previous, pending, watch_folder, processed_videos(store))
    try:  # more inputs for the run, on purpose: the record before them is kept under attempts/
        results = episode_to_lora(inputs=inputs, name=name, runs_dir=runs_dir, params=params, until=until,
                                  webhook_url=webhook_url, new_attempt=True)
    except Exception as exc:
        raise PendingEpisodesError(
            f"{', '.join(v.name for v in pending)} still pending for run {store.name}: {failure_line(exc).rstrip('.')}. "
            f"Fix the cause and Retry (or wait for the next scheduled run), or remove the episode from "
            f"{watch_folder} to drop it") from exc
    mark_processed(store, pending)
    return {"new_episodes": [str(v) for v in pending], "stages": {k: v.recomputed for k, v in results.items()}}
