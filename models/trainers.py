"""LoRA trainers behind one method, by name (`get_trainer(name)`):

- `diffusers` — our trainer (models/lora_trainer.py): diffusers + peft + accelerate, resumable.
- `kohya` — kohya sd-scripts' own `train_network.py` (or `sdxl_train_network.py`), run as a
  subprocess with the package's generated TOML files; needs `scripts_dir` (an sd-scripts checkout
  with its requirements installed) and produces whatever sd-scripts writes. SD 1.5 / SDXL only: a
  FLUX.1 base is refused (the package's FLUX job is the AI-Toolkit YAML).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Protocol

from models.lora_trainer import TrainJob, TrainOutcome, train_lora

OnStep = Callable[[int, int, dict], None]


class Trainer(Protocol):
    """Trains one character's LoRA into `job.output_dir`."""

    name: str

    def train(self, job: TrainJob, *, resume: bool = False, on_step: OnStep | None = None) -> TrainOutcome:
        ...


class DiffusersTrainer:
    """Our diffusers + peft + accelerate trainer."""

    name = "diffusers"

    def train(self, job: TrainJob, *, resume: bool = False, on_step: OnStep | None = None) -> TrainOutcome:
        return train_lora(job, resume=resume, on_step=on_step)


class KohyaScriptsTrainer:
    """kohya sd-scripts `train_network.py` on the package's TOML configs, in a subprocess."""

    name = "kohya"

    def __init__(self, scripts_dir: str | None = None, launcher: list[str] | None = None):
        if not scripts_dir:
            raise ValueError("trainer 'kohya' needs kohya_scripts: the folder of a kohya sd-scripts checkout")
        self.scripts = Path(scripts_dir).expanduser()
        if not (self.scripts / "train_network.py").is_file():
            raise FileNotFoundError(f"kohya_scripts '{scripts_dir}' has no train_network.py")
        self.launcher = launcher or [sys.executable, "-m", "accelerate.commands.launch"]

    def command(self, job: TrainJob, family: str) -> list[str]:
        """The train_network.py command line; run it from the run folder (paths in the TOMLs are relative to it)."""
        config = job.kohya_config
        if config is None or not Path(config).is_file():
            raise FileNotFoundError(f"character '{job.character}' has no configs/{job.character}_config.toml in its package")
        script = "sdxl_train_network.py" if family == "sdxl" else "train_network.py"
        cmd = [*self.launcher, str(self.scripts / script), "--config_file", str(config),
               "--output_dir", str(job.output_dir), "--output_name", job.output_name,
               "--logging_dir", str(Path(job.output_dir) / "logs")]
        if job.kohya_dataset is not None:
            cmd += ["--dataset_config", str(job.kohya_dataset)]
        return cmd

    def train(self, job: TrainJob, *, resume: bool = False, on_step: OnStep | None = None) -> TrainOutcome:
        from models.flux_base import is_flux

        if is_flux(job.settings.base):
            raise ValueError(f"trainer 'kohya' runs the package's SD 1.5 / SDXL TOMLs, not FLUX.1 (base "
                             f"{job.settings.base!r}): train FLUX with trainer 'diffusers' (profile package trains "
                             "the packaged AI-Toolkit job's settings) or run configs/<name>_ai_toolkit.yaml in AI-Toolkit")
        out = Path(job.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        started = time.time()
        family = "sdxl" if "xl" in job.settings.base.lower() else "sd15"
        with open(out / "kohya.log", "a") as log:
            # the package's TOMLs hold paths relative to the run folder (configs/ -> package/ -> run)
            done = subprocess.run(self.command(job, family), cwd=Path(job.kohya_config).resolve().parent.parent.parent,
                                  stdout=log, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            tail = (out / "kohya.log").read_text(errors="replace")[-1500:]
            raise RuntimeError(f"kohya train_network.py exited with {done.returncode}; log tail:\n{tail}")
        lora = out / f"{job.output_name}.safetensors"
        if not lora.is_file():
            raise FileNotFoundError(f"kohya finished but wrote no {lora}")
        steps = [(int(p.stem.rsplit("-", 1)[1]), str(p)) for p in sorted(out.glob(f"{job.output_name}-*.safetensors"))
                 if p.stem.rsplit("-", 1)[1].isdigit()]
        return TrainOutcome(character=job.character, status="completed", steps=0, epochs=0, final_loss=None,
                            final_val_loss=None, best_val_loss=None, best_val_step=None, lora_path=str(lora),
                            diffusers_path="", checkpoints=steps, samples=sorted(str(p) for p in out.glob("sample/*.png")),
                            resumed_from=None, seconds=round(time.time() - started, 2), base=job.settings.base,
                            family=family)


TRAINERS: dict[str, Callable[..., Trainer]] = {"diffusers": DiffusersTrainer, "kohya": KohyaScriptsTrainer}


def get_trainer(name: str, **options: Any) -> Trainer:
    """The trainer registered as `name`; KeyError listing the known names otherwise."""
    if name not in TRAINERS:
        raise KeyError(f"unknown trainer '{name}'; known trainers: {', '.join(TRAINERS)}")
    return TRAINERS[name](**options) if name != "diffusers" else TRAINERS[name]()
