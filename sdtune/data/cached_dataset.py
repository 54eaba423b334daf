"""Samples from the latent and text-embedding cache (`data.cache: true`): what `CaptionDataset` would give, already
through the VAE and the text encoder.

The per-sample random draws (caption dropout, flip) are `CaptionDataset`'s, from the same seed, so a cached run sees
the same captions and orientations as an uncached one; the model samples the latents from the cached posterior with
its own generator, as it samples the posterior it encodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import Dataset

from sdtune.data.captions import process_caption
from sdtune.data.dataset import first_draws, sample_key, size_conditioning
from sdtune.data.progress import progress_bar
from sdtune.data.transforms import Geometry
from sdtune.errors import SdtuneError, first_line


class CachedCaptionDataset(Dataset):
    """`(epoch, index)` → {"latent_mean", "latent_std" (C×h×w, unscaled), "text_embeds" (tokens×width) and for SDXL
    "pooled_text_embeds", "caption", "path", "sample_key" ((epoch, index): the model seeds this sample's noise with
    it), "original_size" and "crop_top_left" (SDXL's size conditioning, as `CaptionDataset` gives them)}, and the
    token ids ("input_ids", …) when `tokenize` (a `sdtune.data.batch.CaptionTokenizer`) is given: a model whose text
    encoder trains encodes them instead of using the cached outputs. `keys[i]` (a
    `sdtune.data.cache.training.SampleKeys`) names record i's entries in `cache`; `sizes[i]` is record i's upright
    (width, height) and `buckets[i]` the size it was encoded at."""

    def __init__(
        self, records: Sequence, keys: Sequence, captions: Sequence[str], cache: Any, random_flip: bool = False,
        caption_dropout: float = 0.0, seed: int = 0, tokenize: Callable[[str], dict[str, Any]] | None = None,
        sizes: Sequence[tuple[int, int]] | None = None, buckets: Sequence[tuple[int, int]] | None = None,
    ) -> None:  # fmt: skip
        self.records, self.keys, self.captions, self.cache = list(records), list(keys), list(captions), cache
        self.random_flip, self.caption_dropout, self.seed = random_flip, caption_dropout, seed
        self.tokenize = tokenize
        self.sizes = list(sizes) if sizes is not None else None
        self.buckets = list(buckets) if buckets is not None else None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, _, drop_draw, flip_draw = first_draws(self.seed, key)
        entries = self.keys[index]
        dropped = drop_draw < self.caption_dropout
        flipped = self.random_flip and flip_draw < 0.5
        mean, std = self.cache.latents(entries.latent_flip if flipped else entries.latent)
        caption = "" if dropped else self.captions[index]
        sample = {
            "latent_mean": mean,
            "latent_std": std,
            **self.cache.text(self.cache.empty_text if dropped else entries.text),
            "caption": caption,
            "path": self.records[index].path,
            "sample_key": sample_key(key),
            "is_prior": torch.tensor(self.records[index].prior),
        }
        if self.sizes is not None and self.buckets is not None:
            size = self.sizes[index]
            sample |= size_conditioning(size, Geometry.plan(size, self.buckets[index], True, flipped, (0.5, 0.5)))
        if self.tokenize is not None:
            sample |= self.tokenize(caption)
        return sample


def check_cacheable(center_crop: bool, shuffle_tags: bool, tag_dropout: float, mask_dir: str | None, alpha_mask: bool) -> None:
    """Settings that change a sample's pixels or caption every step cannot be served from a cache."""
    problems = []
    if not center_crop:
        problems.append("data.center_crop: true (a random crop differs every step)")
    if shuffle_tags or tag_dropout > 0:
        problems.append("data.shuffle_tags: false and data.tag_dropout: 0 (the caption differs every step)")
    if mask_dir is not None or alpha_mask:
        problems.append("no data.mask_dir / data.alpha_mask (loss masks are not cached)")
    if problems:
        raise SdtuneError("data.cache needs " + "; ".join(problems) + ", or data.cache: false")


@dataclass
class CachePlan:
    """Every training sample's cache entries: what `prepare_data` computes and the cached dataset reads."""

    cache: Any  # sdtune.data.cache.training.TrainingCache
    records: list
    contents: list[str]
    captions: list[str]
    buckets: list[tuple[int, int]]
    keys: list
    sizes: list[tuple[int, int]]  # each record's upright (width, height), for SDXL's size conditioning

    @classmethod
    def for_records(
        cls, records: Sequence, buckets: Sequence[tuple[int, int]], folder: str, pretrained: str, revision: str | None,
        clip_skip: int, max_token_length: int, flip: bool,
    ) -> CachePlan:  # fmt: skip
        """`buckets[i]` is the (width, height) record i is encoded at."""
        from sdtune.data.cache.training import TrainingCache, content_hash

        if Path(pretrained).expanduser().is_file():
            raise SdtuneError("data.cache needs a diffusers directory or Hub id as model.pretrained, not a single file")
        cache = TrainingCache(folder, pretrained, revision, clip_skip, max_token_length, flip)
        hashes: dict[tuple[str, int], tuple[str, tuple[int, int]]] = {}
        contents, sizes = [], []
        for record in progress_bar(records, "hashing images for the cache"):  # a repeated record is read once
            if (record.path, record.row) not in hashes:
                try:
                    hashes[record.path, record.row] = content_hash(record), record.upright_size()
                except (OSError, ValueError, SyntaxError) as err:
                    raise SdtuneError(f"image '{record.path}' could not be read ({first_line(err)}); fix or remove it") from err
            contents.append(hashes[record.path, record.row][0])
            sizes.append(hashes[record.path, record.row][1])
        captions = [process_caption(record.caption, prefix=record.prefix) for record in records]
        buckets = [tuple(bucket) for bucket in buckets]
        return cls(cache, list(records), contents, captions, buckets, cache.keys(contents, captions, buckets), sizes)

    def build(self) -> None:
        counts = self.cache.build(self.records, self.contents, self.captions, self.buckets)
        rank_zero_info(f"data.cache: {self.cache.index.root}: computed {counts['computed']}, reused {counts['reused']} entries")

    def dataset(
        self, random_flip: bool, caption_dropout: float, seed: int, tokenize: Callable[[str], dict[str, Any]] | None = None
    ) -> CachedCaptionDataset:
        return CachedCaptionDataset(
            self.records, self.keys, self.captions, self.cache, random_flip, caption_dropout, seed, tokenize,
            self.sizes, self.buckets,
        )
