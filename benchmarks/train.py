"""Training speed: our LoRA trainer against a minimal hand-written diffusers + peft loop.

Both train the same LoRA (same rank, targets, optimizer, batch) on the same tiny SD1.5 stand-in
and the same 64 px images, in this one process, alternating, best of `--repeats`. Our figure is
measured between step callbacks (steady state: data from the latent cache, logging, LR schedule,
gradient clipping, accelerate), the baseline around its bare loop; as wall-clock and as CPU-time
rates (the latter is steadier on a shared machine). Peak RSS after each phase.

    .venv/bin/python -m benchmarks.train [--steps 60] [--batch 4] [--repeats 2]
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

    for _ in range(5):
        step()
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - start), steps / (time.process_time() - cpu)


def ours_steps_per_s(package: Path, out: Path, steps: int, batch: int, rank: int) -> tuple[float, float]:
    """Our trainer, timed between the step callbacks after a 5-step warm-up."""
    from models.lora_data import read_package
    from models.lora_settings import resolve_settings
    from models.lora_trainer import TrainJob, train_lora

    character = read_package(package)[0][0]
    settings = resolve_settings("demo", overrides={
        "base": "tiny", "max_steps": steps + 6, "batch_size": batch, "rank": rank, "alpha": rank,
        "save_every_steps": 10_000, "sample_prompts": [], "unet_lr": 1e-3})
    stamps: dict[int, tuple[float, float]] = {}
    job = TrainJob(character=character.name, trigger=character.trigger, train=character.train, settings=settings,
                   output_dir=out, output_name=character.name, repeats=character.repeats)
    train_lora(job, on_step=lambda s, total, logs: stamps.__setitem__(s, (time.perf_counter(), time.process_time())))
    (wall0, cpu0), (wall1, cpu1) = stamps[5], stamps[5 + steps]
    return steps / (wall1 - wall0), steps / (cpu1 - cpu0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import torch

    from models.lora_data import read_package
    from models.sd_base import resolve_base
    from tests.lora_fixtures import make_character

    torch.set_num_threads(1)  # what the trainer uses for the tiny model; the same for both
    base = resolve_base("tiny")
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "package"
        make_character(package, "bench", "zqx", n_train=8, n_validation=0, repeats=4)
        character = read_package(package)[0][0]
        images, captions = [e.image for e in character.train], [e.caption for e in character.train]
        ours, theirs, rss = [], [], {}
        for i in range(args.repeats):
            theirs.append(baseline_steps_per_s(base, images, captions, args.steps, args.batch, args.rank))
            rss["baseline"] = peak_rss_mib()
            ours.append(ours_steps_per_s(package, Path(tmp) / f"out{i}", args.steps, args.batch, args.rank))
            rss["ours"] = peak_rss_mib()
    print(f"tiny SD1.5 stand-in, 64 px, batch {args.batch}, rank {args.rank}, {args.steps} steps, best of {args.repeats}")
    for label, i in (("wall clock", 0), ("CPU time (steady on a shared machine)", 1)):
        a, b = max(v[i] for v in ours), max(v[i] for v in theirs)
        print(f"  {label}:")
        print(f"    hand-written diffusers+peft loop : {b:7.2f} steps/s   (runs: {', '.join(f'{v[i]:.2f}' for v in theirs)})")
        print(f"    episode2lora trainer             : {a:7.2f} steps/s   (runs: {', '.join(f'{v[i]:.2f}' for v in ours)})")
        print(f"    ratio ours / baseline            : {a / b:7.3f}   (aim >= 0.95)")
    print(f"  peak RSS of this process: after baseline {rss['baseline']:.0f} MiB, after ours {rss['ours']:.0f} MiB")

if __name__ == "__main__":
    main()
