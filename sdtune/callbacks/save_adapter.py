"""Writes what the run trained (the adapter, or the model of a full fine-tune) into the run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from sdtune.errors import SdtuneError
from sdtune.finetune.checkpointing import nonfinite_weights
from sdtune.finetune.sharding import gathered, is_sharded


class SaveAdapter(L.Callback):
    """Save `<run dir>/adapter/` when `fit` ends and, every N optimizer steps, `<run dir>/adapter/step_000500/`,
    so the best step can be picked by eye. Full fine-tunes write `model/` the same way.

    Each adapter folder holds the diffusers file (`pytorch_lora_weights.safetensors`) and the kohya file A1111, Forge
    and ComfyUI load, named after the run so that files of several steps can share one loras folder:
    `adapter/<run>.safetensors`, `adapter/step_000500/<run>-step000500.safetensors`.

    Args:
        dirname: Folder inside the run directory; null takes the method's own ("adapter", or "model" for full).
        every_n_train_steps: Also save a copy named by step every N optimizer steps; 0 only saves at the end.
        enabled: Set false to skip writing (checkpoints still hold the weights).
    """

    def __init__(self, dirname: str | None = None, every_n_train_steps: int = 0, enabled: bool = True) -> None:
        if every_n_train_steps < 0:
            raise SdtuneError(f"adapter.every_n_train_steps must be ≥ 0, got {every_n_train_steps}")
        self.dirname = dirname
        self.every_n_train_steps = every_n_train_steps
        self.enabled = enabled
        self._last_saved_step = -1

    def _folder(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        return trained_folder(trainer, pl_module, self.dirname)

    def _save(self, trainer: L.Trainer, pl_module: L.LightningModule, folder: Path, suffix: str = "") -> None:
        if self.enabled:
            write_adapter(trainer, pl_module, folder, suffix)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        # With gradient accumulation several batches end at the same optimizer step; save once.
        if self.every_n_train_steps and step > 0 and step % self.every_n_train_steps == 0 and step != self._last_saved_step:
            self._last_saved_step = step
            self._save(trainer, pl_module, self._folder(trainer, pl_module) / f"step_{step:06d}", f"-step{step:06d}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer, pl_module, self._folder(trainer, pl_module))


def trained_folder(trainer: L.Trainer, pl_module: L.LightningModule, dirname: str | None = None) -> Path:
    """Where a run's adapter (or a full fine-tune's model) goes: `<run dir>/adapter`, or `dirname` inside the run."""
    return Path(trainer.default_root_dir) / (dirname or getattr(pl_module, "output_dirname", "adapter"))


def write_adapter(trainer: L.Trainer, pl_module: L.LightningModule, folder: Path, suffix: str = "") -> None:
    """Write what the run trained into `folder` (the first process only): the method's own files and, where the
    method has one, the kohya file named after the run directory + `suffix`. Refused when a weight is NaN or
    infinite. Called on every process: a sharded model (FSDP) is gathered by all of them first."""
    if not hasattr(pl_module, "save_weights"):
        return
    if is_sharded(pl_module):
        with gathered(pl_module):
            _write_adapter(trainer, pl_module, folder, suffix)
    else:
        _write_adapter(trainer, pl_module, folder, suffix)


def _write_adapter(trainer: L.Trainer, pl_module: L.LightningModule, folder: Path, suffix: str) -> None:
    if not trainer.is_global_zero:
        return
    trained = {name: p for name, p in pl_module.named_parameters() if p.requires_grad}
    bad = nonfinite_weights(trained)
    if bad:
        raise SdtuneError(f"not saving {folder}: trained weights hold NaN or infinity ({', '.join(bad[:3])})")
    path = pl_module.save_weights(folder)
    rank_zero_info(f"saved {path} (step {trainer.global_step})")
    if hasattr(pl_module, "save_kohya_weights"):
        kohya = pl_module.save_kohya_weights(folder, Path(trainer.default_root_dir).resolve().name + suffix)
        if kohya is not None:
            rank_zero_info(f"saved {kohya} (AUTOMATIC1111, Forge, ComfyUI)")
