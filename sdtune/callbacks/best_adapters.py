"""Keeps the adapters of the N validations with the lowest validation loss, beside the run's last adapter.

Lightning's ModelCheckpoint does the bookkeeping (which N scores are the best, which one a new score pushes out, its
state saved in every checkpoint so that `--ckpt_path last` goes on with it); here a "checkpoint" is an adapter
folder, `adapter/best_step000300_loss0.1234/`, holding what every adapter save writes (the diffusers file and the
kohya file, `<run>-best_step000300_loss0.1234.safetensors`). The bookkeeping runs inside this callback rather than as
a second ModelCheckpoint in the Trainer: Lightning runs ModelCheckpoints last, in their order, and takes the first
one as the run's checkpoint callback, so as a plain callback it has updated its state before the run's checkpoint
saves it, and the run's checkpoint stays the run's.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from sdtune.callbacks.save_adapter import trained_folder, write_adapter
from sdtune.errors import SdtuneError

MONITOR = "val/loss"
# The folders this callback writes, and the only ones it ever removes.
BEST_FOLDER = re.compile(r"best_step\d+_loss[\w.+-]+")


class _AdapterTopK(ModelCheckpoint):
    """ModelCheckpoint's top-k of the validation loss, saving adapter folders instead of checkpoint files."""

    FILE_EXTENSION = ""

    def __init__(self, keep: int) -> None:
        super().__init__(monitor=MONITOR, mode="min", save_top_k=keep, save_last=False, every_n_epochs=1,
                         filename="best_step{step:06d}_loss{" + MONITOR + ":.4f}", auto_insert_metric_name=False,
                         save_on_train_epoch_end=False, enable_version_counter=False)  # fmt: skip

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # dirpath is set by BestAdapters; an adapter folder that holds files already is normal (no warning).
        self._fs = get_filesystem(self.dirpath)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        folder = Path(filepath)
        write_adapter(trainer, trainer.lightning_module, folder, f"-{folder.name}")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        folder = Path(filepath)
        if trainer.is_global_zero and BEST_FOLDER.fullmatch(folder.name) and folder.parent == Path(self.dirpath):
            shutil.rmtree(folder, ignore_errors=True)
            rank_zero_info(f"removed {folder} (no longer among the {self.save_top_k} best)")


class BestAdapters(L.Callback):
    """With validation on, keep the adapters of the N lowest validation losses as `adapter/best_step000300_loss0.1234/`
    (full fine-tunes: `model/best_…`); one pushed out of the N is removed. `adapter/` itself, its `step_*` copies and
    anything else are never touched.

    Args:
        keep: How many to keep; 0 keeps none.
        dirname: Folder inside the run directory; null takes the method's own, as `adapter.dirname`.
    """

    def __init__(self, keep: int = 0, dirname: str | None = None) -> None:
        if keep < 0:
            raise SdtuneError(f"best_adapters.keep must be ≥ 0, got {keep}")
        self.keep = keep
        self.dirname = dirname
        self._top = _AdapterTopK(keep)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._top.dirpath = str(trained_folder(trainer, pl_module, self.dirname).resolve())
        self._top.setup(trainer, pl_module, stage)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.keep:
            self._top.on_validation_end(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return self._top.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._top.load_state_dict(state_dict)
