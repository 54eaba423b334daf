"""`sdtune demo`: the whole path offline on CPU in a few minutes.

Builds a tiny random Stable Diffusion and a generated captioned dataset, trains the `tiny/lora` recipe through the
real `sdtune fit`, then loads the adapter into a diffusers StableDiffusionPipeline and writes sample PNGs with and
without it. The tiny model starts from random weights, so the images show the mechanics, not art.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

DEMO_PROMPTS = ["a red circle", "a blue square", "a green triangle"]


def main(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="sdtune demo",
        description=__doc__,
        epilog="example:\n  sdtune demo --out sdtune-demo\n  tensorboard --logdir sdtune-demo/run/logs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="sdtune-demo", help="folder for the model, dataset, run and samples")
    parser.add_argument("--steps", type=int, default=200, help="training steps (default: 200, about half a minute on 2 CPU cores)")
    ns = parser.parse_args(args)

    from data_prep.shapes import make_shapes_dataset
    from sdtune.cli import main as sdtune_main
    from sdtune.models.tiny import build_tiny_stable_diffusion

    out = Path(ns.out)
    model_dir, data_dir, run_dir = out / "tiny-sd", out / "shapes", out / "run"
    if not (model_dir / "model_index.json").exists():
        build_tiny_stable_diffusion(model_dir)
    print(f"[1/4] tiny model: {model_dir}")
    if not (data_dir / "metadata.jsonl").exists():
        make_shapes_dataset(data_dir, count=32, size=64)
    print(f"[2/4] dataset: {data_dir} (32 captioned images)")

    fit = ["fit", "--config", "tiny/lora", "--model.pretrained", str(model_dir), "--data.root", str(data_dir),
           "--trainer.default_root_dir", str(run_dir), "--trainer.max_steps", str(ns.steps)]
    print("[3/4] sdtune " + " ".join(fit))
    started = time.perf_counter()
    code = sdtune_main(fit)
    if code != 0:
        return code
    seconds = time.perf_counter() - started
    print(f"      trained {ns.steps} steps in {seconds:.0f} s; adapter: {run_dir / 'adapter'}")

    samples = out / "samples"
    difference = write_samples(model_dir, run_dir / "adapter", samples)
    print(f"[4/4] samples: {samples} (base_*.png vs lora_*.png; mean |Δpixel| = {difference:.3f}/255)")
    return 0


def write_samples(model_dir: Path, adapter_dir: Path, out: Path) -> float:
    """Same prompts and seeds with and without the adapter, loaded the way a diffusers user would."""
    from diffusers import StableDiffusionPipeline

    from sdtune.sampling import generate, make_scheduler

    out.mkdir(parents=True, exist_ok=True)
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    kwargs = dict(prompts=DEMO_PROMPTS, seeds=[0], steps=20, guidance_scale=4.0, height=size, width=size)
    base = generate(pipe, **kwargs)
    pipe.load_lora_weights(adapter_dir)
    tuned = generate(pipe, **kwargs)
    differences = []
    for prompt, (b,), (t,) in zip(DEMO_PROMPTS, base, tuned):
        stem = prompt.replace(" ", "_")
        b.save(out / f"base_{stem}.png")
        t.save(out / f"lora_{stem}.png")
        differences.append(np.abs(np.asarray(b, dtype=np.float32) - np.asarray(t, dtype=np.float32)).mean())
    return float(np.mean(differences))
