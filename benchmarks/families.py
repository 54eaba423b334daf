"""Step time of a LoRA fit on each model family's tiny model, one after the other in one run (compare the ratios).

    python benchmarks/families.py --work /tmp/sdtune-families [--steps 40]

Each family's tiny model (the ones the tests use: SD1, SD2, SDXL UNets; SD3 and Flux transformers, every part a
few layers wide) trains its recipe's LoRA through the real `sdtune fit` at 64 px, batch 2, fp32, cache off,
sampling off. Step time is the median time between the ends of consecutive optimizer steps after 5 warm-up steps,
read from the run's TensorBoard `perf/step_time_ms`. Results and the machine are in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable from a checkout without installing

FAMILIES = {  # name: (builder module, recipe)
    "SD1": ("sdtune.models.tiny:build_tiny_stable_diffusion", "sd15/lora"),
    "SD2": ("sdtune.models.tiny_sd2:build_tiny_sd2", "sd2/lora"),
    "SDXL": ("sdtune.models.tiny_sdxl:build_tiny_sdxl", "sdxl/lora"),
    "SD3": ("sdtune.models.tiny_sd3:build_tiny_sd3", "sd35/lora"),
    "Flux": ("sdtune.models.tiny_flux:build_tiny_flux", "flux/lora"),
}


def build(target: str, out: Path) -> Path:
    import importlib

    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)(out)


def step_times(logs: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logs))
    events.Reload()
    return [e.value for e in events.Scalars("perf/step_time_ms")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="scratch folder")
    parser.add_argument("--steps", type=int, default=40)
    ns = parser.parse_args()
    work = Path(ns.work)
    from sdtune.toy.shapes import make_shapes_dataset

    data = make_shapes_dataset(work / "data", count=16, size=64, seed=0)
    print(f"{'family':<8}{'recipe':<12}{'ms/step':>10}{'steps/s':>10}   (64 px, batch 2, fp32, LoRA)")
    for family, (target, recipe) in FAMILIES.items():
        model = build(target, work / "models" / family)
        run = work / "runs" / family
        subprocess.run(
            [sys.executable, "-m", "sdtune.cli", "fit", "--config", recipe, "--model.pretrained", str(model),
             "--data.root", str(data), "--data.resolution", "64", "--data.buckets", "false", "--data.batch_size", "2",
             "--data.cache", "false", "--data.num_workers", "0", "--trainer.max_steps", str(ns.steps),
             "--trainer.precision", "32-true", "--model.weight_dtype", "float32", "--trainer.accelerator", "cpu",
             "--model.gradient_checkpointing", "false", "--samples.enabled", "false", "--trainer.log_every_n_steps", "1",
             "--trainer.enable_progress_bar", "false", "--checkpoint.every_n_train_steps", str(ns.steps),
             "--trainer.default_root_dir", str(run)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        median = statistics.median(step_times(run / "logs")[5:])
        print(f"{family:<8}{recipe:<12}{median:>10.1f}{1000 / median:>10.2f}")


if __name__ == "__main__":
    main()
