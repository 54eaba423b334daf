"""Stable Diffusion 1.x: a UNet conditioned on one CLIP ViT-L text encoder's hidden states (77×768 per window)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from sdtune.models.clip import encode_text
from sdtune.models.families.base import Layout, ModelFamily, TextConditioning


class SD1(ModelFamily):
    name = "sd1"
    label = "SD1.x"
    classes = {
        "vae": "AutoencoderKL", "unet": "UNet2DConditionModel", "text_encoder": "CLIPTextModel",
        "tokenizer": "CLIPTokenizer", "scheduler": "DDPMScheduler",
    }  # fmt: skip
    pipelines = {
        "text2image": "StableDiffusionPipeline",
        "image2image": "StableDiffusionImg2ImgPipeline",
        "inpaint": "StableDiffusionInpaintPipeline",
    }
    kohya_prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    kohya_base_version = "sd_v1"
    modelspec_architecture = "stable-diffusion-v1"

    @classmethod
    def matches(cls, layout: Layout) -> bool:
        """One text encoder, OpenAI's CLIP (quick_gelu); the fallback when nothing else matches."""
        return "text_encoder_2" not in layout.folders and layout.text_encoder_config.get("hidden_act", "quick_gelu") != "gelu"

    def encode_prompt(self, text_encoders: Sequence[torch.nn.Module], ids: Sequence[torch.Tensor], clip_skip: int = 1) -> TextConditioning:
        (encoder,), (input_ids,) = text_encoders, ids
        return TextConditioning(encode_text(encoder, input_ids, clip_skip))

    def predict(
        self, denoiser: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor, text: TextConditioning,
        sizes: Mapping[str, Any] | None = None, pixel_size: tuple[int, int] | None = None, guidance: float | None = None,
    ) -> torch.Tensor:  # fmt: skip
        dtype = self.compute_dtype(denoiser)
        return denoiser(latents.to(dtype), timesteps, text.hidden.to(dtype)).sample

    def pipeline_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
