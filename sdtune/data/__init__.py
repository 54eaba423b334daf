"""Captioned image data: record discovery, subsets, caption augmentation, transforms and the DataModule."""

from sdtune.data.captions import process_caption
from sdtune.data.datamodule import CaptionDataModule
from sdtune.data.dataset import CaptionDataset, EpochSampler
from sdtune.data.subsets import Subset

__all__ = ["CaptionDataModule", "CaptionDataset", "EpochSampler", "Subset", "process_caption"]
