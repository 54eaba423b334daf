"""Model families: SD1.x, SD2.x, SDXL, SD3/3.5 and Flux.1, each a module with a `ModelFamily` (see `base.py` for
the interface).

`FAMILIES` lists them in the order they are tried on a model's layout; `family_named` and `family_of_pipeline` find
one by name or from a diffusers pipeline.
"""

from __future__ import annotations

from typing import Any

from sdtune.errors import SdtuneError
from sdtune.models.families.base import Layout, ModelFamily, ModelParts, TextConditioning, vae_scale_factor
from sdtune.models.families.flux import Flux
from sdtune.models.families.sd1 import SD1
from sdtune.models.families.sd2 import SD2
from sdtune.models.families.sd3 import SD3
from sdtune.models.families.sdxl import SDXL

FAMILIES: tuple[ModelFamily, ...] = (SD3(), Flux(), SDXL(), SD2(), SD1())

__all__ = ["FAMILIES", "Layout", "ModelFamily", "ModelParts", "TextConditioning", "family_for", "family_named",
           "family_of_pipeline", "vae_scale_factor"]  # fmt: skip


def family_for(layout: Layout) -> ModelFamily:
    """The family whose layout `layout` is."""
    for family in FAMILIES:
        if family.matches(layout):
            return family
    raise SdtuneError(f"a model with {', '.join(sorted(layout.folders))} is of no family sdtune knows ({', '.join(f.label for f in FAMILIES)})")


def family_named(name: str) -> ModelFamily:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise SdtuneError(f"unknown model family '{name}' (known: {', '.join(f.name for f in FAMILIES)})")


def family_of_pipeline(pipe: Any) -> ModelFamily:
    """The family of a diffusers pipeline (text-to-image, image-to-image or inpainting), from its components."""
    folders = frozenset(name for name, component in pipe.components.items() if component is not None)
    text_encoder = pipe.components.get("text_encoder")
    config = text_encoder.config.to_dict() if text_encoder is not None else {}
    return family_for(Layout(folders, config))
