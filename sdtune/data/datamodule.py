"""Captioned images as Lightning batches, reproducible down to each crop, flip and dropped caption.

Every random choice for a sample comes from a generator seeded by (seed, epoch, index). The sampler hands the
epoch to the dataset inside each key, so results do not depend on the number of workers, on persistent workers
keeping a stale copy of the dataset, or on which worker happens to load which sample.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from sdtune.data.records import Record, discover_records
from sdtune.data.transforms import load_rgb, preprocess
from sdtune.errors import SdtuneError
from sdtune.models.pretrained import load_tokenizer


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from several values; hashing avoids (seed=1, epoch=0) colliding with (seed=0, epoch=1)."""
    # int() so numpy or tensor indices hash like plain ints.
    canonical = tuple(part if isinstance(part, str) else int(part) for part in parts)
    digest = hashlib.blake2b(repr(canonical).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields `(epoch, index)`; the order is a pure function of (seed, epoch). Lightning calls `set_epoch`."""

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = range(self.num_samples)
        return iter([(self.epoch, index) for index in order])

    def __len__(self) -> int:
        return self.num_samples


class CaptionDataset(Dataset):
    """Records -> dicts of pixel values, token ids and the caption actually used."""

    def __init__(
        self,
        records: Sequence[Record],
        tokenizer: Any,
        resolution: int,
        center_crop: bool = False,
        random_flip: bool = False,
        caption_dropout: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.records = list(records)
        self.tokenizer = tokenizer
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.caption_dropout = caption_dropout
        self.seed = seed

    def __len__(self) -> int:
        return len(self.records)

    def tokenize(self, caption: str) -> torch.Tensor:
        """Pad to the tokenizer's own length: SD1/2 use 77, but nothing here may assume it."""
        return self.tokenizer(
            caption,
            padding="max_length",
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids[0]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        record = self.records[index]
        generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch, index))
        # Drawn unconditionally and before the crop, so switching one augmentation off leaves the others unchanged.
        drop_draw, flip_draw = torch.rand(2, generator=generator).tolist()
        caption = "" if drop_draw < self.caption_dropout else record.caption
        try:
            image = load_rgb(record.open())
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise SdtuneError(f"image '{record.path}' could not be read ({reason}); fix or remove it") from err
        pixel_values = preprocess(
            image,
            self.resolution,
            center_crop=self.center_crop,
            flip=self.random_flip and flip_draw < 0.5,
            generator=generator,
        )
        return {
            "pixel_values": pixel_values,
            "input_ids": self.tokenize(caption),
            "caption": caption,
            "path": record.path,
        }


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors; keep strings (captions, paths) as lists for logging and sample callbacks."""
    batch: dict[str, Any] = {}
    for key, first in samples[0].items():
        values = [sample[key] for sample in samples]
        batch[key] = torch.stack(values) if isinstance(first, torch.Tensor) else values
    return batch


class CaptionDataModule(L.LightningDataModule):
    """Captioned images for text-to-image fine-tuning."""

    def __init__(
        self,
        root: str,
        resolution: int = 512,
        batch_size: int = 1,
        center_crop: bool = False,
        random_flip: bool = False,
        caption_dropout: float = 0.0,
        num_workers: int = 0,
        pretrained: str | None = None,
        revision: str | None = None,
        val_root: str | None = None,
        val_fraction: float = 0.0,
        seed: int = 0,
    ) -> None:
        """
        Args:
            root: Training images: an imagefolder with metadata.jsonl/metadata.csv, images with .txt/.caption
                sidecars, or a `datasets.save_to_disk` folder.
            resolution: Side of the square training crop, in pixels (the shorter side is resized to it first).
            batch_size: Images per batch on each device.
            center_crop: Crop the middle instead of a random square.
            random_flip: Mirror half of the images horizontally (avoid for text or asymmetric subjects).
            caption_dropout: Fraction of captions replaced by "" so the model also learns the unconditional case
                that classifier-free guidance needs.
            num_workers: DataLoader worker processes; 0 loads in the training process.
            pretrained: Model whose tokenizer encodes the captions (the CLI links it from --model.pretrained).
            revision: Hub revision of `pretrained`.
            val_root: Held-out images for validation, in any layout `root` accepts.
            val_fraction: Without val_root (which takes precedence), hold out this fraction of root for
                validation; the split is fixed by seed.
            seed: Seed for shuffling, the validation split and every augmentation.
        """
        super().__init__()
        if resolution <= 0:
            raise SdtuneError(f"data.resolution must be positive, got {resolution}")
        if batch_size < 1:
            raise SdtuneError(f"data.batch_size must be at least 1, got {batch_size}")
        if not 0.0 <= caption_dropout <= 1.0:
            raise SdtuneError(f"data.caption_dropout must be between 0 and 1, got {caption_dropout}")
        if not 0.0 <= val_fraction < 1.0:
            raise SdtuneError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        if num_workers < 0:
            raise SdtuneError(f"data.num_workers must be 0 or more, got {num_workers}")
        self.save_hyperparameters()
        self.root = root
        self.resolution = resolution
        self.batch_size = batch_size
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.caption_dropout = caption_dropout
        self.num_workers = num_workers
        self.pretrained = pretrained
        self.revision = revision
        self.val_root = val_root
        self.val_fraction = val_fraction
        self.seed = seed
        self.train_records: list[Record] = []
        self.val_records: list[Record] = []
        self.tokenizer: Any = None

    @property
    def record_count(self) -> int:
        """Training images found by `setup()` (0 before it runs)."""
        return len(self.train_records)

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is not None:
            return  # Lightning calls setup once per stage; discovery and tokenizer loading need to happen once.
        if self.pretrained is None:
            raise SdtuneError(
                "data.pretrained is not set; pass --model.pretrained (the CLI links it) or --data.pretrained PATH"
            )
        records = discover_records(self.root, "data.root")
        if self.val_root is not None:
            self.train_records, self.val_records = records, discover_records(self.val_root, "data.val_root")
        elif self.val_fraction > 0:
            self.train_records, self.val_records = self._split(records)
        else:
            self.train_records, self.val_records = records, []
        self.tokenizer = load_tokenizer(self.pretrained, self.revision)

    def _split(self, records: list[Record]) -> tuple[list[Record], list[Record]]:
        held_out = max(1, round(len(records) * self.val_fraction))
        if held_out >= len(records):
            raise SdtuneError(
                f"data.val_fraction {self.val_fraction} leaves no training images out of {len(records)} in "
                f"'{self.root}'; lower it or pass data.val_root"
            )
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "val_split"))
        val_indices = set(torch.randperm(len(records), generator=generator)[:held_out].tolist())
        train = [r for i, r in enumerate(records) if i not in val_indices]
        val = [r for i, r in enumerate(records) if i in val_indices]
        return train, val

    def _loader(self, dataset: CaptionDataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochSampler(len(dataset), self.seed, shuffle=shuffle),
            drop_last=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        dataset = CaptionDataset(
            self.train_records,
            self.tokenizer,
            self.resolution,
            center_crop=self.center_crop,
            random_flip=self.random_flip,
            caption_dropout=self.caption_dropout,
            seed=self.seed,
        )
        return self._loader(dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        """Deterministic: center crop, no flip, every caption kept. `[]` without a split makes Lightning skip it."""
        self.setup("validate")
        if not self.val_records:
            return []
        dataset = CaptionDataset(self.val_records, self.tokenizer, self.resolution, center_crop=True, seed=self.seed)
        return self._loader(dataset, shuffle=False)
