"""The pipelines as data: one table per source, each a list of stage steps and hooks in run order.

A row binds a stage's (or hook's) input roles to the stages that feed it: `step(CAPTION,
given_captions="ingest")` keeps the captions the ingest rows carry; optional roles left unbound are
not handed. `run_pipeline` (tasks/run/runner.py) runs any slice of a table; the flows (episode_to_lora,
source_to_lora for renders and photos), the `Stage` literals and the CLI's `--until` choices all
derive from these tables. Adding a stage is a spec in its module and a row here.
"""

from __future__ import annotations

from tasks.augment import AUGMENT
from tasks.caption import CAPTION
from tasks.cluster import CLUSTER
from tasks.embed import EMBED
from tasks.evaluate import EVALUATE
from tasks.frames import FRAMES
from tasks.package import PACKAGE
from tasks.report import RUN_STAGES, write_cluster_report
from tasks.run.runner import hook, stage_names
from tasks.run.spec import step
from tasks.segment import SEGMENT
from tasks.select import SELECT
from tasks.sources.ingest_photos import INGEST_PHOTOS
from tasks.sources.ingest_renders import INGEST_RENDERS
from tasks.tier import TIER
from tasks.train import TRAIN
from tasks.validate import VALIDATE, check_passed

CLUSTER_REPORT = hook("cluster-report", write_cluster_report, after=("tier", "select"), inputs=("clusters", "tiers"),
                      optional=("selection",), **RUN_STAGES)
"""The cluster report (<run>/report/), rewritten after the last of tier and select that ran."""
CHECK_DATASET = hook("check-dataset", lambda run, inputs: check_passed(inputs["validate"], run.store()),
                     after=("validate",), inputs=("validate",))
"""Stop the run when validation failed, so training never starts on a broken dataset."""


def _dataset(images: str, **optional: str) -> list:
    """augment -> caption -> package -> validate -> train, from the stage whose images are trained;
    `backgrounds=STAGE`: background layers for swaps and the background dataset, `given_captions=STAGE`:
    the captions that stage's rows carry are kept."""
    def bound(*roles: str) -> dict[str, str]:
        return {role: optional[role] for role in roles if role in optional}

    return [step(AUGMENT, images=images, **bound("backgrounds")),
            step(CAPTION, **bound("given_captions")), step(PACKAGE, **bound("backgrounds")),
            step(VALIDATE), CHECK_DATASET, step(TRAIN)]


PIPELINES: dict[str, list] = {
    "episode": [step(FRAMES), step(SEGMENT), step(EMBED), step(CLUSTER), step(TIER), step(SELECT, segment="segment"), CLUSTER_REPORT,
                *_dataset("select", backgrounds="segment"), step(EVALUATE)],
    "renders": [step(INGEST_RENDERS), *_dataset("ingest", given_captions="ingest")],
    "photos": [step(INGEST_PHOTOS), *_dataset("ingest", given_captions="ingest")],
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
