"""SDXL's micro-conditioning: each image's original size, crop offset and target size, told to the UNet.

SDXL was trained on images of every size, cropped at random; it learned what an upscaled or cropped picture looks
like from six numbers per sample, (original height, original width, crop top, crop left, target height, target
width), which `StableDiffusionXLPipeline` sets to (h, w, 0, 0, h, w) at inference. Training passes each sample's own
numbers, as its data loader recorded them, so the model keeps telling a cropped photo from a composed one.
"""

from __future__ import annotations

from typing import Any

import torch

from sdtune.models.clip import TextConditioning


def time_ids(batch: dict[str, Any], target_size: tuple[int, int], count: int) -> torch.Tensor:
    """B×6 add_time_ids: the batch's "original_size" and "crop_top_left" ((h, w) and (top, left) per sample), and the
    `target_size` (h, w) in pixels. A batch without them (built by hand) is uncropped at its own size."""
    target = torch.tensor(target_size, dtype=torch.float32).expand(count, 2)
    original = batch.get("original_size")
    crop = batch.get("crop_top_left")
    original = target if original is None else torch.as_tensor(original, dtype=torch.float32).reshape(count, 2)
    crop = torch.zeros(count, 2) if crop is None else torch.as_tensor(crop, dtype=torch.float32).reshape(count, 2)
    return torch.cat([original.cpu(), crop.cpu(), target], dim=1)


def added_cond_kwargs(text: TextConditioning, ids: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The UNet's `added_cond_kwargs` for SDXL: the pooled text embedding in `dtype` and the time ids in float32 (the
    UNet embeds them in float32 anyway; bfloat16 would round a 1080-pixel side to 1088)."""
    return {"text_embeds": text.pooled.to(dtype), "time_ids": ids.to(text.hidden.device, torch.float32)}
