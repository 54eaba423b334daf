"""What does `sdtune export` cost on a real-size model? Time and peak memory of each format, check included.

    python benchmarks/export_sd15.py --work /tmp/sdtune-export-bench

Builds (once, into --work) a Stable Diffusion 1.5-architecture pipeline with random weights (UNet 860 M parameters,
VAE, CLIP ViT-L/14-size text encoder; the tiny test tokenizer, since vocabularies cannot be downloaded here) stored
in fp16 as SD1.5 ships, and a rank-16 LoRA on the UNet's attention projections and a rank-8 one on the text encoder
with random non-zero B. Then runs `sdtune export` for every format in its own process under `/usr/bin/time` and
prints wall time, peak RSS and the check's line. Weights are random, so this measures cost, not image quality.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing


def build_model(out: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdtune.models.tiny import write_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64)  # diffusers' defaults are SD1.x's UNet
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512,
    )  # fmt: skip
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                num_attention_heads=12, max_position_embeddings=77, vocab_size=49408))  # fmt: skip
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        module.to(torch.float16).save_pretrained(out / name)
    betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    PNDMScheduler(**betas, skip_prk_steps=True).save_pretrained(out / "scheduler")
    write_tokenizer(out / "tokenizer")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "PNDMScheduler"], "safety_checker": [None, None], "feature_extractor": [None, None]}  # fmt: skip
    (out / "model_index.json").write_text(json.dumps(index, indent=2))


def build_adapter(model: Path, out: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from training import trained_adapter

    from sdtune.adapters.lora import LoraSettings, TextEncoderLora

    trained_adapter(model, out, std=0.01, lora=LoraSettings(rank=16, alpha=8.0), text_encoder_lora=TextEncoderLora(rank=8, alpha=8.0))


def timed_export(args: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS GB, the command's last stdout line)."""
    result = subprocess.run(["/usr/bin/time", "-f", "TIME %e %M", sys.executable, "-m", "sdtune.cli", "export", *args],
                            capture_output=True, text=True)  # fmt: skip
    found = re.search(r"TIME ([\d.]+) (\d+)", result.stderr)
    if result.returncode != 0 or not found:
        raise SystemExit(f"export {' '.join(args)} failed:\n{result.stderr[-2000:]}")
    return float(found[1]), int(found[2]) / 1024**2, result.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the model, adapter and exports (~6 GB)")
    ns = parser.parse_args()
    model, adapter, exports = ns.work / "sd15-random", ns.work / "adapter", ns.work / "exports"
    if not (model / "model_index.json").is_file():
        started = time.perf_counter()
        build_model(model)
        print(f"built {model} in {time.perf_counter() - started:.0f} s")
    if not adapter.is_dir():
        build_adapter(model, adapter)
    runs = {
        "diffusers fp16": ["--format", "diffusers", "--dtype", "fp16", "--out", exports / "diffusers"],
        "peft": ["--format", "peft", "--out", exports / "peft"],
        "kohya fp16": ["--format", "kohya", "--dtype", "fp16", "--out", exports / "kohya.safetensors"],
        "merge fp16": ["--merge", "--dtype", "fp16", "--out", exports / "merged"],
    }
    print("| export | wall s | peak RSS GB | check |\n| --- | --- | --- | --- |")
    for name, args in runs.items():
        wall, rss, line = timed_export([str(adapter), "--model", str(model), "--force", *map(str, args)])
        print(f"| {name} | {wall:.0f} | {rss:.1f} | {line.split('checked: ')[-1]} |", flush=True)


if __name__ == "__main__":
    main()
