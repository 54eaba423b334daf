"""Is `sdtune fit` as fast as the loop a user would write by hand, and how much does the cache buy?

    python benchmarks/train_loop.py --work /tmp/sdtune-bench                      # tiny model, 64 px, 300 steps
    python benchmarks/train_loop.py --work /tmp/sdtune-bench --model sd15 --resolution 256 --batch-size 1 --steps 12
    python benchmarks/train_loop.py --work /tmp/sdtune-bench --diffusers-script train_text_to_image_lora.py

The same LoRA job several ways, one after the other in one run (the machine is noisy: compare the ratios):
(a) a bare PyTorch loop written here with diffusers' maths and peft's LoRA (no Lightning, no sdtune): load, resize,
    crop, tokenize, VAE encode, text encode, noise, UNet, min-SNR MSE, AdamW — what diffusers' example script does
    per step; (a') the same loop with every image and caption encoded once up front (a hand-written cache);
    (b) `sdtune fit --config tiny/lora`; (c) the same with `--data.cache true` (run twice: the first run builds the
    cache, the second is timed). The job is the tiny/lora recipe's: rank 8, alpha 4, attention projections, AdamW
    lr 1e-3, warmup 5, min-SNR 5, caption dropout 0.1, centre crops; sampling off.
(d) with --diffusers-script, diffusers' own `train_text_to_image_lora.py` on the same job (its rank 8 has alpha 8
    and it has no caption dropout; run through `diffusers_script.py`, which stands in for torchvision).

Step time is the time between the ends of consecutive optimizer steps (data loading, logging and checkpoint writes
included), median after 5 warm-up steps. Peak RSS and wall time come from `/usr/bin/time` around each process.
`--model sd15` is an SD1.5-architecture model with random weights (built once by benchmarks/export_sd15.py's code).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable from a checkout without installing
WARMUP = 5


# --- (a) the bare loop ------------------------------------------------------------------------------------------


def bare_loop(
    model: str, data: str, resolution: int, batch_size: int, steps: int, times_file: str, cached: bool = False
) -> None:
    """`cached`: encode every image and caption once before the first step, then train from the stored VAE
    posteriors (a latent sampled each step) and text outputs, as `data.cache` does; the dropped caption's output
    is stored too."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import compute_snr
    from peft import LoraConfig
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", torch_dtype=torch.float32).requires_grad_(False).eval()
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=torch.float32).requires_grad_(False).eval()
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=torch.float32).requires_grad_(False)
    unet.add_adapter(LoraConfig(r=8, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    unet.train()
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=5)
    rows = [json.loads(line) for line in (Path(data) / "metadata.jsonl").read_text().splitlines() if line.strip()]

    def pixels(name: str) -> torch.Tensor:
        image = Image.open(Path(data) / name).convert("RGB")
        scale = resolution / min(image.size)
        image = image.resize((max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))), Image.LANCZOS)
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
        array = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(resolution, resolution, 3)
        return array.permute(2, 0, 1).float() / 127.5 - 1

    def encode_text(captions: list[str]) -> torch.Tensor:
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        return text_encoder(ids)[0]

    if cached:
        with torch.no_grad():
            posteriors = [vae.encode(pixels(row["file_name"])[None]).latent_dist for row in rows]
            stored = [(d.mean[0], d.std[0], encode_text([row["text"]])[0]) for d, row in zip(posteriors, rows)]
            empty = encode_text([""])[0]

    ends, step, epoch = [], 0, 0
    while step < steps:
        order = torch.randperm(len(rows)).tolist()
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            dropped = [bool(torch.rand(()) < 0.1) for _ in chosen]
            with torch.no_grad():
                if cached:
                    mean, std = torch.stack([stored[i][0] for i in chosen]), torch.stack([stored[i][1] for i in chosen])
                    latents = (mean + std * torch.randn_like(mean)) * vae.config.scaling_factor
                    text = torch.stack([empty if drop else stored[i][2] for i, drop in zip(chosen, dropped)])
                else:
                    images = torch.stack([pixels(rows[i]["file_name"]) for i in chosen])
                    latents = vae.encode(images).latent_dist.sample() * vae.config.scaling_factor
                    text = encode_text(["" if drop else rows[i]["text"] for i, drop in zip(chosen, dropped)])
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],))
            noisy = scheduler.add_noise(latents, noise, timesteps)
            prediction = unet(noisy, timesteps, text).sample
            snr = compute_snr(scheduler, timesteps)
            weights = torch.minimum(snr, torch.full_like(snr, 5.0)) / snr
            loss = (F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3)) * weights).mean()
            loss.backward()
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            ends.append(time.perf_counter())
            step += 1
            if step == steps:
                break
        epoch += 1
    Path(times_file).write_text(json.dumps(ends))


# --- (b), (c) sdtune fit, timed by a callback -------------------------------------------------------------------


class StepTimer(L.Callback):
    """A Lightning callback (`--trainer.callbacks+ train_loop.StepTimer`) writing the end time of every optimizer
    step to $SDTUNE_BENCH_TIMES."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.last_step = -1

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step != self.last_step:
            self.last_step = trainer.global_step
            self.ends.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        Path(os.environ["SDTUNE_BENCH_TIMES"]).write_text(json.dumps(self.ends))


def timed(command: list[str], times_file: Path) -> dict:
    """Run `command` under /usr/bin/time; its step end times come back through `times_file`."""
    env = {**os.environ, "SDTUNE_BENCH_TIMES": str(times_file), "PYTHONPATH": f"{Path(__file__).parent}{os.pathsep}{ROOT}"}
    started = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-f", "TIME %e %M", *command], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    found = re.search(r"TIME ([\d.]+) (\d+)", result.stderr)
    if result.returncode != 0 or not found:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    ends = json.loads(times_file.read_text())
    gaps = [b - a for a, b in zip(ends, ends[1:])][WARMUP:]
    return {"step_ms": 1000 * statistics.median(gaps), "wall_s": wall, "rss_gb": int(found[2]) / 1024**2, "steps": len(ends)}


def prepare(work: Path, model: str, resolution: int, images: int) -> tuple[Path, Path]:
    data = work / f"shapes-{images}-{resolution}"
    if not (data / "metadata.jsonl").is_file():
        from sdtune.toy.shapes import make_shapes_dataset

        make_shapes_dataset(data, count=images, size=resolution, seed=0)
    model_dir = work / model
    if not (model_dir / "model_index.json").is_file():
        if model == "tiny":
            from sdtune.models.tiny import build_tiny_stable_diffusion

            build_tiny_stable_diffusion(model_dir)
        else:
            from export_sd15 import build_model

            build_model(model_dir)
    return model_dir, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the model, data, cache and runs")
    parser.add_argument("--model", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--diffusers-script", type=Path, help="diffusers' examples/text_to_image/train_text_to_image_lora.py")
    parser.add_argument("--arm", choices=("bare", "bare-cached"), help=argparse.SUPPRESS)  # internal: a bare loop here
    parser.add_argument("--times", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.arm:
        bare_loop(str(ns.work), ns.data, ns.resolution, ns.batch_size, ns.steps, ns.times, ns.arm == "bare-cached")
        return

    work = ns.work.expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    model, data = prepare(work, ns.model, ns.resolution, ns.images)
    fit = [sys.executable, "-m", "sdtune.cli", "fit", "--config", "tiny/lora", "--model.pretrained", str(model),
           "--data.root", str(data), "--data.resolution", str(ns.resolution), "--data.batch_size", str(ns.batch_size),
           "--trainer.max_steps", str(ns.steps), "--samples.enabled", "false", "--trainer.enable_progress_bar", "false",
           "--trainer.callbacks+", "train_loop.StepTimer"]  # fmt: skip
    cache = ["--data.cache", "true", "--data.cache_dir", str(work / f"cache-{ns.model}-{ns.resolution}")]
    bare = [sys.executable, __file__, "--work", str(model), "--data", str(data), "--times", str(work / "times.json"),
            "--resolution", str(ns.resolution), "--batch-size", str(ns.batch_size), "--steps", str(ns.steps)]  # fmt: skip
    runs = {
        "bare loop": [*bare, "--arm", "bare"],
        "bare loop, cached latents": [*bare, "--arm", "bare-cached"],
        "sdtune fit": [*fit, "--trainer.default_root_dir", str(work / "run-plain")],
        "sdtune fit, cache (first run: builds it)": [*fit, *cache, "--trainer.default_root_dir", str(work / "run-cache1")],
        "sdtune fit, cache": [*fit, *cache, "--trainer.default_root_dir", str(work / "run-cache2")],
    }
    if ns.diffusers_script:
        runs["diffusers train_text_to_image_lora.py"] = [
            sys.executable, str(Path(__file__).parent / "diffusers_script.py"), str(ns.diffusers_script.resolve()),
            "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--caption_column", "text",
            "--resolution", str(ns.resolution), "--center_crop", "--train_batch_size", str(ns.batch_size),
            "--max_train_steps", str(ns.steps), "--learning_rate", "1e-3", "--rank", "8", "--snr_gamma", "5",
            "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "5", "--seed", "0",
            "--dataloader_num_workers", "0", "--checkpointing_steps", str(ns.steps + 1),
            "--output_dir", str(work / "run-diffusers"),
        ]  # fmt: skip
    # Every run starts from nothing: the first cached run must build the cache.
    for name in ("run-plain", "run-cache1", "run-cache2", "run-diffusers", f"cache-{ns.model}-{ns.resolution}"):
        shutil.rmtree(work / name, ignore_errors=True)
    print(f"{ns.model} model, {ns.resolution} px, batch {ns.batch_size}, {ns.images} images, {ns.steps} steps, "
          f"torch threads {os.cpu_count()}")  # fmt: skip
    print("| run | median step ms | it/s | vs bare loop | wall s | peak RSS GB |\n| --- | --- | --- | --- | --- | --- |")
    results = {}
    for name, command in runs.items():
        result = results[name] = timed(command, work / "times.json")
        bare = results["bare loop"]["step_ms"]
        print(f"| {name} | {result['step_ms']:.1f} | {1000 / result['step_ms']:.1f} | {result['step_ms'] / bare:.2f}× "
              f"| {result['wall_s']:.1f} | {result['rss_gb']:.2f} |", flush=True)  # fmt: skip
    plain, cached = results["sdtune fit"]["step_ms"], results["sdtune fit, cache"]["step_ms"]
    bare_cached = results["bare loop, cached latents"]["step_ms"]
    print(f"\nsdtune fit vs bare loop: {plain / bare:.3f}× the step time; with cache vs bare loop with cached latents: "
          f"{cached / bare_cached:.3f}×; the cache: {plain / cached:.2f}× the it/s (bare loops: {bare / bare_cached:.2f}×)")
    if ns.diffusers_script:
        script = results["diffusers train_text_to_image_lora.py"]["wall_s"]
        print(f"whole sdtune fit with cache vs diffusers' script: {results['sdtune fit, cache']['wall_s'] / script:.2f}× "
              f"the wall time (first cached run, building the cache: "
              f"{results['sdtune fit, cache (first run: builds it)']['wall_s'] / script:.2f}×)")


if __name__ == "__main__":
    main()
