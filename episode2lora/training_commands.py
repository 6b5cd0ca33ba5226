"""`episode2lora train DIR` and `episode2lora versions`: LoRA training outside a run, and its history."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from episode2lora.common import console, fail, parse_sets


def _train_params(profile: str, base: Optional[str], trainer: str, kohya_scripts: Optional[str],
                  characters: list[str], sets: list[str]) -> Any:
    """TrainParams from the options; `--set rank=16` and `--set train.rank=16` both work."""
    from pydantic import ValidationError

    from flows.params import describe
    from tasks.train import TrainParams

    data: dict[str, Any] = {"profile": profile, "trainer": trainer, "characters": characters}
    if base:
        data["base"] = base
    if kohya_scripts:
        data["kohya_scripts"] = kohya_scripts
    data.update({key.removeprefix("train."): value for key, value in parse_sets(sets, "rank=16").items()})
    try:
        return TrainParams.model_validate(data)
    except ValidationError as exc:
        fail(describe(exc, "train options").replace("\n  ", "\n  train."))


def train(
    directory: Path = typer.Argument(..., help="a kohya-style folder: <repeats>_<name>/ image + .txt caption pairs"),
    profile: str = typer.Option("fast", "--profile", help="fast | final (FLUX guide tables) | package (the folder's kohya "
                                "TOMLs; on a FLUX base its AI-Toolkit jobs) | demo"),
    base: Optional[str] = typer.Option(None, "--base", help="base model: Hugging Face id (SD 1.5, SDXL or FLUX.1), local "
                                       "diffusers folder, single .safetensors file, or tiny / tiny-flux (stand-ins)"),
    sets: list[str] = typer.Option([], "--set", help="override one training setting, e.g. --set rank=16"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="output folder (default: <DIR>-lora beside DIR)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the latest checkpoints in the output folder"),
    characters: list[str] = typer.Option([], "--character", help="train only this character (repeatable)"),
    trainer: str = typer.Option("diffusers", "--trainer", help="diffusers (ours) or kohya (sd-scripts subprocess)"),
    kohya_scripts: Optional[str] = typer.Option(None, "--kohya-scripts", help="kohya sd-scripts folder (--trainer kohya)"),
    runs_dir: Path = typer.Option(Path("data/runs"), "--runs-dir", help="folder holding versions.parquet"),
) -> None:
    """Train one LoRA per character folder of a kohya-style dataset; recorded in the versions registry."""
    from models.lora_trainer import ResumeMismatch
    from models.sd_base import BaseModelMissing
    from tasks.train import train_folder

    params = _train_params(profile, base, trainer, kohya_scripts, characters, sets)
    output = output or directory.resolve().parent / f"{directory.resolve().name}-lora"
    try:
        done = train_folder(directory, output, params, resume=resume, registry=runs_dir)
    except (FileNotFoundError, FileExistsError, ResumeMismatch, BaseModelMissing, ValueError, KeyError) as exc:
        hint = "\n  add --resume to continue it" if isinstance(exc, FileExistsError) else ""
        fail(f"{exc}{hint}", 1)
    except Exception as exc:  # the training itself failed: it is recorded as failed in the registry
        fail(f"training failed: {type(exc).__name__}: {exc}\n  see: episode2lora versions --runs-dir {runs_dir}", 1)
    table = Table(title=f"LoRAs in {output}")
    for column in ("character", "steps", "final loss", "best val loss", "LoRA (kohya format)", "version"):
        table.add_column(column)
    for outcome, version in done:
        table.add_row(outcome.character, str(outcome.steps), _num(outcome.final_loss), _num(outcome.best_val_loss),
                      outcome.lora_path, version)
    console.print(table)


def _num(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.4f}"


def versions(
    runs_dir: Path = typer.Option(Path("data/runs"), "--runs-dir", help="folder holding versions.parquet"),
    character: Optional[str] = typer.Option(None, "--character", help="only this character's trainings"),
) -> None:
    """List every LoRA training: status, steps, losses, evaluation's choice, files, errors."""
    from tasks.run.versions import read_versions

    rows = read_versions(runs_dir).to_pylist()
    if character:
        rows = [r for r in rows if r["character"] == character]
    if not rows:
        console.print(f"no trainings recorded in {Path(runs_dir).resolve() / 'versions.parquet'}")
        return
    console.print(versions_table(rows, Path(runs_dir).resolve() / "versions.parquet"))
    for r in rows:  # long values one per line, never squeezed into a column
        if r["final_lora"] or r["lora_path"]:
            console.print(f"  {r['version_id']}  LoRA   {r['final_lora'] or r['lora_path']}", markup=False,
                          highlight=False, soft_wrap=True)
        if r["error"]:
            console.print(f"  {r['version_id']}  error  {' '.join(r['error'].split())}", markup=False,
                          highlight=False, soft_wrap=True)


def versions_table(rows: list[dict[str, Any]], registry: Path) -> Table:
    """One short line per training (the version id holds the character and the start time): it fits 80 columns."""
    table = Table(title=f"training versions ({registry})", title_justify="left")
    for column in ("version", "status", "steps", "best val", "eval score"):
        table.add_column(column, no_wrap=column != "version", overflow="fold")
    colours = {"completed": "green", "running": "yellow", "failed": "red"}
    for r in rows:
        table.add_row(r["version_id"], f"[{colours.get(r['status'], 'white')}]{r['status']}[/]",
                      str(r["steps"] or ""), _num(r["best_val_loss"]), _num(r["eval_score"]))
    return table


def steps_note(params: Any, trained: bool) -> str | None:
    """Why the steps trained differ from the packaged kohya plan: the profile decides them, unless it is `package`."""
    from models.lora_settings import TrainSettings, resolve_settings

    train = params.train
    if train.profile == "package":
        return None
    settings = resolve_settings(train.profile, {}, train.model_dump(include=set(TrainSettings.model_fields)))
    length = f"{settings.max_steps} steps" if settings.max_steps else f"{settings.epochs} epochs"
    return (f"the plan above is what the packaged kohya configs (package/configs/) train; this run "
            f"{'trained' if trained else 'trains'} {length} per character: train.profile {train.profile} sets them "
            "(train.max_steps overrides it); train.profile package trains the plan")


def print_loras(store: Any, params: Any) -> None:
    """After a run that trained: each character's LoRA file, and a plain word when the base is a stand-in."""
    from models.sd_base import is_tiny
    from tasks.train import TINY_NOTICE

    chosen = {}
    for stage, column in (("train", "lora_path"), ("evaluate", "final_lora")):
        if store.is_done(stage):
            chosen.update({r["character"]: r[column] for r in store.read_manifest(stage).to_pylist() if r.get(column)})
    if chosen:
        purity = (store.marker("select") or {}).get("summary", {}).get("purity", {})
        console.print("\nLoRA files (kohya format; load with diffusers' load_lora_weights, ComfyUI or A1111), "
                      "with the estimated purity of each character's images:")
        for character, path in sorted(chosen.items()):
            estimate = purity.get(character)
            shown = "" if estimate is None else f"  (estimated purity {estimate:.2f})"
            console.print(f"  {character:<16} {store.root / path}{shown}", markup=False, highlight=False)
    if is_tiny(params.train.base):
        console.print(f"\n[bold yellow]note:[/] {TINY_NOTICE.format(base=params.train.base)}")
