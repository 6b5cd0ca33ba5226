"""Stage `evaluate`: closed-loop choice of each character's best checkpoint (after `train`).

For every saved checkpoint a test gallery is generated: the trigger word plus test prompts
(poses, framings, settings) at LoRA strengths 0.5 / 0.8 / 1.0 / 1.2, one fixed seed per prompt.
Each image is scored by embedding similarity to the character's training images (the run's
embedder), and each (checkpoint, strength) row by prompt variety too: how different its images
are from each other, which catches the "same pose whatever the prompt" overfit. The checkpoint
with the best mean score is copied as the character's final LoRA; a contact sheet and a score
table are written beside it, published to the UI and recorded in the versions registry.
Background bleed: how much a checkpoint (strength 1 against 0, same seed) changes the image of
a prompt that does not ask for the character (`bleed_prompt`): a LoRA that learnt the scenery
of its training images changes pictures it was not called into (masked loss keeps it low).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.run.spec import Inputs, ShardedStage
from tasks.run.stage import Plan, Shard, StageResult, merge_shards, run_shard
from tasks.run.store import RunStore, fingerprint, safe_name, write_table

STAGE = "evaluate"
VERSION = 2

SCHEMA = pa.schema([
    ("item_id", pa.string()),           # the character
    ("source_id", pa.string()),         # its train row
    ("character", pa.string()),
    ("trigger", pa.string()),
    ("version_id", pa.string()),
    ("best_step", pa.int64()),
    ("best_checkpoint", pa.string()),   # run-relative checkpoint the final LoRA was copied from
    ("score", pa.float64()),
    ("identity", pa.float64()),
    ("variety", pa.float64()),
    ("background_bleed", pa.float64()),  # chosen checkpoint: mean pixel change of the bleed prompt's image, 0-1
    ("final_lora", pa.string()),        # run-relative
    ("contact_sheet", pa.string()),
    ("scores_path", pa.string()),
    ("kept", pa.bool_()),
    ("drop_reason", pa.string()),
])

SCORES_SCHEMA = pa.schema([
    ("checkpoint", pa.string()), ("step", pa.int64()), ("strength", pa.float64()),
    ("identity", pa.float64()), ("variety", pa.float64()), ("score", pa.float64()),
    ("checkpoint_score", pa.float64()), ("best", pa.bool_()),
])


class EvaluateParams(BaseModel):
    """The test gallery and how it is scored."""

    model_config = ConfigDict(extra="forbid")

    strengths: list[float] = Field([0.5, 0.8, 1.0, 1.2], description="LoRA strengths of the gallery")
    prompts: list[str] = Field(
        ["{trigger}", "{trigger}, standing, full body, simple background", "{trigger}, close-up portrait, smiling",
         "{trigger}, sitting on a bench, outdoors, park", "{trigger}, running, city street, night"],
        description="test prompts; {trigger} becomes the character's trigger word")
    bleed_prompt: str = Field("scenery, street, day, no humans", description="a prompt without the trigger: "
                              "background bleed is how much the LoRA changes its image")
    seed: int = Field(1234, description="prompt i uses seed + i at every checkpoint and strength")
    steps: int = Field(25, ge=1, description="inference steps per image")
    guidance_scale: float = Field(7.0, ge=0, description="classifier-free guidance")
    resolution: int | None = Field(None, ge=64, description="gallery image side (None: the training resolution)")
    embedder: str | None = Field(None, description="embedder for scoring (None: the run's, embed.embedder)")
    variety_weight: float = Field(0.5, ge=0, description="weight of prompt variety against identity in the score")
    max_reference_images: int = Field(64, ge=1, description="training images embedded as the identity reference")
    device: str = Field("auto", description="auto, cpu or cuda")

    @field_validator("strengths", "prompts")
    @classmethod
    def _not_empty(cls, value: list) -> list:
        if not value:
            raise ValueError("must hold at least one value, got []")
        return value


# ---- scoring (plain numpy) ---------------------------------------------------------------------

def identity_scores(vectors: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Cosine similarity of each vector to the normalised mean of the reference vectors."""
    centre = reference.mean(axis=0)
    centre = centre / max(float(np.linalg.norm(centre)), 1e-12)
    return vectors @ centre


def prompt_variety(vectors: np.ndarray) -> float:
    """Mean pairwise cosine distance of one row's images (0 when every prompt gives the same image)."""
    n = len(vectors)
    if n < 2:
        return 0.0
    sims = vectors @ vectors.T
    return float((n * n - sims.sum()) / (n * (n - 1)))


def score_rows(rows: dict[tuple[str, float], np.ndarray], reference: np.ndarray, variety_weight: float) -> list[dict]:
    """One record per (checkpoint, strength): identity, variety, score."""
    out = []
    for (label, strength), vectors in rows.items():
        identity = float(identity_scores(vectors, reference).mean())
        variety = prompt_variety(vectors)
        out.append({"checkpoint": label, "strength": strength, "identity": identity, "variety": variety,
                    "score": identity + variety_weight * variety})
    return out


def pick_best(records: list[dict]) -> tuple[str, dict[str, float]]:
    """The checkpoint with the best mean score over strengths (ties: the later checkpoint)."""
    by_checkpoint: dict[str, list[float]] = {}
    for r in records:
        by_checkpoint.setdefault(r["checkpoint"], []).append(r["score"])
    means = {k: float(np.mean(v)) for k, v in by_checkpoint.items()}
    best = max(means, key=lambda k: (means[k], list(means).index(k)))
    return best, means


# ---- one character ------------------------------------------------------------------------------

def image_change(a: Any, b: Any) -> float:
    """Mean absolute pixel difference of two RGB images: 0 (the same) to 1."""
    x = np.asarray(a.convert("RGB"), dtype=np.float32)
    y = np.asarray(b.convert("RGB").resize(a.size), dtype=np.float32)
    return float(np.abs(x - y).mean() / 255.0)


def _bleed(pipe: Any, labels: list[tuple[str, Path]], params: EvaluateParams, size: int) -> dict[str, float]:
    """Background bleed of each checkpoint: its change (strength 1 against 0) of the bleed prompt's image."""
    from models.lora_gallery import render_gallery

    images = render_gallery(pipe, labels, [params.bleed_prompt], [0.0, 1.0], seed=params.seed, steps=params.steps,
                            size=size, guidance=params.guidance_scale)
    return {label: image_change(images[(label, 0.0)][0], images[(label, 1.0)][0]) for label, _ in labels}


def _rgba(image: Any) -> np.ndarray:
    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])


def evaluate_character(root: Path, row: dict, params: EvaluateParams, embedder_spec: str, out: Path,
                       prefix: str) -> tuple[dict, list[dict]]:
    """Gallery, scores, contact sheet and final LoRA of one trained character, written into `out`.

    Args:
        root: the run folder (row paths are relative to it).
        row: the character's train manifest row.
        params: gallery and scoring parameters.
        embedder_spec: the embedder to score with (models/embedders.py spec).
        out: folder to write into; `prefix` is its run-relative path once committed.
    Returns:
        (manifest row with SCHEMA fields, score records with SCORES_SCHEMA fields).
    """
    from PIL import Image

    from models.embedders import load_embedder
    from models.lora_gallery import contact_sheet, load_pipeline, render_gallery
    from models.sd_base import MODEL_WORK

    settings = json.loads((root / row["settings_path"]).read_text())
    checkpoints = [(int(step), root / path) for step, path in json.loads(row["checkpoints"])]
    if not checkpoints:
        checkpoints = [(int(row["steps"] or 0), root / row["lora_path"])]
    trigger = row["trigger"]
    prompts = [p.replace("{trigger}", trigger) for p in params.prompts]
    size = params.resolution or int(settings["settings"]["resolution"])
    labels = [(f"step-{step:06d}", path) for step, path in checkpoints]
    with MODEL_WORK:  # LoRA loading patches torch globally: one model job per process at a time
        pipe = load_pipeline(settings["settings"]["base"], device=params.device)
        gallery = render_gallery(pipe, labels, prompts, params.strengths, seed=params.seed, steps=params.steps,
                                 size=size, guidance=params.guidance_scale)
        bleed = _bleed(pipe, labels, params, size)
        del pipe
    embedder = load_embedder(embedder_spec)
    package_folder = root / "package" / row["source_id"]
    references = sorted(package_folder.glob("*.png"))[: params.max_reference_images]
    reference = embedder.embed([_rgba(Image.open(p)) for p in references])
    vectors = {key: embedder.embed([_rgba(im) for im in images]) for key, images in gallery.items()}
    records = score_rows(vectors, reference, params.variety_weight)
    best, means = pick_best(records)
    steps_of = {label: step for (label, _), (step, _) in zip(labels, checkpoints)}
    paths_of = dict(labels)
    for r in records:
        r.update(step=steps_of[r["checkpoint"]], checkpoint_score=means[r["checkpoint"]], best=r["checkpoint"] == best)
    final = out / f"{safe_name(row['character'])}.safetensors"
    shutil.copy2(paths_of[best], final)
    sheet = contact_sheet(gallery, prompts, {(r["checkpoint"], r["strength"]): r["score"] for r in records})
    sheet.save(out / "contact_sheet.png")
    write_table(pa.Table.from_pylist(records, schema=SCORES_SCHEMA), out / "scores.parquet")
    (out / "report.md").write_text(score_report(row["character"], trigger, records, best, embedder_spec)
                                   + f"\nbackground bleed of {best}: {bleed[best]:.3f} (`{params.bleed_prompt}`, "
                                     "LoRA strength 1 against 0)\n")
    mine = [r for r in records if r["checkpoint"] == best]
    manifest_row = {
        "item_id": row["character"], "source_id": row["item_id"], "character": row["character"], "trigger": trigger,
        "version_id": row.get("version_id"), "best_step": steps_of[best],
        "best_checkpoint": paths_of[best].relative_to(root).as_posix(), "score": means[best],
        "identity": float(np.mean([r["identity"] for r in mine])), "variety": float(np.mean([r["variety"] for r in mine])),
        "background_bleed": bleed[best],
        "final_lora": f"{prefix}/{final.name}", "contact_sheet": f"{prefix}/contact_sheet.png",
        "scores_path": f"{prefix}/scores.parquet", "kept": True, "drop_reason": None,
    }
    return manifest_row, records


def score_report(character: str, trigger: str, records: list[dict], best: str, embedder: str) -> str:
    """Markdown: one table row per (checkpoint, strength), the chosen checkpoint marked."""
    lines = [f"## {character} (`{trigger}`)", "", f"scored with embedder `{embedder}`; chosen: **{best}**", "",
             "| checkpoint | strength | identity | variety | score | checkpoint score |", "|---|---|---|---|---|---|"]
    for r in records:
        mark = " ✅" if r["checkpoint"] == best else ""
        lines.append(f"| {r['checkpoint']}{mark} | {r['strength']:g} | {r['identity']:.3f} | {r['variety']:.3f} "
                     f"| {r['score']:.3f} | {r['checkpoint_score']:.3f} |")
    return "\n".join(lines) + "\n"


# ---- plan, shard, merge --------------------------------------------------------------------------

def _train_rows(store: RunStore, train: str) -> dict[str, dict]:
    rows = store.read_manifest(train).to_pylist()
    return {r["character"]: r for r in rows if r["kept"] and r["status"] == "completed"}


def plan_evaluation(store: RunStore, params: Any, inputs: Inputs) -> Plan:
    """One shard per completed training of the `train` input, keyed by its character, its payload its
    train row; fingerprinted by that row and the scoring setup. The plan's payload: the embedder
    (`evaluate.embedder`, else the run's `embed.embedder`)."""
    from models.embedders import embedder_identity

    own: EvaluateParams = params.evaluate
    embedder = own.embedder or params.embed.embedder
    settings = own.model_dump(mode="json") | {"embedder": embedder_identity(embedder)}
    shards = [Shard(key=character, payload=row, fingerprint=fingerprint(
                  STAGE, VERSION, settings, {"train": json.dumps(row, sort_keys=True, default=str)}))
              for character, row in sorted(_train_rows(store, inputs["train"].stage).items())]
    return Plan(shards=shards, payload=embedder)


def evaluate_one(store: RunStore, shard: Shard, params: Any, plan: Plan) -> StageResult:
    """Evaluate one character's checkpoints (one shard); records the choice in the versions registry."""
    row = shard.payload

    def build(tmp: Path, prefix: str) -> tuple[pa.Table, dict]:
        manifest_row, records = evaluate_character(store.root, row, params.evaluate, plan.payload, tmp, prefix)
        report = {k: manifest_row[k] for k in ("character", "best_step", "score", "identity", "variety",
                                               "background_bleed")}
        report["rows"] = len(records)
        return pa.Table.from_pylist([manifest_row], schema=SCHEMA), report

    result = run_shard(store, STAGE, shard.key, shard.fingerprint, build)
    if result.recomputed and row.get("version_id"):
        from tasks.run import versions

        committed = pq.read_table(store.shard_dir(STAGE, shard.key) / "rows.parquet").to_pylist()[0]
        try:
            versions.update_version(store.root.parent, row["version_id"], best_checkpoint=committed["best_checkpoint"],
                                    eval_score=committed["score"], final_lora=str(store.root / committed["final_lora"]),
                                    eval_table=str(store.root / committed["scores_path"]))
        except KeyError:
            pass  # the registry was removed or moved: the stage's own outputs still hold the choice
    return result


def merge_evaluation(store: RunStore, plan: Plan, params: Any) -> StageResult:
    """The evaluate manifest (one row per character) and `evaluate/report.md`, every character's scores."""
    def merge(tables: list[pa.Table], reports: list[dict]) -> tuple[pa.Table, dict, list[str]]:
        table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
        report = "\n".join((store.shard_dir(STAGE, s.key) / "report.md").read_text() for s in plan.shards)
        (store.stage_dir(STAGE) / "report.md").write_text(f"# Checkpoint evaluation\n\n{report}")
        summary = {"characters": table.num_rows, "kept": table.num_rows, "quarantined": 0,
                   "best_step": dict(zip(table.column("character").to_pylist(), table.column("best_step").to_pylist()))}
        return table, summary, [f"{STAGE}/report.md"]

    return merge_shards(store, STAGE, plan.fingerprint, plan.shard_fingerprints(), merge)


def _publish_report(store: RunStore) -> None:
    """The score tables (with the contact sheets' paths) as a markdown artifact in the Prefect UI."""
    try:
        from prefect.artifacts import create_markdown_artifact

        sheets = [f"- {s.parent.name}: `{s}`" for s in sorted(store.stage_dir(STAGE).glob("shards/*/contact_sheet.png"))]
        text = (store.stage_dir(STAGE) / "report.md").read_text() + "\n### Contact sheets\n\n" + "\n".join(sheets)
        create_markdown_artifact(text, key="evaluate-report", description="checkpoint evaluation")
    except Exception:  # the UI is a nicety: never fail the stage because of it
        pass


def _scores(store: RunStore, result: StageResult) -> list[dict] | None:
    shard = store.shard_dir(STAGE, result.key)
    return pq.read_table(shard / "scores.parquet").to_pylist() if (shard / "scores.parquet").is_file() else None


EVALUATE = ShardedStage(
    name=STAGE, version=VERSION, params=EvaluateParams, inputs=("train",), reads=(STAGE, "embed.embedder"),
    tags=("gpu",), title="evaluate", plan=plan_evaluation, shard=evaluate_one, merge=merge_evaluation,
    rows=lambda store, result: _publish_report(store), shard_rows=_scores,
)
"""The evaluate stage: one shard per trained character (gallery, scores, best checkpoint); it reads the
run's `embed.embedder` (so it belongs to pipelines with an embed stage: the episode pipeline)."""
