"""Numbers for judging a fine-tune: CLIP score of generated images against their prompts.

CLIP score follows Hessel et al. (2021) and torchmetrics: 100 · max(cos(image embedding, text embedding), 0),
averaged over images. It measures prompt adherence, not beauty; compare it between adapters on the same prompts
and seeds, never across CLIP models.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence

import torch
from PIL import Image
from transformers import AutoProcessor, CLIPModel

from sdtune.errors import SdtuneError, first_line, pickled_objects, refused_pickle
from sdtune.models.pretrained import offline_hint
from sdtune.paths import HUB_ID


def load_clip(source: str, device: str | torch.device = "cpu") -> tuple[CLIPModel, object]:
    """A CLIP model and its processor from a local folder or Hub id, with one-line errors."""
    try:
        model = CLIPModel.from_pretrained(source).to(device).eval()
        processor = AutoProcessor.from_pretrained(source)
    except (OSError, ValueError, pickle.UnpicklingError) as err:
        found = refused_pickle(err)
        if found is not None:
            raise SdtuneError(f"--clip-model '{source}' has weights with {pickled_objects(found)}; use a copy with .safetensors weights") from err
        where = "" if HUB_ID.match(source) else " (not a folder with a saved CLIPModel)"
        raise SdtuneError(f"--clip-model '{source}' could not be loaded{where}{offline_hint()}: {first_line(err)}") from err
    return model, processor


@torch.no_grad()
def clip_scores(model: CLIPModel, processor, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
    """One CLIP score per (image, prompt) pair."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    # CLIP reads at most its position count (77); longer prompts are cut, as in every CLIP-score implementation.
    max_length = model.config.text_config.max_position_embeddings
    inputs = processor(text=list(prompts), images=list(images), return_tensors="pt", padding=True,
                       truncation=True, max_length=max_length)
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    output = model(**inputs)  # image_embeds[i] and text_embeds[i] are the projected, normalised pair i
    cosine = torch.nn.functional.cosine_similarity(output.image_embeds, output.text_embeds, dim=-1)
    return (100 * cosine.clamp_min(0)).tolist()
