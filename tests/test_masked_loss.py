"""Masked loss (issue 24): the character mask, carried as the training images' alpha, weights the
loss at the latent grid. With a local model, new scenery behind the character barely changes the
gradient or the LoRA trained by the trainer's step loop (asserted, ratio printed); the untrained
tiny stand-in carries the scenery into every latent and prediction, so there the end-to-end ratio
is only measured and printed (why: the stand-in test's docstring)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from tests.lora_fixtures import POSES, tiny_job


def make_masked_character(package: Path, *, scenery_seed: int, n_train: int = 6, n_validation: int = 2,
                          size: int = 64) -> None:
    """`2_blob/` + `validation/blob/`: RGBA images (a red figure over a noisy scene, alpha = the
    figure's mask dilated by 2 px and feathered) and a dataset TOML whose subset sets alpha_mask.
    The figures depend only on the image index; the scenery (alpha 0) only on `scenery_seed`."""
    figures = np.random.default_rng(0)
    scenery = np.random.default_rng(scenery_seed)
    train, validation = package / "2_blob", package / "validation" / "blob"
    for folder in (train, validation, package / "configs"):
        folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_train + n_validation):
        cx, cy = (int(v) for v in figures.integers(size // 3, 2 * size // 3, 2))
        r = int(figures.integers(size // 7, size // 4))
        figure = Image.new("L", (size, size), 0)
        ImageDraw.Draw(figure).ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        alpha = np.asarray(figure.filter(ImageFilter.MaxFilter(5)).filter(ImageFilter.GaussianBlur(1)))
        picture = scenery.integers(0, 256, (size, size, 3)).astype(np.uint8)  # the scene behind
        inside = alpha > 0
        picture[inside] = np.asarray(figures.integers(0, 256, (size, size, 3)), np.uint8)[inside] // 4 + 150
        picture[np.asarray(figure) > 0] = (220, 40, 40)
        folder = train if i < n_train else validation
        Image.fromarray(np.dstack([picture, alpha]), "RGBA").save(folder / f"img{i:03d}.png")
        (folder / f"img{i:03d}.txt").write_text(f"zqx, round creature, {POSES[i % len(POSES)]}, outdoors")
    (package / "configs" / "blob_dataset.toml").write_text(
        '[general]\ncaption_extension = ".txt"\n\n[[datasets]]\nresolution = 64\n\n  [[datasets.subsets]]\n'
        '  image_dir = "2_blob"\n  num_repeats = 2\n  alpha_mask = true\n')


def _train(package: Path, out: Path, masked_loss: str):
    from models.lora_trainer import train_lora

    job = tiny_job(package, out, max_steps=12, unet_lr=3e-3, rank=4, alpha=4, save_every_steps=12,
                   masked_loss=masked_loss, cache_latents=False)
    return train_lora(job)


def _delta_weights(lora_path: str) -> dict[str, torch.Tensor]:
    """Each module's learnt weight change (lora_up @ lora_down), from the kohya file."""
    from models.kohya_format import read_kohya

    tensors, _ = read_kohya(Path(lora_path))
    return {k[: -len(".lora_up.weight")]: tensors[k].float() @ tensors[k.replace("lora_up", "lora_down")].float()
            for k in tensors if k.endswith(".lora_up.weight")}


def _distance(a: dict, b: dict) -> float:
    return float(torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a)))


def test_latent_mask_is_the_alpha_area_averaged_to_the_latent_grid_and_mean_normalised():
    from models.lora_data import latent_mask

    alpha = torch.zeros(64, 64)
    alpha[:, :32] = 1.0                      # left half: the character
    alpha[:, 32:36] = 0.5                    # a feathered edge, half a latent cell wide
    weights = latent_mask(alpha, (8, 8))
    assert weights.shape == (1, 8, 8)
    cells = torch.tensor([1.0, 1, 1, 1, 0.25, 0, 0, 0])  # area averages of the 8-pixel columns
    assert torch.allclose(weights[0], (cells / cells.mean()).expand(8, 8))
    assert weights.mean() == pytest.approx(1.0)
    floored = latent_mask(alpha, (8, 8), floor=0.1)[0, 0]
    assert floored[7] / floored[0] == pytest.approx(0.1) and floored.mean() == pytest.approx(1.0)
    assert torch.count_nonzero(latent_mask(torch.zeros(64, 64), (8, 8))) == 0  # no character: nothing learnt


def test_load_mask_follows_the_image_resize_and_crop(tmp_path):
    from models.lora_data import has_alpha, load_mask

    alpha = np.zeros((40, 80), np.uint8)
    alpha[:, :40] = 255                      # left half of a 2:1 image
    Image.fromarray(np.dstack([np.zeros((40, 80, 3), np.uint8), alpha]), "RGBA").save(tmp_path / "a.png")
    mask = load_mask(tmp_path / "a.png", (64, 64))  # covers 128x64, centre crop keeps x 32..96
    assert mask.shape == (64, 64) and has_alpha(tmp_path / "a.png")
    assert mask[:, :28].min() == 1.0 and mask[:, 36:].max() == 0.0
    Image.new("RGB", (16, 16)).save(tmp_path / "b.png")
    assert not has_alpha(tmp_path / "b.png") and load_mask(tmp_path / "b.png", (8, 8)).eq(1).all()


def test_masked_loss_keeps_the_scenery_out_of_the_gradient_of_a_local_model(tmp_path):
    """The trainer's own path (alpha -> latent-grid mask -> weighted loss -> gradient), with a local
    encoder (4x4 area pooling) and a local denoiser (1x1 convolutions) in place of the stand-in's
    VAE and UNet: with masked loss, scenery under alpha 0 barely reaches the gradient; without, it does."""
    for name, seed in (("a", 1), ("b", 2)):
        make_masked_character(tmp_path / name, scenery_seed=seed)
    grads = {(name, mode): _local_gradient(tmp_path / name, tmp_path / f"out-{name}-{mode}", mode)
             for name in ("a", "b") for mode in ("on", "off")}
    masked = float((grads["a", "on"] - grads["b", "on"]).norm() / grads["a", "on"].norm())
    unmasked = float((grads["a", "off"] - grads["b", "off"]).norm() / grads["a", "off"].norm())
    print(f"\nlocal model, gradient change from new scenery: masked {masked:.4f}, unmasked {unmasked:.4f}, "
          f"ratio {masked / unmasked:.3f}")
    assert masked < 0.2 * unmasked, (masked, unmasked)  # what is left: latent cells the mask edge only partly covers


def test_masked_lora_trained_on_a_local_model_barely_changes_with_new_scenery(tmp_path):
    """The issue's measurement: LoRAs trained by the trainer's step loop (`_Run._loop`: repeats,
    seeded noise and timesteps, each image's latent-grid mask, the loss, clipping, AdamW; 12 steps,
    same seed) on scenery a and on scenery b, masked and unmasked; the ratio of the two LoRA
    weight differences is printed and asserted. The model is local (area-pooling encoder, a
    per-position denoiser carrying the LoRA): the tiny stand-in cannot show it (see the next test).
    A rerun on the same images gives the same LoRA, so the differences are not run-to-run noise."""
    for name, seed in (("a", 1), ("b", 2), ("a-again", 1)):
        make_masked_character(tmp_path / name, scenery_seed=seed)
    deltas = {(name, mode): _local_lora(tmp_path / name, tmp_path / f"out-{name}-{mode}", mode)
              for name in ("a", "b", "a-again") for mode in ("on", "off")}
    masked = _distance(deltas["a", "on"], deltas["b", "on"])
    unmasked = _distance(deltas["a", "off"], deltas["b", "off"])
    print(f"\nlocal model, LoRA weight change from new scenery (trainer's step loop, 12 steps): masked {masked:.4g}, "
          f"unmasked {unmasked:.4g}, ratio {masked / unmasked:.3f}")
    assert _distance(deltas["a", "on"], deltas["a-again", "on"]) == 0.0  # same seed, same images: same LoRA
    assert _distance(deltas["a", "off"], deltas["a-again", "off"]) == 0.0
    assert masked < 0.3 * unmasked, (masked, unmasked)


class _LocalDenoiser(torch.nn.Module):
    """A per-position denoiser with the UNet's call signature: nothing mixes positions."""

    def __init__(self, hidden: int = 0):
        super().__init__()
        torch.manual_seed(0)
        layers = [torch.nn.Conv2d(4, hidden, 1), torch.nn.SiLU(), torch.nn.Conv2d(hidden, 4, 1)] if hidden else \
            [torch.nn.Conv2d(4, 4, 1)]
        self.net = torch.nn.Sequential(*layers)

    def forward(self, sample, timesteps, embeds, added_cond_kwargs=None):
        from types import SimpleNamespace

        return SimpleNamespace(sample=self.net(sample))


def _local_run(package: Path, out: Path, masked_loss: str, denoiser: torch.nn.Module, **settings):
    """The trainer's `_Run` with the local denoiser as its UNet and 4x4 area-pooled latents."""
    import torch.nn.functional as F

    from models.lora_data import load_image
    from models.lora_trainer import _Run

    run = _Run(tiny_job(package, out, masked_loss=masked_loss, cache_latents=False, **settings), None)
    run.unet = denoiser
    pixels = torch.stack([load_image(e.image, g.bucket, e.alpha_mask) for e, g in zip(run.job.train, run.geometry)])
    pooled = F.avg_pool2d(pixels, 4)
    latents = torch.cat([pooled, pooled.mean(1, keepdim=True)], 1)  # 4 channels at the latent grid
    assert latents.shape[-2:] == run.latents[0].shape[-2:]
    run.latents = list(latents)
    return run


def _local_gradient(package: Path, out: Path, masked_loss: str) -> torch.Tensor:
    """The gradient of one micro-batch (all training images) of the trainer's loss, local model."""
    from models.lora_trainer import _reset_accelerate

    run = _local_run(package, out, masked_loss, _LocalDenoiser())
    try:
        indices = list(range(len(run.job.train)))
        loss = run._loss(torch.stack(run.latents), [run.captions[i] for i in indices],
                         [run.geometry[i] for i in indices], train_te=False, gen=torch.Generator().manual_seed(0),
                         masks=run._masks(run.masks, indices))
        loss.backward()
    finally:
        _reset_accelerate()
    return torch.cat([p.grad.flatten() for p in run.unet.parameters()])


def _local_lora(package: Path, out: Path, masked_loss: str) -> dict[str, torch.Tensor]:
    """A rank-4 LoRA on the local denoiser trained by the trainer's step loop; each module's
    weight change (B @ A). The per-step bookkeeping (logs, checkpoints of a diffusers UNet) is left out."""
    from peft import LoraConfig, inject_adapter_in_model

    from models.lora_trainer import _reset_accelerate

    denoiser = _LocalDenoiser(hidden=32)
    torch.manual_seed(1)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["net.0", "net.2"]), denoiser)
    run = _local_run(package, out, masked_loss, denoiser, max_steps=12, unet_lr=3e-3)
    try:
        run.trainable = [p for p in denoiser.parameters() if p.requires_grad]
        run.optimizer = torch.optim.AdamW(run.trainable, lr=run.s.unet_lr, weight_decay=run.s.weight_decay)
        run.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lambda step: 1.0)
        run._after_step = lambda: None
        run._loop()
    finally:
        _reset_accelerate()
    return {name: (layer.lora_B["default"].weight[..., 0, 0] @ layer.lora_A["default"].weight[..., 0, 0]).detach()
            for name, layer in denoiser.net.named_children() if hasattr(layer, "lora_A")}


def test_weight_change_from_new_scenery_is_measured_on_the_tiny_stand_in(tmp_path):
    """The same measurement through train_lora on the tiny stand-in (LoRA files), printed, not asserted
    small: masked and unmasked LoRAs move about alike there (ratio ~0.97). Not the trainer (a rerun on
    the same images gives the same LoRA; no latent cache, frozen text encoder, no min-SNR): the untrained
    stand-in carries the scenery into the character's own latents and predictions. Gradient ratios
    measured: its VAE with a local denoiser 0.94 (a receptive field spanning the 64 px picture; no
    mid-block attention: 1.5), its UNet with a local encoder 2.0 (self-attention, 3x3 receptive field
    and GroupNorm's whole-image statistics: each enough on its own). A trained base is near local.
    Asserted: the mask reaches the training and the files say which they are."""
    for name, seed in (("a", 1), ("b", 2), ("a-again", 1)):
        make_masked_character(tmp_path / name, scenery_seed=seed)
    keys = [("a", "on"), ("a", "off"), ("b", "on"), ("b", "off"), ("a-again", "on")]
    runs = {(name, mode): _train(tmp_path / name, tmp_path / f"out-{name}-{mode}", mode) for name, mode in keys}
    deltas = {key: _delta_weights(run.lora_path) for key, run in runs.items()}
    masked = _distance(deltas["a", "on"], deltas["b", "on"])
    unmasked = _distance(deltas["a", "off"], deltas["b", "off"])
    print(f"\ntiny stand-in, LoRA weight change from new scenery: masked {masked:.4g}, unmasked {unmasked:.4g}, "
          f"ratio {masked / unmasked:.3f}")
    assert _distance(deltas["a", "on"], deltas["a-again", "on"]) == 0.0  # same seed, same images: same LoRA
    assert unmasked > 0 and _distance(deltas["a", "on"], deltas["a", "off"]) > 0.05 * unmasked

    from models.kohya_format import read_kohya

    assert read_kohya(Path(runs["a", "on"].lora_path))[1]["ss_masked_loss"] == "True"
    assert read_kohya(Path(runs["a", "off"].lora_path))[1]["ss_masked_loss"] == "False"


def test_auto_follows_the_images_and_on_without_masks_names_the_field(tmp_path):
    from models.lora_data import masked_loss_on, read_package
    from tests.lora_fixtures import make_character

    make_masked_character(tmp_path / "masked", scenery_seed=1, n_train=2, n_validation=1)
    make_character(tmp_path / "plain", "blob", "zqx", n_train=2, n_validation=1)
    masked = read_package(tmp_path / "masked")[0][0]
    plain = read_package(tmp_path / "plain")[0][0]
    assert all(e.alpha_mask for e in masked.train + masked.validation)
    assert not any(e.alpha_mask for e in plain.train)
    assert masked_loss_on("auto", masked.train) and not masked_loss_on("auto", plain.train)
    assert not masked_loss_on("off", masked.train)
    with pytest.raises(ValueError, match="masked_loss is 'on'"):
        masked_loss_on("on", plain.train, "blob")


def test_settings_check_masked_loss_and_mask_floor():
    from models.lora_settings import resolve_settings

    assert resolve_settings("demo").masked_loss == "auto" and resolve_settings("demo").mask_floor == 0.0
    with pytest.raises(ValueError, match="masked_loss"):
        resolve_settings("demo", overrides={"masked_loss": "yes"})
    with pytest.raises(ValueError, match="mask_floor"):
        resolve_settings("demo", overrides={"mask_floor": 1.5})


def test_sdxl_trains_masked_and_says_so(tmp_path):
    from models.kohya_format import read_kohya
    from models.lora_trainer import train_lora

    make_masked_character(tmp_path / "pkg", scenery_seed=1, n_train=2, n_validation=1)
    job = tiny_job(tmp_path / "pkg", tmp_path / "out", base="tiny-sdxl", max_steps=2, save_every_steps=2,
                   mask_floor=0.1, cache_latents=False)
    meta = read_kohya(Path(train_lora(job).lora_path))[1]
    assert meta["ss_masked_loss"] == "True" and meta["ss_mask_floor"] == "0.1"
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"


def test_train_job_says_whether_the_loss_is_masked(tmp_path):
    from tasks.train import masked_loss_note
    from tests.lora_fixtures import make_character

    make_masked_character(tmp_path / "masked", scenery_seed=1, n_train=2, n_validation=1)
    make_character(tmp_path / "plain", "blob", "zqx", n_train=2, n_validation=1)
    assert "masked loss on (auto: the training images carry the character mask as alpha)" in \
        masked_loss_note(tiny_job(tmp_path / "masked", tmp_path / "o1"))
    assert "masked loss off (auto: the training images carry no alpha mask)" in \
        masked_loss_note(tiny_job(tmp_path / "plain", tmp_path / "o2"))
    with pytest.raises(ValueError, match="masked_loss is 'on'"):
        masked_loss_note(tiny_job(tmp_path / "plain", tmp_path / "o3", masked_loss="on"))
