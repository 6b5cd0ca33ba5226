"""The settings of one LoRA training, the profiles, and how a kohya TOML maps onto them.

Resolution order (later wins): `TrainSettings` defaults < the profile < the kohya config of the
package (profile `package` only) < fields set explicitly by the user. The base model is always
the run's choice (a kohya config's pretrained_model_name_or_path is not used). Profiles `fast` and `final`
carry the values of the FLUX identity-LoRA guide's tables; `demo` is sized for the tiny CPU
stand-in model; `package` trains with each character's `configs/<name>_config.toml`.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from models.sd_base import DEFAULT_BASE

Scheduler = Literal["constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear"]
Precision = Literal["auto", "no", "fp16", "bf16"]
Optimizer = Literal["auto", "adamw", "adamw8bit"]
Prediction = Literal["auto", "epsilon", "v"]
MaskedLoss = Literal["auto", "on", "off"]
CAPTION_FIELDS = ("shuffle_caption", "keep_tokens", "caption_dropout_rate", "caption_tag_dropout_rate")
"""How captions vary: read from the package's dataset TOML whatever the profile (captions as packaged)."""


class TrainSettings(BaseModel):
    """Everything that decides one LoRA training (a field per knob; checked up front)."""

    model_config = ConfigDict(extra="forbid")

    base: str = Field(DEFAULT_BASE, description="base model: Hugging Face id, local diffusers folder, single "
                      ".safetensors/.ckpt file, or tiny / tiny-sdxl (untrained stand-ins)")
    base_config: Optional[str] = Field(None, description="for a single-file base: a diffusers folder (or hub id) of the "
                                       "same architecture whose configs and tokenizers it uses (default: the SD 1.5 / "
                                       "SDXL base id, which needs the hub once)")
    prediction: Prediction = Field("auto", description="what the UNet predicts: auto (the base's scheduler, or the "
                                   "file's v_pred marker), epsilon, or v (v-prediction)")
    zero_terminal_snr: Optional[bool] = Field(None, description="rescale the noise schedule to zero terminal SNR "
                                              "(None: on for v-prediction, off for epsilon)")
    resolution: int = Field(512, ge=64, description="training resolution (bucket area = resolution²)")
    min_bucket_reso: int = Field(256, ge=64, description="smallest bucket side")
    max_bucket_reso: int = Field(768, ge=64, description="largest bucket side")
    bucket_step: int = Field(64, ge=8, description="bucket sides are multiples of this")
    max_steps: Optional[int] = Field(1500, ge=1, description="optimizer steps (None: epochs decide)")
    epochs: Optional[int] = Field(None, ge=1, description="passes over the repeated dataset when max_steps is None")
    batch_size: int = Field(1, ge=1, description="images per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    rank: int = Field(32, ge=1, description="LoRA rank (kohya network_dim)")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha (kohya network_alpha); scale = alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout")
    target_modules: list[str] = Field(["to_q", "to_k", "to_v", "to_out.0"], description="UNet modules that get LoRA layers")
    unet_lr: float = Field(1e-4, gt=0, description="UNet LoRA learning rate")
    train_text_encoder: bool = Field(False, description="train LoRA layers on the text encoder(s) too")
    text_encoder_lr: Optional[float] = Field(None, gt=0, description="text-encoder LR (None: 0.4 x unet_lr)")
    text_encoder_fraction: float = Field(1.0, gt=0, le=1, description="two-phase: train the TE for this fraction of the steps, then freeze it")
    lr_scheduler: Scheduler = Field("constant_with_warmup", description="learning-rate schedule")
    warmup_steps: int = Field(100, ge=0, description="linear warm-up steps")
    lr_cycles: int = Field(1, ge=1, description="restarts of cosine_with_restarts")
    noise_offset: float = Field(0.05, ge=0, description="noise offset (per-channel constant added to the noise)")
    min_snr_gamma: Optional[float] = Field(None, gt=0, description="min-SNR loss weighting gamma (None: off)")
    caption_dropout_rate: float = Field(0.0, ge=0, le=1, description="share of steps trained with an empty caption")
    caption_tag_dropout_rate: float = Field(0.0, ge=0, le=1, description="each tag after keep_tokens is dropped with this probability")
    shuffle_caption: bool = Field(False, description="shuffle the comma-separated tags after the first keep_tokens")
    keep_tokens: int = Field(0, ge=0, description="leading tags never shuffled or dropped (the trigger word)")
    optimizer: Optimizer = Field("auto", description="adamw, adamw8bit (bitsandbytes + GPU), auto = 8-bit when possible")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping (0: off)")
    mixed_precision: Precision = Field("auto", description="auto = bf16 on a GPU that has it, fp16 on other GPUs, no on CPU")
    gradient_checkpointing: bool = Field(True, description="trade compute for memory (ignored on CPU)")
    cache_latents: bool = Field(True, description="encode images once and keep latents on disk")
    seed: int = Field(42, description="seed of data order, noise and timesteps")
    save_every_steps: int = Field(250, ge=1, description="checkpoint every N steps")
    keep_last: int = Field(3, ge=1, description="keep the last K checkpoints")
    sample_every_steps: int = Field(0, ge=0, description="sample images every N steps (0: at checkpoints only)")
    sample_prompts: list[str] = Field(["{trigger}, standing, full body, simple background",
                                       "{trigger}, close-up portrait, smiling"],
                                      description="prompts of the samples; {trigger} becomes the trigger word")
    sample_steps: int = Field(20, ge=1, description="inference steps of samples")
    validate_every_steps: int = Field(0, ge=0, description="validation loss every N steps (0: at checkpoints)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when present")
    masked_loss: MaskedLoss = Field("auto", description="weight the loss by each image's alpha mask (the character): "
                                    "auto = on when the training images carry alpha, on, off")
    mask_floor: float = Field(0.0, ge=0, lt=1, description="masked loss weight of background pixels (alpha 0), "
                              "0 = the background is not learnt at all")
    timestep_sampling: Literal["sigmoid", "shift", "uniform", "logit_normal"] = Field(
        "sigmoid", description="FLUX only: how training noise levels are drawn (flow matching)")
    flow_shift: float = Field(3.0, gt=0, description="FLUX only: sigma shift of timestep_sampling 'shift'")
    guidance: float = Field(1.0, ge=0, description="FLUX.1-dev only: the guidance embedding's value while training")
    init_lora: Optional[str] = Field(None, description="start from this LoRA file (kohya format, same rank) instead of "
                                     "fresh layers: fine-tuning, e.g. a detail stage after a core LoRA")

    @model_validator(mode="after")
    def _check(self) -> "TrainSettings":
        if self.max_steps is None and self.epochs is None:
            raise ValueError("one of max_steps or epochs must be set, got neither")
        if self.min_bucket_reso > self.max_bucket_reso:
            raise ValueError(f"min_bucket_reso ({self.min_bucket_reso}) must be <= max_bucket_reso ({self.max_bucket_reso})")
        if self.resolution % self.bucket_step:
            raise ValueError(f"resolution must be a multiple of bucket_step ({self.bucket_step}), got {self.resolution}")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module, got []")
        return self

    @property
    def te_lr(self) -> float:
        return self.text_encoder_lr if self.text_encoder_lr is not None else 0.4 * self.unet_lr


PROFILES: dict[str, dict[str, Any]] = {
    # FLUX guide, "Fast Iteration Profile": validate the dataset, detect early issues.
    "fast": dict(resolution=512, max_steps=1500, rank=32, alpha=32, unet_lr=1e-4, lr_scheduler="constant_with_warmup",
                 warmup_steps=100, noise_offset=0.05, min_bucket_reso=256, max_bucket_reso=768,
                 train_text_encoder=False, dropout=0.0, min_snr_gamma=None),
    # FLUX guide, "Final/Production Profile".
    "final": dict(resolution=768, max_steps=2500, rank=64, alpha=64, dropout=0.1, unet_lr=1e-4, lr_scheduler="cosine",
                  warmup_steps=500, noise_offset=0.1, min_snr_gamma=5.0, min_bucket_reso=384, max_bucket_reso=1024,
                  train_text_encoder=False),
    # The package's own kohya configs decide (fast profile for what they leave out).
    "package": {},
    # Sized for the tiny untrained stand-in on a CPU: proves the path, learns nothing useful.
    "demo": dict(resolution=64, max_steps=30, rank=4, alpha=4, unet_lr=1e-3, lr_scheduler="constant", warmup_steps=0,
                 noise_offset=0.0, min_bucket_reso=64, max_bucket_reso=128, save_every_steps=10, keep_last=3,
                 sample_steps=4, gradient_checkpointing=False),
}
Profile = Literal["fast", "final", "package", "demo"]

FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out"]
"""FLUX.1: attention and MLP projections of the double and single blocks (kohya's lora_flux default set)."""
FLUX_PROFILES: dict[str, dict[str, Any]] = {
    # On a FLUX base the guide's tables hold as they are (rank/alpha, LR, schedule, warm-up, steps, buckets,
    # text encoder frozen); added here is what a FLUX.1 LoRA needs and SD has no word for.
    "fast": dict(target_modules=FLUX_TARGETS, timestep_sampling="sigmoid", guidance=1.0),
    "final": dict(target_modules=FLUX_TARGETS, timestep_sampling="sigmoid", guidance=1.0),
    "package": dict(target_modules=FLUX_TARGETS),
    "demo": dict(target_modules=FLUX_TARGETS, timestep_sampling="sigmoid"),
}
"""What a FLUX base adds to each profile (after the profile, before explicit fields)."""


def flux_ignored(settings: "TrainSettings") -> list[str]:
    """Settings of a FLUX training that flow matching has no use for, each with why (said, not dropped)."""
    notes = []
    if settings.noise_offset:
        notes.append(f"noise_offset={settings.noise_offset} is ignored on FLUX (flow matching has no offset noise)")
    if settings.min_snr_gamma:
        notes.append(f"min_snr_gamma={settings.min_snr_gamma} is ignored on FLUX (no DDPM SNR in flow matching)")
    if settings.zero_terminal_snr:
        notes.append("zero_terminal_snr is ignored on FLUX (flow matching reaches pure noise at sigma 1)")
    if settings.prediction != "auto":
        notes.append(f"prediction={settings.prediction} is ignored on FLUX (it predicts the velocity noise - x)")
    return notes

# kohya train_network.py / dataset-config keys -> TrainSettings fields
KOHYA_KEYS: dict[str, str] = {
    "resolution": "resolution", "min_bucket_reso": "min_bucket_reso",
    "max_bucket_reso": "max_bucket_reso", "bucket_reso_steps": "bucket_step", "max_train_steps": "max_steps",
    "max_train_epochs": "epochs", "train_batch_size": "batch_size", "batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "network_dim": "rank", "network_alpha": "alpha",
    "network_dropout": "dropout", "unet_lr": "unet_lr", "learning_rate": "unet_lr",
    "text_encoder_lr": "text_encoder_lr", "lr_scheduler": "lr_scheduler", "lr_warmup_steps": "warmup_steps",
    "lr_scheduler_num_cycles": "lr_cycles", "noise_offset": "noise_offset", "min_snr_gamma": "min_snr_gamma",
    "caption_dropout_rate": "caption_dropout_rate", "mixed_precision": "mixed_precision",
    "caption_tag_dropout_rate": "caption_tag_dropout_rate", "shuffle_caption": "shuffle_caption",
    "keep_tokens": "keep_tokens", "zero_terminal_snr": "zero_terminal_snr",
    "gradient_checkpointing": "gradient_checkpointing", "seed": "seed", "save_every_n_steps": "save_every_steps",
    "max_grad_norm": "max_grad_norm", "cache_latents": "cache_latents", "cache_latents_to_disk": "cache_latents",
}


def _resolution(value: Any) -> int:
    """kohya writes resolution as 512, "512", "512,512" or [512, 512]; we train square areas."""
    if isinstance(value, (list, tuple)):
        return int(max(value))
    return int(max(int(v) for v in str(value).split(",")))


def from_kohya(config: dict[str, Any]) -> dict[str, Any]:
    """TrainSettings fields from a kohya config (train_network keys, or a dataset TOML's)."""
    out: dict[str, Any] = {}
    flat = {k: v for k, v in config.items() if not isinstance(v, dict)}
    for section in (v for v in config.values() if isinstance(v, dict)):  # kohya merges all sections
        flat.update(section)
    for dataset in flat.pop("datasets", []) or []:
        flat.update({k: v for k, v in dataset.items() if not isinstance(v, (list, dict))})
    for key, value in flat.items():
        if key in KOHYA_KEYS and value is not None:
            out[KOHYA_KEYS[key]] = _resolution(value) if key == "resolution" else value
    if "network_train_unet_only" in flat:
        out["train_text_encoder"] = not bool(flat["network_train_unet_only"])
    if "masked_loss" in flat:  # kohya's --masked_loss flag
        out["masked_loss"] = "on" if flat["masked_loss"] else "auto"
    if "v_parameterization" in flat:
        out["prediction"] = "v" if flat["v_parameterization"] else "epsilon"
    if str(flat.get("optimizer_type", "")).lower() in ("adamw8bit", "adamw"):
        out["optimizer"] = str(flat["optimizer_type"]).lower()
    if out.get("lr_scheduler") not in (None, *Scheduler.__args__):
        out.pop("lr_scheduler")
    if out.get("mixed_precision") not in (None, *Precision.__args__):
        out.pop("mixed_precision")
    if "epochs" in out and "max_steps" not in out:
        out["max_steps"] = None  # kohya: epochs decide unless max_train_steps is given
    return out


AI_TOOLKIT = "ai_toolkit_job"
"""Key of `read_kohya_config`'s result holding the TrainSettings fields of the AI-Toolkit FLUX job
packaged beside the TOMLs (`configs/<name>_ai_toolkit.yaml`): a FLUX base trains those under profile package."""


def _ai_toolkit_beside(paths: tuple[Path, ...]) -> Path | None:
    """`configs/<name>_ai_toolkit.yaml` beside a `<name>_config.toml` / `<name>_dataset.toml` of `paths`."""
    for path in (Path(p) for p in paths if p is not None):
        for suffix in ("_config.toml", "_dataset.toml"):
            if path.name.endswith(suffix):
                job = path.with_name(path.name[: -len(suffix)] + "_ai_toolkit.yaml")
                if job.is_file():
                    return job
    return None


def read_kohya_config(*paths: Path) -> dict[str, Any]:
    """TrainSettings fields from kohya TOML files (missing files are skipped; later files win), and under
    AI_TOOLKIT those of the AI-Toolkit job packaged beside them, if there is one."""
    out: dict[str, Any] = {}
    for path in paths:
        if path is not None and Path(path).is_file():
            out.update(from_kohya(tomllib.loads(Path(path).read_text())))
    job = _ai_toolkit_beside(paths)
    if job is not None:
        from models.ai_toolkit_format import job_settings, read_job

        out[AI_TOOLKIT] = job_settings(read_job(job))
    return out


def _optional(model: type[BaseModel], name: str) -> type[BaseModel]:
    """A model with every field of `model` (same checks), optional and None by default (None = not set)."""
    fields = {k: (Optional[Annotated[f.annotation, *f.metadata] if f.metadata else f.annotation],
                  Field(None, description=f.description)) for k, f in model.model_fields.items()}
    return create_model(name, __config__=ConfigDict(extra="forbid"), **fields)


SettingsOverrides = _optional(TrainSettings, "SettingsOverrides")


def _is_flux(base: str) -> bool:
    from models.flux_base import is_flux

    return is_flux(base)


def resolve_settings(profile: str, package_config: dict[str, Any] | None = None,
                     overrides: dict[str, Any] | None = None) -> TrainSettings:
    """Defaults < profile < package kohya config < explicit overrides.

    The package config counts whole under profile `package` (on a FLUX base: the AI-Toolkit job
    packaged beside it, when `read_kohya_config` found one); under other profiles only its
    caption handling (CAPTION_FIELDS: shuffle, keep_tokens, dropout) counts, since it describes
    how the packaged captions are meant to be read.
    """
    if profile not in PROFILES:
        raise KeyError(f"unknown profile '{profile}'; known profiles: {', '.join(PROFILES)}")
    explicit = {k: v for k, v in (overrides or {}).items() if v is not None}
    base = str(explicit.get("base", DEFAULT_BASE))
    flux = base != DEFAULT_BASE and _is_flux(base)
    package_config = dict(package_config or {})
    job = package_config.pop(AI_TOOLKIT, None)
    data: dict[str, Any] = dict(PROFILES["fast"] if profile == "package" else PROFILES[profile])
    if profile == "package":  # a FLUX base trains the packaged AI-Toolkit job when there is one
        data.update(job if flux and job is not None else package_config)
    else:
        data.update({k: v for k, v in package_config.items() if k in CAPTION_FIELDS})
    if "epochs" in explicit and "max_steps" not in explicit:
        data["max_steps"] = None  # asking for epochs means epochs decide the length
    if flux:
        data.update(FLUX_PROFILES[profile])
    data.update(explicit)
    try:
        return TrainSettings.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}"
                             + (f" (got {e['input']!r})" if e["loc"] else "") for e in exc.errors())
        raise ValueError(f"invalid training settings (profile {profile}): {problems}") from None
