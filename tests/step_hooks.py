"""A callback the reliability tests load into `sdtune fit` subprocesses (`--trainer.callbacks+ step_hooks.StepHooks`,
with tests/ on PYTHONPATH): it records every step's loss and batch, can SIGKILL its own process after a step, as a
preempted machine would (no cleanup, no handlers run), send it SIGTERM or SIGINT after a step, turn a trainable
weight into NaN before a step, and blow one up (finite, 1e6) after a step."""

from __future__ import annotations

import json
import os
import signal

import lightning as L
import torch


class StepHooks(L.Callback):
    def __init__(self, record: str | None = None, kill_after: int = 0, nan_at: int = 0, signal_after: int = 0,
                 signal_name: str = "SIGTERM", explode_at: int = 0) -> None:  # fmt: skip
        self.record = record
        self.kill_after = kill_after
        self.nan_at = nan_at
        self.signal_after, self.signal_name = signal_after, signal_name
        self.explode_at = explode_at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.nan_at and trainer.global_step + 1 == self.nan_at:
            weight = next(p for p in pl_module.parameters() if p.requires_grad)
            with torch.no_grad():
                weight.fill_(float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.record:
            line = {"step": trainer.global_step, "loss": float(outputs["loss"]), "paths": list(batch["path"])}
            with open(self.record, "a") as handle:
                handle.write(json.dumps(line) + "\n")
        if self.explode_at and trainer.global_step == self.explode_at:
            weight = next(p for p in pl_module.parameters() if p.requires_grad)
            with torch.no_grad():
                weight.fill_(1e6)
        if self.kill_after and trainer.global_step == self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.signal_after and trainer.global_step == self.signal_after:
            os.kill(os.getpid(), getattr(signal, self.signal_name))
