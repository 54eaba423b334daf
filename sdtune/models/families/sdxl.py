"""Stable Diffusion XL: two CLIP text encoders (their penultimate hidden states concatenated, and the second one's
pooled, projected embedding) and a UNet that is also told each image's size and crop.

The micro-conditioning: SDXL was trained on images of every size, cropped at random; it learned what an upscaled or
cropped picture looks like from six numbers per sample, (original height, original width, crop top, crop left,
target height, target width), which `StableDiffusionXLPipeline` sets to (h, w, 0, 0, h, w) at inference. Training
passes each sample's own numbers, as its data loader recorded them, so the model keeps telling a cropped photo from
a composed one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from sdtune.models.families.base import Layout, ModelFamily, TextConditioning


class SDXL(ModelFamily):
    name = "sdxl"
    label = "SDXL"
    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    classes = {
        "vae": "AutoencoderKL", "unet": "UNet2DConditionModel", "text_encoder": "CLIPTextModel",
        "text_encoder_2": "CLIPTextModelWithProjection", "tokenizer": "CLIPTokenizer", "tokenizer_2": "CLIPTokenizer",
        "scheduler": "DDPMScheduler",
    }  # fmt: skip
    pipelines = {
        "text2image": "StableDiffusionXLPipeline",
        "image2image": "StableDiffusionXLImg2ImgPipeline",
        "inpaint": "StableDiffusionXLInpaintPipeline",
    }
    index_options = ("force_zeros_for_empty_prompt",)
    new_tokens = False
    init_adapter = False
    # The UNet keys keep diffusers' module names, as diffusers' SDXL training scripts write them and A1111, Forge and
    # ComfyUI convert them (kohya's own SDXL trainer names the original `input_blocks` modules instead).
    kohya_prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    kohya_base_version = "sdxl_base_v1-0"
    modelspec_architecture = "stable-diffusion-xl-v1-base"

    @classmethod
    def matches(cls, layout: Layout) -> bool:
        """A second text encoder and a UNet."""
        return "text_encoder_2" in layout.folders and "transformer" not in layout.folders

    def encode_prompt(self, text_encoders: Sequence[torch.nn.Module], ids: Sequence[torch.Tensor], clip_skip: int = 1) -> TextConditioning:
        """As StableDiffusionXLPipeline encodes: each encoder's penultimate hidden state (no final layer norm;
        `clip_skip` k takes the (k+1)-th from the end), concatenated along the width, and the pooled, projected
        output of the second encoder. The pooled embedding of a chunked prompt is its first chunk's, as kohya takes it."""
        states = []
        for encoder, input_ids in zip(text_encoders, ids, strict=True):
            if input_ids.ndim == 2:
                input_ids = input_ids[:, None]
            batch, chunks, length = input_ids.shape
            output = encoder(input_ids.reshape(batch * chunks, length).to(encoder.device), output_hidden_states=True)
            hidden = output.hidden_states[-(clip_skip + 1)]
            states.append(hidden.reshape(batch, chunks * length, hidden.shape[-1]))
        pooled = output.text_embeds.reshape(batch, chunks, -1)[:, 0]
        return TextConditioning(torch.cat(states, dim=-1), pooled)

    def max_clip_skip(self, text_encoders: Sequence[torch.nn.Module]) -> int:
        return super().max_clip_skip(text_encoders) - 1  # the penultimate layer is already the first choice

    def predict(
        self, denoiser: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor, text: TextConditioning,
        sizes: Mapping[str, Any] | None = None, pixel_size: tuple[int, int] | None = None, guidance: float | None = None,
    ) -> torch.Tensor:  # fmt: skip
        dtype = self.compute_dtype(denoiser)
        ids = time_ids(sizes or {}, pixel_size, len(latents))
        added = added_cond_kwargs(text, ids, dtype)
        return denoiser(latents.to(dtype), timesteps, text.hidden.to(dtype), added_cond_kwargs=added).sample

    def pipeline_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        return {"force_zeros_for_empty_prompt": bool(options.get("force_zeros_for_empty_prompt", True)), "add_watermarker": False}

    def zero_negative(self, options: Mapping[str, Any]) -> bool:
        """StableDiffusionXLPipeline's rule: zeros when model_index.json says force_zeros_for_empty_prompt (its
        default, and SDXL base's setting)."""
        return bool(options.get("force_zeros_for_empty_prompt", True))

    def prompt_kwargs(self, positive: TextConditioning, negative: TextConditioning) -> dict[str, torch.Tensor]:
        return super().prompt_kwargs(positive, negative) | {
            "pooled_prompt_embeds": positive.pooled, "negative_pooled_prompt_embeds": negative.pooled,
        }  # fmt: skip


def time_ids(sizes: Mapping[str, Any], target_size: tuple[int, int], count: int) -> torch.Tensor:
    """B×6 add_time_ids: each sample's "original_size" and "crop_top_left" ((h, w) and (top, left)), and the
    `target_size` (h, w) in pixels. Without them (a batch built by hand) every sample is uncropped at its own size."""
    target = torch.tensor(target_size, dtype=torch.float32).expand(count, 2)
    original = sizes.get("original_size")
    crop = sizes.get("crop_top_left")
    original = target if original is None else torch.as_tensor(original, dtype=torch.float32).reshape(count, 2)
    crop = torch.zeros(count, 2) if crop is None else torch.as_tensor(crop, dtype=torch.float32).reshape(count, 2)
    return torch.cat([original.cpu(), crop.cpu(), target], dim=1)


def added_cond_kwargs(text: TextConditioning, ids: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The UNet's `added_cond_kwargs`: the pooled text embedding in `dtype` and the time ids in float32 (the UNet
    embeds them in float32 anyway; bfloat16 would round a 1080-pixel side to 1088)."""
    return {"text_embeds": text.pooled.to(dtype), "time_ids": ids.to(text.hidden.device, torch.float32)}
