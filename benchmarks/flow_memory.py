"""Memory of the flow-matching families: the real models' weights in bf16, int8 and NF4 (computed from their
published configs, built on the meta device: nothing is downloaded or allocated), the cache entries per 1024-px image,
and a measured tiny QLoRA run.

    python benchmarks/flow_memory.py

Results and the machine are in benchmarks/README.md.
"""

from __future__ import annotations

import subprocess
import sys

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

GB = 1e9

# The models' published configs (transformer/config.json, text_encoder*/config.json).
FLUX1_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                 axes_dims_rope=[16, 56, 56])  # fmt: skip
SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                  num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")  # fmt: skip
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384, qk_norm="rms_norm",
                   dual_attention_layers=tuple(range(13)))  # fmt: skip
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu")
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280,
              hidden_act="gelu")  # fmt: skip


def sizes(model: torch.nn.Module) -> dict[str, float]:
    """Bytes of the weights: bf16; int8 (linear weights 1 byte + a float32 scale per row); NF4 (linear weights half a
    byte + double-quantized absmax: 8 bits per 64 weights + float32 per 256 blocks); everything else stays bf16."""
    linear = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    linear_params = sum(w.numel() for w in linear)
    rows = sum(w.shape[0] for w in linear)
    total = sum(p.numel() for p in model.parameters())
    rest = 2 * (total - linear_params)
    return {
        "params": total,
        "bf16": 2 * total,
        "int8": rest + linear_params + 4 * rows,
        "nf4": rest + linear_params / 2 + linear_params / 64 + 4 * linear_params / (64 * 256),
    }


def meta(build) -> torch.nn.Module:
    with torch.device("meta"):
        return build()


def tiny_qlora_rss(quantize: str | None) -> float:
    """Peak RSS (GiB) of a process that builds the tiny Flux LoRA module (quantized or not) and trains 3 steps."""
    code = f"""
import resource, sys, tempfile, torch, lightning as L
from pathlib import Path
from sdtune.finetune import LoRAFineTune
from sdtune.data import CaptionDataModule
from sdtune.models.tiny_flux import build_tiny_flux
from sdtune.toy.shapes import make_shapes_dataset
root = Path(tempfile.mkdtemp())
model = build_tiny_flux(root / "flux")
data = make_shapes_dataset(root / "data", count=8, size=64)
module = LoRAFineTune(str(model), lora={{"rank": 4, "alpha": 4}}, quantize={quantize!r})
trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=str(root))
trainer.fit(module, CaptionDataModule(str(data), resolution=64, batch_size=2, center_crop=True, pretrained=str(model)))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    models = {
        "Flux.1 dev transformer": meta(lambda: FluxTransformer2DModel(**FLUX1_DEV)),
        "SD3.5 Large transformer": meta(lambda: SD3Transformer2DModel(**SD35_LARGE)),
        "SD3.5 Medium transformer": meta(lambda: SD3Transformer2DModel(**SD35_MEDIUM)),
        "T5-XXL encoder": meta(lambda: T5EncoderModel(T5Config(**T5_XXL))),
        "CLIP-G (OpenCLIP bigG)": meta(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))),
        "CLIP-L": meta(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L))),
    }
    print(f"{'weights':<26}{'params':>10}{'bf16':>10}{'int8':>10}{'nf4':>10}   (GB = 1e9 bytes)")
    for name, model in models.items():
        s = sizes(model)
        print(f"{name:<26}{s['params'] / 1e9:>9.2f}B{s['bf16'] / GB:>10.1f}{s['int8'] / GB:>10.1f}{s['nf4'] / GB:>10.1f}")
    latents = 2 * 16 * 128 * 128 * 4  # mean and std, 16 channels of 128 × 128, float32
    print("\ncache per 1024-px image (one orientation), as sdtune stores it:")
    print(f"  latents (both families)    {latents / 2**20:.2f} MiB  (16 × 128 × 128 mean + std, float32)")
    sd3_text = (77 + 256) * 4096 * 2 + 2048 * 4
    flux_text = 512 * 4096 * 2 + 768 * 4
    print(f"  SD3.5 text per caption     {sd3_text / 2**20:.2f} MiB  ((77 + 256) × 4096 float16 + 2048 pooled float32)")
    print(f"  Flux text per caption      {flux_text / 2**20:.2f} MiB  (512 × 4096 float16 + 768 pooled float32)")
    print("\ntiny Flux LoRA, 3 training steps on the CPU (peak RSS of the whole process):")
    for quantize in (None, "nf4", "int8"):
        print(f"  quantize={quantize!s:<5} {tiny_qlora_rss(quantize):.3f} GiB")


if __name__ == "__main__":
    main()
