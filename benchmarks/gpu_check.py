"""GPU check of the LoRA trainer: tiny SD 1.5 and SDXL trainings in fp16 and bf16, a resume, speed.

For each family (tiny SD 1.5, tiny SDXL with its text encoders trained) and each precision it
trains a few steps with our trainer (8-bit AdamW where bitsandbytes is installed, else AdamW),
checks the losses are finite and the kohya LoRA file is written, and times steps/s against a
minimal hand-written diffusers + peft loop on the same device, precision and batch (ratio
printed). Then it stops one training after a checkpoint, resumes it, and prints how far the
resumed LoRA is from the uninterrupted one. Runs in a few minutes with torch, transformers,
accelerate, peft, safetensors, pillow and diffusers only (no prefect, no av); `--device cpu`
runs the same on a CPU (fp32 and bf16).

    python -m benchmarks.gpu_check [--device auto|cuda|cpu] [--steps 40] [--batch 4]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import tempfile
import time
from pathlib import Path

OK = True


class _Stop(Exception):
    """Raised from the step callback to stop a training right after a checkpoint."""


def _fail(message: str) -> None:
    global OK
    OK = False
    print(f"  FAIL: {message}")


def minimal_loop(base: str, device: str, precision: str, steps: int, batch: int, rank: int, package: Path) -> float:
    """Steps/s of a bare diffusers + peft loop: fixed latents and text embeddings, autocast, AdamW."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig

    from models.lora_data import load_image, read_package
    from models.sd_base import load_base

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    m = load_base(base, dtype=dtype, device=device)
    m.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in m.unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    m.unet.train()
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    scaler = torch.amp.GradScaler(device) if precision == "fp16" else None
    examples = read_package(package)[0][0].train[:batch]
    with torch.no_grad():
        m.vae.to(dtype=torch.float32)
        pixels = torch.stack([load_image(e.image, (64, 64)) for e in examples]).to(device)
        latents = (m.vae.encode(pixels).latent_dist.mode() * m.vae.config.scaling_factor).to(dtype)
        ids = [tok([e.caption for e in examples], padding="max_length", max_length=tok.model_max_length,
                   truncation=True, return_tensors="pt").input_ids.to(device) for tok in m.tokenizers]
        if m.family == "sdxl":
            first = m.text_encoders[0](ids[0], output_hidden_states=True)
            second = m.text_encoders[1](ids[1], output_hidden_states=True)
            embeds = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
            added = {"text_embeds": second.text_embeds,
                     "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * len(examples), device=device, dtype=dtype)}
        else:
            embeds, added = m.text_encoders[0](ids[0])[0], None
    sched = m.noise_scheduler
    autocast = torch.autocast(device_type=device, dtype=dtype, enabled=precision != "no")

    def step() -> None:
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), device=device)
        with autocast:
            pred = m.unet(sched.add_noise(latents, noise, t), t, embeds, added_cond_kwargs=added).sample
        loss = F.mse_loss(pred.float(), noise.float())
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps / (time.perf_counter() - start)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _job(package: Path, out: Path, base: str, device: str, precision: str, steps: int, batch: int, rank: int, **extra):
    from models.lora_data import read_package
    from models.lora_settings import resolve_settings
    from models.lora_trainer import TrainJob

    character = read_package(package)[0][0]
    optimizer = "adamw8bit" if device == "cuda" and importlib.util.find_spec("bitsandbytes") else "adamw"
    settings = resolve_settings("demo", overrides={
        "base": base, "device": device, "mixed_precision": precision, "max_steps": steps, "batch_size": batch,
        "rank": rank, "alpha": rank, "unet_lr": 1e-3, "sample_prompts": [], "save_every_steps": 10_000,
        "optimizer": optimizer, "gradient_checkpointing": False, **extra})
    return TrainJob(character=character.name, trigger=character.trigger, train=character.train,
                    validation=character.validation, settings=settings, output_dir=out, output_name=character.name,
                    repeats=character.repeats)


def ours(job, steps: int, device: str) -> tuple[float, list[float], object]:
    """Steps/s of our trainer between its step callbacks 5 and 5 + `steps` (the job runs one more
    step, so the final validation and export fall outside), its losses, outcome."""
    from models.lora_trainer import train_lora

    stamps: dict[int, float] = {}
    losses: list[float] = []

    def on_step(step: int, total: int, logs: dict) -> None:
        _sync(device)
        stamps[step] = time.perf_counter()
        losses.append(logs["loss"])

    outcome = train_lora(job, on_step=on_step)
    return steps / (stamps[5 + steps] - stamps[5]), losses, outcome


def check_resume(package: Path, tmp: Path, base: str, device: str, precision: str, batch: int, rank: int) -> None:
    """Stop a training right after its checkpoint at step 10, resume it, compare with the whole run."""
    from models.kohya_format import read_kohya
    from models.lora_trainer import train_lora

    whole = train_lora(_job(package, tmp / "whole", base, device, precision, 20, batch, rank, save_every_steps=10))
    cut = _job(package, tmp / "cut", base, device, precision, 20, batch, rank, save_every_steps=10)

    def stop(step: int, total: int, logs: dict) -> None:
        if step == 10:
            raise _Stop

    try:
        train_lora(cut, on_step=stop)
    except _Stop:
        pass
    resumed = train_lora(cut, resume=True)
    a, _ = read_kohya(Path(whole.lora_path))
    b, _ = read_kohya(Path(resumed.lora_path))
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    scale = max(float(v.float().abs().max()) for k, v in a.items() if k.endswith("lora_up.weight"))
    print(f"  resume {base} {precision}: resumed from step {resumed.resumed_from}, max |whole - resumed| = "
          f"{diff:.3g} (largest lora_up weight {scale:.3g})")
    if resumed.resumed_from != 10 or resumed.steps != 20:
        _fail(f"resume went from {resumed.resumed_from} to {resumed.steps}, expected 10 -> 20")
    if device == "cpu" and precision == "no" and diff != 0.0:
        _fail("on CPU in fp32 a resumed training must equal the whole one exactly")
    if diff > 0.05 * max(scale, 1e-8):
        _fail(f"the resumed LoRA is far from the uninterrupted one ({diff:.3g})")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _optimizer(outcome) -> str:
    import json

    return json.loads((Path(outcome.lora_path).parent / "settings.json").read_text())["optimizer"]


def _check(label: str, losses: list[float], outcome) -> None:
    if not all(math.isfinite(v) for v in losses):
        _fail(f"{label}: non-finite loss")
    if not Path(outcome.lora_path).is_file():
        _fail(f"{label}: no LoRA file")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args(argv)

    import torch

    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here; run with --device cpu")
        return 2
    if device == "cpu":
        torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
        precisions = ["no", "bf16"]
    else:
        precisions = ["fp16", "bf16"] if torch.cuda.is_bf16_supported() else ["fp16"]
    print(f"device {device} ({torch.cuda.get_device_name(0) if device == 'cuda' else 'CPU'}), torch {torch.__version__}, "
          f"bitsandbytes {'yes' if importlib.util.find_spec('bitsandbytes') else 'no'}, {args.steps} steps, "
          f"batch {args.batch}, rank {args.rank}")
    from models.sd_base import resolve_base
    from tests.lora_fixtures import make_character

    started = time.time()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        package = tmp / "package"
        make_character(package, "check", "zqx", n_train=8, n_validation=2, repeats=4)
        for base in ("tiny-sd15", "tiny-sdxl"):
            resolve_base(base)  # built once, outside the timings
            for precision in precisions:
                job = _job(package, tmp / f"{base}-{precision}", base, device, precision, args.steps + 6, args.batch,
                           args.rank)
                rate, losses, outcome = ours(job, args.steps, device)
                bare = minimal_loop(base, device, precision, args.steps, args.batch, args.rank, package)
                print(f"  {base:9s} {precision:4s}: ours {rate:7.2f} steps/s, minimal loop {bare:7.2f} steps/s, "
                      f"ratio {rate / bare:5.2f}; loss {_mean(losses[:5]):.3f} -> {_mean(losses[-5:]):.3f} "
                      f"(mean of first / last 5 steps; {_optimizer(outcome)})")
                _check(f"{base} {precision}", losses, outcome)
        job = _job(package, tmp / "sdxl-te", "tiny-sdxl", device, precisions[-1], 10, args.batch, args.rank,
                   train_text_encoder=True)
        _, losses, outcome = ours(job, 4, device)
        from models.kohya_format import read_kohya

        prefixes = sorted({k.split(".")[0].split("_")[1] for k in read_kohya(Path(outcome.lora_path))[0]})
        print(f"  tiny-sdxl {precisions[-1]} with both text encoders: LoRA parts {prefixes}")
        _check("tiny-sdxl with text encoders", losses, outcome)
        if prefixes != ["te1", "te2", "unet"]:
            _fail(f"SDXL LoRA with text encoders has parts {prefixes}")
        check_resume(package, tmp, "tiny-sd15", device, precisions[0], args.batch, args.rank)
    loaded = sorted(m for m in ("prefect", "av") if m in sys.modules)
    if loaded:
        _fail(f"the trainer path imported {', '.join(loaded)}")
    print(f"{'OK' if OK else 'FAILED'} in {time.time() - started:.0f} s")
    return 0 if OK else 1


if __name__ == "__main__":
    raise SystemExit(main())
