"""SIGTERM (SLURM, spot instances being reclaimed) and Ctrl+C save a checkpoint and stop cleanly.

Lightning already turns SIGTERM into a stop between two batches: its handler sets a flag, every rank learns of it,
and after the current batch has finished (optimizer step included) it raises `SIGTERMException`. This callback
saves `last.ckpt` from `on_exception` at that moment, through the Trainer's (atomic) checkpoint writer, and notes
which signal it was so the CLI can exit with 128 + its number and one line of advice instead of a traceback.

Ctrl+C raises KeyboardInterrupt wherever the process happens to be, possibly half-way through an optimizer step, and
Lightning then exits without saving. While training runs, the first SIGINT is therefore passed on as SIGTERM, so it
stops at the same clean point; a second Ctrl+C interrupts at once, as usual.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

received: dict[str, int | None] = {"signal": None}  # the signal that stopped the run, for the exit code


class GracefulStop(L.Callback):
    def __init__(self, enabled: bool = True) -> None:
        """
        Args:
            enabled: On SIGTERM or the first Ctrl+C, finish the current batch, save checkpoints/last.ckpt and exit.
        """
        self.enabled = enabled
        self._previous_sigint: Any = None
        self._installed = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or not _in_main_thread():
            return
        self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)
        self._installed = True
        received["signal"] = None

    def _on_sigint(self, signum: int, frame: Any) -> None:
        received["signal"] = signal.SIGINT
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl+C interrupts at once
        os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler: stop after the current batch

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()
        if not self.enabled or not isinstance(exception, SIGTERMException):
            return
        received["signal"] = received["signal"] or signal.SIGTERM
        name = signal.Signals(received["signal"]).name
        checkpoint = trainer.checkpoint_callback
        if not isinstance(checkpoint, ModelCheckpoint) or checkpoint.dirpath is None:
            rank_zero_info(f"{name}: stopped after optimizer step {trainer.global_step}; no checkpoint folder to save to")
            return
        path = Path(checkpoint.dirpath) / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
        trainer.save_checkpoint(path)
        rank_zero_info(
            f"{name}: stopped after optimizer step {trainer.global_step} and saved {path}; "
            "run the same command with --ckpt_path last to continue"
        )

    def _restore(self) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._installed = False


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
