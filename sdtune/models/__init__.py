"""Models: loading (`pretrained`, the only place that calls from_pretrained), the families (`families`), prompt
tokenisation and CLIP encoding, and tiny random pipelines for tests."""

from sdtune.models.families import ModelFamily, ModelParts
from sdtune.models.pretrained import load_model, load_tokenizer

__all__ = ["ModelFamily", "ModelParts", "load_model", "load_tokenizer"]
