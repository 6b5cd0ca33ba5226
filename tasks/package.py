"""Stage `package`: the kohya_ss training tree, its configs, and an AI-Toolkit profile.

Layout under `<run>/package/`::

    {repeats}_{character}/<stem>.png + <stem>.txt    training pairs (RGBA: alpha = character mask; caption)
    validation/{character}/<stem>.png + .txt          held-out pairs (split per character)
    configs/{character}_dataset.toml                  kohya dataset config (--dataset_config)
    configs/{character}_config.toml                   kohya train_network.py config (--config_file)
    configs/{character}_prompts.txt                   kohya sample prompts
    configs/{character}_ai_toolkit.yaml               AI-Toolkit FLUX LoRA job (the Kyana seed's profile; steps,
                                                      LR, sample prompts and init LoRA as the train parameters
                                                      set them per character: a render run's two stages)
    manifest.parquet, characters.parquet

Images are rendered from the caption stage's rows (tasks/composite.py: RGBA layer onto the plain
colour, or onto the background layer the augment op chose); a render that comes out blank (a
white shape on the white canvas) is quarantined, not packaged. A packaged image keeps its
character's mask (the layer's alpha, dilated a few pixels and feathered, so outlines are learnt)
as its alpha channel over the whole rendered picture; the dataset TOML sets kohya's
`alpha_mask = true` on those subsets and the AI-Toolkit job its `alpha_mask`, so trainers weight
the loss by it (masked loss: the LoRA learns the character, not the background). The validation split is drawn
per character over originals: an original and all its augmented copies land on the same side.
Training parameters follow the Yokai guide's table by training image count; creature-kind
characters get network_dim 48 and learning rates x1.1. Options: one multi-concept LoRA over
all characters, and a background dataset from the run's background layers.
"""

from __future__ import annotations

import math
import os
import random
import shutil
from pathlib import Path
from typing import Any, Literal, Optional

import cv2
import numpy as np
import pyarrow as pa
import tomli_w
import yaml
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.run.progress import StageProgress
from tasks.composite import (ALPHA_ON, RenderSpec, background_layers, blank_reason, cover, read_background,
                             read_row_images, render)
from tasks.run.spec import GlobalStage, Inputs
from tasks.run.stage import StageResult, rows_by_character
from tasks.run.store import QUARANTINE, RunStore, safe_name, write_table

STAGE = "package"
VERSION = 5  # 4: column `crop`; 5: crumbs dropped before rendering

TABLE: tuple[tuple[float, int, int, float, float], ...] = (
    (10, 30, 30, 5e-5, 2e-5),
    (20, 20, 25, 8e-5, 3e-5),
    (50, 15, 20, 1e-4, 5e-5),
    (100, 10, 15, 1e-4, 5e-5),
    (math.inf, 5, 12, 1e-4, 5e-5),
)
"""(largest image count, repeats, epochs, UNet LR, text encoder LR), from the Yokai guide."""

SCHEMA = pa.schema([
    ("item_id", pa.string()),
    ("source_id", pa.string()),        # the caption row (same image id)
    ("character", pa.string()),
    ("trigger", pa.string()),
    ("kind", pa.string()),
    ("split", pa.string()),            # train / validation
    ("repeats", pa.int32()),
    ("path", pa.string()),             # run-relative PNG (RGBA, alpha = character mask, when alpha_mask)
    ("caption_path", pa.string()),     # run-relative .txt beside it
    ("caption", pa.string()),
    ("crop", pa.string()),             # full | upper_body | head (a face-centred crop of a layer, tasks/select.py)
    ("kept", pa.bool_()),
    ("drop_reason", pa.string()),
])

CHARACTERS_SCHEMA = pa.schema([
    ("character", pa.string()),
    ("trigger", pa.string()),
    ("kind", pa.string()),
    ("n_train", pa.int32()),
    ("n_validation", pa.int32()),
    ("repeats", pa.int32()),
    ("epochs", pa.int32()),
    ("unet_lr", pa.float64()),
    ("text_encoder_lr", pa.float64()),
    ("network_dim", pa.int32()),
    ("network_alpha", pa.int32()),
    ("total_steps", pa.int64()),
])


class BackgroundDatasetParams(BaseModel):
    """An optional style dataset from the run's background layers (the Yokai guide's step 8)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="also package a background dataset")
    name: str = Field("background", description="its folder and config name")
    trigger: str = Field("bgscene", description="its trigger word")
    max_images: int = Field(200, ge=1, description="keep at most this many (the most diverse)")
    similarity_threshold: float = Field(0.95, gt=0, le=1, description="cosine similarity above which two backgrounds are duplicates")
    repeats: int = Field(10, ge=1, description="kohya repeats")
    epochs: int = Field(10, ge=1, description="epochs")
    unet_lr: float = Field(5e-5, gt=0, description="UNet learning rate (gentler than characters)")
    text_encoder_lr: float = Field(2e-5, gt=0, description="text encoder learning rate")


class AIToolkitParams(BaseModel):
    """The FLUX LoRA profile written as an AI-Toolkit job (the Kyana seed)."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = Field("black-forest-labs/FLUX.1-dev", description="FLUX base model id or path")
    rank: int = Field(16, ge=1, description="LoRA linear rank (alpha = rank)")
    steps: int = Field(3000, ge=1, description="training steps")
    lr: float = Field(1e-4, gt=0, description="learning rate")
    sample_every: int = Field(250, ge=1, description="steps between samples and saves")


class LoraPlan(BaseModel):
    """What the train parameters set for one LoRA (`train.per_character`, `train.init_from`); its
    AI-Toolkit job follows it (None: the package's `ai_toolkit` default)."""

    model_config = ConfigDict(extra="forbid")

    steps: Optional[int] = None
    lr: Optional[float] = None
    prompts: Optional[list[str]] = None
    init_from: Optional[str] = None
    """The LoRA of this run it is fine-tuned from (trained first)."""


class PackageParams(BaseModel):
    """The kohya tree, its split, its images and its training parameters."""

    model_config = ConfigDict(extra="forbid")

    render: RenderSpec = Field(default_factory=RenderSpec, description="canvas of the packaged images")
    alpha_mask: bool = Field(True, description="keep each character's mask as the images' alpha channel and set "
                             "kohya / AI-Toolkit alpha_mask (masked loss); false: plain RGB images")
    mask_dilate: int = Field(3, ge=0, le=64, description="pixels the mask is grown by, so outlines are learnt")
    mask_feather: float = Field(2.0, ge=0, le=64, description="blur (Gaussian sigma, pixels) of the mask's edge")
    validation_split: float = Field(0.1, ge=0, lt=1, description="share of each character's originals held out")
    seed: int = Field(0, description="seed of the validation split")
    base_model: str = Field("stable-diffusion-v1-5/stable-diffusion-v1-5", description="kohya pretrained_model_name_or_path")
    v_parameterization: bool = Field(False, description="the base is a v-prediction model: kohya v_parameterization "
                                     "and zero_terminal_snr")
    batch_size: int = Field(1, ge=1, description="training batch size")
    min_bucket_reso: int = Field(256, ge=64, description="smallest aspect bucket side")
    max_bucket_reso: int = Field(1024, ge=64, description="largest aspect bucket side")
    keep_tokens: int = Field(1, ge=0, description="leading caption tokens never shuffled (the trigger)")
    shuffle_caption: bool = Field(True, description="shuffle caption tokens after keep_tokens")
    network_dim: int = Field(32, ge=1, description="LoRA rank for human and unknown characters")
    creature_network_dim: int = Field(48, ge=1, description="LoRA rank for creature characters")
    creature_lr_scale: float = Field(1.1, gt=0, description="learning-rate factor for creature characters")
    optimizer_type: str = Field("AdamW8bit", description="kohya optimizer_type")
    lr_scheduler: str = Field("cosine", description="kohya lr_scheduler")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("fp16", description="kohya mixed_precision")
    save_every_n_epochs: int = Field(2, ge=1, description="checkpoint and sample every N epochs")
    min_snr_gamma: float = Field(5.0, ge=0, description="kohya min_snr_gamma")
    noise_offset: float = Field(0.05, ge=0, description="kohya noise_offset")
    caption_dropout_rate: float = Field(0.05, ge=0, lt=1, description="kohya caption_dropout_rate")
    multi_concept: bool = Field(False, description="also write one LoRA config over all characters")
    multi_concept_name: str = Field("all_characters", description="name of the multi-concept LoRA")
    background: BackgroundDatasetParams = Field(default_factory=BackgroundDatasetParams)
    ai_toolkit: AIToolkitParams = Field(default_factory=AIToolkitParams)

    @field_validator("max_bucket_reso")
    @classmethod
    def _buckets(cls, value: int, info) -> int:
        low = info.data.get("min_bucket_reso", 0)
        if value < low:
            raise ValueError(f"max_bucket_reso ({value}) must be >= min_bucket_reso ({low})")
        return value


class PlannedPackage(PackageParams):
    """The package parameters with the train parameters' plan of single LoRAs (what the AI-Toolkit jobs follow)."""

    loras: dict[str, LoraPlan] = {}


def package_settings(params: Any) -> PackageParams:
    """The package stage's settings out of a run's parameters: `params.package`, with the per-LoRA plan
    of `params.train` (per_character steps, LR, sample prompts; init_from) when it sets one."""
    train = params.train
    named = sorted(set(train.per_character) | set(train.init_from))
    loras = {name: LoraPlan(init_from=train.init_from.get(name)) for name in named}
    for name, given in train.per_character.items():
        loras[name] = loras[name].model_copy(update={"steps": given.max_steps, "lr": given.unet_lr,
                                                     "prompts": given.sample_prompts})
    if not loras:
        return params.package
    return PlannedPackage.model_validate({**params.package.model_dump(), "loras": loras})


# ---- training parameters -------------------------------------------------------------------------

def _sig(x: float) -> float:
    return float(f"{x:.3g}")


def training_plan(n_images: int, kind: str, params: PackageParams) -> dict[str, Any]:
    """Repeats, epochs, learning rates and network size for a character with n training images."""
    for top, repeats, epochs, unet_lr, te_lr in TABLE:
        if n_images <= top:
            break
    scale = params.creature_lr_scale if kind == "creature" else 1.0
    dim = params.creature_network_dim if kind == "creature" else params.network_dim
    return {"repeats": repeats, "epochs": epochs, "unet_lr": _sig(unet_lr * scale), "text_encoder_lr": _sig(te_lr * scale),
            "network_dim": dim, "network_alpha": max(1, dim // 2),
            "total_steps": math.ceil(n_images * repeats * epochs / params.batch_size)}


# ---- split -------------------------------------------------------------------------------------

def split_groups(groups: list[str], fraction: float, seed: int, character: str) -> set[str]:
    """The originals (group ids) of one character held out for validation."""
    groups = sorted(set(groups))
    if fraction <= 0 or len(groups) < 2:
        return set()
    n = min(len(groups) - 1, max(1, round(len(groups) * fraction)))
    rng = random.Random(f"{seed}:{character}")
    return set(rng.sample(groups, n))


# ---- TOML (kohya reads TOML) -------------------------------------------------------------------

def toml_text(document: dict[str, Any]) -> str:
    """`document` as TOML (tables, arrays of tables), keys whose value is None left out."""
    def present(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: present(item) for key, item in value.items() if item is not None}
        if isinstance(value, (list, tuple)):
            return [present(item) for item in value]
        return value

    return tomli_w.dumps(present(document))


# ---- configs ------------------------------------------------------------------------------------

def kohya_dataset(subsets: list[dict[str, Any]], params: PackageParams) -> str:
    """A kohya dataset config: [general], then one [[datasets]] with a [[datasets.subsets]] per subset."""
    general = {"caption_extension": ".txt", "shuffle_caption": params.shuffle_caption, "keep_tokens": params.keep_tokens}
    dataset = {"resolution": params.render.resolution, "batch_size": params.batch_size, "enable_bucket": True,
               "min_bucket_reso": params.min_bucket_reso, "max_bucket_reso": params.max_bucket_reso,
               **({"subsets": subsets} if subsets else {})}
    return toml_text({"general": general, "datasets": [dataset]})


def kohya_subset(image_dir: Path, repeats: int, trigger: str, params: PackageParams,
                 masked: bool = False) -> dict[str, Any]:
    """A kohya [[datasets.subsets]] table; `masked`: its images carry the mask (kohya's alpha_mask)."""
    return {"image_dir": str(image_dir), "num_repeats": repeats, "class_tokens": trigger, "caption_extension": ".txt",
            "keep_tokens": params.keep_tokens, "shuffle_caption": params.shuffle_caption,
            **({"alpha_mask": True} if masked else {})}


def kohya_training(name: str, plan: dict[str, Any], dataset_config: Path, prompts: Path, output_dir: Path,
                   params: PackageParams) -> str:
    """A kohya training config (train_network.py --config_file); kohya merges its sections into one set of arguments."""
    return toml_text({
        "model": {"pretrained_model_name_or_path": params.base_model,
                  **({"v_parameterization": True, "zero_terminal_snr": True} if params.v_parameterization else {})},
        "dataset": {"dataset_config": str(dataset_config), "cache_latents": True,
                    "caption_dropout_rate": params.caption_dropout_rate, "max_data_loader_n_workers": 2},
        "network": {"network_module": "networks.lora", "network_dim": plan["network_dim"],
                    "network_alpha": plan["network_alpha"]},
        "optimizer": {"optimizer_type": params.optimizer_type, "unet_lr": plan["unet_lr"],
                      "text_encoder_lr": plan["text_encoder_lr"], "lr_scheduler": params.lr_scheduler},
        "training": {"max_train_epochs": plan["epochs"], "mixed_precision": params.mixed_precision,
                     "gradient_checkpointing": True, "min_snr_gamma": params.min_snr_gamma,
                     "noise_offset": params.noise_offset, "seed": params.seed},
        "saving": {"output_dir": str(output_dir), "output_name": name, "save_model_as": "safetensors",
                   "save_precision": "fp16", "save_every_n_epochs": params.save_every_n_epochs,
                   "logging_dir": str(output_dir / "logs")},
        "sampling": {"sample_prompts": str(prompts), "sample_every_n_epochs": params.save_every_n_epochs,
                     "sample_sampler": "euler_a"},
    })


def sample_prompts(trigger: str, kind: str, params: PackageParams) -> list[str]:
    """Kohya sample prompt lines (prompt --n negative --w --h --s steps --d seed)."""
    size = params.render.resolution
    tail = f" --n lowres, blurry, bad anatomy, watermark --w {size} --h {size} --s 20 --d {params.seed + 42}"
    if kind == "background":
        bodies = ["scenery, no humans", "scenery, no humans, evening light", "scenery, no humans, wide view"]
    else:
        bodies = ["standing, full body, plain background", "upper body, scene background, soft lighting",
                  "sitting, outdoors, bright lighting"]
    return [f"{trigger}, {body}{tail}" for body in bodies]


def ai_toolkit_job(name: str, triggers: list[str], kind: str, folders: list[Path], output: Path,
                   params: PackageParams, masked: bool = False) -> str:
    """An AI-Toolkit `sd_trainer` job for a FLUX LoRA (the Kyana seed's profile), with the steps, LR,
    sample prompts and init LoRA the train parameters give this LoRA (`PlannedPackage.loras`)."""
    from models.ai_toolkit_format import ai_toolkit_job as build

    at = params.ai_toolkit
    plan = getattr(params, "loras", {}).get(name) or LoraPlan()
    prompts = ([p.replace("{trigger}", triggers[0]) for p in plan.prompts] if plan.prompts is not None else
               [p.split(" --n ")[0] for t in triggers for p in sample_prompts(t, kind, params)])
    job = build(f"{name}_flux_lora", triggers[0], folders, output, rank=at.rank, steps=plan.steps or at.steps,
                lr=plan.lr or at.lr, base_model=at.base_model, resolution=[params.render.resolution], prompts=prompts,
                save_every=at.sample_every, sample_every=at.sample_every, meta={"name": name}, alpha_mask=masked,
                init_lora=ai_toolkit_lora(plan.init_from) if plan.init_from else None)
    return yaml.safe_dump(job, sort_keys=False)


def ai_toolkit_lora(name: str) -> str:
    """Where AI-Toolkit saves the LoRA of the job `ai_toolkit_job` writes for `name` (run-relative)."""
    job = f"{name}_flux_lora"
    return (Path("train") / name / "ai_toolkit" / job / f"{job}.safetensors").as_posix()


# ---- background dataset -----------------------------------------------------------------------

def thumbnail_embedding(rgb: np.ndarray) -> np.ndarray:
    """A small image embedding (16x16 colour thumbnail, centred, unit length) for near-duplicate tests."""
    small = cv2.resize(rgb, (16, 16), interpolation=cv2.INTER_AREA).astype(np.float32).ravel()
    small -= small.mean()
    norm = float(np.linalg.norm(small))
    return small / norm if norm > 0 else small


def pick_backgrounds(embeddings: np.ndarray, threshold: float, max_images: int) -> list[int]:
    """Drop near-duplicates (cosine > threshold), then keep the most diverse `max_images` (farthest first)."""
    kept: list[int] = []
    for i in range(len(embeddings)):
        if not kept or float((embeddings[kept] @ embeddings[i]).max()) <= threshold:
            kept.append(i)
    if len(kept) <= max_images:
        return kept
    chosen = [kept[0]]
    nearest = embeddings[kept] @ embeddings[kept[0]]
    while len(chosen) < max_images:
        j = int(np.argmin(nearest))
        chosen.append(kept[j])
        nearest = np.maximum(nearest, embeddings[kept] @ embeddings[kept[j]])
    return sorted(chosen)


# ---- the tree ----------------------------------------------------------------------------------

def training_mask(alpha: np.ndarray, dilate: int, feather: float) -> np.ndarray:
    """The loss mask of a rendered image (uint8): the character's alpha grown by `dilate` pixels and
    its edge blurred by `feather` (Gaussian sigma), never below the alpha itself."""
    mask = (alpha > ALPHA_ON).astype(np.uint8) * 255
    if dilate:
        mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilate + 1, 2 * dilate + 1)))
    if feather:
        mask = cv2.GaussianBlur(mask, (0, 0), feather)
    return np.maximum(mask, alpha)


def _write_pair(folder: Path, stem: str, rgb: np.ndarray, caption: str, mask: np.ndarray | None = None) -> None:
    """`<stem>.png` (RGBA when a mask is given: alpha = the mask over the whole picture) and `<stem>.txt`."""
    image = Image.fromarray(np.dstack([rgb, mask]), "RGBA") if mask is not None else Image.fromarray(rgb, "RGB")
    image.save(folder / f"{stem}.png", compress_level=3)
    (folder / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")


def _stems(item_ids: list[str]) -> dict[str, str]:
    """A unique, path-safe file stem per item id."""
    stems: dict[str, str] = {}
    used: set[str] = set()
    for item in sorted(item_ids):
        base = safe_name(item, max_len=120)
        stem, n = base, 2
        while stem in used:
            stem, n = f"{base}-{n}", n + 1
        used.add(stem)
        stems[item] = stem
    return stems


def package_dataset(root: Path, rows: list[dict], backgrounds: list[str], params: PackageParams,
                    out: Path) -> tuple[pa.Table, pa.Table, dict]:
    """Write the kohya tree and configs into `out` (the run's package folder).

    Args:
        root: the run folder (row paths are relative to it).
        rows: kept caption rows (item_id, character, trigger, kind, group_id, path, background_path, caption).
        backgrounds: run-relative background layers (used only when the background dataset is enabled).
        params: packaging parameters.
        out: the package folder.
    Returns:
        (manifest with SCHEMA, characters table with CHARACTERS_SCHEMA, summary).
    """
    (out / "configs").mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    characters: list[dict] = []
    subsets: list[tuple[dict, str, Path]] = []  # (kohya subset, trigger, train folder) per character
    stems = _stems([r["item_id"] for r in rows])
    with StageProgress("package", len(rows)) as bar:
        for character, mine in rows_by_character(rows).items():
            packaged, row, subset, train_dir = package_character(root, character, mine, stems, params, out, bar)
            records.extend(packaged)
            characters.append(row)
            subsets.append((subset, row["trigger"], train_dir))
    if params.background.enabled and backgrounds:
        background = _package_backgrounds(root, backgrounds, params, out, records)
        if background:
            characters.append(background)
    if params.multi_concept and subsets:
        total = sum(c["n_train"] for c in characters if c["kind"] != "background")
        plan = training_plan(total, "human", params)
        _write_configs(out, safe_name(params.multi_concept_name), [t for _, t, _ in subsets], "human", plan,
                       [s for s, _, _ in subsets], [d for _, _, d in subsets], params)
    return (pa.Table.from_pylist(records, schema=SCHEMA), pa.Table.from_pylist(characters, schema=CHARACTERS_SCHEMA),
            _summary(records, characters, bool(subsets), params))


def package_character(root: Path, character: str, rows: list[dict], stems: dict[str, str], params: PackageParams,
                      out: Path, bar: StageProgress) -> tuple[list[dict], dict, dict, Path]:
    """Render one character's rows into `{repeats}_{name}/` (train) and `validation/{name}/` (its held-out
    originals and their copies) and write its configs.

    Returns (its manifest records, its characters row, its kohya subset, its training folder).
    """
    name = safe_name(character)
    trigger, kind = rows[0]["trigger"], rows[0].get("kind") or "unknown"
    held_out = split_groups([r["group_id"] or r["item_id"] for r in rows], params.validation_split, params.seed,
                            character)
    staging = out / f".train-{name}"  # renamed to {repeats}_{name} once the count is known
    validation = out / "validation" / name
    records = []
    for row in rows:
        split = "validation" if (row["group_id"] or row["item_id"]) in held_out else "train"
        folder = validation if split == "validation" else staging
        folder.mkdir(parents=True, exist_ok=True)
        record = {"item_id": row["item_id"], "source_id": row["item_id"], "character": character, "trigger": trigger,
                  "kind": kind, "split": split, "caption": row["caption"], "crop": row.get("crop") or "full",
                  "kept": True, "drop_reason": None, "path": None, "caption_path": None}
        record.update(_package_image(root, row, folder, stems[row["item_id"]], params))
        records.append(record)
        bar.advance()
    n_train = sum(r["kept"] and r["split"] == "train" for r in records)
    n_val = sum(r["kept"] and r["split"] == "validation" for r in records)
    plan = training_plan(n_train, kind, params)
    train_dir = out / f"{plan['repeats']}_{name}"
    if staging.exists():
        staging.rename(train_dir)
    else:
        train_dir.mkdir(parents=True)
    for record in records:
        record["repeats"] = plan["repeats"]
        stem = record.pop("stem", None)
        if stem:
            rel = (train_dir if record["split"] == "train" else validation).relative_to(root).as_posix()
            record.update(path=f"{rel}/{stem}.png", caption_path=f"{rel}/{stem}.txt")
    subset = kohya_subset(train_dir, plan["repeats"], trigger, params, masked=params.alpha_mask)
    _write_configs(out, name, [trigger], kind, plan, [subset], [train_dir], params)
    row = {"character": character, "trigger": trigger, "kind": kind, "n_train": n_train, "n_validation": n_val, **plan}
    return records, row, subset, train_dir


def _summary(records: list[dict], characters: list[dict], any_subset: bool, params: PackageParams) -> dict:
    """The package's counts, steps per LoRA and multi-concept name."""
    return {
        "characters": len([c for c in characters if c["kind"] != "background"]),
        "kept": sum(r["kept"] for r in records),
        "train": sum(r["split"] == "train" and r["kept"] for r in records),
        "validation": sum(r["split"] == "validation" and r["kept"] for r in records),
        "quarantined": sum(not r["kept"] for r in records),
        "crops": {k: sum(r["kept"] and r.get("crop") == k for r in records) for k in ("upper_body", "head")},
        "total_steps": {c["character"]: c["total_steps"] for c in characters},
        "steps": [steps_line(c, params) for c in characters],
        "multi_concept": safe_name(params.multi_concept_name) if params.multi_concept and any_subset else None,
    }


def _package_image(root: Path, row: dict, folder: Path, stem: str, params: PackageParams) -> dict:
    """Render one caption row into `folder` as `<stem>.png` (+ `.txt`): {"stem": stem}, or what
    quarantines it ({"kept": False, "drop_reason": ...}) when it is unreadable or renders blank."""
    try:
        layer, background = read_row_images(root, row)
    except ValueError as exc:
        return {"kept": False, "drop_reason": f"{QUARANTINE}{exc}"}
    rendered = render(layer, background, params.render)
    rgb = np.ascontiguousarray(rendered[..., :3])
    blank = blank_reason(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    if blank:  # e.g. a white shape on the white canvas: nothing to learn from
        return {"kept": False, "drop_reason": f"{QUARANTINE}{row['path']}: rendered image is "
                                              f"{blank[0].split('_')[0]} ({blank[1]})"}
    _write_pair(folder, stem, rgb, row["caption"], _mask(rendered, params))
    return {"stem": stem}


def _mask(rendered: np.ndarray, params: PackageParams) -> np.ndarray | None:
    """The loss mask packaged with a rendered RGBA image (None without `alpha_mask`)."""
    return training_mask(rendered[..., 3], params.mask_dilate, params.mask_feather) if params.alpha_mask else None


def steps_line(character: dict, params: PackageParams) -> str:
    """`name: N images x R repeats x E epochs / batch B = S steps` (the guide's total-steps rule)."""
    return (f"{character['character']}: {character['n_train']} images x {character['repeats']} repeats x "
            f"{character['epochs']} epochs / batch {params.batch_size} = {character['total_steps']} steps")


def _write_configs(out: Path, name: str, triggers: list[str], kind: str, plan: dict, subsets: list[dict],
                   folders: list[Path], params: PackageParams) -> None:
    """Dataset TOML, training TOML, sample prompts and AI-Toolkit YAML of one LoRA.

    Paths inside them are relative to the run folder (`out`'s parent), so a moved run folder keeps
    working: run kohya or AI-Toolkit from the run folder (the kohya trainer does).
    """
    configs = out / "configs"
    dataset_path = configs / f"{name}_dataset.toml"
    prompts_path = configs / f"{name}_prompts.txt"

    def rel(path: Path | str) -> Path:
        return Path(os.path.relpath(path, out.parent))

    output_dir = Path("train") / name
    subsets = [{**s, "image_dir": str(rel(s["image_dir"]))} for s in subsets]
    dataset_path.write_text(kohya_dataset(subsets, params), encoding="utf-8")
    prompts = [line for trigger in triggers for line in sample_prompts(trigger, kind, params)]
    prompts_path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    (configs / f"{name}_config.toml").write_text(
        kohya_training(name, plan, rel(dataset_path), rel(prompts_path), output_dir, params), encoding="utf-8")
    masked = any(s.get("alpha_mask") for s in subsets)
    (configs / f"{name}_ai_toolkit.yaml").write_text(
        ai_toolkit_job(name, triggers, kind, [rel(f) for f in folders], output_dir / "ai_toolkit", params, masked),
        encoding="utf-8")


def _package_backgrounds(root: Path, backgrounds: list[str], params: PackageParams, out: Path,
                         records: list[dict]) -> dict:
    """The background dataset: deduplicated, the most diverse kept, captioned with the scene."""
    from models.captioners import dominant_colours

    bg = params.background
    images, paths = [], []
    for path in backgrounds:
        try:
            images.append(read_background(root / path))
            paths.append(path)
        except ValueError:
            continue
    if not images:
        return {}
    keep = pick_backgrounds(np.stack([thumbnail_embedding(im) for im in images]), bg.similarity_threshold, bg.max_images)
    name = safe_name(bg.name)
    folder = out / f"{bg.repeats}_{name}"
    folder.mkdir(parents=True, exist_ok=True)
    size = params.render.resolution
    for i in keep:
        canvas = cover(images[i], size)
        colours = dominant_colours(canvas, np.ones(canvas.shape[:2], bool))
        luma = float(canvas.mean())
        light = "dim lighting" if luma < 70 else ("bright lighting" if luma > 185 else "soft lighting")
        caption = ", ".join([bg.trigger, "scenery", "no humans", *([f"{' and '.join(colours)} colours"] if colours else []), light])
        stem = safe_name(Path(paths[i]).parent.parent.name + "_" + Path(paths[i]).stem, max_len=120)
        _write_pair(folder, stem, canvas, caption)
        rel = folder.relative_to(root).as_posix()
        records.append({"item_id": f"background:{paths[i]}", "source_id": paths[i], "character": bg.name,
                        "trigger": bg.trigger, "kind": "background", "split": "train", "repeats": bg.repeats,
                        "path": f"{rel}/{stem}.png", "caption_path": f"{rel}/{stem}.txt", "caption": caption,
                        "crop": "full", "kept": True, "drop_reason": None})
    n = len(keep)
    plan = {"repeats": bg.repeats, "epochs": bg.epochs, "unet_lr": bg.unet_lr, "text_encoder_lr": bg.text_encoder_lr,
            "network_dim": params.network_dim, "network_alpha": max(1, params.network_dim // 2),
            "total_steps": math.ceil(n * bg.repeats * bg.epochs / params.batch_size)}
    _write_configs(out, name, [bg.trigger], "background", plan, [kohya_subset(folder, bg.repeats, bg.trigger, params)],
                   [folder], params)
    return {"character": bg.name, "trigger": bg.trigger, "kind": "background", "n_train": n, "n_validation": 0, **plan}


# ---- the stage ------------------------------------------------------------------------------------

def build_package(store: RunStore, params: Any, inputs: Inputs, folder: Path) -> tuple[pa.Table, dict, list[str]]:
    """Package the kept captioned images of the `caption` input into `folder`, replacing a previous package
    wholesale; the background dataset from the layers of the `backgrounds` input, when it is enabled."""
    for child in folder.iterdir():
        if child.name != "params.json":
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    settings = package_settings(params)
    rows = [r for r in store.read_manifest(inputs["caption"].stage).to_pylist() if r["kept"]]
    with_backgrounds = settings.background.enabled and "backgrounds" in inputs
    backgrounds = background_layers(store, inputs["backgrounds"].stage) if with_backgrounds else []
    table, characters, summary = package_dataset(store.root, rows, backgrounds, settings, folder)
    write_table(characters, folder / "characters.parquet")
    return table, summary, [f"{STAGE}/characters.parquet"]


def _steps(store: RunStore, result: StageResult) -> list[dict]:
    """Print each character's kohya command (run from the run folder); the per-character step counts for the UI."""
    for line in result.summary.get("steps", []):
        name = safe_name(line.split(":", 1)[0])
        print(f"{line}  ->  cd {store.root} && accelerate launch train_network.py "
              f"--config_file {STAGE}/configs/{name}_config.toml")
    return [{"character": k, "total_steps": v} for k, v in result.summary["total_steps"].items()]


PACKAGE = GlobalStage(name=STAGE, version=VERSION, params=PackageParams, inputs=("caption",), optional=("backgrounds",),
                      reads=("package", "train.per_character", "train.init_from"), title="package",
                      build=build_package, rows=_steps)
"""The package stage: the kohya tree, its configs and the AI-Toolkit job."""
