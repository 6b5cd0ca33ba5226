"""The LoRA trainer on tiny SD1.5 / SDXL stand-ins: learning, exact resume after a kill, kohya files
that diffusers loads, the versions registry, the package reader, the settings and the CLI."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT, run_cli
from tests.lora_fixtures import kill_after, make_character, tiny_job


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("package")
    make_character(folder, "blob", "zqx")
    return folder


@pytest.fixture(scope="module")
def trained(package, tmp_path_factory):
    """A 30-step training, rank 4 with alpha 2 (scale 0.5), checkpoints every 10 steps."""
    from models.lora_trainer import train_lora

    out = tmp_path_factory.mktemp("trained")
    job = tiny_job(package, out, max_steps=30, unet_lr=3e-3, rank=4, alpha=2, save_every_steps=10,
                   sample_prompts=["{trigger}, standing"])
    return train_lora(job)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- learning, outputs -----------------------------------------------------------------------

def test_validation_loss_goes_down_and_outputs_are_written(trained):
    out = Path(trained.lora_path).parent
    val = _lines(out / "validation.jsonl")
    assert [v["step"] for v in val] == [0, 10, 20, 30]  # step 0 = before training
    assert val[-1]["val_loss"] < 0.95 * val[0]["val_loss"], val
    assert trained.best_val_loss == min(v["val_loss"] for v in val[1:])
    assert [s for s, _ in trained.checkpoints] == [10, 20, 30]
    assert len(_lines(out / "loss.jsonl")) == 30
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-000010.png", "step-000020.png", "step-000030.png"]
    assert list((out / "logs").rglob("events.out.tfevents.*")), "no TensorBoard log"
    assert Path(trained.diffusers_path).is_file()
    assert len(list((out / "latents").glob("*.safetensors"))) == 8  # 6 training + 2 validation images, cached


def test_kohya_file_has_kohya_keys_and_ss_metadata(trained):
    from models.kohya_format import read_kohya

    tensors, meta = read_kohya(Path(trained.lora_path))
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    assert all(m.startswith("lora_unet_") for m in modules)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in modules
    for m in modules:  # every module: down, up and the real alpha
        assert tensors[f"{m}.lora_down.weight"].shape[0] == 4 and tensors[f"{m}.lora_up.weight"].shape[1] == 4
        assert float(tensors[f"{m}.alpha"]) == 2.0
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_steps"] == "30" and meta["ss_sd_model_name"] == "tiny"
    assert meta["ss_resolution"] == "(64, 64)"
    assert json.loads(meta["ss_tag_frequency"])["2_blob"]["zqx"] == 6
    assert json.loads(meta["ss_dataset_dirs"]) == {"2_blob": {"n_repeats": 2, "img_count": 6}}


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _images(pipe, prompt="zqx, standing"):
    import torch

    return pipe(prompt, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images


def test_kohya_file_loads_in_diffusers_like_peft_with_alpha_not_rank(trained):
    """rank 4, alpha 2: diffusers must apply scale 0.5 exactly as the peft model we trained."""
    import numpy as np
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as dlog
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    from models.sd_base import resolve_base

    base = resolve_base("tiny")
    plain = StableDiffusionPipeline.from_pretrained(base)
    plain.set_progress_bar_config(disable=True)
    before = _images(plain)

    handler = _Warnings()
    dlog.get_logger("diffusers").addHandler(handler)
    try:
        plain.load_lora_weights(trained.lora_path, adapter_name="kohya")
    finally:
        dlog.get_logger("diffusers").removeHandler(handler)
    assert not [m for m in handler.messages if "unexpected keys" in m or "missing keys" in m], handler.messages
    scalings = {m.scaling["kohya"] for m in plain.unet.modules() if hasattr(m, "scaling") and "kohya" in m.scaling}
    assert scalings == {0.5}
    loaded = _images(plain)

    reference = StableDiffusionPipeline.from_pretrained(base)  # the same LoRA put in by peft directly
    reference.set_progress_bar_config(disable=True)
    reference.unet.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    checkpoint = load_file(str(Path(trained.checkpoints[-1][1]).parent / "lora.safetensors"))
    result = set_peft_model_state_dict(reference.unet, {k[5:]: v for k, v in checkpoint.items() if k.startswith("unet.")})
    assert not result.unexpected_keys
    expected = _images(reference)

    assert np.abs(loaded - before).max() > 1e-3, "the LoRA did not change the output"
    np.testing.assert_allclose(loaded, expected, atol=2e-5)

    folded = StableDiffusionPipeline.from_pretrained(base)  # the diffusers-format file beside it
    folded.set_progress_bar_config(disable=True)
    folded.load_lora_weights(trained.diffusers_path)
    np.testing.assert_allclose(_images(folded), expected, atol=2e-5)


# ---- resume after a kill -----------------------------------------------------------------------

RESUME_SETTINGS = dict(max_steps=12, save_every_steps=4, keep_last=2, batch_size=2, grad_accum=2, unet_lr=3e-3,
                       caption_dropout_rate=0.3, noise_offset=0.05, min_snr_gamma=5.0, dropout=0.1,
                       lr_scheduler="cosine", warmup_steps=3)


def test_kill_after_checkpoint_then_resume_matches_uninterrupted_run(package, tmp_path):
    from safetensors.torch import load_file

    from models.lora_trainer import train_lora

    whole = train_lora(tiny_job(package, tmp_path / "whole", **RESUME_SETTINGS))

    killed = tmp_path / "killed"
    code = (f"from tests.lora_fixtures import train_then_die; "
            f"train_then_die({str(package)!r}, {str(killed)!r}, {json.dumps(json.dumps(RESUME_SETTINGS))}, 10)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr[-2000:]  # SIGKILL, mid-run
    assert not (killed / "outcome.json").exists()
    assert len(_lines(killed / "loss.jsonl")) == 10  # steps 9-10 ran after the last checkpoint (8)
    assert sorted(p.name for p in (killed / "checkpoints").iterdir() if not p.name.startswith(".")) == ["step-000004", "step-000008"]

    with pytest.raises(FileExistsError):  # never silently overwritten
        train_lora(tiny_job(package, killed, **RESUME_SETTINGS))
    resumed = train_lora(tiny_job(package, killed, **RESUME_SETTINGS), resume=True)

    assert resumed.resumed_from == 8 and resumed.steps == 12
    assert _lines(killed / "loss.jsonl") == _lines(tmp_path / "whole" / "loss.jsonl")  # same trajectory, exactly
    assert _lines(killed / "validation.jsonl") == _lines(tmp_path / "whole" / "validation.jsonl")
    a, b = load_file(whole.lora_path), load_file(resumed.lora_path)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert [s for s, _ in resumed.checkpoints] == [8, 12]  # keep_last 2


def test_train_stage_killed_mid_training_resumes_on_the_next_run(tmp_path):
    """The stage keeps an interrupted training's checkpoints and version id, and continues it."""
    from tasks.run.spec import run_stage
    from tasks.run.stage import StageResult
    from tasks.run.store import RunStore
    from tasks.run.versions import read_versions
    from tasks.train import TRAIN, TrainParams
    from tests.stages import run_params

    store = RunStore(tmp_path, "lora")
    make_character(store.root / "package", "blob", "zqx", n_train=4, n_validation=0)
    settings = {"profile": "demo", "base": "tiny", "max_steps": 20, "save_every_steps": 4, "sample_prompts": []}
    code = ("import json, sys; from tasks.run.spec import run_stage; from tasks.run.stage import StageResult; "
            "from tasks.run.store import RunStore; from tasks.train import TRAIN, TrainParams; "
            "from tests.stages import run_params; "
            "run_stage(TRAIN, RunStore(sys.argv[1], 'lora'), run_params(train=TrainParams.model_validate("
            "json.loads(sys.argv[2]))), {'package': StageResult(stage='package', fingerprint='p')})")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), json.dumps(settings)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    kill_after(proc, store.root / "train" / "work" / "blob" / "checkpoints" / "step-000004")  # SIGKILL
    assert not store.is_done("train")
    running = read_versions(tmp_path).to_pylist()
    assert [r["status"] for r in running] == ["running"]

    result = run_stage(TRAIN, store, run_params(train=TrainParams.model_validate(settings)),
                       {"package": StageResult(stage="package", fingerprint="p")})
    row = store.read_manifest("train").to_pylist()[0]
    assert result.recomputed and row["steps"] == 20 and row["resumed_from"] >= 4
    assert not (store.root / "train" / "work" / "blob").exists()  # committed: resume state dropped
    versions = read_versions(tmp_path).to_pylist()
    assert [(r["version_id"], r["status"]) for r in versions] == [(running[0]["version_id"], "completed")]


def test_resume_refuses_a_checkpoint_of_other_settings(package, tmp_path):
    from models.lora_trainer import ResumeMismatch, train_lora

    train_lora(tiny_job(package, tmp_path, max_steps=2, save_every_steps=1))
    with pytest.raises(ResumeMismatch, match="other settings"):
        train_lora(tiny_job(package, tmp_path, max_steps=2, save_every_steps=1, rank=8), resume=True)


# ---- SDXL --------------------------------------------------------------------------------------

def test_sdxl_trains_with_text_encoders_and_exports_te1_te2(package, tmp_path):
    import numpy as np
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import logging as dlog

    from models.kohya_format import read_kohya
    from models.lora_trainer import train_lora
    from models.sd_base import resolve_base

    job = tiny_job(package, tmp_path, base="tiny-sdxl", max_steps=4, save_every_steps=2, unet_lr=3e-3,
                   train_text_encoder=True, text_encoder_fraction=0.5)
    outcome = train_lora(job)
    assert outcome.family == "sdxl"
    tensors, meta = read_kohya(Path(outcome.lora_path))
    prefixes = {k.split("_")[0] + "_" + k.split("_")[1] for k in tensors}
    assert prefixes == {"lora_unet", "lora_te1", "lora_te2"}
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors  # sgm names
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha" in tensors
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_network_train_unet_only"] == "False"
    te_up = [v for k, v in tensors.items() if k.startswith("lora_te1_") and k.endswith("lora_up.weight")]
    assert any(float(v.abs().max()) > 0 for v in te_up), "the text encoder LoRA was not trained"

    pipe = StableDiffusionXLPipeline.from_pretrained(resolve_base("tiny-sdxl"))
    pipe.set_progress_bar_config(disable=True)
    before = _images(pipe)
    handler = _Warnings()
    dlog.get_logger("diffusers").addHandler(handler)
    try:
        pipe.load_lora_weights(outcome.lora_path)
    finally:
        dlog.get_logger("diffusers").removeHandler(handler)
    assert not [m for m in handler.messages if "unexpected keys" in m or "missing keys" in m or "No LoRA keys" in m]
    assert np.abs(_images(pipe) - before).max() > 1e-4


# ---- registry ----------------------------------------------------------------------------------

def test_registry_records_a_failed_training_with_its_error(package, tmp_path):
    from models.sd_base import BaseModelMissing
    from tasks.train import train_job
    from tasks.run.versions import read_versions

    job = tiny_job(package, tmp_path / "out", max_steps=2)
    job.settings = job.settings.model_copy(update={"base": str(tmp_path / "no-such-model")})
    with pytest.raises(BaseModelMissing):
        train_job(job, registry=tmp_path, progress=False)
    ok, version = train_job(tiny_job(package, tmp_path / "ok", max_steps=2), registry=tmp_path, progress=False)
    rows = read_versions(tmp_path).to_pylist()
    assert [r["status"] for r in rows] == ["failed", "completed"]
    assert rows[0]["error"].startswith("BaseModelMissing") and "no-such-model" in rows[0]["error"]
    assert rows[0]["ended_at"] and rows[1]["version_id"] == version and rows[1]["steps"] == 2
    assert rows[1]["lora_path"] == ok.lora_path and json.loads(rows[1]["params"])["max_steps"] == 2


# ---- data and settings ---------------------------------------------------------------------------

def test_package_reader_parses_kohya_names_leniently(tmp_path):
    from models.lora_data import parse_repeats_folder, read_package

    make_character(tmp_path, "char_000", "zqx", repeats=30, n_train=3, n_validation=1)
    make_character(tmp_path, "hero", "hrx", repeats=5, n_train=2, n_validation=0)
    (tmp_path / "notes").mkdir()
    (tmp_path / "30_char_000" / "broken.png").write_bytes(b"not a png")
    pq.write_table(pa.table({"character": ["hero"], "trigger": ["hero_trigger"]}), tmp_path / "characters.parquet")
    characters, skipped = read_package(tmp_path)
    by_name = {c.name: c for c in characters}
    assert set(by_name) == {"char_000", "hero"} and by_name["char_000"].repeats == 30
    assert len(by_name["char_000"].train) == 3 and len(by_name["char_000"].validation) == 1
    assert by_name["char_000"].quarantined[0].startswith("broken.png: unreadable image")
    assert by_name["hero"].trigger == "hero_trigger" and by_name["char_000"].trigger == "zqx"
    assert skipped == ["notes: name is not <repeats>_<name>"]
    assert parse_repeats_folder("10_sks dog") == (10, "sks dog") and parse_repeats_folder("x_name") is None
    with pytest.raises(FileNotFoundError, match="no <repeats>_<name> image folders"):
        read_package(tmp_path / "notes")


def test_buckets_respect_area_step_and_range():
    from models.lora_data import bucket_sizes, nearest_bucket

    buckets = bucket_sizes(512, 256, 768, 64)
    assert (512, 512) in buckets and (768, 320) in buckets and (320, 768) in buckets
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 and 256 <= min(w, h) for w, h in buckets)
    assert nearest_bucket(1920, 1080, buckets)[0] > nearest_bucket(1920, 1080, buckets)[1]
    assert nearest_bucket(300, 300, buckets) == (512, 512)


def test_profiles_package_config_and_overrides(tmp_path):
    from models.lora_settings import read_kohya_config, resolve_settings
    from tasks.train import TrainParams

    fast, final = resolve_settings("fast"), resolve_settings("final")
    assert (fast.resolution, fast.max_steps, fast.rank, fast.alpha, fast.lr_scheduler, fast.warmup_steps) == \
        (512, 1500, 32, 32, "constant_with_warmup", 100)
    assert (final.resolution, final.max_steps, final.rank, final.dropout, final.min_snr_gamma, final.max_bucket_reso) == \
        (768, 2500, 64, 0.1, 5.0, 1024)
    assert not fast.train_text_encoder and fast.te_lr == pytest.approx(0.4e-4)
    config = tmp_path / "blob_config.toml"
    config.write_text('[network]\nnetwork_dim = 48\nnetwork_alpha = 24\n[optimizer]\nunet_lr = 5.5e-05\n'
                      '[training]\nmax_train_epochs = 30\nmin_snr_gamma = 5.0\n')
    package = resolve_settings("package", read_kohya_config(config), {"alpha": 12})
    assert (package.rank, package.alpha, package.unet_lr, package.epochs, package.max_steps) == (48, 12, 5.5e-5, 30, None)
    with pytest.raises(KeyError, match="known profiles: fast, final, package, demo"):
        resolve_settings("slow")
    with pytest.raises(ValueError, match="rank"):
        TrainParams(rank=0)
    with pytest.raises(ValueError, match="resolution must be a multiple of bucket_step"):
        resolve_settings("fast", overrides={"resolution": 500})


def test_lr_schedules():
    from models.lora_trainer import lr_factor

    assert [lr_factor(s, "constant_with_warmup", 4, 10, 1) for s in (0, 2, 4, 9)] == [0.0, 0.5, 1.0, 1.0]
    assert lr_factor(0, "constant", 4, 10, 1) == 1.0
    assert lr_factor(2, "cosine", 2, 10, 1) == pytest.approx(1.0) and lr_factor(10, "cosine", 2, 10, 1) == pytest.approx(0.0)
    assert lr_factor(6, "cosine_with_restarts", 2, 10, 2) == pytest.approx(1.0)  # second cycle starts at 6


# ---- CLI ---------------------------------------------------------------------------------------

def test_cli_train_folder_then_versions(package, tmp_path):
    import os

    from typer.testing import CliRunner

    from episode2lora.cli import app

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = run_cli(["train", str(package), "--profile", "demo", "--base", "tiny", "--set", "max_steps=3",
                   "--output", str(tmp_path / "loras"), "--runs-dir", str(tmp_path)], env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "UNTRAINED stand-in" in out.stdout
    assert (tmp_path / "loras" / "blob" / "blob.safetensors").is_file()
    cli = CliRunner()
    again = cli.invoke(app, ["train", str(package), "--profile", "demo", "--base", "tiny", "--output",
                             str(tmp_path / "loras"), "--runs-dir", str(tmp_path)])
    assert again.exit_code == 1 and "--resume" in again.output
    bad = cli.invoke(app, ["train", str(package), "--set", "rank=0", "--runs-dir", str(tmp_path)])
    assert bad.exit_code == 2 and "train.rank" in bad.output
    listed = cli.invoke(app, ["versions", "--runs-dir", str(tmp_path)], env={"COLUMNS": "250"})
    assert listed.exit_code == 0 and "blob" in listed.output and "completed" in listed.output


# ---- kohya sd-scripts as the trainer --------------------------------------------------------------

FAKE_TRAIN_NETWORK = '''
import argparse, json, torch
from safetensors.torch import save_file
p = argparse.ArgumentParser()
for name in ("config_file", "dataset_config", "output_dir", "output_name", "logging_dir"):
    p.add_argument("--" + name)
a = p.parse_args()
json.dump(vars(a), open(a.output_dir + "/args.json", "w"))
for suffix in ("-000002", ""):
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, a.output_dir + "/" + a.output_name + suffix + ".safetensors")
'''


def test_kohya_scripts_trainer_runs_train_network_with_the_package_tomls(tmp_path):
    """sd-scripts itself is not installed here: a stand-in train_network.py checks what we hand it."""
    from tasks.train import TrainParams, train_folder
    from tasks.run.versions import read_versions

    package = tmp_path / "package"
    make_character(package, "blob", "zqx", n_train=2, n_validation=0)
    (package / "configs").mkdir()
    (package / "configs" / "blob_config.toml").write_text("[network]\nnetwork_dim = 8\n")
    (package / "configs" / "blob_dataset.toml").write_text("[general]\nshuffle_caption = true\n")
    scripts = tmp_path / "sd-scripts"
    scripts.mkdir()
    (scripts / "train_network.py").write_text(FAKE_TRAIN_NETWORK)
    params = TrainParams(trainer="kohya", kohya_scripts=str(scripts))
    [(outcome, version)] = train_folder(package, tmp_path / "out", params, registry=tmp_path)
    args = json.loads((tmp_path / "out" / "blob" / "args.json").read_text())
    assert args["config_file"] == str(package / "configs" / "blob_config.toml")
    assert args["dataset_config"] == str(package / "configs" / "blob_dataset.toml")
    assert args["output_name"] == "blob" and Path(outcome.lora_path).is_file()
    assert outcome.checkpoints == [(2, str(tmp_path / "out" / "blob" / "blob-000002.safetensors"))]
    [row] = read_versions(tmp_path).to_pylist()
    assert (row["trainer"], row["status"], row["version_id"]) == ("kohya", "completed", version)
    with pytest.raises(ValueError, match="kohya_scripts"):
        train_folder(package, tmp_path / "out2", TrainParams(trainer="kohya"), registry=tmp_path)
