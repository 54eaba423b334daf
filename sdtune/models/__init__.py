"""Model loading: `pretrained` (the only place that calls from_pretrained) and `tiny` (random tiny pipelines)."""

from sdtune.models.pretrained import StableDiffusionParts, load_stable_diffusion, load_tokenizer

__all__ = ["StableDiffusionParts", "load_stable_diffusion", "load_tokenizer"]
