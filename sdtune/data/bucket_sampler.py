"""Batches that each hold one aspect-ratio bucket, so a batch's images stack into one tensor.

`BucketBatchSampler` is a DataLoader `batch_sampler`: it yields lists of `(epoch, index)` keys, the keys
`CaptionDataset` derives each sample's random draws from. The order of an epoch is a pure function of (seed, epoch):
indices are shuffled within each bucket, cut into batches, and the batches of all buckets are shuffled together.

Lightning 2.6 and this sampler (read from its source):

- Several devices: with `Trainer(use_distributed_sampler=True)` (the default) Lightning tries to inject a
  `DistributedSampler` into every DataLoader whose `.sampler` is not one already, and a DataLoader built with
  `batch_sampler=` still has a default `SequentialSampler` there (trainer/connectors/data_connector.py:169-199,
  utilities/data.py:246-324). For a batch sampler that is not a `torch.utils.data.BatchSampler` it then calls
  `type(batch_sampler)(sampler, batch_size=..., drop_last=...)`; here that raises an SdtuneError naming the
  setting (without `__new__`'s check it would be a bare TypeError about `seed`). So a multi-device run needs
  `Trainer(use_distributed_sampler=False)`, and the DataModule passes `num_replicas` and `rank` itself
  (`trainer.distributed_sampler_kwargs`, None on one device). This sampler splits the batches between the ranks:
  disjoint, and the same number on every rank.
- Epochs: Lightning calls `set_epoch` only on `loader.sampler` and `loader.batch_sampler.sampler`, never on the
  batch sampler itself (fabric/utilities/data.py:415-436). `sampler` is therefore this sampler itself, so Lightning
  moves it to the next epoch like any sampler.
- Resuming: Lightning saves the state of a *loader* that has `state_dict`/`load_state_dict` (a torchdata
  `StatefulDataLoader`), never of its sampler or batch sampler (utilities/combined_loader.py:378-394,
  loops/fit_loop.py:520-530); a plain `torch.utils.data.DataLoader` has no `state_dict`, so nothing of it is saved.
  The DataModule saves and restores `state_dict()` itself (see `BucketBatchSampler.state_dict`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler

from sdtune.data.buckets import Bucket, format_bucket
from sdtune.data.dataset import derive_seed
from sdtune.errors import SdtuneError

Key = tuple[int, int]


def _batch_count(size: int, batch_size: int, drop_last: bool) -> int:
    return size // batch_size if drop_last else -(-size // batch_size)


class BucketBatchSampler(Sampler[list[Key]]):
    """Lists of `(epoch, index)` keys, all of one bucket; the order is a pure function of (seed, epoch).

    Args:
        buckets: The bucket (width, height) of each dataset index; `buckets[i]` is the bucket of index i.
        batch_size: Samples per batch; a bucket's last batch may be smaller (see `drop_last`).
        seed: Seed of the shuffles; every rank must pass the same one.
        shuffle: Shuffle indices within buckets and batches across buckets, anew each epoch. False (validation):
            buckets in sorted order, each bucket's indices in increasing order.
        drop_last: Drop each bucket's last batch when it is smaller than `batch_size`.
        num_replicas: Processes sharing the data (DDP world size).
        rank: This process's place among them (global rank), in [0, num_replicas).

    Several replicas: every rank builds the same global list of batches and takes every `num_replicas`-th one,
    starting at its rank. The list is first truncated to a multiple of `num_replicas`, so every rank yields the
    same number of batches (a rank that ran out early would wait forever in the next all-reduce); at most
    `num_replicas - 1` batches an epoch are left out, and with `shuffle` they are different batches each epoch.
    Truncating was chosen over repeating batches because repeats would count some samples twice in an epoch
    (and twice in a validation loss). Batches are split whole, so the ranks' batches can differ in size when
    `drop_last` is False.

    `len()` is the number of batches a rank yields in a whole epoch; it is the same for every epoch and seed.
    Resuming mid-epoch (`load_state_dict`) yields only the rest of that epoch but keeps `len()` whole, because
    Lightning counts the batches it already trained in that epoch against `len()`.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> BucketBatchSampler:
        # Under DDP with `use_distributed_sampler` on, Lightning re-creates a batch sampler as
        # `cls(DistributedSampler(...), batch_size=..., drop_last=...)`; without this check that fails with a bare
        # TypeError about `seed` that does not name the setting to change.
        if args and isinstance(args[0], Sampler):
            raise SdtuneError(
                "Lightning tried to put a DistributedSampler inside BucketBatchSampler, which shares batches between "
                "devices itself; set trainer.use_distributed_sampler to false"
            )
        return super().__new__(cls)

    def __init__(
        self,
        buckets: Sequence[Bucket],
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if batch_size < 1:
            raise SdtuneError(f"data.batch_size must be at least 1, got {batch_size}")
        if len(buckets) == 0:
            raise SdtuneError("no training samples to batch: the dataset is empty")
        if num_replicas < 1:
            raise SdtuneError(f"the number of devices must be at least 1, got {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise SdtuneError(f"rank {rank} is outside [0, {num_replicas}) (num_replicas={num_replicas})")
        groups: dict[Bucket, list[int]] = {}
        for index, bucket in enumerate(buckets):
            groups.setdefault(tuple(bucket), []).append(index)
        # Sorted, so neither the order of the records nor of dict insertion changes an epoch.
        self.groups = {bucket: groups[bucket] for bucket in sorted(groups)}
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        total = sum(_batch_count(len(indices), batch_size, drop_last) for indices in self.groups.values())
        if total < num_replicas:
            what = (
                f"{total} batches of up to {batch_size}" if total else f"no full batch of {batch_size} (drop_last)"
            )
            raise SdtuneError(
                f"{len(buckets)} samples in {len(self.groups)} buckets make {what}, fewer than the {num_replicas} "
                f"devices; lower data.batch_size or use fewer devices"
            )
        self.total_batches = total
        self._per_rank = total // num_replicas
        self._position = 0  # batches of self.epoch handed out so far, including any skipped on resume
        self.trained = 0  # batches of self.epoch trained on (see `mark_trained`), including any skipped on resume
        self._resume: tuple[int, int] | None = None  # (epoch, batches to skip), from load_state_dict

    @property
    def sampler(self) -> BucketBatchSampler:
        """This sampler: Lightning calls `set_epoch` on `loader.batch_sampler.sampler` but not on the batch sampler."""
        return self

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this before each training epoch; moving to another epoch drops a pending resume."""
        if epoch != self.epoch:
            self._resume = None
            self._position = 0
            self.trained = 0
        self.epoch = epoch

    def __len__(self) -> int:
        return self._per_rank

    def global_batches(self, epoch: int | None = None) -> list[list[int]]:
        """Every rank's batches of `epoch` (default: the current one) as dataset indices, before the split."""
        epoch = self.epoch if epoch is None else epoch
        generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch, "bucket_batches"))
        batches: list[list[int]] = []
        for indices in self.groups.values():
            if self.shuffle:
                indices = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
            stop = len(indices) // self.batch_size * self.batch_size if self.drop_last else len(indices)
            batches.extend(indices[start : start + self.batch_size] for start in range(0, stop, self.batch_size))
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return batches

    def rank_batches(self, epoch: int | None = None) -> list[list[int]]:
        """This rank's batches of `epoch` (default: the current one) as dataset indices, from the start."""
        usable = self._per_rank * self.num_replicas
        return self.global_batches(epoch)[self.rank : usable : self.num_replicas]

    def __iter__(self) -> Iterator[list[Key]]:
        # The order is fixed here, not at the first next(): DataLoader workers and Lightning create the iterator
        # before the first batch is asked for. A pending resume stays until an iterator hands out a batch (or
        # runs out): torch's worker loader calls iter() twice and throws the first iterator away unused.
        epoch, resume = self.epoch, self._resume
        start = resume[1] if resume is not None and resume[0] == epoch else 0
        self._position = self.trained = start
        batches = [[(epoch, index) for index in batch] for batch in self.rank_batches(epoch)[start:]]
        return self._hand_out(batches, resume)

    def _hand_out(self, batches: list[list[Key]], resume: tuple[int, int] | None) -> Iterator[list[Key]]:
        for batch in batches:
            if resume is not None and self._resume is resume:
                self._resume = None
            self._position += 1
            yield batch
        if resume is not None and self._resume is resume:
            self._resume = None

    def mark_trained(self) -> None:
        """One more of this epoch's batches was trained on (the DataModule calls this as each reaches the model)."""
        self.trained += 1

    def state_dict(self, consumed: int | None = None) -> dict[str, int]:
        """Where this rank is in the current epoch: `{"epoch", "batches_yielded"}`.

        `consumed` is the number of this epoch's batches actually trained on by this rank, counted from the
        start of the epoch (a resumed epoch's skipped batches included). Pass it when iterating through a
        DataLoader: the loader asks for batches ahead of the training step (its workers' prefetch, and
        Lightning's fetcher keeps one batch in hand), so the count this sampler keeps itself (used when
        `consumed` is None) is batches handed to the loader, not batches trained on. `trained` counts the
        latter when `mark_trained` is called for each batch the model receives (the DataModule does, so a
        ModelCheckpoint save in `on_train_batch_end` counts the batch just trained).

        A finished epoch is saved as the start of the next one, so a resume goes on with the next epoch.
        """
        position = self._position if consumed is None else consumed
        if not 0 <= position <= len(self):
            raise ValueError(f"consumed must be in [0, {len(self)}] (batches per epoch), got {position}")
        if position == len(self):
            return {"epoch": self.epoch + 1, "batches_yielded": 0}
        return {"epoch": self.epoch, "batches_yielded": position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` was saved: iterators of that epoch yield only its remaining batches.

        The resume holds until an iterator hands out its first batch (or has none left), then the epoch's next
        pass is whole again; `set_epoch` to another epoch drops it. The saving run must have used the same
        samples, buckets, batch_size, drop_last, seed and devices.
        """
        epoch, position = int(state["epoch"]), int(state["batches_yielded"])
        if not 0 <= position <= len(self):
            raise SdtuneError(
                f"the checkpoint stopped after batch {position} of epoch {epoch}, but an epoch now has {len(self)} "
                f"batches per device; resume with the data, data.batch_size and devices it was saved with"
            )
        self.epoch = epoch
        self._position = position
        self._resume = (epoch, position)


def bucket_report(buckets: Sequence[Bucket], batch_size: int, drop_last: bool = False, limit: int = 8) -> str:
    """One line: how many samples and batches each bucket holds, the largest buckets first.

    e.g. "3 buckets, 161 samples, 41 batches of up to 4: 512x512 ×120 (30 batches), 576x448 ×37 (10),
    448x576 ×4 (1)".
    Only the `limit` largest buckets are listed; the rest are summed up at the end.
    """
    if batch_size < 1:
        raise SdtuneError(f"data.batch_size must be at least 1, got {batch_size}")
    counts = sorted(Counter(tuple(bucket) for bucket in buckets).items(), key=lambda item: (-item[1], item[0]))
    if not counts:
        return "0 buckets: no samples"
    batches = [_batch_count(count, batch_size, drop_last) for _, count in counts]
    parts = []
    for i, ((bucket, count), n) in enumerate(zip(counts[:limit], batches)):
        unit = (" batch" if n == 1 else " batches") if i == 0 else ""
        parts.append(f"{format_bucket(bucket)} ×{count} ({n}{unit})")
    if len(counts) > limit:
        rest = counts[limit:]
        parts.append(f"… {len(rest)} more ×{sum(count for _, count in rest)} ({sum(batches[limit:])})")
    plural = {"buckets": "s" if len(counts) != 1 else "", "samples": "s" if len(buckets) != 1 else ""}
    head = (
        f"{len(counts)} bucket{plural['buckets']}, {len(buckets)} sample{plural['samples']}, "
        f"{sum(batches)} batch{'es' if sum(batches) != 1 else ''} of {'' if drop_last else 'up to '}{batch_size}"
    )
    return f"{head}: " + ", ".join(parts)
