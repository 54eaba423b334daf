"""Peak memory and step time of `sdtune fit --config sdxl/lora` at full SDXL size, on whatever device runs it.

Nothing can be downloaded here, so the model is SDXL base 1.0's architecture with random weights, written once in
bfloat16 (UNet 2.57 B parameters, VAE 84 M, text encoders 85 M and 632 M: their token embeddings have the 677 rows
of sdtune's tiny tokenizer instead of 49,408, which leaves out 101 M parameters, 3 % of the model). The recipe runs as shipped (bf16-mixed,
frozen weights in bf16, gradient checkpointing, rank-16 LoRA, batch 2 at 1024 px) except for the few steps, the CPU
accelerator when no GPU is present, and sampling off. The peak resident memory of the `fit` process is what a GPU
would need for weights and activations, minus what only a CPU process holds (Python, the libraries, about 1 GB).

    python benchmarks/sdxl_memory.py --work /tmp/sdxlbench [--steps 2] [--resolution 1024] [--batch-size 2]
                                     [--no-checkpointing]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def build_model(out: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdtune.models.tiny import _tokenizer_vocab_size, write_tokenizer
    from sdtune.models.tiny_sdxl import model_index

    vocab = _tokenizer_vocab_size()
    ids = dict(bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1, max_position_embeddings=77)

    def save(module, name):
        module.to(torch.bfloat16).save_pretrained(out / name)
        print(f"  {name}: {sum(p.numel() for p in module.parameters()) / 1e6:.0f} M parameters", flush=True)

    save(CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu", **ids)),
         "text_encoder")  # fmt: skip
    save(CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=vocab, hidden_size=1280, intermediate_size=5120,
                                                    num_hidden_layers=32, num_attention_heads=20, projection_dim=1280,
                                                    hidden_act="gelu", **ids)),
         "text_encoder_2")  # fmt: skip
    save(AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                       up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                       sample_size=1024, scaling_factor=0.13025),
         "vae")  # fmt: skip
    save(UNet2DConditionModel(
        sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ), "unet")  # fmt: skip
    EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                           steps_offset=1, timestep_spacing="leading").save_pretrained(out / "scheduler")  # fmt: skip
    write_tokenizer(out / "tokenizer")
    write_tokenizer(out / "tokenizer_2", pad_token="!")
    (out / "model_index.json").write_text(json.dumps(model_index(), indent=2))


def build_data(out: Path, size: int, count: int) -> None:
    import numpy as np
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(0)
    for i in range(count):
        small = generator.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC).save(out / f"{i}.jpg", quality=90)
        (out / f"{i}.txt").write_text(f"a photo number {i}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="folder for the random model, images and runs")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--no-checkpointing", action="store_true", help="turn the recipe's gradient checkpointing off")
    ns = parser.parse_args()
    model, data = ns.work / "sdxl-random", ns.work / f"data{ns.resolution}"
    if not (model / "model_index.json").is_file():
        print("building the random SDXL (once)", flush=True)
        build_model(model)
    if not data.is_dir():
        build_data(data, ns.resolution, 4)
    import torch

    run = ns.work / f"run-{ns.resolution}-b{ns.batch_size}-{int(time.time())}"
    command = [sys.executable, "-m", "sdtune.cli", "fit", "--config", "sdxl/lora", "--model.pretrained", str(model),
               "--data.root", str(data), "--data.resolution", str(ns.resolution), "--data.batch_size", str(ns.batch_size),
               "--data.num_workers", "0", "--trainer.max_steps", str(ns.steps), "--trainer.default_root_dir", str(run),
               "--samples.enabled", "false", "--adapter.enabled", "false", "--checkpoint.every_n_train_steps", "0"]  # fmt: skip
    if not torch.cuda.is_available():
        command += ["--trainer.accelerator", "cpu"]
    if ns.no_checkpointing:
        command += ["--model.gradient_checkpointing", "false"]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2  # KiB → GiB (Linux)
    if result.returncode != 0:
        sys.exit(f"fit failed:\n{result.stderr[-3000:]}")
    lines = [line for line in result.stderr.splitlines() if line.startswith("throughput:")]
    print(json.dumps({"resolution": ns.resolution, "batch_size": ns.batch_size, "steps": ns.steps,
                      "gradient_checkpointing": not ns.no_checkpointing,
                      "peak_rss_gib": round(peak, 2), "wall_seconds": round(seconds, 1),
                      "throughput": lines[-1] if lines else None}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
