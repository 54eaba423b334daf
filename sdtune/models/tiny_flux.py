"""A tiny random Flux.1 (dev) in the diffusers layout, for tests.

What sets Flux apart is kept: a transformer with double (joint) and single blocks over latents packed 2×2 into
tokens with rotary position ids, a CLIP whose pooled output conditions it beside a T5 sequence, the guidance
embedding of the distilled dev model, a 16-channel VAE with shift and scale, and the flow-matching scheduler with
resolution-dependent shift.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

from sdtune.models.tiny import clip_text_encoder, tiny_vae, tokenizer_vocab_size, write_tokenizer
from sdtune.models.tiny_t5 import t5_encoder, t5_tokenizer

T5_WIDTH = 48


def model_index() -> dict:
    return {
        "_class_name": "FluxPipeline",
        "_diffusers_version": "0.42.0",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def build_tiny_flux(out: str | Path, seed: int = 0, sample_size: int = 32, guidance_embeds: bool = True) -> Path:
    """Write a complete random-weight Flux-style pipeline directory to `out` (dev-like with `guidance_embeds`,
    schnell-like without) and return its path; images are `2 * sample_size` pixels."""
    out = Path(out)
    torch.manual_seed(seed)
    text_encoder = clip_text_encoder(tokenizer_vocab_size(), hidden_size=32, intermediate_size=37, num_hidden_layers=3)
    tokenizer_2 = t5_tokenizer()
    text_encoder_2 = t5_encoder(len(tokenizer_2), T5_WIDTH)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16 * 4, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=T5_WIDTH, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance_embeds,
    )  # fmt: skip
    vae = tiny_vae(2 * sample_size, scaling_factor=0.3611, latent_channels=16, shift_factor=0.1159)
    write_tokenizer(out / "tokenizer")
    tokenizer_2.save_pretrained(out / "tokenizer_2")
    for name, module in (("transformer", transformer), ("vae", vae), ("text_encoder", text_encoder),
                         ("text_encoder_2", text_encoder_2)):  # fmt: skip
        module.save_pretrained(out / name)
    # Flux.1's scheduler: the shift grows with the image's token count between base_shift and max_shift.
    FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    ).save_pretrained(out / "scheduler")  # fmt: skip
    (out / "model_index.json").write_text(json.dumps(model_index(), indent=2))
    return out
