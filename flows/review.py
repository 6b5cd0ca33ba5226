"""Human in the loop: after `tier` the run pauses until a person reviews the clusters.

The review page (`<run>/review/review.html`, served with the run folder's other files by the local
server, `tasks.run.links.served_url`, and linked from the pause's description and the run's
`review-page` artifact) is the cluster report made interactive: per cluster a `train` tick, a character name and a trigger word, pre-filled with what
`select` would do on its own, and its least typical layers first, each excluded by clicking its picture.
"Resume the run" posts the answers to Prefect's API (`POST /api/flow_runs/<id>/resume`), exactly what
the fallback, the Resume form on the run's page in the Prefect UI, sends: per cluster only the
editable fields (train, name, trigger, the layers to exclude). The answers are written as a select
overrides file in the run folder (`review/overrides.yaml`, on top of the overrides file given in the
parameters, if any) and the run continues with `select` using it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml
from pydantic import BaseModel, ConfigDict, Field, create_model

from prefect.input import RunInput

from tasks.select import ClusterOverride, LayerOverride, Overrides, SelectParams, default_name, load_overrides, \
    would_select
from tasks.run.links import served_url
from tasks.run.stage import RunRef, StageResult
from tasks.run.store import RunStore

REVIEW_TIMEOUT_S = 24 * 3600
"""How long a paused run waits for its answers before it fails."""
POLL_S = 3
FOLDER = "review"
PAGE_NAME = "review.html"
PAGE_KEY = "review-page"
"""The key of the link artifact to the review page."""


def _trigger() -> Any:
    """The trigger word field: no commas (they separate caption tags)."""
    return Field("", pattern=r"^[^,\t\r\n]*$", description="trigger word, no commas (empty: from the name)")


class LayerChoice(BaseModel):
    """One of a cluster's least typical layers: what the review shows and whether it is excluded."""

    model_config = ConfigDict(extra="forbid")

    item_id: str = Field(description="the layer")
    path: str = Field("", description="the layer image, relative to the run folder")
    exclude: bool = Field(False, description="leave this layer out of the character")


class ClusterChoice(BaseModel):
    """One cluster under review: what the page shows of it (tier, size, kind, purity, layers) and the choice."""

    model_config = ConfigDict(extra="forbid")

    cluster_id: int
    tier: str = ""
    size: int = 0
    kind: str = ""
    purity: float = 0.0
    selected: bool
    name: str = ""
    trigger: str = _trigger()
    least_typical: list[LayerChoice] = Field(default_factory=list)


class ClusterAnswer(BaseModel):
    """One cluster's answer: only what a person edits (the form's and the review page's fields)."""

    model_config = ConfigDict(extra="forbid")

    cluster_id: int = Field(description="the cluster these answers are for (the review page shows it)")
    selected: bool = Field(description="train a LoRA for this character")
    name: str = Field("", description="character name (empty: char_ and the cluster id)")
    trigger: str = _trigger()
    exclude: list[str] = Field(default_factory=list,
                               description="ids of layers to leave out (the review page lists the least typical)")


class ClusterReview(RunInput):
    """The answers the paused run waits for."""

    clusters: list[ClusterAnswer]


def review_form(url: str | None) -> type[ClusterReview]:
    """ClusterReview with the review page linked in each cluster's block of the form: Prefect's Resume
    dialog squeezes the pause's description (markdown above the form) to nothing when the form is long."""
    if not url:
        return ClusterReview
    answer = create_model("ClusterAnswer", __base__=ClusterAnswer, cluster_id=(int, Field(
        description=f"the cluster these answers are for: [open the review page]({url}) to see its pictures "
                    "(the page resumes this run too)")))
    return create_model("ClusterReview", __base__=ClusterReview, clusters=(list[answer], ...))


def review_choices(tiers: pa.Table, params: SelectParams, base: Overrides) -> list[ClusterChoice]:
    """The clusters to review, pre-filled with what `select` would choose without a review
    (`tasks.select.would_select` on the tier stage's usable layers).

    Clusters merged into another by the overrides file are left out (they follow that one).
    """
    rows = {r["cluster_id"]: r for r in tiers.to_pylist()}
    roots = {cid: base.root_of(cid, set(rows)) for cid in rows}
    choices = []
    for cid, row in sorted(rows.items()):
        if roots[cid] != cid:
            continue
        entry = base.clusters.get(cid, ClusterOverride())
        merged = [rows[c] for c, root in roots.items() if root == cid and c != cid]
        layers = [LayerChoice(item_id=i, path=p, exclude=bool(base.layers.get(i) and base.layers[i].exclude))
                  for i, p in zip(row.get("atypical_ids") or [], row.get("atypical_paths") or [])]
        choices.append(ClusterChoice(cluster_id=cid, tier=row["tier"], size=row["size"], kind=row.get("kind") or "unknown",
                                     purity=round(float(row.get("purity") or 0.0), 3),
                                     selected=would_select(row, entry, params, merged=merged),
                                     name=entry.name or default_name(cid)[0], trigger=entry.trigger or "",
                                     least_typical=layers))
    return choices


def answers_of(choices: list[ClusterChoice]) -> list[ClusterAnswer]:
    """The form's pre-filled answers: the editable part of each choice."""
    return [ClusterAnswer(cluster_id=c.cluster_id, selected=c.selected, name=c.name, trigger=c.trigger,
                          exclude=[layer.item_id for layer in c.least_typical if layer.exclude]) for c in choices]


def apply_answers(choices: list[ClusterChoice], answers: list[ClusterAnswer]) -> list[ClusterChoice]:
    """The answered clusters' choices with the answers applied (a layer id not offered is added, excluded).

    Raises ValueError naming a cluster that is not under review.
    """
    by_id = {c.cluster_id: c for c in choices}
    result = []
    for answer in answers:
        if answer.cluster_id not in by_id:
            raise ValueError(f"review answer for cluster {answer.cluster_id}: not a cluster under review "
                             f"({sorted(by_id)})")
        choice = by_id[answer.cluster_id]
        offered = {layer.item_id for layer in choice.least_typical}
        layers = [layer.model_copy(update={"exclude": layer.item_id in answer.exclude}) for layer in choice.least_typical]
        layers += [LayerChoice(item_id=i, exclude=True) for i in dict.fromkeys(answer.exclude) if i not in offered]
        result.append(choice.model_copy(update={"selected": answer.selected, "name": answer.name,
                                                "trigger": answer.trigger, "least_typical": layers}))
    return result


def describe(choices: list[ClusterChoice], store: RunStore, page_url: str | None = None) -> str:
    """Markdown shown above the fallback form: the review page's link and the clusters with their layers."""
    page = store.root / FOLDER / PAGE_NAME
    lines = [f"### Review the clusters of run `{store.name}`", "",
             f"**[Open the review page]({page_url})** (pictures; resumes this run)" if page_url
             else f"Review page (open it through the local server to resume from it): `{page}`", "",
             "Or answer here: per cluster `selected` (train it), a name, a trigger word and the ids of layers to "
             "exclude (least typical first below).", "",
             "| cluster | tier | kind | layers | est. purity | selected now | least typical layers |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {c.cluster_id} | {c.tier} | {c.kind} | {c.size} | {c.purity:.2f} | {'yes' if c.selected else 'no'} "
              f"| {' '.join(f'`{layer.item_id}`' for layer in c.least_typical)} |" for c in choices]
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


def write_review_page(store: RunStore, choices: list[ClusterChoice], flow_run_id: str) -> Path:
    """Write the review page of `flow_run_id` (the cluster report made interactive) to `<run>/review/review.html`."""
    from tasks.report import render_review

    page = store.root / FOLDER / PAGE_NAME
    page.parent.mkdir(parents=True, exist_ok=True)
    reviewed = {c.cluster_id: {"selected": c.selected, "name": c.name, "trigger": c.trigger,
                               "exclude": [layer.item_id for layer in c.least_typical if layer.exclude],
                               "layers": {layer.item_id: layer.path for layer in c.least_typical}} for c in choices}
    tmp = page.with_name(f".{PAGE_NAME}.tmp")
    tmp.write_text(render_review(store, reviewed, flow_run_id), encoding="utf-8")
    tmp.replace(page)
    return page


def pause_for_review(run: RunRef, tier: StageResult, params: SelectParams,
                     timeout: int = REVIEW_TIMEOUT_S) -> SelectParams:
    """Pause the flow run until a person answers the review (page or form); the select params that use the answers.

    Args:
        run: the run (its tier manifest lists the clusters).
        tier: the finished tier stage.
        params: the select parameters the run was started with.
        timeout: seconds to wait for the answers before the run fails.
    """
    from prefect.artifacts import create_link_artifact, create_markdown_artifact
    from prefect.flow_runs import pause_flow_run
    from prefect.runtime import flow_run

    store = run.store()
    if not store.is_done("tier", tier.fingerprint):
        raise RuntimeError(f"the tier stage of run '{store.name}' is not done; cannot review its clusters")
    base = load_overrides(params.overrides)
    choices = review_choices(store.read_manifest("tier"), params, base)
    page = write_review_page(store, choices, str(flow_run.id)).resolve()
    url = served_url(page)  # the local server serves the run folders' files (deployments/api_server.py)
    if url:
        create_link_artifact(url, link_text="review the clusters", key=PAGE_KEY, description="review page")
    form = review_form(url).with_initial_data(description=describe(choices, store, url), clusters=answers_of(choices))
    answer = pause_flow_run(wait_for_input=form, timeout=timeout, poll_interval=POLL_S)
    path = write_overrides(store, overrides_from(apply_answers(choices, answer.clusters), base))
    chosen = [f"| {c.cluster_id} | {c.name} | {c.trigger} | {len(c.exclude)} |" for c in answer.clusters if c.selected]
    create_markdown_artifact("\n".join(["### Review answers", "", "| cluster | name | trigger | layers excluded |",
                                        "|---|---|---|---|", *chosen, "", f"overrides: `{path}`"]),
                             key="review", description="review")
    return SelectParams.model_validate({**params.model_dump(), "overrides": str(path)})
