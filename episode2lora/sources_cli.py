"""`episode2lora renders` and `episode2lora photos`: image sources instead of episodes.

    episode2lora renders DIR --name NAME [--trigger WORD] [--resolution 1024x1024] [--frames 36]
                         [--caption-template FILE] [--stage1-steps N --stage1-lr LR --stage2-steps N --stage2-lr LR]
                         [--profile fast|final|demo] [--dry-run]
    episode2lora photos DIR --name NAME --trigger WORD [--profile fast|final] [--dry-run]
    episode2lora photos DIR --trigger WORD --analyze [--json FILE]

Both are conveniences over the one flow `source-to-lora` (flows/source_to_lora.py): options and
config files (`ingest:` for the source's ingest section) in, that flow run in this process.
episode2lora/cli.py adds them to the app.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import textwrap
from pathlib import Path
from typing import Any, Optional

import typer
import yaml

from episode2lora.common import CONFIG, RUNS_DIR, check_until, check_writable, console, execute, fail, open_store, \
    parse_sets

RUN_KINDS = {"renders-to-lora": "renders", "photos-to-lora": "photos"}
"""What a source run records as its `flow` (run.json) -> its source (tasks/run/runner.py: run_kind)."""
PROFILES_HELP = "training profile: fast / final (the FLUX guide's tables), package, demo (tiny CPU stand-in)"
BASE = typer.Option(None, "--base", help="base model: Hugging Face id, local folder, or tiny")
UNTIL = typer.Option("train", "--until", help="last stage to run (default: train; a wrong one lists them)")
DRY_RUN = typer.Option(False, "--dry-run", help="print the resolved configuration and commands; train nothing")
"""Options both source commands take (with CONFIG and RUNS_DIR of episode2lora/common.py)."""


def _load(model: Any, config: Optional[Path], sets: list[str], named: dict[str, Any]) -> Any:
    """Defaults < config file < --set < the named options."""
    from flows.params import ParamsError, load_params

    overrides = {**parse_sets(sets), **{k: v for k, v in named.items() if v is not None}}
    try:
        return load_params(config, overrides, model=model)
    except ParamsError as exc:
        fail(str(exc))


def _settings_of(train: Any, character: str, trigger: str) -> dict:
    """The resolved training settings of one LoRA, as the train stage will resolve them."""
    from models.lora_data import CharacterSet

    stand_in = CharacterSet(name=character, folder=Path("."), repeats=1, trigger=trigger, train=[])
    return train.settings_for(stand_in).model_dump(mode="json")


def _rerun_command() -> str:
    return " ".join(shlex.quote(a) for a in ["episode2lora", *sys.argv[1:]] if a != "--dry-run")


def _print_dry_run(source: str, params: Any, input_dir: Path, run_dir: Path) -> None:
    """The resolved configuration, each training's settings, and the commands a run executes."""
    out = console
    ingest, train = params.ingest, params.train
    out.print(f"[bold]dry run[/] — nothing is trained. Run folder: {run_dir}", highlight=False)
    out.print("\n[bold]resolved configuration[/]")
    out.print(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False, width=1000), markup=False, highlight=False, soft_wrap=True)
    starts = {lora: str(run_dir / "train" / "shards" / base / f"{base}.safetensors") for lora, base in train.init_from.items()}
    if source == "renders":
        first, second = ingest.character_of(1), ingest.character_of(2)
        loras = [(first, f"stage 1 (phases {ingest.stage1_phases})"),
                 (second, f"stage 2 (phases {ingest.stage2_phases}), fine-tuned from stage 1's LoRA")]
    else:
        loras = [(ingest.name, f"profile {train.profile}")]
    out.print("[bold]trainings[/] (trainer " + train.trainer + ")", highlight=False)
    for character, what in loras:
        settings = _settings_of(train, character, ingest.trigger)
        settings["init_lora"] = starts.get(character, settings["init_lora"])
        out.print(f"  {character}: {what}", markup=False, highlight=False, soft_wrap=True)
        out.print(textwrap.indent(yaml.safe_dump(settings, sort_keys=False, width=1000), "      ").rstrip(), markup=False,
                  highlight=False, soft_wrap=True)
    out.print("[bold]commands[/] (the configs' paths are relative to the run folder: run them from there)")
    out.print(f"  {_rerun_command()}", markup=False, highlight=False, soft_wrap=True)
    out.print(f"  cd {run_dir}", markup=False, highlight=False, soft_wrap=True)
    for character, _ in loras:
        out.print(f"  python run.py package/configs/{character}_ai_toolkit.yaml   "
                  "# AI-Toolkit (FLUX), written by the package stage", markup=False, highlight=False, soft_wrap=True)
    if train.trainer == "kohya":
        for character, _ in loras:
            out.print(f"  accelerate launch {train.kohya_scripts or '<sd-scripts>'}/train_network.py --config_file "
                      f"package/configs/{character}_config.toml --dataset_config package/configs/{character}_dataset.toml",
                      markup=False, highlight=False, soft_wrap=True)


def _execute(source: str, input_dir: Path, name: str, trigger: Optional[str], runs_dir: Path, params: Any,
             until: str, new_attempt: bool = False) -> None:
    """Run the source's pipeline (common.execute), then print its ingest report, the run's status and its LoRAs."""
    from flows.notify import lora_paths

    check_writable(runs_dir)
    if not Path(input_dir).is_dir():
        fail(f"input folder not found: {input_dir}")
    try:
        resolved = params.for_run(name, trigger)
    except ValueError as exc:
        fail(str(exc))
    store = open_store(name, runs_dir)

    def flow() -> dict:
        from flows.source_params import SourceParams
        from flows.source_to_lora import source_to_lora

        return source_to_lora(source=source, input_dir=str(input_dir), name=name, trigger=trigger,
                              runs_dir=str(runs_dir), params=SourceParams.of(source, params), until=until,
                              new_attempt=new_attempt)

    execute(source, [os.path.abspath(input_dir)], name, runs_dir, resolved, until, flow, new_attempt=new_attempt,
            expected=(ValueError,), before_report=lambda: _print_ingest_report(store))
    for lora in lora_paths(store):
        console.print(f"  LoRA      {lora}")


def _print_ingest_report(store: Any) -> None:
    for name in ("report.txt", "analysis.txt"):
        path = store.root / "ingest" / name
        if path.is_file():
            console.print(path.read_text(encoding="utf-8"), markup=False, highlight=False, soft_wrap=True)


def renders(
    input_dir: Path = typer.Argument(..., help="folder of phase folders (phase_1_essential/, ...) of NAME_..._0000.png renders"),
    name: str = typer.Option(..., "--name", "-n", help="run name and the product's LoRA (stage 2: <name>_detail)"),
    trigger: Optional[str] = typer.Option(None, "--trigger", help="trigger word of every caption (default: the name)"),
    resolution: Optional[str] = typer.Option(None, "--resolution", help="expected WIDTHxHEIGHT of every render (default 1024x1024)"),
    frames: Optional[int] = typer.Option(None, "--frames", help="frames per sequence, e.g. 36 (default: up to the highest frame number)"),
    caption_template: Optional[Path] = typer.Option(None, "--caption-template", help="caption template file for renders without a .txt"),
    stage1_steps: Optional[int] = typer.Option(None, "--stage1-steps", help="training steps of stage 1 (default 3000)"),
    stage1_lr: Optional[float] = typer.Option(None, "--stage1-lr", help="learning rate of stage 1 (default 1e-4)"),
    stage2_steps: Optional[int] = typer.Option(None, "--stage2-steps", help="steps of stage 2, the detail fine-tune (default 1500)"),
    stage2_lr: Optional[float] = typer.Option(None, "--stage2-lr", help="learning rate of stage 2 (default 5e-5)"),
    profile: Optional[str] = typer.Option(None, "--profile", help=PROFILES_HELP),
    base: Optional[str] = BASE,
    config: Optional[Path] = CONFIG,
    sets: list[str] = typer.Option([], "--set", help="override one parameter, e.g. --set ingest.black_level=5"),
    until: str = UNTIL,
    dry_run: bool = DRY_RUN,
    runs_dir: Path = RUNS_DIR,
) -> None:
    """Check a render folder (the Kyana guide's quality list) and train its staged LoRAs."""
    from flows.source_params import RendersRunParams
    from tasks.sources.render_training import DETAIL_SUFFIX, NAME
    check_until(until, "renders")
    size = None
    if resolution is not None:
        try:
            size = [int(v) for v in resolution.lower().split("x")]
            assert len(size) == 2
        except (ValueError, AssertionError):
            fail(f"--resolution must look like 1024x1024, got {resolution!r}")
    stage1, stage2 = f"train.per_character.{NAME}", f"train.per_character.{NAME}{DETAIL_SUFFIX}"
    params = _load(RendersRunParams, config, sets, {
        "ingest.resolution": size, "ingest.frames_per_sequence": frames,
        "ingest.caption_template": str(caption_template.expanduser().resolve()) if caption_template else None,
        f"{stage1}.max_steps": stage1_steps, f"{stage1}.unet_lr": stage1_lr, f"{stage2}.max_steps": stage2_steps,
        f"{stage2}.unet_lr": stage2_lr, "train.profile": profile, "train.base": base})
    try:
        resolved = params.for_run(name, trigger)
    except ValueError as exc:
        fail(str(exc))
    if dry_run:
        _print_dry_run("renders", resolved, input_dir, open_store(name, runs_dir).root)
        return
    _execute("renders", input_dir, name, trigger, runs_dir, params, until)


def photos(
    input_dir: Path = typer.Argument(..., help="photo folder: images/ + captions/, or images and .txt side by side"),
    name: Optional[str] = typer.Option(None, "--name", "-n", help="run name and the identity's LoRA (not needed with --analyze)"),
    trigger: Optional[str] = typer.Option(None, "--trigger", help="unique trigger token, e.g. ohwx"),
    profile: Optional[str] = typer.Option(None, "--profile", help=PROFILES_HELP + " (default fast)"),
    analyze: bool = typer.Option(False, "--analyze", help="only print the dataset analysis and recommendations"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="with --analyze: write the analysis as JSON here ('-': stdout)"),
    base: Optional[str] = BASE,
    config: Optional[Path] = CONFIG,
    sets: list[str] = typer.Option([], "--set", help="override one parameter, e.g. --set ingest.min_images=20"),
    until: str = UNTIL,
    dry_run: bool = DRY_RUN,
    runs_dir: Path = RUNS_DIR,
) -> None:
    """Analyze a photo set (the FLUX identity guide) and train its LoRA with the fast or final profile."""
    from flows.source_params import PhotosRunParams
    from tasks.sources.ingest_photos import analyze_photos, format_analysis
    check_until(until, "photos")
    if not trigger:
        fail("--trigger is required: a unique token such as ohwx, sks or a made-up word")
    if not name and not analyze:
        fail("--name is required (the run and the LoRA's name); or pass --analyze to only analyze the set")
    params = _load(PhotosRunParams, config, sets, {"train.profile": profile, "train.base": base})
    try:
        resolved = params.for_run(name or Path(input_dir).name, trigger)
    except ValueError as exc:
        fail(str(exc))
    if analyze:
        try:
            analysis = analyze_photos(input_dir, resolved.ingest)
        except FileNotFoundError as exc:
            fail(str(exc))
        if str(json_out) == "-":
            print(json.dumps(analysis, indent=2))
            return
        console.print(format_analysis(analysis), markup=False, highlight=False, soft_wrap=True)
        if json_out is not None:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(analysis, indent=2), encoding="utf-8")
            console.print(f"analysis: {json_out}", highlight=False)
        return
    if dry_run:
        _print_dry_run("photos", resolved, input_dir, open_store(name, runs_dir).root)
        return
    _execute("photos", input_dir, name, trigger, runs_dir, params, until)


def resume_source(record: dict, name: str, runs_dir: Path) -> None:
    """`episode2lora resume` of a render or photo run: the same source, inputs and parameters again.

    A record written before a parameter moved (render training settings under `ingest`,
    `caption.captions_from`) reads into today's parameters; the run then goes on as a new attempt
    (its old record kept under attempts/), since what it records is written differently now.
    """
    from flows.source_params import SOURCE_MODELS
    from tasks.run.store import record_changes

    source = RUN_KINDS[record["flow"]]
    params = SOURCE_MODELS[source].model_validate(record["params"])
    resolved = params.for_run(name, params.ingest.trigger).model_dump(mode="json")
    moved = bool(record_changes(record, {**record, "params": resolved}))
    _execute(source, Path(record["inputs"][0]), name, params.ingest.trigger, runs_dir, params, record["until"],
             new_attempt=moved)
