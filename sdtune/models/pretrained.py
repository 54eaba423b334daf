"""Loading Stable Diffusion components. This module is the only caller of `from_pretrained`.

`pretrained` is a local directory in the diffusers layout (model_index.json, unet/, vae/, text_encoder/,
tokenizer/, scheduler/) or a Hugging Face Hub id, with an optional revision and weight variant ("fp16").
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdtune.errors import SdtuneError, first_line

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class StableDiffusionParts:
    """The pieces of a Stable Diffusion checkpoint that training needs."""

    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along one side (8 for SD; read from the VAE config, never assumed)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def _check_local(path: Path) -> None:
    missing = [name for name in SUBFOLDERS if not (path / name).is_dir()]
    if missing:
        raise SdtuneError(
            f"model.pretrained '{path}' is not a diffusers model directory: missing {', '.join(m + '/' for m in missing)} "
            "(convert single-file checkpoints first, or pass a Hub id)"
        )


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _resolve(pretrained: str) -> str:
    path = Path(pretrained).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SdtuneError(f"model.pretrained '{pretrained}' is a file; pass a diffusers model directory or a Hub id")
        _check_local(path)
        return str(path)
    if not HUB_ID.match(pretrained):
        raise SdtuneError(f"model.pretrained '{pretrained}' does not exist (not a local directory nor a Hub id 'org/name')")
    return pretrained


def _offline_hint() -> str:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("0", "", "false", "no"):
        return ""
    return " (HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache: download it first or pass a local directory)"


def _load(cls, pretrained: str, subfolder: str, **kwargs):
    """`cls.from_pretrained` (or `cls` itself when it is a loading function) with one-line errors."""
    load = cls.from_pretrained if hasattr(cls, "from_pretrained") else cls
    try:
        return load(pretrained, subfolder=subfolder, **kwargs)
    except (OSError, ValueError, EnvironmentError) as err:
        raise SdtuneError(f"model.pretrained '{pretrained}': {subfolder}/ could not be loaded{_offline_hint()}: {first_line(err)}") from err


def load_tokenizer(pretrained: str, revision: str | None = None) -> CLIPTokenizer:
    """The CLIP tokenizer from the `tokenizer/` subfolder, with its length capped by the text encoder's positions."""
    source = _resolve(pretrained)
    tokenizer = _load(CLIPTokenizer, source, "tokenizer", revision=revision)
    # Recent transformers build an empty tokenizer instead of failing when the vocabulary files are missing.
    if tokenizer.vocab_size <= 3:
        raise SdtuneError(f"model.pretrained '{pretrained}': tokenizer/ has no vocabulary (vocab.json + merges.txt){_offline_hint()}")
    if tokenizer.model_max_length > 100_000:  # no model_max_length in tokenizer_config.json
        config = _load(CLIPTextConfig, source, "text_encoder", revision=revision)
        tokenizer.model_max_length = config.max_position_embeddings
    return tokenizer


def load_stable_diffusion(
    pretrained: str,
    revision: str | None = None,
    variant: str | None = None,
    dtype: torch.dtype = torch.float32,
    unet_dtype: torch.dtype | None = None,
) -> StableDiffusionParts:
    """Load VAE and text encoder in `dtype`, the UNet in `unet_dtype` (default `dtype`), the tokenizer and the DDPM
    training scheduler. Loading in the target dtype avoids a float32 copy of every weight on the way."""
    source = _resolve(pretrained)
    weights = dict(revision=revision, variant=variant, torch_dtype=dtype)
    return StableDiffusionParts(
        vae=_load(AutoencoderKL, source, "vae", **weights),
        text_encoder=_load(CLIPTextModel, source, "text_encoder", **weights),
        tokenizer=load_tokenizer(source, revision=revision),
        unet=_load(UNet2DConditionModel, source, "unet", **{**weights, "torch_dtype": unet_dtype or dtype}),
        # Training always uses DDPM noising with the checkpoint's betas and prediction type.
        noise_scheduler=_load(DDPMScheduler, source, "scheduler", revision=revision),
    )


def load_inference_scheduler(pretrained: str, revision: str | None = None):
    """The scheduler class the checkpoint ships for sampling (PNDM for SD1.5), as named in its config."""
    import diffusers

    source = _resolve(pretrained)
    config = _load(DDPMScheduler.load_config, source, "scheduler", revision=revision)
    scheduler_class = getattr(diffusers, config.get("_class_name") or "DDPMScheduler", DDPMScheduler)
    return _load(scheduler_class, source, "scheduler", revision=revision)


def load_pipeline(
    pretrained: str,
    revision: str | None = None,
    variant: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
):
    """A StableDiffusionPipeline for sampling: every component in `dtype` (on `device`), the checkpoint's own inference
    scheduler, no safety checker. Built from the same one-line-error loaders as training, so a missing directory,
    an uncached Hub id offline or a missing subfolder is one clear line, never a traceback."""
    from diffusers import StableDiffusionPipeline

    parts = load_stable_diffusion(pretrained, revision=revision, variant=variant, dtype=dtype)
    pipe = StableDiffusionPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
        scheduler=load_inference_scheduler(pretrained, revision=revision),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    return pipe.to(device) if device is not None else pipe
