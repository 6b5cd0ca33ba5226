"""Scheduled reprocessing: add the episodes that appeared in a watch folder to a run.

The per-episode stages are keyed per episode, so running the full flow on the run's inputs
plus the new files processes only the new episodes there; the global stages then rerun on
the union (clusters are matched to the previous run's, so names and triggers persist).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.params import RunParams
from tasks.frames import VIDEO_SUFFIXES
from tasks.run.store import RunStore


def seen_videos(store: RunStore) -> set[Path]:
    """Videos that already have a committed frames shard in the run (quarantined ones included)."""
    return {Path(r["video"]).resolve() for r in store.shard_reports("frames").values() if r.get("video")}


def new_episodes(store: RunStore, watch_folder: str | Path) -> list[Path]:
    """Video files under `watch_folder` that the run has not processed yet, sorted.

    Raises NotADirectoryError when the watch folder does not exist.
    """
    folder = Path(watch_folder).expanduser()
    if not folder.is_dir():
        raise NotADirectoryError(f"watch_folder '{watch_folder}' is not a folder")
    videos = sorted(p.resolve() for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
    seen = seen_videos(store)
    return [v for v in videos if v not in seen]


@flow(name="reprocess", log_prints=True)
def reprocess(
    watch_folder: str,
    name: str,
    runs_dir: str = "data/runs",
    webhook_url: str | None = None,
) -> dict[str, Any]:
    """Run the episodes that are new in `watch_folder` through run `name` (its own parameters).

    A run that does not exist yet starts with the default parameters.
    """
    from flows.episode_to_lora import episode_to_lora

    logger = get_run_logger()
    store = RunStore(runs_dir, name)
    fresh = new_episodes(store, watch_folder)
    if not fresh:
        logger.info("no new episodes in %s for run %s", watch_folder, store.name)
        return {"new_episodes": [], "stages": {}}
    logger.info("new episodes for run %s: %s", store.name, ", ".join(v.name for v in fresh))
    try:
        record = store.read_run_record()
    except FileNotFoundError:
        record = {"inputs": [], "params": RunParams().model_dump(mode="json")}
    inputs = list(dict.fromkeys([*record["inputs"], *(str(v) for v in fresh)]))
    options: dict[str, Any] = {"params": RunParams.model_validate(record["params"])}
    if record.get("until"):
        options["until"] = record["until"]
    # more inputs for the run, on purpose: the record before them is kept under attempts/
    results = episode_to_lora(inputs=inputs, name=name, runs_dir=runs_dir, webhook_url=webhook_url, new_attempt=True,
                              **options)
    return {"new_episodes": [str(v) for v in fresh], "stages": {k: v.recomputed for k, v in results.items()}}
