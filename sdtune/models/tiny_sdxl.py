"""A tiny random Stable Diffusion XL in the diffusers layout, for tests.

The same families as SDXL base: a UNet whose added conditioning is "text_time" (the pooled text embedding and the
six size and crop numbers, each through a sinusoidal embedding), a `CLIPTextModel` and a
`CLIPTextModelWithProjection` whose penultimate hidden states are concatenated for cross-attention, two CLIP
tokenizers (the second pads with "!", as SDXL's does), Euler as the inference scheduler and SDXL's VAE scaling
factor. The two encoders have different widths (32 and 48, projection 40), so code that confuses them or assumes
one width fails on it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from sdtune.models.tiny import MAX_TOKENS, clip_text_encoder, tiny_unet, tiny_vae, tokenizer_vocab_size, write_tokenizer

TIME_EMBED_DIM = 8  # per number of the six add_time_ids
SDXL_SCALING_FACTOR = 0.13025


def model_index() -> dict:
    """model_index.json of an SDXL base pipeline directory."""
    return {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": "0.34.0",
        "feature_extractor": [None, None],
        "force_zeros_for_empty_prompt": True,
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def build_tiny_sdxl(out: str | Path, seed: int = 0, sample_size: int = 32) -> Path:
    """Write a complete random-weight SDXL-style pipeline directory to `out` and return its path.

    `sample_size` is the UNet's latent side; images are `2 * sample_size` pixels (the tiny VAE downsamples by 2)."""
    out = Path(out)
    torch.manual_seed(seed)
    vocab_size = tokenizer_vocab_size()
    text_encoder = clip_text_encoder(vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=3)
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=48, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3,
            max_position_embeddings=MAX_TOKENS, layer_norm_eps=1e-5, bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, projection_dim=40,
        )
    )  # fmt: skip
    pooled_dim = text_encoder_2.config.projection_dim
    unet = tiny_unet(
        sample_size,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + pooled_dim,
        cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
    )
    vae = tiny_vae(2 * sample_size, SDXL_SCALING_FACTOR)
    # SDXL base's training betas and its inference scheduler's settings.
    betas = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    scheduler = EulerDiscreteScheduler(**betas, steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")
    DDPMScheduler(**betas)  # the config must also build the training scheduler: fail here, not in a test
    write_tokenizer(out / "tokenizer")
    write_tokenizer(out / "tokenizer_2", pad_token="!")
    unet.save_pretrained(out / "unet")
    vae.save_pretrained(out / "vae")
    text_encoder.save_pretrained(out / "text_encoder")
    text_encoder_2.save_pretrained(out / "text_encoder_2")
    scheduler.save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps(model_index(), indent=2))
    return out
