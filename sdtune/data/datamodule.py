"""The Lightning DataModule: finds the images once, splits off validation, and builds reproducible loaders.

Samples and the collate function live in `sdtune.data.dataset`, the batch sampler in `sdtune.data.bucket_sampler`.
Every loader batches through `BucketBatchSampler`: without `buckets` all samples share one square bucket. It splits
batches between DDP ranks itself, so the CLI turns Lightning's `use_distributed_sampler` off, and its position in
the epoch is saved in checkpoints (this module's `state_dict`), so a run resumed mid-epoch goes on with the batches
it had not trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from sdtune.data.batch import CaptionTokenizer, collate
from sdtune.data.bucket_sampler import BucketBatchSampler, bucket_report
from sdtune.data.buckets import Bucket, assign_bucket, make_buckets
from sdtune.data.cached_dataset import CachePlan, check_cacheable
from sdtune.data.captions import with_prefix
from sdtune.data.class_images import generate_class_images
from sdtune.data.dataset import CaptionDataset, derive_seed
from sdtune.data.images import IMAGE_ERRORS, has_alpha
from sdtune.data.progress import progress_bar
from sdtune.data.records import Record
from sdtune.data.subsets import Subset, check_subsets, load_subsets
from sdtune.errors import SdtuneError, first_line
from sdtune.models.pretrained import load_tokenizers, model_family
from sdtune.models.text import chunk_count, text_token_ids

__all__ = ["CaptionDataModule", "CaptionDataset", "collate", "derive_seed"]


@dataclass(eq=False)
class CaptionDataModule(L.LightningDataModule):
    """Captioned images for text-to-image fine-tuning: every setting below is a `data.*` key of `sdtune fit`."""

    root: str | None = None
    """Training images: an imagefolder with metadata.jsonl/metadata.csv, images with .txt/.caption sidecars, a
    `datasets.save_to_disk` folder, or a kohya parent whose only contents are `<repeats>_<class words>` folders
    (e.g. `10_sks dog`). Give this or `subsets`, not both."""
    subsets: list[Subset] | None = None
    """Several folders, each `{root, repeats, prefix, default_caption, prior, generate}`: e.g. a few instance images
    with repeats 10 and prefix "sks" next to class images with `prior: true` (DreamBooth's prior preservation;
    `generate: 200` makes missing ones with the base model from default_caption)."""
    resolution: int = 512
    """Side of the square training crop, in pixels (the shorter side is resized to it first); with `buckets`, the
    side of the square whose area every bucket has at most."""
    batch_size: int = 1
    """Images per batch on each device."""
    center_crop: bool = False
    """Crop the middle instead of a random square (or random bucket-sized box)."""
    buckets: bool = False
    """Aspect-ratio buckets (kohya's enable_bucket): each image trains at the size of about resolution² pixels whose
    aspect ratio is closest to its own, instead of a resolution² square, so wide and tall images keep their edges;
    it is resized to cover that size and cropped. Each batch holds one bucket; the log lists the buckets and their
    batch counts."""
    bucket_step: int = 64
    """Bucket sides are multiples of this many pixels (of 8, the VAE's downscaling; 64 is kohya's default and keeps
    every UNet level of SD even)."""
    bucket_min_side: int | None = None
    """Shortest bucket side; null: resolution / 2."""
    bucket_max_side: int | None = None
    """Longest bucket side; null: 2 × resolution."""
    random_flip: bool = False
    """Mirror half of the images horizontally (avoid for text or asymmetric subjects)."""
    caption_dropout: float = 0.0
    """Fraction of captions replaced by "" so the model also learns the unconditional case that classifier-free
    guidance needs."""
    shuffle_tags: bool = False
    """Treat captions as comma-separated tags and shuffle them for every sample, so no concept is tied to a position
    (for booru-style tag captions, not sentences)."""
    keep_tokens: int = 0
    """The first N tags of each caption stay in place and are never dropped (kohya semantics; a subset's prefix is in
    front of them and always kept)."""
    tag_dropout: float = 0.0
    """Drop each other tag with this probability, so the model learns to fill in unprompted details."""
    max_token_length: int | None = None
    """Caption tokens the text encoder sees: one window of its tokenizer by default (75 for CLIP: 77 with the start
    and end tokens) or a multiple, split into windows that are encoded separately and concatenated
    (AUTOMATIC1111-style)."""
    mask_dir: str | None = None
    """Loss-weight masks mirroring the image folders (same relative path, any image suffix); white trains fully,
    black not at all. Images without a mask train with full weight."""
    alpha_mask: bool = False
    """Use each image's alpha channel as its loss mask (opaque trains fully)."""
    num_workers: int = 0
    """DataLoader worker processes; 0 loads in the training process."""
    pin_memory: bool | None = None
    """Page-locked batches for faster host-to-GPU copies; null: on when CUDA is available."""
    persistent_workers: bool = True
    """Keep worker processes between epochs (with num_workers > 0) instead of restarting them, which costs seconds
    per epoch on small datasets."""
    cache: bool = False
    """Train from cached VAE latents and text-encoder outputs instead of encoding every step: the first run computes
    what is missing (the entries `sdtune prep cache` writes, shared with it), later runs only read. Needs
    center_crop, no tag shuffling or dropout and no masks; random_flip caches both orientations. A text encoder that
    trains encodes the captions every step (only the latents are then taken from the cache)."""
    cache_dir: str | None = None
    """Where the cache lives; null: `cache/` inside data.root (or the first subset's root), where `sdtune prep cache`
    puts it."""
    pretrained: str | None = None
    """Model whose tokenizers encode the captions (the CLI links it from --model.pretrained)."""
    revision: str | None = None
    """Hub revision of `pretrained` (of `pretrained_config` for a single-file `pretrained`)."""
    pretrained_config: str | None = None
    """For a single-file `pretrained`, the diffusers directory or Hub id whose tokenizer it uses (the CLI links it
    from --model.pretrained_config)."""
    clip_skip: int = 1
    """Text-encoder layer the cached text outputs come from (the CLI links it from --model.clip_skip)."""
    added_tokens: dict[str, int] = field(default_factory=dict)
    """Tokens the model adds to its tokenizer (textual inversion, pivotal tuning) and the ids it gave them; the CLI
    links them from the model, so captions are tokenized with the same ids."""
    val_root: str | None = None
    """Held-out images for validation, in any layout `root` accepts."""
    val_fraction: float = 0.0
    """Without val_root (which takes precedence), hold out this fraction of the images for validation; the split is
    fixed by seed."""
    seed: int | None = None
    """Seed of the shuffling, the validation split and every augmentation; null takes seed_everything's value (the
    seed of torch's global generator when the module is built), as the model's noise does."""

    def __post_init__(self) -> None:
        super().__init__()
        self.check()
        self.subsets = check_subsets(self.subsets) if self.subsets is not None else None
        self.added_tokens = dict(self.added_tokens or {})
        if self.seed is None:
            self.seed = torch.initial_seed()  # seed_everything's value: LightningCLI seeds before building
        self.pin_memory = torch.cuda.is_available() if self.pin_memory is None else self.pin_memory
        self.cached: CachePlan | None = None  # the training samples' cache entries, once setup() has found them
        # Samples per epoch: an image appears once per repeat of its subset. Validation has no repeats.
        self.train_records: list[Record] = []
        self.val_records: list[Record] = []
        # The (width, height) each sample is cropped to, index for index with the records.
        self.train_buckets: list[Bucket] = []
        self.val_buckets: list[Bucket] = []
        self.tokenizers: list[Any] = []
        self.family: Any = None  # the model's family (how each tokenizer reads a caption), once setup() has run
        self._train_batches: BucketBatchSampler | None = None  # the training loader's, for state_dict()
        self._resume: dict[str, int] | None = None  # from a checkpoint, until the training loader exists
        self.unreadable: dict[str, int] = {}  # image files that failed to load in training: how often
        self.skipped: list[str] = []  # what setup() left out and why: rows outside their folder, unreadable headers
        # Each header read: the image's upright size, or why it could not be read.
        self._sizes: dict[tuple[str, int], tuple[int, int] | str] = {}

    def check(self) -> None:
        """The settings' own rules, one line for the first broken one (pre-flight builds the module to run them)."""
        if (self.root is None) == (self.subsets is None):
            raise SdtuneError("pass exactly one of data.root and data.subsets" + (", not both" if self.root else ""))
        if self.resolution <= 0:
            raise SdtuneError(f"data.resolution must be positive, got {self.resolution}")
        if self.batch_size < 1:
            raise SdtuneError(f"data.batch_size must be at least 1, got {self.batch_size}")
        for name in ("caption_dropout", "tag_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise SdtuneError(f"data.{name} must be between 0 and 1, got {getattr(self, name)}")
        if self.keep_tokens < 0:
            raise SdtuneError(f"data.keep_tokens must be 0 or more, got {self.keep_tokens}")
        if self.mask_dir is not None and self.alpha_mask:
            raise SdtuneError("data.mask_dir and data.alpha_mask both set; masks come from one of them, pick one")
        if not 0.0 <= self.val_fraction < 1.0:
            raise SdtuneError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.num_workers < 0:
            raise SdtuneError(f"data.num_workers must be 0 or more, got {self.num_workers}")
        if self.buckets:
            self._check_bucket_settings(self.resolution, self.bucket_step, self.bucket_min_side, self.bucket_max_side)
        if self.cache:
            check_cacheable(self.center_crop, self.shuffle_tags, self.tag_dropout, self.mask_dir, self.alpha_mask)

    @property
    def record_count(self) -> int:
        """Training samples per epoch found by `setup()` (images × their subset's repeats; 0 before it runs)."""
        return len(self.train_records)

    @property
    def masks(self) -> str | None:
        """Where `CaptionDataset` takes loss masks from: "file", "alpha", or None (no "mask" key at all)."""
        return "alpha" if self.alpha_mask else "file" if self.mask_dir else None

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizers:
            return  # Lightning calls setup once per stage; discovery and tokenizer loading need to happen once.
        if self.pretrained is None:
            raise SdtuneError(
                "data.pretrained is not set; pass --model.pretrained (the CLI links it) or --data.pretrained PATH"
            )
        tokenizers = load_tokenizers(self.pretrained, self.revision, self.pretrained_config)
        self.family = model_family(self.pretrained, self.revision, self.pretrained_config)
        if self.added_tokens:  # textual inversion: the model's new tokens, with the ids the model gave them
            tokenizers[0].add_tokens(list(self.added_tokens))
            if tokenizers[0].convert_tokens_to_ids(list(self.added_tokens)) != list(self.added_tokens.values()):
                raise SdtuneError("data.pretrained's tokenizer differs from the model's; the new tokens got other ids")
        if self.max_token_length is None:
            self.max_token_length = tokenizers[0].model_max_length - 2
        chunk_count(tokenizers[0], self.max_token_length)  # a bad length fails before anything is read
        skipped: list[str] = []
        pairs = self.training_pairs(skipped=skipped)
        if self.val_root is not None:
            val_pairs = load_subsets([Subset(self.val_root)], ["data.val_root"], self.mask_dir, False, skipped)
            val_pairs = self._readable(val_pairs, skipped, "data.val_root")
        elif self.val_fraction > 0:
            pairs, val_pairs = self.split(pairs)
        else:
            val_pairs = []
        self.train_records = [record for record, repeats in pairs for _ in range(repeats)]
        self.val_records = [record for record, _ in val_pairs]
        self.skipped = skipped
        if skipped:
            more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
            rank_zero_warn(f"{len(skipped)} image(s) left out: {'; '.join(skipped[:5])}{more}")
        self._warn_about_long_captions(tokenizers[0], [record for record, _ in pairs])
        self._warn_about_missing_masks([record for record, _ in pairs])
        self.train_buckets = self.assign_buckets(self.train_records)
        self.val_buckets = self.assign_buckets(self.val_records)
        if self.buckets:
            rank_zero_info(f"data.buckets: {bucket_report(self.train_buckets, self.batch_size)}")
        if self.cache:
            folder = self.cache_dir or str(Path(self.root or self.subsets[0].root).expanduser() / "cache")
            self.cached = CachePlan.for_records(
                self.train_records, self.train_buckets, folder, self.pretrained, self.revision, self.clip_skip,
                self.max_token_length, self.random_flip,
            )
        self.tokenizers = tokenizers

    @property
    def tokenizer(self) -> Any:
        """The first text encoder's tokenizer (None before `setup`)."""
        return self.tokenizers[0] if self.tokenizers else None

    def training_pairs(self, announce: bool = True, skipped: list[str] | None = None) -> list[tuple[Record, int]]:
        """(record, repeats) of every image in data.root or data.subsets, before any validation split.

        What is left out (rows outside their folder; images whose header cannot be read) goes to
        `skipped` with the reason; without a list, each is a warning."""
        if self.subsets is not None:
            settings = [f"data.subsets[{i}].root" for i in range(len(self.subsets))]
            where = "data.subsets"
        else:
            settings, where = ["data.root"], "data.root"
        subsets = self.subsets or [Subset(str(self.root))]
        pairs = load_subsets(subsets, settings, self.mask_dir, announce=announce, skipped=skipped)
        return self._readable(pairs, skipped, where)

    def _readable(
        self, pairs: list[tuple[Record, int]], skipped: list[str] | None, where: str
    ) -> list[tuple[Record, int]]:
        """Every image's header is read (buckets need its size; without them, the run would otherwise start and
        meet the file mid-epoch): one whose header cannot be read (not a format sdtune reads, a decompression bomb,
        a broken file) is left out with its reason. A file that breaks after its header is found when it is loaded,
        and replaced by a stand-in (see `on_before_batch_transfer`)."""
        kept, failed = [], {}
        for record, repeats in progress_bar(pairs, "reading image headers"):
            key = (record.path, record.row)
            if key not in self._sizes:
                try:
                    self._sizes[key] = record.upright_size()
                except IMAGE_ERRORS as err:
                    self._sizes[key] = f"{where}: skipped '{record.path}': {first_line(err)}"
            if isinstance(self._sizes[key], str):
                failed[key] = self._sizes[key]
            else:
                kept.append((record, repeats))
        reasons = list(failed.values())
        if pairs and not kept:
            raise SdtuneError(f"{where} has no readable images: all {len(pairs)} skipped, first {reasons[0]}")
        if skipped is None:
            for reason in reasons:
                rank_zero_warn(reason)
        else:
            skipped.extend(reasons)
        return kept

    def prepare_data(self) -> None:
        """Generate missing DreamBooth class images, and with data.cache compute the missing entries (once per node,
        before every rank's setup reads them)."""
        for index, subset in enumerate(self.subsets or []):
            if subset.generate:
                generate_class_images(
                    subset.root, subset.default_caption, subset.generate, self.resolution, self.pretrained,
                    self.revision, self.pretrained_config, self.seed, setting=f"data.subsets[{index}]",
                )  # fmt: skip
        if self.cache:
            self.setup("fit")
            self.cached.build()

    @staticmethod
    def _check_bucket_settings(resolution: int, step: int, min_side: int | None, max_side: int | None) -> None:
        if step <= 0 or step % 8:
            raise SdtuneError(f"data.bucket_step must be a positive multiple of 8 (the VAE's factor), got {step}")
        for name, side in (("bucket_min_side", min_side), ("bucket_max_side", max_side)):
            if side is not None and (side < step or side % step):
                raise SdtuneError(f"data.{name} must be a multiple of data.bucket_step ({step}), got {side}")
        if resolution < step:
            raise SdtuneError(f"data.resolution {resolution} is smaller than data.bucket_step {step}; lower the step")
        if min_side is not None and max_side is not None and min_side > max_side:
            raise SdtuneError(f"data.bucket_min_side {min_side} is above data.bucket_max_side {max_side}")

    def assign_buckets(self, records: list[Record]) -> list[Bucket]:
        """Each record's training size: its aspect-ratio bucket (from the image header) or the square."""
        if not self.buckets:
            return [(self.resolution, self.resolution)] * len(records)
        table = make_buckets(self.resolution**2, self.bucket_step, self.bucket_min_side, self.bucket_max_side)
        found: dict[tuple[str, int], Bucket] = {}
        for record in records:  # a record repeated by its subset is opened once
            if (record.path, record.row) not in found:
                size = self._sizes.get((record.path, record.row))
                if not isinstance(size, tuple):
                    size = self._read_header(record, Record.upright_size)
                found[record.path, record.row] = assign_bucket(*size, table)
        return [found[record.path, record.row] for record in records]

    def split(self, pairs: list[tuple[Record, int]]) -> tuple[list[tuple[Record, int]], list[tuple[Record, int]]]:
        """Hold out whole images (never one repeat of an image that is also trained on)."""
        held_out = max(1, round(len(pairs) * self.val_fraction))
        if held_out >= len(pairs):
            where = f"'{self.root}'" if self.root is not None else "data.subsets"
            raise SdtuneError(
                f"data.val_fraction {self.val_fraction} leaves no training images out of {len(pairs)} in "
                f"{where}; lower it or pass data.val_root"
            )
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "val_split"))
        val_indices = set(torch.randperm(len(pairs), generator=generator)[:held_out].tolist())
        train = [p for i, p in enumerate(pairs) if i not in val_indices]
        val = [p for i, p in enumerate(pairs) if i in val_indices]
        return train, val

    def _warn_about_long_captions(self, tokenizer: Any, records: list[Record]) -> None:
        """Silent truncation is the usual reason a long caption "does nothing"; say so once, with the fix."""
        captions = [with_prefix(record.caption, record.prefix) for record in records]
        lengths = [len(ids) for ids in text_token_ids(tokenizer, captions)]
        long = [(length, record) for length, record in zip(lengths, records) if length > self.max_token_length]
        if long:
            window = tokenizer.model_max_length - 2
            needed = -(-max(lengths) // window) * window
            rank_zero_warn(
                f"{len(long)} of {len(records)} captions are longer than {self.max_token_length} tokens and will be "
                f"truncated (first: {long[0][1].path}); raise data.max_token_length to {needed} to keep them whole"
            )

    def _warn_about_missing_masks(self, records: list[Record]) -> None:
        """A mask folder that mirrors the wrong level matches nothing; the count makes that visible."""
        if self.mask_dir is not None:
            missing, what = sum(record.mask is None for record in records), f"no mask in {self.mask_dir}"
        elif self.alpha_mask:
            missing, what = sum(not self._has_alpha(record) for record in records), "no alpha channel"
        else:
            return
        if missing:
            rank_zero_warn(f"{missing} of {len(records)} images have {what}; they train with full weight")

    def _has_alpha(self, record: Record) -> bool:
        return self._read_header(record, lambda r: has_alpha(r.open()))

    @staticmethod
    def _read_header(record: Record, read: Callable[[Record], Any]) -> Any:
        """`read(record)` (something from the image's header), with an unreadable file as one line naming it."""
        try:
            return read(record)
        except IMAGE_ERRORS as err:
            raise SdtuneError(f"image '{record.path}' could not be read ({first_line(err)}); fix or remove it") from err

    def _loader(self, dataset: Any, buckets: list[Bucket], train: bool) -> DataLoader:
        """Batches of one bucket each. Training shuffles and splits the batches between DDP ranks; validation keeps
        a fixed order and every rank sees all of it (so each rank's validation loss is the same)."""
        replicas = (self.trainer.distributed_sampler_kwargs if train and self.trainer is not None else None) or {}
        batches = BucketBatchSampler(buckets, self.batch_size, self.seed, shuffle=train, **replicas)
        return DataLoader(
            dataset,
            batch_sampler=batches,
            # Worker seeds come from this generator, not torch's global one, which a resume restores (dropout).
            generator=torch.Generator().manual_seed(derive_seed(self.seed, "loader", int(train))),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            collate_fn=collate,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        if self.cached is not None:
            # Token ids too: a text encoder that trains encodes them instead of reading its cached outputs.
            tokenize = CaptionTokenizer(self.tokenizers, self.max_token_length, self.family)
            dataset = self.cached.dataset(self.random_flip, self.caption_dropout, self.seed, tokenize)
        else:
            dataset = self._train_dataset()
        loader = self._loader(dataset, self.train_buckets, train=True)
        self._train_batches = loader.batch_sampler
        if self._resume is not None:
            self._train_batches.load_state_dict(self._resume)
            self._resume = None
        return loader

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count the training batches trained on (what a checkpoint saved now must skip on resume), and count (and
        warn once about) images that failed to load; their batch trains on stand-ins of its size."""
        if self._train_batches is not None and self.trainer is not None and self.trainer.training:
            self._train_batches.mark_trained()
        failed_files = batch.pop("unreadable", []) if isinstance(batch, dict) else []
        for failed in failed_files:
            if failed not in self.unreadable:
                rank_zero_warn(f"{failed}; trained on the next image of its size instead")
            self.unreadable[failed] = self.unreadable.get(failed, 0) + 1
        return batch

    def teardown(self, stage: str) -> None:
        if self.unreadable:
            times = sum(self.unreadable.values())
            rank_zero_warn(
                f"{len(self.unreadable)} image(s) could not be read and were replaced {times} time(s) in all; fix or "
                f"remove them: {'; '.join(list(self.unreadable)[:5])}"
            )

    def state_dict(self) -> dict[str, Any]:
        """The training batches' position in the epoch, counted in batches trained (not fetched ahead)."""
        if self._train_batches is None:
            return {}
        return {"train_batches": self._train_batches.state_dict(self._train_batches.trained)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Lightning restores this before it asks for the training loader, which then starts where it stopped."""
        self._resume = state_dict.get("train_batches")
        if self._resume is not None:
            epoch, done = self._resume["epoch"], self._resume["batches_yielded"]
            where = f"continues after its first {done} batches" if done else "starts from its first batch"
            rank_zero_info(f"data: epoch {epoch} {where}")

    def _train_dataset(self) -> CaptionDataset:
        return CaptionDataset(
            self.train_records,
            self.tokenizers,
            self.resolution,
            center_crop=self.center_crop,
            random_flip=self.random_flip,
            caption_dropout=self.caption_dropout,
            seed=self.seed,
            shuffle_tags=self.shuffle_tags,
            keep_tokens=self.keep_tokens,
            tag_dropout=self.tag_dropout,
            max_token_length=self.max_token_length,
            masks=self.masks,
            buckets=self.train_buckets,
            family=self.family,
        )

    def val_dataloader(self) -> DataLoader | list:
        """Deterministic: center crop, no flip, every caption kept as written (plus its subset's prefix).

        `[]` without a split makes Lightning skip validation.
        """
        self.setup("validate")
        if not self.val_records:
            return []
        dataset = CaptionDataset(
            self.val_records, self.tokenizers, self.resolution, center_crop=True, seed=self.seed,
            max_token_length=self.max_token_length, masks=self.masks, buckets=self.val_buckets, family=self.family,
        )  # fmt: skip
        return self._loader(dataset, self.val_buckets, train=False)
