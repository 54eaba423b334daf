"""A tiny random Stable Diffusion 3 (MMDiT) in the diffusers layout, for tests.

What sets SD3 apart is kept: a transformer denoiser with joint text-image attention, three text encoders (two CLIPs
with projections, whose pooled outputs are concatenated, and a T5 whose sequence follows theirs), a 16-channel VAE
with a shift and a scale, and the flow-matching scheduler with its shift. The widths differ from each other and
from SD3's, so code that assumes SD3's numbers (4096, 2048, 77 + 256 tokens) fails on it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from sdtune.models.tiny import MAX_TOKENS, tiny_vae, tokenizer_vocab_size, write_tokenizer
from sdtune.models.tiny_t5 import t5_encoder, t5_tokenizer

T5_WIDTH = 64  # the joint attention width; the CLIPs' concatenated widths (16 + 32) are padded to it


def clip_with_projection(vocab_size: int, hidden_size: int, layers: int, projection_dim: int) -> CLIPTextModelWithProjection:
    """A random CLIP text encoder with a projection (SD3's, SDXL's second), OpenCLIP-style (GELU)."""
    return CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_attention_heads=4,
            num_hidden_layers=layers, max_position_embeddings=MAX_TOKENS, layer_norm_eps=1e-5,
            bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
            projection_dim=projection_dim, hidden_act="gelu",
        )
    )  # fmt: skip


def model_index() -> dict:
    return {
        "_class_name": "StableDiffusion3Pipeline",
        "_diffusers_version": "0.42.0",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def build_tiny_sd3(out: str | Path, seed: int = 0, sample_size: int = 32) -> Path:
    """Write a complete random-weight SD3-style pipeline directory to `out` and return its path; images are
    `2 * sample_size` pixels (the tiny VAE downsamples by 2)."""
    out = Path(out)
    torch.manual_seed(seed)
    vocab_size = tokenizer_vocab_size()
    text_encoder = clip_with_projection(vocab_size, 16, layers=3, projection_dim=16)
    text_encoder_2 = clip_with_projection(vocab_size, 32, layers=3, projection_dim=24)
    tokenizer_3 = t5_tokenizer()
    text_encoder_3 = t5_encoder(len(tokenizer_3), T5_WIDTH)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=T5_WIDTH, caption_projection_dim=32,
        pooled_projection_dim=16 + 24, pos_embed_max_size=sample_size,
    )  # fmt: skip
    vae = tiny_vae(2 * sample_size, scaling_factor=1.5305, latent_channels=16, shift_factor=0.0609)
    write_tokenizer(out / "tokenizer")
    write_tokenizer(out / "tokenizer_2", pad_token="!")
    tokenizer_3.save_pretrained(out / "tokenizer_3")
    for name, module in (("transformer", transformer), ("vae", vae), ("text_encoder", text_encoder),
                         ("text_encoder_2", text_encoder_2), ("text_encoder_3", text_encoder_3)):  # fmt: skip
        module.save_pretrained(out / name)
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps(model_index(), indent=2))
    return out
