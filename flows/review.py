"""Human in the loop: after `tier` the run pauses with a form listing the clusters.

In the Prefect UI the paused run shows "Resume" with the form: per cluster a tick box
(train it or not), a character name and a trigger word, pre-filled with what `select` would
do on its own, and its least typical layers first, each with one tick box to exclude it. The answers are written as a select overrides file in the run folder
(`review/overrides.yaml`, on top of the overrides file given in the parameters, if any) and
the run continues with `select` using it.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import yaml
from pydantic import BaseModel, ConfigDict, Field

from prefect.input import RunInput

from tasks.select import ClusterOverride, LayerOverride, Overrides, SelectParams, default_name, load_overrides
from tasks.run.stage import RunRef, StageResult
from tasks.run.store import RunStore

REVIEW_TIMEOUT_S = 24 * 3600
"""How long a paused run waits for its answers before it fails."""
POLL_S = 3


class LayerChoice(BaseModel):
    """One of a cluster's least typical layers in the review form."""

    model_config = ConfigDict(extra="forbid")

    item_id: str = Field(description="the layer (see its path)")
    path: str = Field("", description="the layer image, relative to the run folder")
    exclude: bool = Field(False, description="leave this layer out of the character")


class ClusterChoice(BaseModel):
    """One cluster in the review form."""

    model_config = ConfigDict(extra="forbid")

    cluster_id: int = Field(description="cluster id (kept stable across runs)")
    tier: str = Field("", description="tier S/A/B/C/D (for information)")
    size: int = Field(0, description="layers in the cluster (for information)")
    kind: str = Field("", description="character / scenery / mixed (for information)")
    purity: float = Field(0.0, description="estimated share of character layers among those taken (for information)")
    selected: bool = Field(description="train a LoRA for this character")
    name: str = Field("", description="character name (empty: char_<id>)")
    trigger: str = Field("", pattern=r"^[^,\t\r\n]*$", description="trigger word, no commas (empty: from the name)")
    least_typical: list[LayerChoice] = Field(default_factory=list,
                                             description="the cluster's least typical layers first: tick to exclude")


class ClusterReview(RunInput):
    """The answers the paused run waits for."""

    clusters: list[ClusterChoice]


def review_choices(tiers: pa.Table, params: SelectParams, base: Overrides) -> list[ClusterChoice]:
    """The form's rows, pre-filled with what `select` would choose without a review.

    Clusters merged into another by the overrides file are left out (they follow that one).
    """
    wanted = set(params.tiers) if params.tiers is not None else None
    choices = []
    for row in sorted(tiers.to_pylist(), key=lambda r: r["cluster_id"]):
        cid = row["cluster_id"]
        entry = base.clusters.get(cid, ClusterOverride())
        if entry.merge_into is not None:
            continue
        by_tier = row["tier"] in wanted if wanted is not None else bool(row["recommended"])
        kind = row.get("kind") or "unknown"
        usable = row.get("used", row["size"])
        selected = entry.include or (not entry.exclude and by_tier and kind in (*params.kinds, "unknown")
                                     and usable >= params.min_images)
        layers = [LayerChoice(item_id=i, path=p, exclude=bool(base.layers.get(i) and base.layers[i].exclude))
                  for i, p in zip(row.get("atypical_ids") or [], row.get("atypical_paths") or [])]
        choices.append(ClusterChoice(cluster_id=cid, tier=row["tier"], size=row["size"], kind=kind,
                                     purity=round(float(row.get("purity") or 0.0), 3), selected=selected,
                                     name=entry.name or default_name(cid)[0], trigger=entry.trigger or "",
                                     least_typical=layers))
    return choices


def describe(choices: list[ClusterChoice], store: RunStore) -> str:
    """Markdown shown above the form."""
    lines = [f"### Review the clusters of run `{store.name}`", "",
             "Tick the characters to train and give them a name and a trigger word.",
             f"Contact sheets: `{store.root / 'report'}`", "",
             "Each cluster lists its least typical layers first: tick `exclude` to leave one out.", "",
             "| cluster | tier | kind | layers | est. purity | selected now |", "|---|---|---|---|---|---|"]
    lines += [f"| {c.cluster_id} | {c.tier} | {c.kind} | {c.size} | {c.purity:.2f} | {'yes' if c.selected else 'no'} |"
              for c in choices]
    return "\n".join(lines)


def overrides_from(choices: list[ClusterChoice], base: Overrides) -> Overrides:
    """The overrides file after the review: every reviewed cluster included or excluded, named.

    Raises ValueError naming the cluster when an answer is not a valid override.
    """
    clusters = dict(base.clusters)
    layers = dict(base.layers)
    for choice in choices:
        for layer in choice.least_typical:
            if layer.exclude:
                layers[layer.item_id] = LayerOverride(exclude=True)
            elif layer.item_id in layers and layers[layer.item_id].exclude:
                del layers[layer.item_id]
        entry = clusters.get(choice.cluster_id, ClusterOverride())
        try:
            clusters[choice.cluster_id] = ClusterOverride(
                name=choice.name.strip() or entry.name, trigger=choice.trigger.strip() or entry.trigger,
                kind=entry.kind, include=choice.selected, exclude=not choice.selected)
        except ValueError as exc:
            raise ValueError(f"review answer for cluster {choice.cluster_id}: {exc}") from None
    return Overrides(clusters=clusters, layers=layers)


def write_overrides(store: RunStore, overrides: Overrides) -> Path:
    """Save the overrides where `select` reads them: `<run>/review/overrides.yaml`."""
    path = store.root / "review" / "overrides.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = overrides.model_dump(mode="json", exclude_defaults=True)
    path.write_text(yaml.safe_dump(data, sort_keys=True))
    return path


def pause_for_review(run: RunRef, tier: StageResult, params: SelectParams,
                     timeout: int = REVIEW_TIMEOUT_S) -> SelectParams:
    """Pause the flow run until a person answers the cluster form; the select params that use the answers.

    Args:
        run: the run (its tier manifest lists the clusters).
        tier: the finished tier stage.
        params: the select parameters the run was started with.
        timeout: seconds to wait for the answers before the run fails.
    """
    from prefect.artifacts import create_markdown_artifact
    from prefect.flow_runs import pause_flow_run

    store = run.store()
    if not store.is_done("tier", tier.fingerprint):
        raise RuntimeError(f"the tier stage of run '{store.name}' is not done; cannot review its clusters")
    base = load_overrides(params.overrides)
    choices = review_choices(store.read_manifest("tier"), params, base)
    form = ClusterReview.with_initial_data(description=describe(choices, store), clusters=choices)
    answer = pause_flow_run(wait_for_input=form, timeout=timeout, poll_interval=POLL_S)
    path = write_overrides(store, overrides_from(answer.clusters, base))
    chosen = [f"| {c.cluster_id} | {c.name} | {c.trigger} |" for c in answer.clusters if c.selected]
    create_markdown_artifact("\n".join(["### Review answers", "", "| cluster | name | trigger |", "|---|---|---|",
                                        *chosen, "", f"overrides: `{path}`"]), key="review", description="review")
    return SelectParams.model_validate({**params.model_dump(), "overrides": str(path)})
