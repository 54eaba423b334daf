"""BucketBatchSampler: one bucket per batch, a reproducible order, DDP splits and exact mid-epoch resume."""

from __future__ import annotations

import itertools
import pickle
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, SequentialSampler

from sdtune.data.bucket_sampler import BucketBatchSampler, bucket_report
from sdtune.errors import SdtuneError

SQUARE, WIDE, TALL = (512, 512), (640, 384), (384, 640)


# 29 samples over three buckets of 13, 11 and 5, interleaved: every bucket ends in a partial batch of 4.
BUCKETS = [(SQUARE, WIDE, TALL)[i % 3] for i in range(15)] + [SQUARE] * 8 + [WIDE] * 6


def epoch_of(sampler: BucketBatchSampler, epoch: int = 0) -> list[list[tuple[int, int]]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def indices(batches) -> list[int]:
    return [index for batch in batches for _, index in batch]


def test_every_batch_holds_one_bucket_and_every_index_comes_once():
    assert Counter(BUCKETS) == {SQUARE: 13, WIDE: 11, TALL: 5}
    sampler = BucketBatchSampler(BUCKETS, batch_size=4, seed=0)
    for epoch in range(3):
        batches = epoch_of(sampler, epoch)
        for batch in batches:
            assert len({BUCKETS[index] for _, index in batch}) == 1
            assert {key_epoch for key_epoch, _ in batch} == {epoch}
            assert 1 <= len(batch) <= 4
        assert sorted(indices(batches)) == list(range(len(BUCKETS)))
        assert len(batches) == len(sampler) == 4 + 3 + 2  # ceil(13/4) + ceil(11/4) + ceil(5/4)


def test_drop_last_drops_each_buckets_partial_batch():
    sampler = BucketBatchSampler(BUCKETS, batch_size=4, seed=0, drop_last=True)
    batches = epoch_of(sampler)
    assert len(batches) == len(sampler) == 3 + 2 + 1
    assert all(len(batch) == 4 for batch in batches)
    assert len(set(indices(batches))) == 24


def test_the_order_depends_only_on_seed_and_epoch():
    first = BucketBatchSampler(BUCKETS, batch_size=4, seed=7)
    again = BucketBatchSampler(BUCKETS, batch_size=4, seed=7)
    assert epoch_of(first, 3) == epoch_of(again, 3)
    assert epoch_of(first, 3) == epoch_of(first, 3)  # iterating twice changes nothing
    assert indices(epoch_of(first, 3)) != indices(epoch_of(first, 4))
    other_seed = BucketBatchSampler(BUCKETS, batch_size=4, seed=8)
    assert indices(epoch_of(first, 3)) != indices(epoch_of(other_seed, 3))
    # Batches of different buckets are interleaved, not bucket after bucket.
    order = [BUCKETS[batch[0][1]] for batch in epoch_of(first, 3)]
    assert order != sorted(order, key=order.index)


def test_without_shuffle_buckets_come_sorted_and_indices_in_order():
    sampler = BucketBatchSampler(BUCKETS, batch_size=4, seed=0, shuffle=False)
    expected = []
    for bucket in sorted({TALL, WIDE, SQUARE}):
        members = [i for i, b in enumerate(BUCKETS) if b == bucket]
        expected += [members[start : start + 4] for start in range(0, len(members), 4)]
    assert [[index for _, index in batch] for batch in epoch_of(sampler, 0)] == expected
    assert indices(epoch_of(sampler, 5)) == indices(epoch_of(sampler, 0))


@pytest.mark.parametrize("replicas", [2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_get_disjoint_batches_of_equal_count(replicas, drop_last):
    for epoch in range(3):
        samplers = [
            BucketBatchSampler(BUCKETS, 4, seed=1, drop_last=drop_last, num_replicas=replicas, rank=rank)
            for rank in range(replicas)
        ]
        per_rank = [epoch_of(sampler, epoch) for sampler in samplers]
        assert len({len(batches) for batches in per_rank}) == 1
        assert all(len(batches) == len(sampler) for batches, sampler in zip(per_rank, samplers))
        seen = [indices(batches) for batches in per_rank]
        union = set().union(*map(set, seen))
        assert sum(map(len, seen)) == len(union)  # disjoint
        # The union is the single-device epoch minus the batches truncated to share them out evenly.
        whole = BucketBatchSampler(BUCKETS, 4, seed=1, drop_last=drop_last).global_batches(epoch)
        kept = len(whole) // replicas * replicas
        assert len(whole) - kept < replicas
        assert union == set(indices([[(epoch, i) for i in batch] for batch in whole[:kept]]))
        # Round-robin: rank r has batches r, r + replicas, ... of the shared order.
        assert [[i for _, i in batch] for batch in per_rank[1]] == whole[1:kept:replicas]


def test_len_matches_iteration_for_many_shapes():
    for batch_size, replicas, drop_last in itertools.product([1, 2, 3, 5], [1, 2, 3], [False, True]):
        for rank in range(replicas):
            sampler = BucketBatchSampler(BUCKETS, batch_size, 3, drop_last=drop_last, num_replicas=replicas, rank=rank)
            assert len(epoch_of(sampler, 2)) == len(sampler)


@pytest.mark.parametrize("replicas", [1, 2])
def test_resuming_mid_epoch_yields_exactly_the_rest(replicas):
    for rank in range(replicas):
        uninterrupted = BucketBatchSampler(BUCKETS, 3, seed=5, num_replicas=replicas, rank=rank)
        expected = epoch_of(uninterrupted, 2)
        for k in range(len(expected) + 1):
            sampler = BucketBatchSampler(BUCKETS, 3, seed=5, num_replicas=replicas, rank=rank)
            sampler.set_epoch(2)
            iterator = iter(sampler)
            consumed = [next(iterator) for _ in range(k)]
            state = sampler.state_dict()
            resumed = BucketBatchSampler(BUCKETS, 3, seed=5, num_replicas=replicas, rank=rank)
            resumed.load_state_dict(state)
            rest = list(resumed)
            if k < len(expected):
                assert state == {"epoch": 2, "batches_yielded": k}
                assert consumed + rest == expected
                assert len(resumed) == len(expected)  # Lightning counts the resumed epoch's first k against len
            else:  # a finished epoch resumes at the start of the next one
                assert state == {"epoch": 3, "batches_yielded": 0}
                assert rest == epoch_of(BucketBatchSampler(BUCKETS, 3, seed=5, num_replicas=replicas, rank=rank), 3)


def test_resume_takes_the_consumed_count_not_what_a_prefetching_loader_asked_for():
    sampler = BucketBatchSampler(BUCKETS, 4, seed=0)
    expected = epoch_of(sampler, 1)
    iterator = iter(sampler)
    for _ in range(5):  # the loader asked for five batches; the training step has seen three
        next(iterator)
    assert sampler.state_dict() == {"epoch": 1, "batches_yielded": 5}
    state = sampler.state_dict(consumed=3)
    assert state == {"epoch": 1, "batches_yielded": 3}
    resumed = BucketBatchSampler(BUCKETS, 4, seed=0)
    resumed.load_state_dict(state)
    assert list(resumed) == expected[3:]
    # Counts stay absolute within the epoch: saving again after a resume counts the skipped batches too.
    resumed.load_state_dict(state)
    iterator = iter(resumed)
    next(iterator)
    assert resumed.state_dict() == {"epoch": 1, "batches_yielded": 4}
    with pytest.raises(ValueError, match="consumed"):
        sampler.state_dict(consumed=len(sampler) + 1)


def test_a_resume_applies_once_and_only_to_its_epoch():
    sampler = BucketBatchSampler(BUCKETS, 4, seed=0)
    sampler.load_state_dict({"epoch": 1, "batches_yielded": 2})
    sampler.set_epoch(1)  # Lightning sets the same epoch again: the resume stays
    assert len(list(sampler)) == len(sampler) - 2
    assert len(list(sampler)) == len(sampler)  # the next pass of that epoch is whole
    sampler.load_state_dict({"epoch": 1, "batches_yielded": 2})
    sampler.set_epoch(2)  # another epoch: the resume is stale
    assert list(sampler) == epoch_of(BucketBatchSampler(BUCKETS, 4, seed=0), 2)


def test_a_resume_survives_iterators_thrown_away_unused():
    """torch's worker loader calls iter() twice and uses the second; Lightning may call it before set_epoch."""
    expected = epoch_of(BucketBatchSampler(BUCKETS, 4, seed=0), 1)
    sampler = BucketBatchSampler(BUCKETS, 4, seed=0)
    sampler.load_state_dict({"epoch": 1, "batches_yielded": 2})
    iter(sampler)
    iter(sampler)
    assert list(sampler) == expected[2:]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_dataloader_resumes_mid_epoch(workers):
    def loader(sampler):
        return DataLoader(KeyDataset(len(BUCKETS)), batch_sampler=sampler, num_workers=workers, collate_fn=list)

    expected = epoch_of(BucketBatchSampler(BUCKETS, 4, seed=0), 1)
    sampler = BucketBatchSampler(BUCKETS, 4, seed=0)
    sampler.set_epoch(1)
    batches = iter(loader(sampler))
    trained = [next(batches) for _ in range(3)]  # workers have asked the sampler for more than these
    state = sampler.state_dict(consumed=len(trained))
    resumed = BucketBatchSampler(BUCKETS, 4, seed=0)
    resumed.load_state_dict(state)
    assert trained + list(loader(resumed)) == expected


def test_a_resume_from_other_settings_is_refused():
    sampler = BucketBatchSampler(BUCKETS, 4, seed=0)
    with pytest.raises(SdtuneError, match="data.batch_size and devices"):
        sampler.load_state_dict({"epoch": 0, "batches_yielded": len(sampler) + 1})


def test_lightning_finds_set_epoch_through_the_sampler_attribute():
    from lightning.fabric.utilities.data import _set_sampler_epoch

    sampler = BucketBatchSampler(BUCKETS, 4, seed=0)
    loader = DataLoader(KeyDataset(len(BUCKETS)), batch_sampler=sampler, collate_fn=list)
    _set_sampler_epoch(loader, 4)
    assert sampler.epoch == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "data.batch_size must be at least 1"),
        ({"buckets": []}, "dataset is empty"),
        ({"rank": 2, "num_replicas": 2}, "rank 2 is outside"),
        ({"rank": -1}, "rank -1 is outside"),
        ({"num_replicas": 0}, "at least 1"),
        ({"num_replicas": 10, "batch_size": 8}, "lower data.batch_size or use fewer devices"),
        ({"drop_last": True, "batch_size": 16}, "no full batch of 16"),
    ],
)
def test_bad_input_is_one_line_saying_what_to_change(kwargs, message):
    arguments = {"buckets": BUCKETS, "batch_size": 4, "seed": 0} | kwargs
    with pytest.raises(SdtuneError, match=message) as caught:
        BucketBatchSampler(**arguments)
    assert "\n" not in str(caught.value)


def test_lightnings_distributed_sampler_injection_names_the_setting_to_turn_off():
    """What Lightning 2.6 does under DDP with use_distributed_sampler on (utilities/data.py, batch sampler branch)."""
    sampler = BucketBatchSampler(BUCKETS, 4, seed=0)
    with pytest.raises(SdtuneError, match="set trainer.use_distributed_sampler to false"):
        type(sampler)(SequentialSampler(range(len(BUCKETS))), batch_size=sampler.batch_size, drop_last=False)


def test_it_pickles_for_worker_processes():
    sampler = BucketBatchSampler(BUCKETS, 4, seed=0)
    sampler.set_epoch(2)
    assert list(pickle.loads(pickle.dumps(sampler))) == list(sampler)


class KeyDataset(Dataset):
    """Returns its key, like CaptionDataset takes one."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, int]:
        epoch, index = key
        assert 0 <= index < self.size
        return epoch, index


def test_a_dataloader_takes_it_as_batch_sampler():
    sampler = BucketBatchSampler(BUCKETS, 4, seed=0)
    loader = DataLoader(KeyDataset(len(BUCKETS)), batch_sampler=sampler, num_workers=0)
    sampler.set_epoch(1)
    batches = list(loader)
    assert len(batches) == len(loader) == len(sampler)
    assert [list(zip(*map(torch.Tensor.tolist, batch))) for batch in batches] == epoch_of(sampler, 1)


def test_bucket_report_is_one_line_with_counts_and_batches():
    report = bucket_report(BUCKETS, 4)
    assert report == (
        "3 buckets, 29 samples, 9 batches of up to 4: 512x512 ×13 (4 batches), 640x384 ×11 (3), 384x640 ×5 (2)"
    )
    assert bucket_report([SQUARE] * 3, 4) == "1 bucket, 3 samples, 1 batch of up to 4: 512x512 ×3 (1 batch)"
    assert bucket_report(BUCKETS, 4, drop_last=True).startswith("3 buckets, 29 samples, 6 batches of 4:")
    many = [(64 * (i + 1), 64) for i in range(12) for _ in range(i + 1)]
    assert bucket_report(many, 2, limit=2).endswith(", … 10 more ×55 (30)")
    assert bucket_report([], 4) == "0 buckets: no samples"
    with pytest.raises(SdtuneError):
        bucket_report(BUCKETS, 0)
