"""Base models for LoRA training: Stable Diffusion 1.5 and SDXL, by Hugging Face id, local
diffusers folder, or single `.safetensors` / `.ckpt` file (how most anime bases are published).

`load_base(name)` returns the parts a trainer needs (tokenizers, text encoders, UNet, VAE, noise
scheduler) and which family they are. A single file is read with diffusers' single-file loading;
its architecture (configs, tokenizers) comes from `config`, a diffusers folder or hub id of the
same family (default: the SD 1.5 / SDXL base id, which needs the hub or its cache). The noise
scheduler predicts `epsilon` or `v` (`prediction`: auto = the base's scheduler, or the `v_pred`
marker some v-prediction files carry), and v-prediction bases get a zero-terminal-SNR schedule
unless told otherwise. `tiny`, `tiny-sd15` and `tiny-sdxl` stand for tiny untrained models built
on first use (models/tiny_sd.py); they make the pipeline run on a CPU without downloads, and
produce no useful images.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Family = Literal["sd15", "sdxl", "flux"]
DEFAULT_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"
FAMILY_CONFIGS: dict[str, str] = {"sd15": DEFAULT_BASE, "sdxl": "stabilityai/stable-diffusion-xl-base-1.0"}
"""The architecture a single file of each family is read with when no `config` is given."""
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
PREDICTIONS = {"epsilon": "epsilon", "v": "v_prediction"}
MODEL_WORK = threading.RLock()
"""One model job (loading, a training, a gallery) per process at a time: model loading and LoRA
injection patch torch globally, accelerate keeps per-process state, and one GPU runs one job anyway."""


class BaseModelMissing(FileNotFoundError):
    """The base model is neither a local diffusers folder nor downloadable here."""


@dataclass
class LoadedBase:
    """The parts of a Stable Diffusion pipeline a LoRA trainer uses."""

    name: str
    path: str
    family: Family
    tokenizers: list[Any]
    text_encoders: list[Any]
    unet: Any
    vae: Any
    noise_scheduler: Any
    extra: dict[str, Any] = field(default_factory=dict)
    file: str | None = None          # the single file it was read from (hashed into the LoRA's metadata)

    @property
    def v_prediction(self) -> bool:
        return self.noise_scheduler.config.prediction_type == "v_prediction"

    @property
    def zero_terminal_snr(self) -> bool:
        return bool(self.noise_scheduler.config.get("rescale_betas_zero_snr", False))

    def pipeline(self, scheduler: Any | None = None):
        """A diffusers pipeline over these very modules (no copy), for samples and evaluation."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        sched = scheduler or self.noise_scheduler
        if self.family == "sdxl":
            return StableDiffusionXLPipeline(
                vae=self.vae, text_encoder=self.text_encoders[0], text_encoder_2=self.text_encoders[1],
                tokenizer=self.tokenizers[0], tokenizer_2=self.tokenizers[1], unet=self.unet, scheduler=sched,
            )
        return StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoders[0], tokenizer=self.tokenizers[0], unet=self.unet,
            scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )


def resolve_base(name: str) -> str:
    """A local folder for tiny names, else the name itself (a local folder or a hub id)."""
    from models.tiny_flux import TINY_FLUX_BASES, ensure_tiny_flux
    from models.tiny_sd import TINY_BASES, ensure_tiny_base

    if name in TINY_FLUX_BASES:
        return str(ensure_tiny_flux(name))
    if name in TINY_BASES:
        return str(ensure_tiny_base(name))
    return name


def is_tiny(name: str) -> bool:
    from models.tiny_flux import TINY_FLUX_BASES
    from models.tiny_sd import TINY_BASES

    return name in TINY_BASES or name in TINY_FLUX_BASES or (Path(name) / "README.md").is_file() and "Tiny randomly-initialised" in (
        Path(name) / "README.md").read_text(errors="ignore")


def is_single_file(name: str) -> bool:
    """True for a `.safetensors` / `.ckpt` path (existing or not: a missing one is reported as such)."""
    return Path(name).suffix.lower() in SINGLE_FILE_SUFFIXES


def _file_keys(path: Path) -> list[str]:
    """Tensor names of a checkpoint file (without reading the tensors of a .safetensors)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            return list(fh.keys())
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    return list(state.get("state_dict", state).keys())


def inspect_file(path: str | Path) -> tuple[Family, bool]:
    """(family, has a v_pred marker) of a single-file checkpoint, from its tensor names.

    SDXL files keep their text encoders under `conditioner.embedders.`; SD 1.x files under
    `cond_stage_model.`. v-prediction anime bases mark themselves with a `v_pred` tensor.
    """
    path = Path(path)
    if not path.is_file():
        raise BaseModelMissing(f"base model file not found: {path} (train.base)")
    try:
        keys = _file_keys(path)
    except Exception as exc:  # safetensors / torch raise several kinds for a damaged file
        raise BaseModelMissing(f"base model file {path} is not a readable checkpoint "
                               f"({type(exc).__name__}: {str(exc)[:200]})") from None
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        raise BaseModelMissing(f"base model file {path} has no Stable Diffusion UNet (model.diffusion_model.*): "
                               "train.base must be a full SD 1.5 / SDXL checkpoint, not a LoRA or a VAE")
    family: Family = "sdxl" if any(k.startswith("conditioner.embedders.") for k in keys) else "sd15"
    return family, "v_pred" in keys


def detect_family(path: str) -> Family:
    """`sdxl` when the pipeline has a second text encoder, else `sd15`."""
    if is_single_file(path):
        return inspect_file(path)[0]
    index = Path(path) / "model_index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        if str(data.get("_class_name", "")).startswith("Flux"):
            raise ValueError(f"base model '{path}' is a FLUX.1 pipeline: the LoRA trainer reads it "
                             "(models/flux_base.py); this Stable Diffusion loader does not")
        return "sdxl" if "text_encoder_2" in data else "sd15"
    from huggingface_hub import hf_hub_download

    try:
        data = json.loads(Path(hf_hub_download(path, "model_index.json")).read_text())
    except Exception as exc:
        raise BaseModelMissing(_missing_message(path, exc)) from None
    return "sdxl" if "text_encoder_2" in data else "sd15"


def _missing_message(name: str, exc: BaseException) -> str:
    from models.local_paths import missing_path

    if missing := missing_path(name, "base model"):
        return (f"{missing}; pass an existing diffusers folder (with model_index.json) or .safetensors file, "
                "a Hugging Face id, or base 'tiny' for an untrained stand-in that only exercises the code")
    return (f"base model '{name}' is not a local diffusers folder (with model_index.json) and could not be "
            f"fetched from the Hugging Face hub ({type(exc).__name__}: {str(exc)[:200]}). Pass a local folder "
            "(e.g. --base /models/sd15 or train.base=...), allow downloads (unset HF_HUB_OFFLINE), "
            "or use base 'tiny' for an untrained stand-in that only exercises the code")


def load_base(name: str, *, dtype: Any = None, device: Any = "cpu", config: str | None = None,
              prediction: str = "auto", zero_terminal_snr: bool | None = None) -> LoadedBase:
    """Load tokenizers, text encoders, UNet, VAE and the DDPM noise scheduler of a SD1.5/SDXL base.

    Args:
        name: hub id, diffusers folder, single .safetensors/.ckpt file, or a tiny name.
        config: for a single file, the diffusers folder / hub id giving its architecture.
        prediction: auto, epsilon or v; zero_terminal_snr: None = on for v-prediction.
    Raises BaseModelMissing with what to do when the model is not available.
    """
    import torch

    if prediction not in ("auto", *PREDICTIONS):
        raise ValueError(f"prediction must be auto, epsilon or v, got {prediction!r}")
    with MODEL_WORK:
        path = resolve_base(name)
        if is_single_file(path):
            family, marked_v = inspect_file(path)
            base = _load_file(name, path, family, dtype or torch.float32, device, config)
        else:
            family, marked_v = detect_family(path), False
            base = _load(name, path, family, dtype or torch.float32, device)
        base.noise_scheduler = _noise_scheduler(base.noise_scheduler.config, prediction, marked_v, zero_terminal_snr)
        return base


def _noise_scheduler(config: Any, prediction: str, marked_v: bool, zero_terminal_snr: bool | None) -> Any:
    """The DDPM training scheduler with the prediction type and terminal-SNR rescaling asked for."""
    from diffusers import DDPMScheduler

    if prediction == "auto":
        kind = "v_prediction" if marked_v else config.get("prediction_type", "epsilon")
    else:
        kind = PREDICTIONS[prediction]
    ztsnr = kind == "v_prediction" if zero_terminal_snr is None else zero_terminal_snr
    return DDPMScheduler.from_config(config, prediction_type=kind, rescale_betas_zero_snr=ztsnr)


def _load_file(name: str, path: str, family: Family, dtype: Any, device: Any, config: str | None) -> LoadedBase:
    """A single-file checkpoint through diffusers' `from_single_file`, read with a local architecture."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    arch = resolve_base(config) if config else FAMILY_CONFIGS[family]
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    kwargs = {"original_config": arch} if arch.lower().endswith((".yaml", ".yml")) else {"config": arch}
    try:
        pipe = cls.from_single_file(path, torch_dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:  # hub / offline errors are OSErrors
        raise BaseModelMissing(
            f"single-file base '{name}' ({family}) needs the configs and tokenizers of its architecture, read from "
            f"'{arch}', which is not a local diffusers folder of that family and could not be fetched "
            f"({type(exc).__name__}: {str(exc)[:200]}). Set train.base_config to a local diffusers folder of a "
            f"{'SDXL' if family == 'sdxl' else 'SD 1.5'} pipeline (any one: only its configs and tokenizers are used), "
            "or allow downloads (unset HF_HUB_OFFLINE)") from None
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if family == "sdxl" else [])
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    for module in (*encoders, pipe.unet, pipe.vae):
        module.requires_grad_(False)
        module.to(device)
    return LoadedBase(name=name, path=path, family=family, tokenizers=tokenizers, text_encoders=encoders,
                     unet=pipe.unet, vae=pipe.vae, noise_scheduler=pipe.scheduler, file=path)


def _load(name: str, path: str, family: Family, dtype: Any, device: Any) -> LoadedBase:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    try:
        tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")]
        encoders = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype)]
        if family == "sdxl":
            tokenizers.append(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2"))
            encoders.append(CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", dtype=dtype))
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype)
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    except OSError as exc:
        raise BaseModelMissing(_missing_message(name, exc)) from None
    for module in (*encoders, unet, vae):
        module.requires_grad_(False)
        module.to(device)
    return LoadedBase(name=name, path=path, family=family, tokenizers=tokenizers, text_encoders=encoders,
                     unet=unet, vae=vae, noise_scheduler=scheduler)
