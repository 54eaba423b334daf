"""Optional behaviour around training, one callback a file; each can be switched off alone."""

from sdtune.callbacks.best_adapters import BestAdapters
from sdtune.callbacks.early_stop import EarlyStop
from sdtune.callbacks.ema import EMA
from sdtune.callbacks.graceful_stop import GracefulStop
from sdtune.callbacks.nonfinite import NonFiniteGuard
from sdtune.callbacks.sample_images import SampleImages
from sdtune.callbacks.save_adapter import SaveAdapter
from sdtune.callbacks.save_config import SaveRunConfig
from sdtune.callbacks.step_progress import StepProgress
from sdtune.callbacks.throughput import Throughput

__all__ = ["EMA", "BestAdapters", "EarlyStop", "GracefulStop", "NonFiniteGuard", "SampleImages", "SaveAdapter",
           "SaveRunConfig", "StepProgress", "Throughput"]  # fmt: skip
