"""GPU check of the LoRA trainer: tiny SD 1.5, SDXL and FLUX.1 trainings in fp16 / bf16, a resume,
speed, 8-bit FLUX base weights, and the memory a real FLUX.1-dev LoRA training needs.

For each family (tiny SD 1.5, tiny SDXL with its text encoders trained) and each precision it
trains a few steps with our trainer (8-bit AdamW where bitsandbytes is installed, else AdamW),
checks the losses are finite and the kohya LoRA file is written, and times steps/s against a
minimal hand-written diffusers + peft loop on the same device, precision and batch (ratio
printed). Then it stops one training after a checkpoint, resumes it, and prints how far the
resumed LoRA is from the uninterrupted one. Runs in a few minutes with torch, transformers,
accelerate, peft, safetensors, pillow and diffusers only (no prefect, no av); `--device cpu`
runs the same on a CPU (fp32 and bf16).

Tiny FLUX.1 trains in bf16 (steps/s and peak GPU memory), then with 8-bit base weights (bitsandbytes
through diffusers, on CUDA only; a "no GPU: ..." line on a CPU). Last, a table of the memory a
FLUX.1-dev LoRA training would need per setting (bf16 or 8-bit base, gradient checkpointing on or
off, 512 / 768 / 1024 px), computed from FLUX.1-dev's config written below (no download).

    python -m benchmarks.gpu_check [--device auto|cuda|cpu] [--part all|sd|flux|memory] [--steps 40] [--batch 4]
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


# ---- tiny FLUX.1 ------------------------------------------------------------------------------

def check_flux(package: Path, tmp: Path, device: str, precision: str, args: argparse.Namespace) -> None:
    """Tiny FLUX.1 trained by our trainer in `precision`: finite losses, a kohya FLUX file, speed, peak GPU memory."""
    import torch

    from models.kohya_format import read_kohya
    from models.sd_base import resolve_base

    resolve_base("tiny-flux")  # built once, outside the timings
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    job = _job(package, tmp / f"tiny-flux-{precision}", "tiny-flux", device, precision, args.steps + 6, args.batch,
               args.rank)
    rate, losses, outcome = ours(job, args.steps, device)
    peak = f"peak GPU memory {torch.cuda.max_memory_allocated() / 2 ** 20:.0f} MiB" if device == "cuda" else (
        "no GPU: peak GPU memory not measured")
    print(f"  tiny-flux {precision:4s}: ours {rate:7.2f} steps/s; loss {_mean(losses[:5]):.3f} -> "
          f"{_mean(losses[-5:]):.3f}; {_optimizer(outcome)}; {peak}")
    _check(f"tiny-flux {precision}", losses, outcome)
    _, meta = read_kohya(Path(outcome.lora_path))
    if "flux" not in meta.get("ss_base_model_version", ""):
        _fail(f"tiny-flux {precision}: ss_base_model_version is {meta.get('ss_base_model_version')!r}")


def _flux_names(transformer) -> list[str]:
    """The block projections the trainer puts LoRA on (bitsandbytes' Linear8bitLt is a torch Linear too)."""
    import torch

    from models.lora_settings import FLUX_TARGETS

    blocks = ("transformer_blocks.", "single_transformer_blocks.")
    return [n for n, m in transformer.named_modules() if n.startswith(blocks) and isinstance(m, torch.nn.Linear)
            and any(n.endswith("." + t) for t in FLUX_TARGETS)]


def check_flux_8bit(device: str, steps: int = 10) -> None:
    """Tiny FLUX.1 with 8-bit base weights (bitsandbytes through diffusers' quantization_config), LoRA in fp32
    under bf16 autocast: a few flow-matching steps on stand-in latents; finite losses, 8-bit layers present."""
    if device != "cuda":
        print("  no GPU: tiny FLUX with 8-bit base weights skipped (bitsandbytes 8-bit layers need CUDA)")
        return
    if not importlib.util.find_spec("bitsandbytes"):
        print("  bitsandbytes not installed: tiny FLUX with 8-bit base weights skipped (pip install bitsandbytes)")
        return
    import torch
    import torch.nn.functional as F
    from diffusers import BitsAndBytesConfig, FluxTransformer2DModel
    from peft import LoraConfig

    from models.flux_base import flow_pair, pack, predict
    from models.sd_base import resolve_base

    try:
        torch.cuda.reset_peak_memory_stats()
        transformer = FluxTransformer2DModel.from_pretrained(
            resolve_base("tiny-flux"), subfolder="transformer", torch_dtype=torch.bfloat16,
            quantization_config=BitsAndBytesConfig(load_in_8bit=True))
        eight = sum(type(m).__name__ == "Linear8bitLt" for m in transformer.modules())
        transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=_flux_names(transformer)))
        params = [p for p in transformer.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        gen = torch.Generator(device="cuda").manual_seed(0)
        latents = torch.randn(2, 16, 8, 8, device="cuda", generator=gen)
        embeds = torch.randn(2, 77, 32, device="cuda", generator=gen)
        pooled = torch.randn(2, 32, device="cuda", generator=gen)
        guidance = 1.0 if transformer.config.guidance_embeds else None
        losses = []
        for _ in range(steps):
            sigmas = torch.rand(2, device="cuda", generator=gen)
            noisy, target = flow_pair(latents, torch.randn(latents.shape, device="cuda", generator=gen), sigmas)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                pred = predict(transformer, noisy, sigmas, embeds, pooled, guidance, torch.bfloat16)
            loss = F.mse_loss(pred.float(), pack(target).float())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    except Exception as exc:  # a library combination that cannot do it: said, not crashed
        _fail(f"tiny FLUX with 8-bit base weights: {type(exc).__name__}: {str(exc)[:300]}")
        return
    print(f"  tiny-flux 8-bit base: {eight} Linear8bitLt layers, loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
          f"peak GPU memory {torch.cuda.max_memory_allocated() / 2 ** 20:.0f} MiB")
    if not eight:
        _fail("tiny FLUX 8-bit: no layer was quantised")
    if not all(math.isfinite(v) for v in losses):
        _fail("tiny FLUX 8-bit: non-finite loss")
    fp8 = [m for m in ("torchao", "optimum.quanto") if _installed(m)]
    print("  fp8 base weights: " + (f"{', '.join(fp8)} installed (not exercised here)" if fp8 else
                                     "torchao / optimum-quanto not installed: not checked"))


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


# ---- FLUX.1-dev LoRA training memory, from the model's config (no download) --------------------

FLUX1_DEV_TRANSFORMER = dict(in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                             num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                             guidance_embeds=True)
"""black-forest-labs/FLUX.1-dev `transformer/config.json` (diffusers FluxTransformer2DModel; patch_size 1,
out_channels = in_channels, MLP ratio 4, timestep projection 256 wide as diffusers builds it)."""
FLUX1_DEV_T5 = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128)
"""Its `text_encoder_2/config.json`: the T5 v1.1 XXL encoder (gated GELU: wi_0, wi_1, wo)."""
FLUX1_DEV_CLIP = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, vocab_size=49408,
                      max_position_embeddings=77)
"""Its `text_encoder/config.json`: the CLIP ViT-L/14 text model (pooled embedding)."""
FLUX1_VAE_PARAMS = 84e6
"""Its VAE: about 84 M parameters (SD's AutoencoderKL layout with 16 latent channels); small beside the rest."""
T5_TOKENS, LATENT_DOWN, PACK = 512, 8, 2
"""Training sequence: 512 T5 tokens (FLUX.1-dev's max_sequence_length) + (side / 8 / 2)^2 packed image tokens."""
ACTIVATION_FACTOR = 34
"""Bytes of 16-bit activations a transformer block keeps for backward per token and hidden unit (Korthikanti
et al. 2022, "Reducing Activation Recomputation in Large Transformer Models": 34·s·b·h per layer, without the
attention-score term, which fused SDPA / flash attention does not store)."""
OVERHEAD_GIB = 1.0
"""CUDA context, cuBLAS workspaces and allocator slack (a round figure)."""
GIB = 1024 ** 3


def flux_block_linears(cfg: dict) -> list[tuple[str, int, int, int]]:
    """(module name in a block, in_features, out_features, how many) of every Linear in FLUX's double and single blocks."""
    inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    mlp, double, single = 4 * inner, cfg["num_layers"], cfg["num_single_layers"]
    rows = [(n, inner, inner, double) for n in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                                                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                                                "attn.to_add_out")]
    rows += [("norm1.linear", inner, 6 * inner, double), ("norm1_context.linear", inner, 6 * inner, double),
             ("ff.net.0.proj", inner, mlp, double), ("ff.net.2", mlp, inner, double),
             ("ff_context.net.0.proj", inner, mlp, double), ("ff_context.net.2", mlp, inner, double)]
    rows += [(n, inner, inner, single) for n in ("attn.to_q", "attn.to_k", "attn.to_v")]
    rows += [("norm.linear", inner, 3 * inner, single), ("proj_mlp", inner, mlp, single),
             ("proj_out", inner + mlp, inner, single)]
    return rows


def flux_transformer_params(cfg: dict) -> tuple[int, int]:
    """(parameters in the blocks' Linears, all other parameters) of a FLUX transformer config."""
    inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    blocks = sum((i + 1) * o * n for _, i, o, n in flux_block_linears(cfg))
    norms = cfg["attention_head_dim"] * (4 * cfg["num_layers"] + 2 * cfg["num_single_layers"])
    embedders = (cfg["in_channels"] + 1) * inner + (cfg["joint_attention_dim"] + 1) * inner
    embedders += (2 if cfg.get("guidance_embeds") else 1) * ((256 + 1) * inner + (inner + 1) * inner)
    embedders += (cfg["pooled_projection_dim"] + 1) * inner + (inner + 1) * inner
    head = (inner + 1) * 2 * inner + (inner + 1) * cfg["in_channels"]
    return blocks, norms + embedders + head


def text_encoder_params(t5: dict, clip: dict) -> tuple[int, int]:
    """(T5 encoder linears, everything else of both text encoders) from their configs."""
    inner = t5["num_heads"] * t5["d_kv"]
    linears = t5["num_layers"] * (4 * t5["d_model"] * inner + 3 * t5["d_model"] * t5["d_ff"])
    h, layers = clip["hidden_size"], clip["num_hidden_layers"]
    clip_total = layers * (4 * (h * h + h) + 2 * h * clip["intermediate_size"] + clip["intermediate_size"] + 5 * h)
    clip_total += (clip["vocab_size"] + clip["max_position_embeddings"]) * h + h * h
    return linears, t5["vocab_size"] * t5["d_model"] + clip_total


def flux_lora_memory(resolution: int = 512, rank: int = 32, batch: int = 1, *, base: str = "bf16",
                     checkpointing: bool = True, optimizer: str = "adamw", cfg: dict | None = None) -> dict[str, float]:
    """GiB a FLUX.1-dev LoRA training needs: weights, LoRA with its gradients and optimizer state,
    activations, the training step's peak and the set-up peak (T5 loaded while captions are embedded).

    `base`: bf16 or 8bit (the blocks' Linears and T5's at 1 byte, the rest in bf16); LoRA on the
    FLUX block projections (models/lora_settings.FLUX_TARGETS) in fp32, AdamW (8 bytes of state per
    parameter) or adamw8bit (2); `checkpointing`: only each block's input is kept, one block recomputed.
    """
    cfg = cfg or FLUX1_DEV_TRANSFORMER
    if base not in ("bf16", "8bit"):
        raise ValueError(f"base must be bf16 or 8bit, got {base!r}")
    from models.lora_settings import FLUX_TARGETS

    targets = tuple("." + t for t in FLUX_TARGETS)  # matched as the trainer matches them (name ends with .<target>)
    linear_bytes = 1 if base == "8bit" else 2
    block_linears, other = flux_transformer_params(cfg)
    weights = block_linears * linear_bytes + other * 2
    lora = sum(rank * (i + o) * n for name, i, o, n in flux_block_linears(cfg)
               if f".{name}".endswith(targets))
    lora_bytes = lora * (4 + 4 + (2 if optimizer == "adamw8bit" else 8))
    inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    tokens = T5_TOKENS + (resolution // LATENT_DOWN // PACK) ** 2
    blocks = cfg["num_layers"] + cfg["num_single_layers"]
    per_block = ACTIVATION_FACTOR * tokens * batch * inner
    activations = (2 * tokens * batch * inner * blocks + per_block) if checkpointing else per_block * blocks
    t5_linears, text_other = text_encoder_params(FLUX1_DEV_T5, FLUX1_DEV_CLIP)
    text = t5_linears * linear_bytes + text_other * 2 + FLUX1_VAE_PARAMS * 2
    training = weights + lora_bytes + activations + FLUX1_VAE_PARAMS * 2
    return {"transformer_params_b": (block_linears + other) / 1e9, "lora_params_m": lora / 1e6,
            "weights": weights / GIB, "lora_and_optimizer": lora_bytes / GIB, "activations": activations / GIB,
            "training": training / GIB + OVERHEAD_GIB, "setup": (weights + text) / GIB + OVERHEAD_GIB}


def print_flux_memory(rank: int = 32, batch: int = 1, optimizer: str = "adamw8bit") -> None:
    """The table of FLUX.1-dev LoRA training memory per setting, at the fast / final profiles' sides and 1024."""
    first = flux_lora_memory(rank=rank)
    print(f"FLUX.1-dev LoRA training memory, estimated from its config: transformer {first['transformer_params_b']:.2f} B "
          f"parameters, LoRA rank {rank} on the block projections {first['lora_params_m']:.1f} M, batch {batch}, "
          f"{optimizer}; GiB. set-up = transformer + T5 + CLIP + VAE while captions are embedded (T5 freed after); "
          "needs = the larger of set-up and step")
    print(f"  {'side':>5} {'base':>5} {'grad ckpt':>9} {'weights':>8} {'LoRA+opt':>8} {'activ.':>7} {'step':>6} "
          f"{'set-up':>7} {'needs':>6}")
    for side in (512, 768, 1024):
        for base in ("bf16", "8bit"):
            for ckpt in (False, True):
                m = flux_lora_memory(side, rank, batch, base=base, checkpointing=ckpt, optimizer=optimizer)
                print(f"  {side:>5} {base:>5} {'on' if ckpt else 'off':>9} {m['weights']:8.1f} "
                      f"{m['lora_and_optimizer']:8.2f} {m['activations']:7.1f} {m['training']:6.1f} {m['setup']:7.1f} "
                      f"{max(m['training'], m['setup']):6.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--part", choices=["all", "sd", "flux", "memory"], default="all")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args(argv)

    if args.part == "memory":
        print_flux_memory()
        return 0
    import torch

    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here; run with --device cpu")
        return 2
    if device == "cpu":
        torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
        precisions = ["no", "bf16"]
        print("no GPU: the trainings below run on the CPU (fp32 and bf16); peak GPU memory and 8-bit base weights "
              "are not checked")
    else:
        precisions = ["fp16", "bf16"] if torch.cuda.is_bf16_supported() else ["fp16"]
    print(f"device {device} ({torch.cuda.get_device_name(0) if device == 'cuda' else 'CPU'}), torch {torch.__version__}, "
          f"bitsandbytes {'yes' if importlib.util.find_spec('bitsandbytes') else 'no'}, {args.steps} steps, "
          f"batch {args.batch}, rank {args.rank}")
    from tests.lora_fixtures import make_character

    started = time.time()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        package = tmp / "package"
        make_character(package, "check", "zqx", n_train=8, n_validation=2, repeats=4)
        if args.part in ("all", "sd"):
            check_sd(package, tmp, device, precisions, args)
        if args.part in ("all", "flux"):
            check_flux(package, tmp, device, "bf16", args)
            check_flux_8bit(device)
    print_flux_memory()
    loaded = sorted(m for m in ("prefect", "av") if m in sys.modules)
    if loaded:
        _fail(f"the trainer path imported {', '.join(loaded)}")
    print(f"{'OK' if OK else 'FAILED'} in {time.time() - started:.0f} s")
    return 0 if OK else 1


def check_sd(package: Path, tmp: Path, device: str, precisions: list[str], args: argparse.Namespace) -> None:
    """Tiny SD 1.5 and SDXL per precision (speed against the minimal loop), SDXL with its text encoders, a resume."""
    from models.kohya_format import read_kohya
    from models.sd_base import resolve_base

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
    prefixes = sorted({k.split(".")[0].split("_")[1] for k in read_kohya(Path(outcome.lora_path))[0]})
    print(f"  tiny-sdxl {precisions[-1]} with both text encoders: LoRA parts {prefixes}")
    _check("tiny-sdxl with text encoders", losses, outcome)
    if prefixes != ["te1", "te2", "unet"]:
        _fail(f"SDXL LoRA with text encoders has parts {prefixes}")
    check_resume(package, tmp, "tiny-sd15", device, precisions[0], args.batch, args.rank)


if __name__ == "__main__":
    raise SystemExit(main())
