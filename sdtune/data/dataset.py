"""Captioned images as training samples, reproducible down to each crop, flip, shuffled tag and dropped caption.

Every random choice for a sample comes from a generator seeded by (seed, epoch, index). The sampler hands the
epoch to the dataset inside each key, so results do not depend on the number of workers, on persistent workers
keeping a stale copy of the dataset, or on which worker happens to load which sample.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Literal

import torch
from PIL import Image
from torch.utils.data import Dataset

from sdtune.data.batch import CaptionTokenizer
from sdtune.data.buckets import Bucket
from sdtune.data.captions import process_caption
from sdtune.data.images import IMAGE_ERRORS, load_image, load_mask
from sdtune.data.records import Record
from sdtune.data.transforms import Geometry, mask_to_tensor, to_tensor
from sdtune.errors import SdtuneError, first_line


class UnreadableImage(SdtuneError):
    """An image file that could not be decoded at training time."""


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from several values; hashing avoids (seed=1, epoch=0) colliding with (seed=0, epoch=1)."""
    # int() so numpy or tensor indices hash like plain ints.
    canonical = tuple(part if isinstance(part, str) else int(part) for part in parts)
    digest = hashlib.blake2b(repr(canonical).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_key(key: int | tuple[int, int]) -> tuple[int, int]:
    """(epoch, index) of a dataset key; a bare index is in epoch 0."""
    return (int(key[0]), int(key[1])) if isinstance(key, tuple) else (0, int(key))


def first_draws(seed: int, key: int | tuple[int, int]) -> tuple[int, torch.Generator, float, float]:
    """(index, generator, caption-dropout draw, flip draw) of the sample `key` ((epoch, index), or an index in epoch 0).

    Every dataset draws these first and in this order, so the cached and the encoded datasets drop and flip the
    same samples; `CaptionDataset` goes on drawing from the generator."""
    epoch, index = sample_key(key)
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch, index))
    drop_draw, flip_draw = torch.rand(2, generator=generator).tolist()
    return index, generator, drop_draw, flip_draw


class CaptionDataset(Dataset):
    """Records -> dicts of pixel values, token ids (`input_ids` from the first of `tokenizers` (one tokenizer or the
    model's list), `input_ids_2` from SDXL's second), the
    caption actually used, the path, the sample's `(epoch, index)` key (the model seeds this sample's noise with
    it), the image's `original_size` (h, w) and `crop_top_left` (SDXL's size conditioning; see `size_conditioning`)
    and, with masks, the loss mask.

    A record listed several times (subset repeats) is several samples: each index gets its own random draws.
    `max_token_length` None means one window of the tokenizer's own length. `masks` is where loss masks come
    from: "file" (`Record.mask`, all ones when missing), "alpha" (the image's alpha channel), or None (no key).
    `buckets[i]` is the (width, height) sample i is cropped to; None: every sample is a `resolution` square.
    `family` (the model's) says how each tokenizer reads a caption; None: CLIP's windows for every one.
    """

    def __init__(
        self,
        records: Sequence[Record],
        tokenizers: Any | Sequence[Any],
        resolution: int,
        center_crop: bool = False,
        random_flip: bool = False,
        caption_dropout: float = 0.0,
        seed: int = 0,
        shuffle_tags: bool = False,
        keep_tokens: int = 0,
        tag_dropout: float = 0.0,
        max_token_length: int | None = None,
        masks: Literal["file", "alpha"] | None = None,
        buckets: Sequence[Bucket] | None = None,
        family: Any = None,
    ) -> None:
        if buckets is not None and len(buckets) != len(records):
            raise ValueError(f"{len(buckets)} buckets for {len(records)} records")
        self.records = list(records)
        self.buckets = list(buckets) if buckets is not None else None
        tokenizers = list(tokenizers) if isinstance(tokenizers, (list, tuple)) else [tokenizers]
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.caption_dropout = caption_dropout
        self.seed = seed
        self.shuffle_tags = shuffle_tags
        self.keep_tokens = keep_tokens
        self.tag_dropout = tag_dropout
        self.max_token_length = max_token_length or tokenizers[0].model_max_length - 2
        self.masks = masks
        # caption → {"input_ids": (chunks, model_max_length), …}: SD1/2 use 77, but nothing here may assume it.
        self.tokenize = CaptionTokenizer(tokenizers, self.max_token_length, family)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """The sample `key`; when its image cannot be read, the next readable image of the same size (bucket) in
        its place, with `"unreadable"` saying which file failed and why, so the batch keeps its size and shape
        (and every DDP rank its step) and the run goes on."""
        try:
            return self._sample(key)
        except UnreadableImage as err:
            failed = str(err)
        epoch, index = sample_key(key)
        for other in self._same_size_after(index):
            try:
                sample = self._sample((epoch, other))
            except UnreadableImage:
                continue
            # The stand-in keeps the failed sample's key, so its training noise is not a copy of `other`'s.
            sample["unreadable"], sample["sample_key"] = failed, (epoch, index)
            return sample
        raise SdtuneError(f"{failed}, nor could any other image of its size; fix or remove them")

    def _same_size_after(self, index: int) -> list[int]:
        size = self.buckets[index] if self.buckets is not None else None
        order = [*range(index + 1, len(self.records)), *range(index)]
        return [i for i in order if size is None or self.buckets[i] == size]

    def _sample(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, generator, drop_draw, flip_draw = first_draws(self.seed, key)
        record = self.records[index]
        # Drawn unconditionally and in this order (new draws go last), so switching one augmentation off leaves
        # the others unchanged.
        crop_draws = tuple(torch.rand(2, generator=generator).tolist())
        caption = process_caption(
            record.caption,
            prefix=record.prefix,
            shuffle_tags=self.shuffle_tags,
            keep_tokens=self.keep_tokens,
            tag_dropout=self.tag_dropout,
            generator=generator,
        )
        if drop_draw < self.caption_dropout:
            caption = ""
        try:
            image, alpha = load_image(record.open())
        except IMAGE_ERRORS as err:
            raise UnreadableImage(f"image '{record.path}' could not be read ({first_line(err)})") from err
        flip = self.random_flip and flip_draw < 0.5
        size = self.buckets[index] if self.buckets is not None else (self.resolution, self.resolution)
        geometry = Geometry.plan(image.size, size, self.center_crop, flip, crop_draws)
        sample = {
            "pixel_values": to_tensor(geometry.apply(image)),
            **self.tokenize(caption),
            "caption": caption,
            "path": record.path,
            "sample_key": sample_key(key),
            **size_conditioning(image.size, geometry),
            "is_prior": torch.tensor(record.prior),
        }
        if self.masks is not None:
            mask = alpha if self.masks == "alpha" else self._mask_file(record, image.size)
            if mask is None:
                sample["mask"] = torch.ones(1, size[1], size[0])
            else:
                sample["mask"] = mask_to_tensor(geometry.apply(mask, Image.Resampling.BILINEAR))
        return sample

    @staticmethod
    def _mask_file(record: Record, size: tuple[int, int]) -> Image.Image | None:
        """The record's mask at the image's size; a mask at another scale is resized, another shape refused."""
        if record.mask is None:
            return None
        try:
            mask = load_mask(record.mask)
        except IMAGE_ERRORS as err:
            raise SdtuneError(f"mask '{record.mask}' could not be read ({first_line(err)}); fix or remove it") from err
        if mask.size != size:
            if abs(mask.size[0] / mask.size[1] - size[0] / size[1]) > 0.01 * size[0] / size[1]:
                raise SdtuneError(
                    f"mask '{record.mask}' is {mask.size[0]}x{mask.size[1]} but its image '{record.path}' is "
                    f"{size[0]}x{size[1]}; masks must have the image's aspect ratio"
                )
            mask = mask.resize(size, Image.Resampling.BILINEAR)
        return mask


def size_conditioning(size: tuple[int, int], geometry: Geometry) -> dict[str, torch.Tensor]:
    """"original_size" (h, w) of the upright image and "crop_top_left" (top, left) of its training crop."""
    return {"original_size": torch.tensor([size[1], size[0]]), "crop_top_left": torch.tensor(geometry.crop_top_left())}
