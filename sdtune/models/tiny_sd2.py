"""A tiny random Stable Diffusion 2.x (768-v style) in the diffusers layout, for tests.

What sets SD2 apart from SD1 is kept: the scheduler predicts v (`prediction_type: v_prediction`), the UNet's
attention uses linear projections and a head size per block, and the text encoder is OpenCLIP-style (GELU, a width
other than SD1's). A model that silently trains or samples it as an ε model gives wrong targets and images.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdtune.models.tiny import (
    clip_text_encoder,
    save_pipeline,
    tiny_unet,
    tiny_vae,
    tokenizer_vocab_size,
    write_tokenizer,
)

TEXT_WIDTH = 48


def build_tiny_sd2(out: str | Path, seed: int = 0, sample_size: int = 32) -> Path:
    """Write a complete random-weight SD2-style v-prediction pipeline directory to `out` and return its path.

    `sample_size` is the UNet's latent side; images are `2 * sample_size` pixels (the tiny VAE downsamples by 2)."""
    out = Path(out)
    torch.manual_seed(seed)
    unet = tiny_unet(sample_size, cross_attention_dim=TEXT_WIDTH, attention_head_dim=(2, 4), use_linear_projection=True)
    text_encoder = clip_text_encoder(tokenizer_vocab_size(), TEXT_WIDTH, 64, num_hidden_layers=4, hidden_act="gelu")
    write_tokenizer(out / "tokenizer")
    save_pipeline(out, tiny_vae(2 * sample_size), unet, text_encoder, prediction_type="v_prediction")
    return out
