"""LoRA training on a tiny FLUX.1 stand-in: it learns, the kohya FLUX file has kohya's keys, alpha and
metadata and loads in diffusers like the peft form, timestep sampling, the FLUX profiles, the
settings flow matching ignores, and masked loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.lora_fixtures import make_character, tiny_job


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("flux-package")
    make_character(folder, "blob", "zqx")
    return folder


@pytest.fixture(scope="module")
def trained(package, tmp_path_factory):
    """10 steps on tiny-flux, rank 4 with alpha 2 (scale 0.5), a noise offset that FLUX ignores."""
    from models.lora_trainer import train_lora

    out = tmp_path_factory.mktemp("flux-trained")
    job = tiny_job(package, out, base="tiny-flux", max_steps=10, unet_lr=3e-3, rank=4, alpha=2, save_every_steps=5,
                   noise_offset=0.05, sample_prompts=["{trigger}, standing"])
    with pytest.warns(UserWarning, match="noise_offset=0.05 is ignored on FLUX"):
        return train_lora(job)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _modules(tensors: dict) -> set[str]:
    return {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}


def test_flux_lora_trains_with_finite_loss_and_changing_weights(trained):
    from safetensors.torch import load_file

    out = Path(trained.lora_path).parent
    losses = [line["loss"] for line in _lines(out / "loss.jsonl")]
    assert len(losses) == 10 and all(0 < x < 100 for x in losses), losses
    val = _lines(out / "validation.jsonl")
    assert [v["step"] for v in val] == [0, 5, 10]
    assert val[-1]["val_loss"] < val[0]["val_loss"], val  # fixed noise and sigmas: the LoRA fits the data
    peft = load_file(trained.diffusers_path)
    ups = [v for k, v in peft.items() if "lora_B" in k]
    assert ups and all(float(v.abs().max()) > 0 for v in ups)  # peft's B starts at zero: every layer moved
    assert trained.family == "flux"
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-000005.png", "step-000010.png"]


def test_kohya_flux_file_has_fused_keys_explicit_alpha_and_flux_metadata(trained):
    from models.kohya_format import read_kohya

    tensors, meta = read_kohya(Path(trained.lora_path))
    modules = _modules(tensors)
    assert modules == {f"lora_unet_double_blocks_0_{k}" for k in (
        "img_attn_qkv", "txt_attn_qkv", "img_attn_proj", "txt_attn_proj", "img_mlp_0", "img_mlp_2", "txt_mlp_0",
        "txt_mlp_2")} | {"lora_unet_single_blocks_0_linear1", "lora_unet_single_blocks_0_linear2"}
    fused = {"img_attn_qkv": 3, "txt_attn_qkv": 3, "linear1": 4}
    for m in modules:
        parts = next((n for k, n in fused.items() if m.endswith(k)), 1)
        assert tensors[f"{m}.lora_down.weight"].shape[0] == 4 * parts
        assert float(tensors[f"{m}.alpha"]) == 2.0 * parts  # alpha / rank = 0.5 in every module
    up = tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]  # block-diagonal: (96, 12)
    assert up.shape == (96, 12) and float(up[:32, 4:].abs().max()) == 0 and float(up[32:64, :4].abs().max()) == 0
    assert meta["ss_base_model_version"] == "flux1" and meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert meta["ss_network_module"] == "networks.lora_flux"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0" and meta["ss_steps"] == "10"
    assert meta["ss_timestep_sampling"] == "sigmoid" and meta["ss_noise_offset"] == "None"
    assert "noise_offset" in json.loads(meta["ss_ignored_settings"])[0]


def _pipe():
    from diffusers import FluxPipeline

    from models.sd_base import resolve_base

    pipe = FluxPipeline.from_pretrained(resolve_base("tiny-flux"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe):
    import torch

    return pipe("zqx, standing", num_inference_steps=3, height=64, width=64, max_sequence_length=77,
                generator=torch.Generator().manual_seed(0), output_type="np").images


def test_both_forms_load_in_diffusers_and_give_the_same_images(trained, tmp_path):
    """diffusers' FluxPipeline.load_lora_weights reads the peft form, and the kohya file through its own
    kohya converter. That converter hard-codes FLUX.1's widths for single_blocks linear1 (3072 x 3 + 12288),
    so on the tiny model the kohya file goes in without linear1 (checked exactly by the next test, and
    through diffusers' converter at FLUX.1's widths by the last one) and is compared with the peft form
    without the same four modules."""
    import numpy as np
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    pipe = _pipe()
    base = _images(pipe)
    pipe.load_lora_weights(trained.diffusers_path, adapter_name="peft")
    with_lora = _images(pipe)
    assert np.abs(with_lora - base).max() > 1e-3  # the LoRA changes the picture (same seed)
    pipe.unload_lora_weights()

    single_fused = ("single_transformer_blocks.0.attn.to_", "single_transformer_blocks.0.proj_mlp")
    peft = {k: v for k, v in load_file(trained.diffusers_path).items() if not any(s in k for s in single_fused)}
    with safe_open(trained.diffusers_path, framework="pt") as fh:  # keeps rank and alpha (diffusers' metadata)
        save_file(peft, tmp_path / "peft_part.safetensors", metadata=fh.metadata())
    pipe.load_lora_weights(str(tmp_path / "peft_part.safetensors"), adapter_name="peft_part")
    peft_part = _images(pipe)
    pipe.unload_lora_weights()
    kohya = {k: v for k, v in load_file(trained.lora_path).items() if "single_blocks_0_linear1" not in k}
    pipe.load_lora_weights(kohya, adapter_name="kohya")
    kohya_part = _images(pipe)
    assert np.abs(peft_part - base).max() > 1e-3
    assert np.abs(kohya_part - peft_part).max() < 1e-4


def test_kohya_flux_file_holds_exactly_the_trained_lora_fused_parts_included(trained):
    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    from models.flux_format import from_kohya_flux
    from models.sd_base import resolve_base

    transformer = FluxTransformer2DModel.from_pretrained(resolve_base("tiny-flux"), subfolder="transformer")
    shapes = {n: (m.out_features, m.in_features) for n, m in transformer.named_modules()
              if n.startswith(("transformer_blocks.", "single_transformer_blocks.")) and isinstance(m, torch.nn.Linear)}
    back = from_kohya_flux(load_file(trained.lora_path), shapes)
    peft = {k.removeprefix("transformer."): v for k, v in load_file(trained.diffusers_path).items()}
    assert set(back) == set(peft)
    for key, value in peft.items():
        # the same delta B @ A * scale: the scale (0.5) sits in A on the kohya side
        expected = value * 0.5 if "lora_A" in key else value
        assert torch.allclose(back[key], expected.float(), atol=1e-6), key


def test_timestep_sampling_choices_draw_the_documented_sigmas():
    import torch

    from models.flux_base import flow_pair, sample_sigmas

    def draw(kind, **kw):
        return sample_sigmas(kind, 20000, torch.Generator().manual_seed(0), **kw)

    uniform, sigmoid, shifted = draw("uniform"), draw("sigmoid"), draw("shift", shift=3.0)
    for s in (uniform, sigmoid, shifted, draw("logit_normal")):
        assert 0 < float(s.min()) and float(s.max()) < 1
    assert abs(float(uniform.mean()) - 0.5) < 0.01 and abs(float(uniform.std()) - 0.289) < 0.01
    assert abs(float(sigmoid.mean()) - 0.5) < 0.01 and float(sigmoid.std()) < 0.23  # bunched in the middle
    assert float(shifted.mean()) > 0.65  # shift 3 moves training towards noise
    x, noise = torch.ones(2, 16, 2, 2), torch.zeros(2, 16, 2, 2)
    noisy, target = flow_pair(x, noise, torch.tensor([0.25, 1.0]))
    assert torch.allclose(noisy[0], torch.full_like(x[0], 0.75)) and float(noisy[1].abs().max()) == 0
    assert torch.equal(target, noise - x)
    with pytest.raises(ValueError, match="timestep_sampling"):
        sample_sigmas("cosine", 4, torch.Generator())


def test_bad_flux_settings_name_the_field(tmp_path, package):
    from models.lora_settings import resolve_settings
    from models.lora_trainer import train_lora

    with pytest.raises(ValueError, match="timestep_sampling"):
        resolve_settings("demo", overrides={"base": "tiny-flux", "timestep_sampling": "cosine"})
    with pytest.raises(ValueError, match="flow_shift"):
        resolve_settings("demo", overrides={"base": "tiny-flux", "flow_shift": 0})
    with pytest.raises(ValueError, match="train_text_encoder"):
        train_lora(tiny_job(package, tmp_path, base="tiny-flux", train_text_encoder=True, max_steps=1))
    with pytest.raises(ValueError, match="target_modules"):
        train_lora(tiny_job(package, tmp_path / "b", base="tiny-flux", target_modules=["conv1"], max_steps=1))


def test_fast_and_final_profiles_on_a_flux_base_and_the_settings_flux_ignores():
    from models.lora_settings import FLUX_TARGETS, flux_ignored, resolve_settings

    fast = resolve_settings("fast", overrides={"base": "black-forest-labs/FLUX.1-dev"})
    assert (fast.rank, fast.alpha, fast.unet_lr, fast.lr_scheduler, fast.warmup_steps, fast.max_steps) == (
        32, 32, 1e-4, "constant_with_warmup", 100, 1500)
    assert (fast.resolution, fast.min_bucket_reso, fast.max_bucket_reso, fast.train_text_encoder) == (512, 256, 768, False)
    assert fast.target_modules == FLUX_TARGETS and fast.timestep_sampling == "sigmoid" and fast.guidance == 1.0
    final = resolve_settings("final", overrides={"base": "tiny-flux"})
    assert (final.rank, final.alpha, final.dropout, final.lr_scheduler, final.warmup_steps, final.max_steps) == (
        64, 64, 0.1, "cosine", 500, 2500)
    assert (final.resolution, final.min_bucket_reso, final.max_bucket_reso) == (768, 384, 1024)
    notes = flux_ignored(final)
    assert any("noise_offset=0.1" in n for n in notes) and any("min_snr_gamma=5.0" in n for n in notes)
    explicit = resolve_settings("fast", overrides={"base": "tiny-flux", "target_modules": ["to_q"]})
    assert explicit.target_modules == ["to_q"]  # the user's choice wins over the FLUX table
    sd = resolve_settings("fast")  # SD bases keep their settings
    assert sd.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]


def test_masked_loss_weights_the_packed_flux_loss(package, tmp_path):
    import torch

    from models.lora_trainer import _reset_accelerate, _run_class
    from models.sd_base import MODEL_WORK

    job = tiny_job(package, tmp_path, base="tiny-flux", max_steps=1)
    with MODEL_WORK:
        try:
            run = _run_class("tiny-flux")(job, None)
            latents = torch.stack(run.latents[:2])
            captions, geometry = run.captions[:2], run.geometry[:2]

            def loss(masks):
                return run._loss(latents, captions, geometry, train_te=False, gen=torch.Generator().manual_seed(1),
                                 masks=masks).item()

            plain = loss(None)
            assert loss(torch.ones(2, 1, *latents.shape[-2:])) == pytest.approx(plain, rel=1e-6)
            left = torch.zeros(2, 1, *latents.shape[-2:])
            left[..., : latents.shape[-1] // 2] = 2.0  # mean 1: only the left half counts
            right = 2.0 - left
            assert loss(left) != pytest.approx(plain, rel=1e-3)
            assert (loss(left) + loss(right)) / 2 == pytest.approx(plain, rel=1e-5)  # each value weighted where it is
            assert not run.text_encoders and not run.base.text_encoders  # T5 freed once captions are embedded
        finally:
            _reset_accelerate()


def test_a_stopped_flux_training_resumes_exactly(package, tmp_path):
    """Stopped after step 4 (checkpoint at 3), resumed: the same LoRA as the run that never stopped."""
    import torch
    from safetensors.torch import load_file

    from models.lora_trainer import train_lora

    settings = dict(base="tiny-flux", max_steps=6, save_every_steps=3, unet_lr=3e-3)
    whole = train_lora(tiny_job(package, tmp_path / "whole", **settings))

    class Stop(Exception):
        pass

    def stop(step, total, logs):
        if step == 4:
            raise Stop

    with pytest.raises(Stop):
        train_lora(tiny_job(package, tmp_path / "resumed", **settings), on_step=stop)
    resumed = train_lora(tiny_job(package, tmp_path / "resumed", **settings), resume=True)
    assert resumed.resumed_from == 3 and resumed.final_loss == whole.final_loss
    a, b = load_file(whole.lora_path), load_file(resumed.lora_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_single_file_flux_transformer_trains(package, tmp_path):
    """A tiny single-file transformer in BFL's names (written by inverting our converter) reads back
    exactly, detects as FLUX, and trains with the rest of the pipeline from train.base_config."""
    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file, save_file

    from models.flux_base import diffusers_to_bfl, is_flux, load_flux_base
    from models.lora_trainer import train_lora
    from models.sd_base import BaseModelMissing, resolve_base

    folder = resolve_base("tiny-flux")
    transformer = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    bfl = diffusers_to_bfl(transformer.state_dict(), dict(transformer.config))
    assert "double_blocks.0.img_attn.qkv.weight" in bfl and "single_blocks.0.linear1.weight" in bfl
    file = tmp_path / "flux-merge.safetensors"
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in bfl.items()}, file)
    assert is_flux(str(file)) and not is_flux(str(tmp_path / "missing.safetensors"))

    base = load_flux_base(str(file), config="tiny-flux")
    assert base.file == str(file) and base.unet.config.guidance_embeds
    loaded = base.unet.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in transformer.state_dict().items())
    with pytest.raises(BaseModelMissing, match="train.base_config"):
        load_flux_base(str(file), config=str(tmp_path / "no-such-folder"))

    outcome = train_lora(tiny_job(package, tmp_path / "out", base=str(file), base_config="tiny-flux", max_steps=2,
                                  save_every_steps=2))
    assert outcome.family == "flux" and outcome.steps == 2
    assert any(k.startswith("lora_unet_single_blocks_0_linear1") for k in load_file(outcome.lora_path))


def test_diffusers_kohya_converter_reads_our_fused_keys_at_flux1_widths():
    """At FLUX.1's real widths (3072, MLP 12288), which diffusers' kohya converter assumes, it splits our
    fused qkv and linear1 back into exactly the trained per-module LoRAs (alpha / rank kept)."""
    import torch
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    from models.flux_format import to_kohya_flux

    inner, mlp = 3072, 12288
    shapes = {f"transformer_blocks.0.{m}": (inner, inner) for m in (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
        "attn.add_v_proj", "attn.to_add_out")}
    shapes |= {"transformer_blocks.0.ff.net.0.proj": (mlp, inner), "transformer_blocks.0.ff.net.2": (inner, mlp)}
    shapes |= {f"single_transformer_blocks.0.{m}": (inner, inner) for m in ("attn.to_q", "attn.to_k", "attn.to_v")}
    shapes |= {"single_transformer_blocks.0.proj_mlp": (mlp, inner),
               "single_transformer_blocks.0.proj_out": (inner, inner + mlp)}
    gen = torch.Generator().manual_seed(0)
    peft = {}
    for name, (rows, cols) in shapes.items():
        peft[f"{name}.lora_A.weight"] = torch.randn(2, cols, generator=gen)
        peft[f"{name}.lora_B.weight"] = torch.randn(rows, 2, generator=gen)
    converted = _convert_kohya_flux_lora_to_diffusers(to_kohya_flux(peft, alpha=1.0, shapes=shapes))
    assert set(converted) == {f"transformer.{k}" for k in peft}
    for key, value in peft.items():  # scale alpha / rank = 0.5 folded into lora_A by the converter
        assert torch.allclose(converted[f"transformer.{key}"], value * 0.5 if "lora_A" in key else value), key


# ---- the learning check (models/lora_check.py) on a FLUX base --------------------------------

FLUX_LEARNING = dict(base="tiny-flux", max_steps=100, batch_size=2, rank=8, alpha=8, unet_lr=1e-2, save_every_steps=100)
FLUX_MIN_GAIN, FLUX_MIN_CAPTION_GAIN = 1.1, 1.01
"""What a working tiny-FLUX training reaches on held-out poses against empty captions (measured:
gain 1.18, caption gain 1.027) and a disabled LoRA cannot (gain 1.0 exactly, caption gain 0.997:
the base alone)."""


@pytest.fixture(scope="module")
def robo_flux(tmp_path_factory):
    """A tiny-FLUX LoRA of one arcade character (held-out poses under validation/), and its held-out images."""
    from models.lora_data import read_package
    from models.lora_trainer import train_lora
    from tests.lora_fixtures import make_renders

    package = tmp_path_factory.mktemp("robo-flux")
    make_renders(package, "robo", "zqrobo", "robot", repeats=3, seed=0, backdrop=(70, 110, 220))
    outcome = train_lora(tiny_job(package, tmp_path_factory.mktemp("robo-flux-out"), **FLUX_LEARNING))
    return outcome, read_package(package)[0][0].validation


def test_learning_check_passes_for_a_flux_training_and_fails_with_the_lora_disabled(robo_flux):
    from models.lora_check import learning_check

    outcome, heldout = robo_flux
    empty = [""] * len(heldout)
    on = learning_check("tiny-flux", outcome.lora_path, heldout, empty)
    assert on.velocity and on.passed(FLUX_MIN_GAIN, FLUX_MIN_CAPTION_GAIN), on.to_json()
    off = learning_check("tiny-flux", outcome.lora_path, heldout, empty, lora_scale=0.0)
    assert not off.passed(FLUX_MIN_GAIN, FLUX_MIN_CAPTION_GAIN), off.to_json()
    assert off.gain == pytest.approx(1.0) and off.loss_base == on.loss_base
    peft = learning_check("tiny-flux", outcome.diffusers_path, heldout, empty)  # the diffusers form: the same LoRA
    assert peft.loss_lora == pytest.approx(on.loss_lora, rel=1e-5)
    assert peft.loss_other == pytest.approx(on.loss_other, rel=1e-5)


# ---- the packaged AI-Toolkit job and the trainer ---------------------------------------------

def test_packaged_ai_toolkit_job_and_the_flux_trainer_agree(tmp_path):
    """Under profile package a FLUX base trains what the packaged AI-Toolkit job says (rank, alpha, LR,
    steps, resolution, schedule, timestep sampling), not the SD-oriented kohya TOML beside it; an SD
    base still trains the kohya TOML. Read as the train stage reads a character's configs."""
    import yaml

    from models.ai_toolkit_format import ai_toolkit_job, job_settings
    from models.lora_data import read_package
    from models.lora_settings import AI_TOOLKIT, read_kohya_config, resolve_settings

    make_character(tmp_path, "blob", "zqx")
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "blob_config.toml").write_text(
        "[additional_network_arguments]\nnetwork_dim = 32\nnetwork_alpha = 16\nunet_lr = 5e-4\n"
        "[training_arguments]\nmax_train_steps = 900\nlr_scheduler = \"cosine\"\nlr_warmup_steps = 50\n"
        "[dataset_arguments]\nresolution = 1024\nnoise_offset = 0.05\n")
    job = ai_toolkit_job("blob_flux_lora", "zqx", ["2_blob"], "train/blob/ai_toolkit", rank=12, steps=700, lr=2e-4,
                         base_model="black-forest-labs/FLUX.1-dev", resolution=[640], prompts=["zqx, standing"],
                         save_every=100, sample_every=100)
    (configs / "blob_ai_toolkit.yaml").write_text(yaml.safe_dump(job, sort_keys=False))

    character = read_package(tmp_path)[0][0]
    package = read_kohya_config(*character.config_files)
    assert package[AI_TOOLKIT] == job_settings(job)
    flux = resolve_settings("package", package, {"base": "tiny-flux"})
    process = job["config"]["process"][0]
    assert (flux.rank, flux.alpha) == (process["network"]["linear"], process["network"]["linear_alpha"]) == (12, 12)
    assert (flux.unet_lr, flux.max_steps, flux.resolution) == (process["train"]["lr"], process["train"]["steps"],
                                                               process["datasets"][0]["resolution"][0]) == (2e-4, 700, 640)
    assert (flux.lr_scheduler, flux.warmup_steps, flux.batch_size, flux.train_text_encoder) == ("constant", 0, 1, False)
    assert process["train"]["timestep_type"] == flux.timestep_sampling == "sigmoid"
    assert flux.caption_dropout_rate == process["datasets"][0]["caption_dropout_rate"] and flux.noise_offset == 0.0
    assert flux.min_bucket_reso <= flux.resolution <= flux.max_bucket_reso
    assert flux.sample_prompts == ["zqx, standing"] and flux.save_every_steps == 100
    explicit = resolve_settings("package", package, {"base": "tiny-flux", "max_steps": 5})
    assert explicit.max_steps == 5 and explicit.rank == 12  # the user's fields still win
    sd = resolve_settings("package", package, {"base": "tiny"})
    assert (sd.rank, sd.alpha, sd.unet_lr, sd.max_steps, sd.resolution) == (32, 16, 5e-4, 900, 1024)
    fast = resolve_settings("fast", package, {"base": "tiny-flux"})  # other profiles: the profile decides
    assert (fast.rank, fast.max_steps) == (32, 1500)


# ---- the CLI -----------------------------------------------------------------------------------

def test_cli_trains_a_flux_lora_in_kohya_flux_form_that_diffusers_loads(package, tmp_path):
    """`episode2lora train DIR --base tiny-flux --profile demo --output OUT` in a subprocess: kohya FLUX
    keys with an explicit .alpha per module, flux metadata, and FluxPipeline.load_lora_weights takes
    both forms (the kohya file without single_blocks linear1, whose widths diffusers' converter
    hard-codes at FLUX.1's: see test_both_forms_load_in_diffusers_and_give_the_same_images)."""
    import os

    import numpy as np
    from safetensors.torch import load_file

    from models.kohya_format import read_kohya
    from tests.conftest import ROOT, run_cli

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = run_cli(["train", str(package), "--base", "tiny-flux", "--profile", "demo", "--output", str(tmp_path / "out"),
                   "--runs-dir", str(tmp_path)], env, timeout=1800)  # a loaded machine: minutes to import
    assert out.returncode == 0, out.stderr[-2000:]
    lora = tmp_path / "out" / "blob" / "blob.safetensors"
    tensors, meta = read_kohya(lora)
    downs = [k.removesuffix(".lora_down.weight") for k in tensors if k.endswith(".lora_down.weight")]
    assert downs and all(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_")) for k in downs)
    assert all(f"{k}.alpha" in tensors and f"{k}.lora_up.weight" in tensors for k in downs)
    assert "flux" in meta["ss_base_model_version"] and meta["modelspec.architecture"].startswith("flux-1")
    assert meta["ss_network_dim"] == "4" and meta["ss_steps"] == "30"  # the demo profile on a FLUX base

    pipe = _pipe()
    base = _images(pipe)
    pipe.load_lora_weights(str(tmp_path / "out" / "blob" / "diffusers"), adapter_name="peft")
    assert np.abs(_images(pipe) - base).max() > 1e-4
    pipe.unload_lora_weights()
    kohya = {k: v for k, v in load_file(lora).items() if "single_blocks_0_linear1" not in k}
    pipe.load_lora_weights(kohya, adapter_name="kohya")
    assert np.abs(_images(pipe) - base).max() > 1e-4


# ---- benchmarks/gpu_check.py's FLUX.1-dev memory estimate ---------------------------------------

def test_flux_memory_estimate_counts_the_real_modules_and_gives_sane_figures(trained):
    """Parameter and LoRA counts from a config match the tiny transformer and its trained LoRA exactly;
    for FLUX.1-dev: 11.9 B parameters, and memory that moves the right way with each setting."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    from benchmarks.gpu_check import FLUX1_DEV_TRANSFORMER, flux_lora_memory, flux_transformer_params
    from models.sd_base import resolve_base

    tiny = FluxTransformer2DModel.from_pretrained(resolve_base("tiny-flux"), subfolder="transformer")
    assert sum(flux_transformer_params(dict(tiny.config))) == sum(p.numel() for p in tiny.parameters())
    lora = sum(v.numel() for v in load_file(trained.diffusers_path).values())  # rank 4 on FLUX_TARGETS
    assert flux_lora_memory(rank=4, cfg=dict(tiny.config))["lora_params_m"] * 1e6 == pytest.approx(lora)

    assert sum(flux_transformer_params(FLUX1_DEV_TRANSFORMER)) / 1e9 == pytest.approx(11.9, abs=0.05)
    bf16 = flux_lora_memory(1024, 32, base="bf16", checkpointing=False)
    ckpt = flux_lora_memory(1024, 32, base="bf16", checkpointing=True)
    eight = flux_lora_memory(1024, 32, base="8bit", checkpointing=True, optimizer="adamw8bit")
    assert 21 < bf16["weights"] < 23.5 and 10 < eight["weights"] < 12.5  # 11.9 B x 2 bytes, then mostly 1 byte
    assert bf16["training"] > 40 and 24 < ckpt["training"] < 32 and eight["training"] < 20
    assert ckpt["activations"] < bf16["activations"] / 8
    assert flux_lora_memory(512)["activations"] < flux_lora_memory(1024)["activations"]
    assert flux_lora_memory(rank=64)["lora_and_optimizer"] == pytest.approx(2 * flux_lora_memory(rank=32)["lora_and_optimizer"])
    assert all(v > 0 for v in bf16.values()) and eight["setup"] < bf16["setup"]
    with pytest.raises(ValueError, match="base"):
        flux_lora_memory(base="fp4")


def test_kohya_scripts_trainer_refuses_a_flux_base_with_the_way_out(package, tmp_path):
    from models.trainers import get_trainer

    (tmp_path / "train_network.py").write_text("")
    job = tiny_job(package, tmp_path / "out", base="tiny-flux", max_steps=1)
    with pytest.raises(ValueError, match="ai_toolkit.yaml"):
        get_trainer("kohya", scripts_dir=str(tmp_path)).train(job)
    assert not (tmp_path / "out").exists()


def test_the_pipelines_train_stage_trains_a_flux_lora_from_a_packaged_run(tmp_path):
    """The train stage (not only `episode2lora train`) on a FLUX base: kohya FLUX keys, flux metadata,
    the manifest and the versions registry say so."""
    from safetensors import safe_open

    from tasks.run.spec import run_stage
    from tasks.run.stage import StageResult
    from tasks.run.store import RunStore
    from tasks.run.versions import read_versions
    from tasks.train import TRAIN, TrainParams
    from tests.lora_fixtures import make_character
    from tests.stages import run_params

    store = RunStore(tmp_path, "flux")
    make_character(store.root / "package", "blob", "zqx", n_train=4, n_validation=0)
    params = run_params(train=TrainParams(profile="demo", base="tiny-flux", max_steps=4, sample_prompts=[]))
    result = run_stage(TRAIN, store, params, {"package": StageResult(stage="package", fingerprint="p")})
    row = store.read_manifest("train").to_pylist()[0]
    assert result.recomputed and row["steps"] == 4
    with safe_open(row["lora_path"] if row["lora_path"].startswith("/") else str(store.root / row["lora_path"]),
                   "pt") as lora:
        keys, meta = list(lora.keys()), lora.metadata()
    assert any(k.startswith("lora_unet_double_blocks_0_") for k in keys) and any(k.endswith(".alpha") for k in keys)
    assert "flux" in meta["ss_base_model_version"]
    assert [(v["base"], v["status"]) for v in read_versions(tmp_path).to_pylist()] == [("tiny-flux", "completed")]
