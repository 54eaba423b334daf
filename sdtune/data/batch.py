"""What a batch holds: the named fields the DataModule's loaders give and the training methods read.

A sample is encoded by the model on every step (`pixel_values` and the token ids) or comes from the cache
(`latent_mean`/`latent_std` and the text encoders' outputs); every sample carries its `sample_key`, from which the
model seeds the sample's random draws, and SDXL's size conditioning. Collation stacks tensors and keeps strings as
lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypedDict

import torch

from sdtune.models.text import caption_ids


class Batch(TypedDict, total=False):
    """One batch (or, unstacked, one sample) of captioned images; every key is optional except `path`."""

    pixel_values: torch.Tensor  # B×3×H×W in [-1, 1]: images the VAE encodes every step
    input_ids: torch.Tensor  # B×chunks×L token ids of the first text encoder
    input_ids_2: torch.Tensor  # … of the second (SDXL)
    input_ids_3: torch.Tensor  # … of the third
    latent_mean: torch.Tensor  # B×C×h×w cached posterior mean (data.cache; unscaled)
    latent_std: torch.Tensor  # B×C×h×w cached posterior std
    text_embeds: torch.Tensor  # B×tokens×width cached text-encoder output
    pooled_text_embeds: torch.Tensor  # B×width cached pooled output (SDXL)
    caption: list[str]  # the caption as trained (after dropout, shuffling and prefixes)
    path: list[str]  # each image's file
    sample_key: list[tuple[int, int]]  # (epoch, dataset index): the seed of the sample's draws
    original_size: torch.Tensor  # B×2 (h, w) of the upright image (SDXL's size conditioning)
    crop_top_left: torch.Tensor  # B×2 (top, left) of the crop in the resized image
    is_prior: torch.Tensor  # B bools: DreamBooth class images
    mask: torch.Tensor  # B×1×H×W loss weights in [0, 1]
    unreadable: list[str]  # files that failed to load and were replaced (taken out before the model sees the batch)


# Batch keys of each text encoder's token ids, in the family's order: SD1/2 have one encoder, SDXL two (each with
# its own tokenizer).
ID_KEYS = ("input_ids", "input_ids_2", "input_ids_3")


class CaptionTokenizer:
    """caption → {"input_ids": ..., "input_ids_2": ...}: the ids of each of the model's tokenizers, as its family
    tokenizes (CLIP: `caption_ids`' 75-token windows; T5: its fixed length), so every text encoder reads the same
    caption (a dropped caption is "" for all of them). Without a family, CLIP windows for every tokenizer.
    Picklable, for DataLoader workers."""

    def __init__(self, tokenizers: Sequence[Any], max_tokens: int, family: Any = None) -> None:
        if not 1 <= len(tokenizers) <= len(ID_KEYS):
            raise ValueError(f"{len(tokenizers)} tokenizers; a model has 1 to {len(ID_KEYS)}")
        self.tokenizers, self.max_tokens, self.family = list(tokenizers), max_tokens, family

    def __call__(self, caption: str) -> dict[str, torch.LongTensor]:
        if self.family is None:
            ids = [caption_ids(tokenizer, self.max_tokens, caption) for tokenizer in self.tokenizers]
        else:
            ids = self.family.tokenize(self.tokenizers, caption, self.max_tokens)
        return dict(zip(ID_KEYS, ids))


def collate(samples: list[dict[str, Any]]) -> Batch:
    """Stack tensors; keep strings (captions, paths) as lists for logging and sample callbacks. "unreadable" (on a
    substituted sample only) becomes the list of the batch's failed files, when there is one."""
    batch: dict[str, Any] = {}
    for key, first in samples[0].items():
        if key == "unreadable":
            continue
        values = [sample[key] for sample in samples]
        batch[key] = torch.stack(values) if isinstance(first, torch.Tensor) else values
    failed = [sample["unreadable"] for sample in samples if "unreadable" in sample]
    if failed:
        batch["unreadable"] = failed
    return batch  # type: ignore[return-value]
