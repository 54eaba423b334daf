"""Ends the run when the validation loss has stopped improving, and says why in one line.

Lightning's EarlyStopping decides, checked after every validation (not at epoch ends: sdtune's runs validate every
N steps); its counter is saved in every checkpoint, so `--ckpt_path last` counts on from where the run was.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.utilities import rank_zero_info

from sdtune.errors import SdtuneError

MONITOR = "val/loss"


class EarlyStop(EarlyStopping):
    """Stop after `patience` validations in a row whose loss is not below the best so far by more than `min_delta`
    (or as soon as it is NaN or infinite). Off unless `patience` is set; needs validation on.

    Args:
        patience: Validations without improvement before the run ends; null: never stop early.
        min_delta: How much lower than the best a validation loss must be to count as an improvement.
    """

    def __init__(self, patience: int | None = None, min_delta: float = 0.0) -> None:
        if patience is not None and patience < 1:
            raise SdtuneError(f"early_stopping.patience must be ≥ 1 or null (off), got {patience}")
        if min_delta < 0:
            raise SdtuneError(f"early_stopping.min_delta must be ≥ 0, got {min_delta}")
        super().__init__(monitor=MONITOR, min_delta=min_delta, patience=patience or 0, mode="min",
                         check_on_train_epoch_end=False)  # fmt: skip
        self.enabled = patience is not None
        self._why: str | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled:
            super().on_validation_end(trainer, pl_module)

    def _evaluate_stopping_criteria(self, current: torch.Tensor) -> tuple[bool, str | None]:
        should_stop, reason = super()._evaluate_stopping_criteria(current)
        if should_stop and self.stopping_reason == EarlyStoppingReason.PATIENCE_EXHAUSTED:
            self._why = (f"{MONITOR} has not gone below its best, {float(self.best_score):.4f}, by more than "
                         f"{abs(self.min_delta):g} in {self.wait_count} validations")  # fmt: skip
        elif should_stop:
            self._why = f"{MONITOR} is {float(current)}" if not torch.isfinite(current) else reason
        return should_stop, reason

    def _run_early_stopping_check(self, trainer: L.Trainer) -> None:
        self._why = None
        super()._run_early_stopping_check(trainer)
        if self._why and trainer.should_stop:
            rank_zero_info(f"early stopping: {self._why}; the run ends after optimizer step {trainer.global_step}")
