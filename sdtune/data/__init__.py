"""Captioned image data: record discovery, subsets, caption augmentation, transforms and the DataModule.

The names below load on first use: the dataset tools import `sdtune.data.buckets` or `records` without paying for
Lightning and torch at start-up.
"""

from importlib import import_module

_LAZY = {
    "BucketBatchSampler": "sdtune.data.bucket_sampler",
    "CaptionDataModule": "sdtune.data.datamodule",
    "CaptionDataset": "sdtune.data.dataset",
    "Subset": "sdtune.data.subsets",
    "process_caption": "sdtune.data.captions",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sdtune.data' has no attribute '{name}'")
