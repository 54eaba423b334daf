"""Skip optimizer steps whose gradients are NaN or infinite, and stop a run that keeps producing them.

A single bad batch (an all-black image under min-SNR, an fp16 overflow) should cost one step, not the run; a run
that diverged should stop at once with its last good checkpoint, not train NaNs for hours. After the backward pass
(`on_before_optimizer_step`, once per optimizer step, after gradient accumulation and, under DDP, after the
gradients are all-reduced, so every rank decides the same), the guard checks the trainable gradients. A NaN or
infinite loss always gives such gradients. When any is non-finite it drops every gradient (`grad = None`), so the
optimizer leaves the weights and its moments as they were, and warns with the step and the batch's image files.
After `max_in_a_row` such steps in a row it raises an SdtuneError: the run stops, and as ModelCheckpoint does not
save on errors, its newest checkpoint is the last one written before.

Finite gradients can still blow the weights up (a learning rate of 1e10 moves every weight by about 1e10 in one Adam
step). After every optimizer step (`on_train_batch_end`, which runs before any callback saves, samples or checkpoints
that step) the guard therefore also checks the trainable weights: a non-finite one, or one larger in magnitude than
`max_abs_weight`, stops the run at once, before anything is written, and the error names the newest checkpoint,
which holds the weights of a step that passed this check.

Under `16-mixed` the GradScaler skips overflowing steps itself while it lowers its scale (many at the start of a
run are normal); the guard leaves those to it and only counts steps once the scale is down to 1 or less.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from sdtune.errors import SdtuneError
from sdtune.finetune.checkpointing import newest_checkpoint


def gradients_finite(grads: list[torch.Tensor]) -> bool:
    """True when every element of every tensor is finite (one fused norm per tensor, then one check)."""
    if not grads:
        return True
    norms = torch._foreach_norm([g.detach().float() for g in grads])
    return bool(torch.isfinite(torch.stack([n.to(norms[0].device) for n in norms])).all())


def largest_magnitude(tensors: list[torch.Tensor]) -> float:
    """The largest |element| over all tensors (NaN if any element is NaN; 0.0 for no tensors)."""
    if not tensors:
        return 0.0
    maxima = torch._foreach_norm([t.detach() for t in tensors], ord=float("inf"))
    return float(torch.stack([m.float().to(maxima[0].device) for m in maxima]).max())


def newest_checkpoint_of(trainer: L.Trainer) -> str:
    folder = getattr(trainer.checkpoint_callback, "dirpath", None)
    return newest_checkpoint(folder) if folder else "no checkpoint was written yet"


class NonFiniteGuard(L.Callback):
    def __init__(
        self, enabled: bool = True, max_in_a_row: int = 10, files_shown: int = 4, max_abs_weight: float | None = 1e4
    ) -> None:
        """
        Args:
            enabled: Check the gradients before and the trainable weights after every optimizer step.
            max_in_a_row: Stop the run after this many consecutive skipped steps.
            files_shown: How many of a skipped step's image files the warning names.
            max_abs_weight: Stop the run, before anything is saved, when a trainable weight grows larger than this in
                magnitude (trained weights of Stable Diffusion stay below about 10); null checks only for NaN/inf.
        """
        if max_in_a_row < 1:
            raise SdtuneError(f"nonfinite.max_in_a_row must be at least 1, got {max_in_a_row}")
        if max_abs_weight is not None and not max_abs_weight > 0:
            raise SdtuneError(f"nonfinite.max_abs_weight must be positive or null, got {max_abs_weight}")
        self.enabled, self.max_in_a_row, self.files_shown = enabled, max_in_a_row, files_shown
        self.max_abs_weight = max_abs_weight
        self._checked_step = -1
        self.in_a_row = 0
        self.skipped = 0
        self._paths: list[str] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.enabled and isinstance(batch, dict):
            self._paths.extend(str(path) for path in batch.get("path", []))

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if not self.enabled:
            return
        paths, self._paths = self._paths, []
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if gradients_finite([p.grad for p in params]):
            self.in_a_row = 0
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.get_scale() > 1.0:
            return  # the GradScaler skips this step and lowers its scale
        for param in params:
            param.grad = None
        self.in_a_row += 1
        self.skipped += 1
        step = trainer.global_step + 1
        shown = ", ".join(paths[: self.files_shown])
        if len(paths) > self.files_shown:
            shown += f" (+{len(paths) - self.files_shown} more)"
        if self.in_a_row >= self.max_in_a_row:
            raise SdtuneError(
                f"{self.in_a_row} optimizer steps in a row had NaN or infinite gradients (the last, step {step}, "
                f"on {shown or 'a batch without file names'}); stopped, {newest_checkpoint_of(trainer)}: "
                "lower the learning rate, check those images, or use bf16-mixed instead of 16-mixed"
            )
        rank_zero_warn(f"step {step}: NaN or infinite gradients, step skipped (batch: {shown or 'no file names'})")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        # With gradient accumulation several batches end at the same optimizer step; check once per step.
        if not self.enabled or step == self._checked_step:
            return
        self._checked_step = step
        largest = largest_magnitude([p for p in pl_module.parameters() if p.requires_grad])
        limit = float("inf") if self.max_abs_weight is None else self.max_abs_weight
        if largest <= limit:  # False for NaN
            return
        found = "NaN or infinite" if not torch.isfinite(torch.tensor(largest)) else f"as large as {largest:.3g}"
        raise SdtuneError(
            f"after step {step} trained weights are {found} (nonfinite.max_abs_weight {self.max_abs_weight}): "
            f"stopped without saving them, {newest_checkpoint_of(trainer)}; lower the learning rate and continue from "
            "it with --ckpt_path last, or start again"
        )

    def state_dict(self) -> dict[str, int]:
        return {"in_a_row": self.in_a_row, "skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.in_a_row = int(state_dict.get("in_a_row", 0))
        self.skipped = int(state_dict.get("skipped", 0))
