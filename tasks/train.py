"""Stage `train`: one LoRA per packaged character (after `validate`), resumable, recorded.

Each character is one shard and one Prefect task (tagged `gpu`, so a concurrency limit keeps
one training per GPU). A training runs in `train/work/<character>/`; a killed or failed run is
resumed from its latest checkpoint when the stage runs again with the same fingerprint. When it
finishes, its LoRA (kohya and diffusers formats), checkpoints, samples and logs are committed as
the shard `train/shards/<character>/`. Latents are cached in `train/latents/` (by image, bucket
and VAE), so later trainings of the run reuse them. Every training is a row in the versions
registry (`<runs-dir>/versions.parquet`), failed ones with their error.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field

from models.lora_data import CharacterSet, read_package
from models.lora_settings import Profile, SettingsOverrides, TrainSettings, read_kohya_config, resolve_settings
from models.sd_base import DEFAULT_BASE
from tasks.run.progress import StageProgress
from tasks.run.spec import Inputs, ShardedStage
from tasks.run.stage import Plan, Shard, StageResult, merge_shards, run_shard
from tasks.run.store import RunStore, fingerprint, safe_name

STAGE = "train"
VERSION = 1

SCHEMA = pa.schema([
    ("item_id", pa.string()),           # the character
    ("source_id", pa.string()),         # its package folder (<repeats>_<name>)
    ("character", pa.string()),
    ("trigger", pa.string()),
    ("status", pa.string()),
    ("version_id", pa.string()),
    ("trainer", pa.string()),
    ("base", pa.string()),
    ("family", pa.string()),
    ("steps", pa.int64()),
    ("final_loss", pa.float64()),
    ("final_val_loss", pa.float64()),
    ("best_val_loss", pa.float64()),
    ("best_val_step", pa.int64()),
    ("lora_path", pa.string()),         # run-relative kohya-format file
    ("diffusers_path", pa.string()),
    ("checkpoints", pa.string()),       # JSON [[step, run-relative path], ...]
    ("settings_path", pa.string()),
    ("seconds", pa.float64()),
    ("resumed_from", pa.int64()),
    ("kept", pa.bool_()),
    ("drop_reason", pa.string()),
])


class TrainParams(SettingsOverrides):
    """Which trainer and profile, plus any training setting (unset fields come from the profile)."""

    profile: Profile = Field("fast", description="fast / final (FLUX guide tables), package (the package's kohya TOMLs; on a FLUX base its AI-Toolkit job), demo (tiny CPU stand-in)")
    base: str = Field(DEFAULT_BASE, description="base model: a Hugging Face id (SD 1.5, SDXL, FLUX.1-dev/schnell), a local diffusers folder, a single .safetensors file, or tiny / tiny-sdxl / tiny-flux (UNTRAINED stand-ins for demos and tests)")
    trainer: Literal["diffusers", "kohya"] = Field("diffusers", description="our trainer, or kohya sd-scripts in a subprocess")
    kohya_scripts: str | None = Field(None, description="folder of a kohya sd-scripts checkout (trainer kohya)")
    characters: list[str] = Field([], description="train only these characters (empty: all)")
    per_character: dict[str, SettingsOverrides] = Field({}, description="settings of single characters (name -> "
                                                        "fields) over the ones above, e.g. a detail stage's steps and LR")
    init_from: dict[str, str] = Field({}, description="character -> the character of this run whose finished LoRA it "
                                      "fine-tunes (trained first): staged training")

    def settings_for(self, character: CharacterSet) -> TrainSettings:
        """The resolved settings of one character's training."""
        package = read_kohya_config(*character.config_files)  # all of it for profile package, else captions only
        overrides = self.model_dump(include=set(TrainSettings.model_fields))
        if character.name in self.per_character:
            overrides.update(self.per_character[character.name].model_dump(exclude_none=True))
        return resolve_settings(self.profile, package, overrides)


def job_for(character: CharacterSet, params: TrainParams, out: Path) -> Any:
    """The trainer's job for one character of a package."""
    from models.lora_trainer import TrainJob

    configs = {p.name: p for p in character.config_files}
    return TrainJob(character=character.name, trigger=character.trigger, train=character.train,
                    validation=character.validation, repeats=character.repeats, settings=params.settings_for(character),
                    output_dir=out, output_name=safe_name(character.name),
                    kohya_config=configs.get(f"{character.name}_config.toml"),
                    kohya_dataset=configs.get(f"{character.name}_dataset.toml"))


def train_job(job: Any, *, trainer: str = "diffusers", kohya_scripts: str | None = None, resume: bool = False,
              registry: Path | None = None, run: str = "", profile: str = "", version_id: str | None = None,
              progress: bool = True) -> tuple[Any, str]:
    """Train one job with a progress bar, recorded in the versions registry under `registry`.

    Returns (outcome, version id). On failure the version is marked failed with the error and
    the exception propagates.
    """
    from models.lora_checkpoints import checkpoint_dirs
    from models.sd_base import is_tiny
    from models.trainers import get_trainer
    from tasks.run import versions

    if not resume and checkpoint_dirs(job.output_dir):  # refused before anything is recorded
        raise FileExistsError(f"{job.output_dir} already holds checkpoints of a training; resume it or use another output folder")
    options = {"scripts_dir": kohya_scripts} if trainer == "kohya" else {}
    masking = masked_loss_note(job, trainer)  # checked before anything is recorded (masked_loss on needs masks)
    version = None
    if registry is not None and os.environ.get("RANK", "0") != "0":
        registry = None  # under `accelerate launch` only the main process records the training
    if registry is not None:
        version = versions.start_version(
            registry, character=job.character, run=run, trigger=job.trigger, trainer=trainer, base=job.settings.base,
            profile=profile, params=job.settings.model_dump(mode="json"), output_dir=str(job.output_dir),
            version_id=version_id)
    if is_tiny(job.settings.base):
        _warn(TINY_NOTICE.format(base=job.settings.base))
    _say(masking)
    bar = StageProgress(f"train {job.character}", None) if progress else None
    try:
        def on_step(step: int, total: int, logs: dict) -> None:
            if bar is not None:
                if bar.total != total:
                    bar.set_total(total)
                bar.advance(step - bar.done)

        outcome = get_trainer(trainer, **options).train(job, resume=resume, on_step=on_step)
    except BaseException as exc:
        if version is not None:
            versions.fail_version(registry, version, exc)
        raise
    finally:
        if bar is not None:
            bar.close()
    if version is not None:
        versions.finish_version(registry, version, outcome)
    return outcome, version or ""


TINY_NOTICE = ("base model '{base}' is a tiny UNTRAINED stand-in: the LoRA proves the pipeline end to end, it does "
               "not learn the character. For real LoRAs set a real base: train.base=stable-diffusion-v1-5/"
               "stable-diffusion-v1-5 (or an SDXL id, black-forest-labs/FLUX.1-dev, or a local diffusers folder), "
               "e.g. --set train.base=/models/sd15")


def masked_loss_note(job: Any, trainer: str = "diffusers") -> str:
    """One line saying whether (and why) a training weights its loss by the images' masks.

    Raises ValueError when `masked_loss` is on and no training image carries a mask.
    """
    from models.lora_data import masked_loss_on

    setting = job.settings.masked_loss
    if trainer == "kohya":
        return f"{job.character}: kohya trains the subsets with alpha_mask = true masked (its dataset TOML decides)"
    if not masked_loss_on(setting, job.train, job.character):
        why = "train.masked_loss off" if setting == "off" else "auto: the training images carry no alpha mask"
        return f"{job.character}: masked loss off ({why})"
    why = ("auto: the training images carry the character mask as alpha" if setting == "auto"
           else "train.masked_loss on")
    floor = f", background weight {job.settings.mask_floor:g}" if job.settings.mask_floor else ""
    return f"{job.character}: masked loss on ({why}{floor}): the LoRA learns the character, not the background"


def _warn(message: str) -> None:
    """A warning in the Prefect run's log when there is one, else on the terminal."""
    try:
        from prefect.exceptions import MissingContextError
        from prefect.logging import get_run_logger

        get_run_logger().warning(message)
    except (ImportError, MissingContextError):
        print(f"note: {message}")


def _say(message: str) -> None:
    """An information line on the terminal (stderr, beside the progress lines), and in the Prefect
    run's log when there is one (the CLI shows only its warnings)."""
    import sys

    sys.stderr.write(f"note: {message}\n")  # not print: Prefect's log_prints would turn it into a log record
    sys.stderr.flush()
    try:
        from prefect.exceptions import MissingContextError
        from prefect.logging import get_run_logger

        get_run_logger().info(message)
    except (ImportError, MissingContextError):
        pass


def train_folder(package: Path, output: Path, params: TrainParams, *, resume: bool = False,
                 registry: Path | None = None) -> list[tuple[Any, str]]:
    """Train every character of any kohya-style folder into `output/<character>/` (no run store).

    Returns (outcome, version id) per character; the first failure stops and propagates
    (after being recorded as failed in the registry).
    """
    characters, _ = read_package(package)
    if params.characters:
        unknown = sorted(set(params.characters) - {c.name for c in characters})
        if unknown:
            raise ValueError(f"characters not in {package}: {', '.join(unknown)} (it has: {', '.join(c.name for c in characters)})")
        characters = [c for c in characters if c.name in params.characters]
    done = []
    for character in characters:
        job = job_for(character, params, Path(output) / safe_name(character.name))
        done.append(train_job(job, trainer=params.trainer, kohya_scripts=params.kohya_scripts, resume=resume,
                              registry=registry, run=f"folder:{Path(package).resolve()}", profile=params.profile))
    return done


# ---- plan, shard, merge ---------------------------------------------------------------------------

def plan_training(store: RunStore, params: Any, inputs: Inputs) -> Plan:
    """One shard per character of the `package` input, keyed by its name, its payload its package folder;
    fingerprinted by the training job (and the fingerprint of the training it fine-tunes, which comes first:
    the shard's `after`). The plan's payload: the package stage and the folders it skipped."""
    own: TrainParams = params.train
    package = inputs["package"].stage
    characters, skipped = read_package(store.stage_dir(package))
    if own.characters:
        unknown = sorted(set(own.characters) - {c.name for c in characters})
        if unknown:
            raise ValueError(f"train.characters names characters not in the package: {', '.join(unknown)} "
                             f"(package has: {', '.join(c.name for c in characters)})")
        characters = [c for c in characters if c.name in own.characters]
    by_name = {c.name: c for c in characters}
    settings = {"trainer": own.trainer, "kohya_scripts": own.kohya_scripts, "profile": own.profile}
    shards: dict[str, Shard] = {}

    def shard_of(name: str, chain: tuple[str, ...] = ()) -> Shard:
        if name in chain:
            raise ValueError(f"train.init_from forms a cycle: {' -> '.join([*chain, name])}")
        if name not in shards:
            parent = own.init_from.get(name)
            if parent is not None and parent not in by_name:
                raise ValueError(f"train.init_from: '{name}' starts from '{parent}', which this run does not train "
                                 f"(training: {', '.join(by_name)})")
            job = {"job": job_for(by_name[name], own, Path(".")).signature()}
            if parent is not None:
                job["init"] = shard_of(parent, (*chain, name)).fingerprint
            shards[name] = Shard(key=name, fingerprint=fingerprint(STAGE, VERSION, settings, job),
                                 payload=by_name[name].folder.name, after=parent or "")
        return shards[name]

    for character in characters:
        shard_of(character.name)
    return Plan(shards=list(shards.values()), payload={"package": package, "skipped": skipped})


def finished_lora(store: RunStore, character: str) -> Path:
    """The committed LoRA file of a character's training in this run (what a fine-tune starts from)."""
    path = store.shard_dir(STAGE, character) / f"{safe_name(character)}.safetensors"
    if not path.is_file():
        from tasks.run.store import StageNotDoneError

        raise StageNotDoneError(f"the training of '{character}' is not finished ({path} missing); train it first")
    return path


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link (or copy) a file or folder: committing a training never moves its work files."""
    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if src.is_dir():
        shutil.copytree(src, dst, copy_function=link, dirs_exist_ok=True)
    elif src.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        link(str(src), str(dst))


def _work_folder(work: Path, fp: str) -> None:
    """The training's work folder, emptied first when it holds another training (its checkpoints must not
    be resumed)."""
    mark = work / "fingerprint.txt"
    if work.exists() and (not mark.is_file() or mark.read_text() != fp):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    mark.write_text(fp)


def _commit_files(work: Path, outcome: Any, tmp: Path, prefix: str) -> list[list]:
    """Link a finished training's files into the shard folder; its checkpoints as [step, run-relative path]."""
    for name in ("settings.json", "outcome.json", "loss.jsonl", "validation.jsonl", "samples", "logs", "diffusers"):
        _link_tree(work / name, tmp / name)
    _link_tree(Path(outcome.lora_path), tmp / Path(outcome.lora_path).name)
    checkpoints = []
    for step, path in outcome.checkpoints:
        _link_tree(Path(path), tmp / "checkpoints" / Path(path).name)
        checkpoints.append([step, f"{prefix}/checkpoints/{Path(path).name}"])
    return checkpoints


def train_character(store: RunStore, shard: Shard, params: Any, plan: Plan) -> StageResult:
    """Train (or resume) one character and commit its shard; recorded in the versions registry."""
    from models.lora_checkpoints import checkpoint_dirs
    from tasks.run import versions

    own: TrainParams = params.train
    work = store.stage_dir(STAGE) / "work" / safe_name(shard.key)
    registry = store.root.parent

    def build(tmp: Path, prefix: str) -> tuple[pa.Table, dict]:
        _work_folder(work, shard.fingerprint)
        characters, _ = read_package(store.stage_dir(plan.payload["package"]))
        job = job_for(next(c for c in characters if c.name == shard.key), own, work)
        job.latent_cache = store.stage_dir(STAGE) / "latents"  # kept across trainings of this run: reused
        if shard.after:  # staged training: start from the finished LoRA of the earlier stage
            job.settings = job.settings.model_copy(update={"init_lora": str(finished_lora(store, shard.after))})
        id_file = work / "version_id.txt"
        outcome, version = train_job(
            job, trainer=own.trainer, kohya_scripts=own.kohya_scripts, resume=bool(checkpoint_dirs(work)),
            registry=registry, run=store.name, profile=own.profile,
            version_id=id_file.read_text().strip() if id_file.is_file() else _remember(id_file, job.character))
        final = store.root / prefix
        if not (work / "settings.json").is_file():  # trainers other than ours: record what was asked
            (work / "settings.json").write_text(json.dumps({"character": job.character, "trigger": job.trigger,
                                                            "settings": job.settings.model_dump(mode="json")}, indent=2))
        checkpoints = _commit_files(work, outcome, tmp, prefix)
        rel = lambda p: f"{prefix}/{Path(p).relative_to(work).as_posix()}" if p else None  # noqa: E731
        row = {"item_id": shard.key, "source_id": shard.payload, "character": shard.key,
               "trigger": job.trigger, "status": outcome.status, "version_id": version, "trainer": own.trainer,
               "base": outcome.base, "family": outcome.family, "steps": outcome.steps, "final_loss": outcome.final_loss,
               "final_val_loss": outcome.final_val_loss, "best_val_loss": outcome.best_val_loss,
               "best_val_step": outcome.best_val_step, "lora_path": rel(outcome.lora_path),
               "diffusers_path": rel(outcome.diffusers_path) if outcome.diffusers_path else None,
               "checkpoints": json.dumps(checkpoints), "settings_path": f"{prefix}/settings.json",
               "seconds": outcome.seconds, "resumed_from": outcome.resumed_from, "kept": True, "drop_reason": None}
        versions.update_version(registry, version, lora_path=str(final / Path(outcome.lora_path).name),
                                diffusers_path=str(final / "diffusers" / "pytorch_lora_weights.safetensors"),
                                checkpoints=[[s, str(store.root / p)] for s, p in checkpoints], output_dir=str(final))
        report = {k: row[k] for k in ("character", "steps", "final_loss", "best_val_loss", "seconds", "resumed_from")}
        return pa.Table.from_pylist([row], schema=SCHEMA), report

    result = run_shard(store, STAGE, shard.key, shard.fingerprint, build)
    if result.recomputed:
        shutil.rmtree(work, ignore_errors=True)  # committed: the resume state is no longer needed
    return result


def _remember(path: Path, character: str) -> str:
    import time
    import uuid

    version = f"{safe_name(character)}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    path.write_text(version)
    return version


def merge_training(store: RunStore, plan: Plan, params: Any) -> StageResult:
    """The train manifest: one row per character."""
    def merge(tables: list[pa.Table], reports: list[dict]) -> tuple[pa.Table, dict, list[str]]:
        table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
        summary = {"characters": table.num_rows, "kept": table.num_rows, "quarantined": 0,
                   "steps": dict(zip(table.column("character").to_pylist(), table.column("steps").to_pylist())),
                   "skipped_folders": plan.payload["skipped"]}
        return table, summary, []

    return merge_shards(store, STAGE, plan.fingerprint, plan.shard_fingerprints(), merge)


TRAIN = ShardedStage(name=STAGE, version=VERSION, params=TrainParams, inputs=("package",), tags=("gpu",), title="train",
                     plan=plan_training, shard=train_character, merge=merge_training)
"""The train stage: one LoRA per packaged character; a fine-tune waits for the training it starts from."""
