"""The pipelines as data: one table per source, each a list of stage steps and hooks in run order.

`run_pipeline` (tasks/run/runner.py) runs any slice of a table; the flows, the `Stage` literals
and the CLI's `--until` choices all derive from these tables. Adding a stage is a spec in its
module and a row here.
"""

from __future__ import annotations

from tasks.augment import AUGMENT
from tasks.caption import CAPTION
from tasks.cluster import CLUSTER
from tasks.embed import EMBED
from tasks.evaluate import EVALUATE
from tasks.frames import FRAMES
from tasks.package import PACKAGE
from tasks.report import write_cluster_report
from tasks.run.runner import Hook, stage_names
from tasks.run.spec import step
from tasks.segment import SEGMENT
from tasks.select import SELECT
from tasks.sources.ingest_photos import INGEST_PHOTOS
from tasks.sources.ingest_renders import INGEST_RENDERS
from tasks.tier import TIER
from tasks.train import TRAIN
from tasks.validate import VALIDATE, check_passed

CLUSTER_REPORT = Hook("cluster-report", ("tier", "select"), write_cluster_report)
"""The cluster report (<run>/report/), rewritten after the last of tier and select that ran."""
CHECK_DATASET = Hook("check-dataset", ("validate",), lambda run, results: check_passed(results["validate"], run.store()))
"""Stop the run when validation failed, so training never starts on a broken dataset."""


def _dataset(images: str) -> list:
    """augment -> caption -> package -> validate -> train, from the stage whose images are trained."""
    return [step(AUGMENT, images=images), step(CAPTION), step(PACKAGE), step(VALIDATE), CHECK_DATASET, step(TRAIN)]


PIPELINES: dict[str, list] = {
    "episode": [step(FRAMES), step(SEGMENT), step(EMBED), step(CLUSTER), step(TIER), step(SELECT), CLUSTER_REPORT,
                *_dataset("select"), step(EVALUATE)],
    "renders": [step(INGEST_RENDERS), *_dataset("ingest")],
    "photos": [step(INGEST_PHOTOS), *_dataset("ingest")],
}
"""Source -> its pipeline. Renders and photos are sources: an ingest step, then the shared dataset steps."""


STAGES: tuple[str, ...] = tuple(dict.fromkeys(
    name for source in ("episode", "renders", "photos") for name in stage_names(PIPELINES[source])))
"""Every stage folder a run may hold, in run order (`status`, `clean`, the quarantine report)."""


def stages_of(source: str) -> list[str]:
    """The stages of a source's pipeline, in run order. Raises KeyError naming the known sources."""
    if source not in PIPELINES:
        raise KeyError(f"unknown source '{source}'; sources are: {', '.join(PIPELINES)}")
    return stage_names(PIPELINES[source])
