"""Captioned image data: record discovery, PIL+torch transforms, and the Lightning DataModule."""

from sdtune.data.datamodule import CaptionDataModule, CaptionDataset, EpochSampler

__all__ = ["CaptionDataModule", "CaptionDataset", "EpochSampler"]
