"""A tiny random Stable Diffusion in the diffusers layout, for tests and the offline demo.

Same architecture families as SD1.x (AutoencoderKL, CLIPTextModel, UNet2DConditionModel with cross-attention),
a few hundred thousand parameters each. The VAE downsamples by 2 (not 8) and the text width is 32 (not 768), so
code that hard-codes SD's numbers fails on it. The tokenizer is a real CLIP BPE tokenizer whose small vocabulary
ships with sdtune (`tiny_tokenizer/`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

TOKENIZER_FILES = Path(__file__).parent / "tiny_tokenizer"
MAX_TOKENS = 77


def tokenizer_vocab_size() -> int:
    return len(json.loads((TOKENIZER_FILES / "vocab.json").read_text(encoding="utf-8")))


def tokenizer_config(pad_token: str = "<|endoftext|>") -> dict:
    """tokenizer_config.json of a CLIP tokenizer as SD checkpoints ship it (SDXL's second one pads with "!")."""
    return {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_TOKENS,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": pad_token,
        "unk_token": "<|endoftext|>",
        "do_lower_case": True,
    }


def model_index() -> dict:
    """model_index.json of an SD1.x pipeline directory without safety checker."""
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.34.0",
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def write_tokenizer(out: Path, pad_token: str = "<|endoftext|>") -> None:
    """Write the tiny CLIP tokenizer as SD checkpoints ship theirs: vocab.json, merges.txt, tokenizer_config.json."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(TOKENIZER_FILES / name, out / name)
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(pad_token), indent=2))


def build_tiny_stable_diffusion(out: str | Path, seed: int = 0, sample_size: int = 32) -> Path:
    """Write a complete random-weight SD1.x-style pipeline directory to `out` and return its path.

    `sample_size` is the UNet's latent side; images are `2 * sample_size` pixels (the tiny VAE downsamples by 2).
    """
    out = Path(out)
    torch.manual_seed(seed)
    vocab_size = tokenizer_vocab_size()
    unet = tiny_unet(sample_size, cross_attention_dim=32, attention_head_dim=8)
    vae = tiny_vae(2 * sample_size)
    text_encoder = clip_text_encoder(vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=5)
    write_tokenizer(out / "tokenizer")
    save_pipeline(out, vae, unet, text_encoder)
    return out


def tiny_unet(sample_size: int, **options) -> UNet2DConditionModel:
    """A random two-level UNet (32 and 64 channels, cross-attention in the lower level); `options` set the
    cross-attention width, heads and what sets a family apart (linear projections, SDXL's added conditioning)."""
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
        **options,
    )


def tiny_vae(image_size: int, scaling_factor: float = 0.18215, latent_channels: int = 4, shift_factor: float | None = None) -> AutoencoderKL:
    """A random VAE that downsamples by 2 into `latent_channels` latent channels (SD1/2/XL: 4; SD3 and Flux: 16),
    with a latent scaling factor (and SD3/Flux's shift)."""
    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        sample_size=image_size,
        norm_num_groups=32,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    )


def clip_text_encoder(
    vocab_size: int, hidden_size: int, intermediate_size: int, num_hidden_layers: int, hidden_act: str = "quick_gelu"
) -> CLIPTextModel:
    """A random CLIP text encoder for a CLIP tokenizer of `vocab_size` whose last two ids are start and end
    (`hidden_act`: OpenAI CLIP's quick_gelu, or OpenCLIP's gelu as SD2 has it)."""
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_attention_heads=4,
            num_hidden_layers=num_hidden_layers,
            max_position_embeddings=MAX_TOKENS,
            layer_norm_eps=1e-5,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
            projection_dim=hidden_size,
            hidden_act=hidden_act,
        )
    )


def save_pipeline(
    out: Path, vae: AutoencoderKL, unet: UNet2DConditionModel, text_encoder: CLIPTextModel, prediction_type: str = "epsilon"
) -> None:
    """Write the models, SD1.x's training scheduler (SD2's, with prediction_type v_prediction) and model_index.json
    as a pipeline directory (the tokenizer is the caller's)."""
    # SD1.x training betas; DDPM is what training noises with, samplers are chosen at inference.
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    unet.save_pretrained(out / "unet")
    vae.save_pretrained(out / "vae")
    text_encoder.save_pretrained(out / "text_encoder")
    scheduler.save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps(model_index(), indent=2))
