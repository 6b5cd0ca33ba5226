"""Render folders as a source: the ingest checks (each defect of the guide's quality list), the
per-phase report, the caption template, the staged training plan, and the flow to LoRAs."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from tasks.sources.ingest_renders import IngestRendersParams, parse_render_name
from tasks.sources.render_captions import RenderTemplate, caption_from_name, read_template
from tasks.sources.render_training import GUIDE_PROMPTS_STAGE1, GUIDE_PROMPTS_STAGE2
from tasks.run.store import QUARANTINE, RunStore
from tests.source_fixtures import turntable, write_sequence
from tests.stages import run_plain

SEQ1 = "FULL_ASSEMBLY_FLAT_MID_360_64x64"
SEQ2 = "FULL_ASSEMBLY_FLAT_SENSORS_ON_LOW_360_64x64"
SEQ3 = "COPPER_PINS_TOP_HIGH_360_64x64"


def params(**changes) -> IngestRendersParams:
    return IngestRendersParams(**{"name": "kyana", "trigger": "Kyana", "resolution": (64, 64), **changes})


def ingest(store: RunStore, folder: str, checks: IngestRendersParams):
    """The renders pipeline's ingest stage on `folder`, as a plain call."""
    return run_plain(store, "ingest", source="renders", sources=[folder], ingest=checks)


@pytest.fixture
def defective(tmp_path) -> Path:
    """Phase folders with one render of each defect the checks look for."""
    root = tmp_path / "renders"
    p1 = root / "phase_1_essential"
    write_sequence(p1, SEQ1, 8, skip=(3, 5))                                   # gap: frames 3 and 5 missing
    (p1 / f"{SEQ1}_0001.txt").unlink()                                          # missing caption
    Image.fromarray(turntable(30, (48, 48))).save(p1 / f"{SEQ1}_0002.png")      # wrong resolution
    Image.new("RGB", (64, 64), (2, 2, 3)).save(p1 / f"{SEQ1}_0004.png")         # black frame
    good = (p1 / f"{SEQ1}_0006.png").read_bytes()
    (p1 / f"{SEQ1}_0006.png").write_bytes(good[: len(good) // 2])               # corrupt (truncated)
    (p1 / f"{SEQ1}_0007.png").write_bytes(b"")                                  # corrupt (empty)
    Image.fromarray(turntable(0)).save(p1 / "front view_1.png")                 # bad name
    (p1 / "front view_1.txt").write_text("Kyana smartwatch, front view")
    p2 = root / "phase_2_sensors"
    write_sequence(p2, SEQ2, 4)
    Image.new("RGB", (64, 64), (255, 255, 255)).save(p2 / f"{SEQ2}_0004.png")  # blank frame
    (p2 / f"{SEQ2}_0004.txt").write_text("Kyana smartwatch, sensors on")
    return root


def test_each_defect_is_detected_and_reported(tmp_path, defective):
    store = RunStore(tmp_path / "runs", "defects")
    result = ingest(store, str(defective), params(frames_per_sequence=8))
    rows = {r["item_id"]: r for r in store.read_manifest("ingest").to_pylist()}
    reason = {k.split(":")[1]: (r["drop_reason"] or "") for k, r in rows.items()}

    assert reason[f"{SEQ1}_0001"].startswith("missing_caption")
    assert reason[f"{SEQ1}_0002"].startswith("wrong_resolution: 48x48, expected 64x64")
    assert reason[f"{SEQ1}_0004"].startswith("black_frame")
    assert reason[f"{SEQ1}_0006"].startswith(QUARANTINE) and "unreadable image" in reason[f"{SEQ1}_0006"]
    assert reason[f"{SEQ1}_0007"] == f"{QUARANTINE}{SEQ1}_0007.png: empty file (0 bytes)"
    assert reason["front view_1"].startswith("bad_name")
    assert reason[f"{SEQ2}_0004"].startswith("blank_frame")
    assert reason[f"{SEQ1}_0000"] == "" and rows[f"phase_1_essential:{SEQ1}_0000"]["kept"]
    assert "sequence_gap" in rows[f"phase_1_essential:{SEQ1}_0000"]["issues"]      # a gap warns, keeps the frame
    assert [r["kept"] for r in rows.values()].count(True) == 1 + 4                # 0 (phase 1), 0-3 (phase 2)

    sequences = {s["sequence"]: s for s in pq.read_table(store.stage_dir("ingest") / "sequences.parquet").to_pylist()}
    assert sequences[SEQ1]["missing"] == [3, 5] and sequences[SEQ1]["frames"] == 6
    assert sequences[SEQ2]["missing"] == [5, 6, 7]                                 # 0-4 of the expected 8
    assert result.summary["quarantined"] == 2 and result.summary["sequence_gaps"] == 2

    report = (store.stage_dir("ingest") / "report.txt").read_text()
    assert "Phase 1 (phase_1_essential): 7 images (1 render x 6 frames), 1 kept, 6 dropped  [stage 1]" in report
    assert "Phase 2 (phase_2_sensors): 5 images (1 render x 5 frames), 4 kept, 1 dropped  [stage 1]" in report
    assert "Total Core: 5 images -> LoRA 'kyana'" in report
    for unchecked in ("[ ] All PNG files have matching TXT caption files  (1 file)",
                      "[ ] All images are 64x64 resolution  (1 file)",
                      "[ ] Rotation sequences are smooth (no missing frames)  (2 sequences)",
                      "[ ] No corrupted frames  (2 files)", "[ ] No black frames  (1 file)",
                      "[ ] No blank frames  (1 file)", "[ ] File names match the naming convention  (1 file)"):
        assert unchecked in report
    assert f"phase_1_essential/{SEQ1}: missing frame(s) 3, 5 of 8" in report
    assert store.stage_status("ingest")["quarantined"] == 2
    assert any(line.startswith("ingest phase_1_essential:") for line in store.quarantine_report())


def test_a_clean_folder_passes_every_check(tmp_path):
    root = tmp_path / "renders"
    write_sequence(root / "phase_1_essential", SEQ1, 6)
    store = RunStore(tmp_path / "runs", "clean")
    ingest(store, str(root), params())
    report = (store.stage_dir("ingest") / "report.txt").read_text()
    assert "[ ]" not in report and report.count("[x]") == 7
    kept = store.read_manifest("ingest").to_pylist()
    assert all(r["kept"] for r in kept) and len(kept) == 6
    for row in kept:  # linked into the run with its caption beside it (an AI-Toolkit dataset folder)
        image = store.root / row["path"]
        assert image.is_file() and image.with_suffix(".txt").read_text().strip() == row["caption"]
        assert row["caption"].startswith("Kyana smartwatch")


def test_missing_captions_come_from_the_caption_template(tmp_path):
    root = tmp_path / "renders"
    write_sequence(root / "phase_1_essential", SEQ2, 4)
    for txt in (root / "phase_1_essential").glob("*.txt"):
        txt.unlink()
    template = tmp_path / "captions.yaml"
    template.write_text(yaml.safe_dump({
        "template": "{trigger} smartwatch, {words}, view {angle} degrees, white background",
        "tokens": {"FULL_ASSEMBLY": "complete assembly", "FLAT": "flat strap", "SENSORS_ON": "biometric sensors active",
                   "LOW": "low angle", "360": ""}}))
    store = RunStore(tmp_path / "runs", "template")
    ingest(store, str(root), params(caption_template=str(template)))
    rows = sorted(store.read_manifest("ingest").to_pylist(), key=lambda r: r["frame"])
    assert [r["caption_source"] for r in rows] == ["template"] * 4 and all(r["kept"] for r in rows)
    assert rows[1]["caption"] == ("Kyana smartwatch, complete assembly, flat strap, biometric sensors active, "
                                  "low angle, view 90 degrees, white background")


def test_caption_template_rules(tmp_path):
    template = RenderTemplate(template="{trigger}, {words}", tokens={"COPPER_PINS": "copper connector pins"})
    assert caption_from_name(template, trigger="Kyana", sequence=SEQ3, phase="p3", frame=0, frames=36) == \
        "Kyana, copper connector pins, top high 360"
    plain = tmp_path / "plain.txt"
    plain.write_text("{trigger} render of {name}, frame {frame}\n")
    assert read_template(plain).template == "{trigger} render of {name}, frame {frame}"
    bad = tmp_path / "bad.txt"
    bad.write_text("{trigger} {colour}")
    with pytest.raises(ValueError, match=r"bad.txt.*unknown placeholder.*colour"):
        read_template(bad)
    assert parse_render_name(f"{SEQ1}_0035.png") == (SEQ1, 35)
    assert parse_render_name("full_assembly_0001.png") is None and parse_render_name(f"{SEQ1}_35.png") is None


def test_parameters_are_checked_up_front(tmp_path):
    with pytest.raises(ValueError, match=r"overlap: phase\(s\) \[2\]"):
        params(stage1_phases=[1, 2], stage2_phases=[2])
    with pytest.raises(ValueError, match="trigger must be a non-empty word"):
        params(trigger="Kyana, watch")
    with pytest.raises(ValueError, match=r"ingest.name must be set"):
        ingest(RunStore(tmp_path, "x"), str(tmp_path), IngestRendersParams())
    with pytest.raises(FileNotFoundError, match="no images"):
        ingest(RunStore(tmp_path, "x"), str(tmp_path), params())


def test_phases_map_to_training_stages(tmp_path):
    root = tmp_path / "renders"
    write_sequence(root / "phase_1_essential", SEQ1, 4)
    write_sequence(root / "phase_3_details", SEQ3, 4)
    write_sequence(root / "phase_4_animation", "ASSEMBLY_ANIMATION_FLAT_64x64", 3)
    store = RunStore(tmp_path / "runs", "stages")
    result = ingest(store, str(root), params())
    assert result.summary["characters"] == {"kyana": 4, "kyana_detail": 4}
    animation = [r for r in store.read_manifest("ingest").to_pylist() if r["phase_number"] == 4]
    assert len(animation) == 3 and all(r["drop_reason"].startswith("not_trained") for r in animation)
    assert not (store.stage_dir("ingest") / "ai_toolkit").exists()  # training jobs are the package stage's


def test_the_staged_plan_is_train_parameters_and_the_packaged_ai_toolkit_jobs_follow_it():
    """The guide's two stages are the renders run's default train parameters; the package stage's
    AI-Toolkit job of each LoRA takes its steps, LR, prompts and (stage 2) stage 1's LoRA from them."""
    from flows.source_params import RendersRunParams
    from tasks.package import ai_toolkit_job, ai_toolkit_lora, package_settings

    run = RendersRunParams.model_validate(
        {"train": {"per_character": {"{name}_detail": {"max_steps": 700, "unet_lr": 2e-5}}}}).for_run("kyana", "Kyana")
    assert run.train.init_from == {"kyana_detail": "kyana"}
    assert run.train.per_character["kyana"].max_steps == 3000
    assert run.train.per_character["kyana_detail"].sample_prompts == GUIDE_PROMPTS_STAGE2  # kept under the override
    settings = package_settings(run)
    core = yaml.safe_load(ai_toolkit_job("kyana", ["Kyana"], "unknown", [Path("package/15_kyana")],
                                         Path("train/kyana/ai_toolkit"), settings))
    detail = yaml.safe_load(ai_toolkit_job("kyana_detail", ["Kyana"], "unknown", [Path("package/15_kyana_detail")],
                                           Path("train/kyana_detail/ai_toolkit"), settings))
    job1, job2 = core["config"]["process"][0], detail["config"]["process"][0]
    assert job1["sample"]["prompts"] == [p.replace("{trigger}", "Kyana") for p in GUIDE_PROMPTS_STAGE1]
    assert job1["train"]["steps"] == 3000 and job2["train"]["steps"] == 700 and job2["train"]["lr"] == 2e-5
    assert [d["folder_path"] for d in job2["datasets"]] == ["package/15_kyana_detail"]
    assert job2["network"]["pretrained_lora_path"] == ai_toolkit_lora("kyana")
    assert ai_toolkit_lora("kyana") == (f"{job1['training_folder']}/{core['config']['name']}/"
                                        f"{core['config']['name']}.safetensors")
    assert job1["network"] == {"type": "lora", "linear": 16, "linear_alpha": 16}
    assert package_settings(RendersRunParams().for_run("kyana")).loras["kyana_detail"].init_from == "kyana"


def test_old_configs_with_training_settings_under_ingest_still_load():
    """Render configs (and run records) from before the plan moved to `train` keep their meaning."""
    from flows.source_params import RendersRunParams

    old = RendersRunParams.model_validate({"ingest": {"stage2_steps": 900, "stage1_lr": 3e-4, "rank": 8}}).for_run("k")
    assert old.train.per_character["k_detail"].max_steps == 900 and old.train.per_character["k"].unet_lr == 3e-4
    assert old.package.ai_toolkit.rank == 8 and "stage2_steps" not in old.ingest.model_dump()


def test_a_changed_phase_is_ingested_again_alone(tmp_path):
    root = tmp_path / "renders"
    write_sequence(root / "phase_1_essential", SEQ1, 4)
    write_sequence(root / "phase_2_sensors", SEQ2, 4)
    store = RunStore(tmp_path / "runs", "resume")
    ingest(store, str(root), params())
    marker = store.shard_dir("ingest", "phase_1_essential") / "_DONE.json"
    before = marker.stat().st_mtime_ns
    (root / "phase_2_sensors" / f"{SEQ2}_0003.txt").write_text("Kyana smartwatch, new caption")
    again = ingest(store, str(root), params())
    assert again.recomputed and marker.stat().st_mtime_ns == before  # phase 1 reused, phase 2 redone
    captions = {r["frame"]: r["caption"] for r in store.read_manifest("ingest").to_pylist() if r["phase_number"] == 2}
    assert captions[3] == "Kyana smartwatch, new caption"
    assert not ingest(store, str(root), params()).recomputed


def test_flow_from_a_clean_folder_to_staged_loras(prefect_api, tmp_path):
    """ingest -> augment -> caption -> package -> validate -> train (stage 1, then stage 2 from its LoRA)."""
    import torch

    from flows.source_params import SourceParams
    from flows.source_to_lora import source_to_lora
    from models.kohya_format import read_kohya

    root = tmp_path / "renders"
    write_sequence(root / "phase_1_essential", SEQ1, 6)
    write_sequence(root / "phase_3_details", SEQ3, 6)
    run_params = SourceParams.model_validate({
        "renders": {"resolution": [64, 64]}, "photos": {"min_images": 29},  # the photos section is not this run's
        "package": {"render": {"resolution": 64}}, "validate": {"min_resolution": 64},
        "train": {"profile": "demo", "base": "tiny", "save_every_steps": 2, "sample_prompts": [],
                  "per_character": {"{name}": {"max_steps": 2}, "{name}_detail": {"max_steps": 1, "unet_lr": 1e-12}}},
    })
    runs = tmp_path / "runs"
    results = source_to_lora("renders", str(root), "watch", trigger="Kyana", runs_dir=str(runs), params=run_params)
    assert list(results) == ["ingest", "augment", "caption", "package", "validate", "train"]
    store = RunStore(runs, "watch")
    assert all(store.is_done(stage) for stage in results)
    assert results["validate"].summary["passed"]

    captions = store.read_manifest("caption").to_pylist()  # the renders' own captions, kept
    assert {r["captioner"] for r in captions} == {"given"} and all(r["caption"].startswith("Kyana smartwatch") for r in captions)
    assert sorted(p.name for p in (store.root / "package").iterdir() if p.name[0].isdigit()) == ["15_watch", "15_watch_detail"]

    trained = {r["character"]: r for r in store.read_manifest("train").to_pylist()}
    assert {c: r["steps"] for c, r in trained.items()} == {"watch": 2, "watch_detail": 1}
    core, detail = (store.root / trained[c]["lora_path"] for c in ("watch", "watch_detail"))
    settings = json.loads((store.root / trained["watch_detail"]["settings_path"]).read_text())["settings"]
    assert settings["init_lora"] == str(store.shard_dir("train", "watch") / "watch.safetensors")
    assert settings["unet_lr"] == 1e-12 and settings["max_steps"] == 1
    a, _ = read_kohya(core)
    b, _ = read_kohya(detail)
    ups = [k for k in a if k.endswith("lora_up.weight")]
    assert max(float(a[k].abs().max()) for k in ups) > 1e-6  # stage 1 learned something ...
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-7) for k in a)  # ... stage 2 started from it
    job = yaml.safe_load((store.root / "package" / "configs" / "watch_detail_ai_toolkit.yaml").read_text())
    assert job["config"]["process"][0]["network"]["pretrained_lora_path"] == "train/watch/ai_toolkit/watch_flux_lora/watch_flux_lora.safetensors"
    assert job["config"]["process"][0]["train"]["steps"] == 1 and not (store.root / "ingest" / "ai_toolkit").exists()

    again = source_to_lora("renders", str(root), "watch", trigger="Kyana", runs_dir=str(runs), params=run_params)
    assert not any(r.recomputed for r in again.values())
    record = store.read_run_record()
    assert record["flow"] == "renders-to-lora" and record["params"]["ingest"]["resolution"] == [64, 64]


def test_init_lora_must_fit_the_training(tmp_path):
    """The fine-tune option refuses a LoRA of another rank, naming the fix."""
    from peft import LoraConfig

    from models.lora_init import InitLoraMismatch, load_init_lora
    from models.sd_base import load_base
    from tests.lora_fixtures import make_character, tiny_job
    from models.lora_trainer import train_lora

    make_character(tmp_path / "pk", "hero", "herotok", n_train=2, n_validation=0)
    outcome = train_lora(tiny_job(tmp_path / "pk", tmp_path / "out", max_steps=1, save_every_steps=1))
    base = load_base("tiny")
    base.unet.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with pytest.raises(InitLoraMismatch, match="set rank to the file's rank"):
        load_init_lora(base.unet, [], outcome.lora_path, family=base.family, alpha=8)
    with pytest.raises(FileNotFoundError, match="init_lora file not found"):
        load_init_lora(base.unet, [], tmp_path / "nothing.safetensors", family=base.family, alpha=8)


def test_cli_dry_run_prints_the_resolved_stages_and_commands(tmp_path):
    from typer.testing import CliRunner

    from episode2lora.cli import app

    root = tmp_path / "renders"
    write_sequence(root / "phase_1_essential", SEQ1, 2)
    runner = CliRunner()
    out = runner.invoke(app, ["renders", str(root), "--name", "kyana", "--trigger", "Kyana", "--stage2-steps", "900",
                              "--stage2-lr", "3e-5", "--frames", "36", "--dry-run", "--runs-dir", str(tmp_path / "runs")])
    assert out.exit_code == 0, out.output
    text = out.output
    assert "resolved configuration" in text and "frames_per_sequence: 36" in text
    detail = text[text.index("kyana_detail: stage 2"):]
    assert "max_steps: 900" in detail and "unet_lr: 3.0e-05" in detail
    assert f"init_lora: {tmp_path / 'runs' / 'kyana' / 'train' / 'shards' / 'kyana' / 'kyana.safetensors'}" in detail
    assert "package/configs/kyana_detail_ai_toolkit.yaml" in text and "--dry-run" not in text.split("commands")[1]
    assert not (tmp_path / "runs").exists()  # nothing ran
    bad = runner.invoke(app, ["renders", str(root), "--name", "k", "--resolution", "big", "--dry-run"])
    assert bad.exit_code == 2 and "--resolution must look like 1024x1024, got 'big'" in bad.output
