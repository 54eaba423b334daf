"""Stable Diffusion 2.x: SD1's UNet and pipelines with an OpenCLIP ViT-H text encoder (GELU, 1024 wide), linear
attention projections, and (for the 768-px models) v-prediction, which the scheduler's config says."""

from __future__ import annotations

from sdtune.models.families.base import Layout
from sdtune.models.families.sd1 import SD1


class SD2(SD1):
    name = "sd2"
    label = "SD2.x"
    kohya_base_version = "sd_v2"
    modelspec_architecture = "stable-diffusion-v2"

    @classmethod
    def matches(cls, layout: Layout) -> bool:
        """One text encoder, OpenCLIP's (GELU; OpenAI's CLIP, SD1's, uses quick_gelu)."""
        return "text_encoder_2" not in layout.folders and layout.text_encoder_config.get("hidden_act") == "gelu"
