"""Training speed: our LoRA trainer against a minimal hand-written diffusers + peft loop.

Both train the same LoRA (same rank, targets, optimizer, batch) on the same tiny stand-in and the
same 64 px images, in this one process, alternating, best of `--repeats`: on the tiny SD1.5
(epsilon loss) and on the tiny FLUX.1 (`--base tiny-flux`: flow matching on packed latents, the
guidance embedding at 1, text embedded once, LoRA on the block projections). Our figure is
measured between step callbacks (steady state: data from the latent cache, logging, LR schedule,
gradient clipping, accelerate), the baseline around its bare loop; as wall-clock and as CPU-time
rates (the latter is steadier on a shared machine). Peak RSS after each phase.

    .venv/bin/python -m benchmarks.train [--base tiny|tiny-flux|both] [--steps 60] [--batch 4] [--repeats 2]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def baseline_steps_per_s(base: str, images: list[Path], captions: list[str], steps: int, batch: int,
                         rank: int) -> tuple[float, float]:
    """The hand-written loop: fixed batch of latents and text embeddings, nothing else."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig

    from models.lora_data import load_image
    from models.sd_base import load_base

    m = load_base(base)
    m.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    m.unet.train()
    params = [p for p in m.unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    with torch.no_grad():
        pixels = torch.stack([load_image(p, (64, 64)) for p in images[:batch]])
        latents = m.vae.encode(pixels).latent_dist.mode() * m.vae.config.scaling_factor
        ids = m.tokenizers[0](captions[:batch], padding="max_length", max_length=m.tokenizers[0].model_max_length,
                              truncation=True, return_tensors="pt").input_ids
        embeds = m.text_encoders[0](ids)[0]
    sched = m.noise_scheduler
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=gen)
        pred = m.unet(sched.add_noise(latents, noise, t), t, embeds).sample
        F.mse_loss(pred.float(), noise.float()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed_steps(step, steps)


def timed_steps(step, steps: int, warmup: int = 5) -> tuple[float, float]:
    """(steps/s wall-clock, steps/s CPU time) of `steps` calls of `step` after `warmup` calls."""
    for _ in range(warmup):
        step()
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - start), steps / (time.process_time() - cpu)


def flux_baseline_steps_per_s(base: str, images: list[Path], captions: list[str], steps: int, batch: int,
                              rank: int) -> tuple[float, float]:
    """The hand-written FLUX loop: diffusers' own modules and pipeline helpers, fixed latents and text
    embeddings, sigmoid-drawn sigmas, rectified-flow target, AdamW; nothing else."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig

    from models.lora_data import load_image
    from models.lora_settings import FLUX_TARGETS

    transformer = FluxTransformer2DModel.from_pretrained(base, subfolder="transformer")
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    pipe = FluxPipeline.from_pretrained(base, transformer=transformer, vae=vae)
    names = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)
             and n.startswith(("transformer_blocks.", "single_transformer_blocks."))
             and any(n.endswith("." + t) for t in FLUX_TARGETS)]
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=names))
    transformer.train()
    optimizer = torch.optim.AdamW([p for p in transformer.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-2)
    with torch.no_grad():
        pixels = torch.stack([load_image(p, (64, 64)) for p in images[:batch]])
        latents = (vae.encode(pixels).latent_dist.mode() - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
        embeds, pooled, text_ids = pipe.encode_prompt(captions[:batch], captions[:batch], max_sequence_length=77)
    b, c, h, w = latents.shape
    image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", latents.dtype)
    guidance = torch.ones(b) if transformer.config.guidance_embeds else None
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        noise = torch.randn(latents.shape, generator=gen)
        sigma = torch.sigmoid(torch.randn(b, generator=gen)).view(-1, 1, 1, 1)
        noisy = FluxPipeline._pack_latents((1 - sigma) * latents + sigma * noise, b, c, h, w)
        pred = transformer(hidden_states=noisy, timestep=sigma.flatten(), guidance=guidance, pooled_projections=pooled,
                           encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
        F.mse_loss(pred, FluxPipeline._pack_latents(noise - latents, b, c, h, w)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed_steps(step, steps)


def ours_steps_per_s(package: Path, out: Path, steps: int, batch: int, rank: int,
                     base: str = "tiny") -> tuple[float, float]:
    """Our trainer, timed between the step callbacks after a 5-step warm-up."""
    from models.lora_data import read_package
    from models.lora_settings import resolve_settings
    from models.lora_trainer import TrainJob, train_lora

    character = read_package(package)[0][0]
    settings = resolve_settings("demo", overrides={
        "base": base, "max_steps": steps + 6, "batch_size": batch, "rank": rank, "alpha": rank,
        "save_every_steps": 10_000, "sample_prompts": [], "unet_lr": 1e-3})
    stamps: dict[int, tuple[float, float]] = {}
    job = TrainJob(character=character.name, trigger=character.trigger, train=character.train, settings=settings,
                   output_dir=out, output_name=character.name, repeats=character.repeats)
    train_lora(job, on_step=lambda s, total, logs: stamps.__setitem__(s, (time.perf_counter(), time.process_time())))
    (wall0, cpu0), (wall1, cpu1) = stamps[5], stamps[5 + steps]
    return steps / (wall1 - wall0), steps / (cpu1 - cpu0)


BASELINES = {"tiny": ("tiny SD1.5 stand-in", baseline_steps_per_s),
             "tiny-flux": ("tiny FLUX.1 stand-in", flux_baseline_steps_per_s)}


def compare(base: str, package: Path, tmp: Path, args: argparse.Namespace) -> None:
    """Alternate the hand-written loop and our trainer on `base`, print both rates and the ratio."""
    from models.lora_data import read_package
    from models.sd_base import resolve_base

    label, baseline = BASELINES[base]
    folder = resolve_base(base)
    character = read_package(package)[0][0]
    images, captions = [e.image for e in character.train], [e.caption for e in character.train]
    ours, theirs, rss = [], [], {}
    for i in range(args.repeats):
        theirs.append(baseline(folder, images, captions, args.steps, args.batch, args.rank))
        rss["baseline"] = peak_rss_mib()
        ours.append(ours_steps_per_s(package, tmp / f"{base}-out{i}", args.steps, args.batch, args.rank, base))
        rss["ours"] = peak_rss_mib()
    loop = "diffusers+peft flow-matching loop" if base == "tiny-flux" else "diffusers+peft loop"
    print(f"{label}, 64 px, batch {args.batch}, rank {args.rank}, {args.steps} steps, best of {args.repeats}")
    for name, i in (("wall clock", 0), ("CPU time (steady on a shared machine)", 1)):
        a, b = max(v[i] for v in ours), max(v[i] for v in theirs)
        print(f"  {name}:")
        print(f"    hand-written {loop:34s}: {b:7.2f} steps/s   (runs: {', '.join(f'{v[i]:.2f}' for v in theirs)})")
        print(f"    episode2lora trainer {'':26s}: {a:7.2f} steps/s   (runs: {', '.join(f'{v[i]:.2f}' for v in ours)})")
        print(f"    ratio ours / baseline {'':25s}: {a / b:7.3f}   (aim >= 0.95)")
    print(f"  peak RSS of this process: after baseline {rss['baseline']:.0f} MiB, after ours {rss['ours']:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", choices=["tiny", "tiny-flux", "both"], default="both")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import torch

    from tests.lora_fixtures import make_character

    torch.set_num_threads(1)  # what the trainer uses for the tiny models; the same for both
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "package"
        make_character(package, "bench", "zqx", n_train=8, n_validation=0, repeats=4)
        for base in (["tiny", "tiny-flux"] if args.base == "both" else [args.base]):
            compare(base, package, Path(tmp), args)


if __name__ == "__main__":
    main()
