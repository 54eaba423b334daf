"""A progress line for step-based training: optimizer steps done of the run's total, speed, time left, loss and lr.

Lightning's own bars count batches within an epoch (`Epoch 0/-2 … 0.00it/s` for a `max_steps` run); sdtune's runs
are planned in optimizer steps, so this one counts `trainer.global_step` (one per `accumulate_grad_batches`
batches) against `trainer.max_steps`, or epochs × optimizer steps per epoch when `max_steps` is -1 (Lightning's
`estimated_stepping_batches`). On a terminal the line is redrawn in place; elsewhere (CI logs, a file) it is printed
at most every `interval_seconds`, and at the first and last step, so logs stay short.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

import lightning as L
from lightning.pytorch.callbacks.progress import ProgressBar

from sdtune.errors import SdtuneError


def format_duration(seconds: float) -> str:
    """4015 → '1:06:55', 75 → '1:15'."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def format_rate(steps: int, seconds: float) -> str:
    """Steps per second, or seconds per step when slower than one a second: '2.50 it/s', '3.20 s/it'."""
    if steps <= 0 or seconds <= 0:
        return "? it/s"
    rate = steps / seconds
    return f"{rate:.2f} it/s" if rate >= 1 else f"{seconds / steps:.2f} s/it"


def progress_line(step: int, total: float, steps_timed: int, seconds: float, loss: float | None = None,
                  lr: float | None = None) -> str:  # fmt: skip
    """`step 40/100 | 3.20 s/it | ETA 3:12 | loss 0.1234 | lr 1.0e-04`: the ETA assumes the speed of the
    `steps_timed` steps measured over `seconds` holds for the steps left."""
    known = math.isfinite(total)
    parts = [f"step {step}/{int(total)}" if known else f"step {step}", format_rate(steps_timed, seconds)]
    if known and steps_timed > 0 and seconds > 0:
        parts.append(f"ETA {format_duration(max(0, total - step) * seconds / steps_timed)}")
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if lr is not None:
        parts.append(f"lr {lr:.1e}")
    return " | ".join(parts)


class StepProgress(ProgressBar):
    """The training progress in optimizer steps: `step 40/100 | 3.20 s/it | ETA 3:12 | loss 0.1234 | lr 1.0e-04`.

    Args:
        interval_seconds: Where the output is not a terminal, print the line at most this often (and at the first
            and the last step).
    """

    def __init__(self, interval_seconds: float = 30.0) -> None:
        super().__init__()
        if interval_seconds < 0:
            raise SdtuneError(f"progress interval_seconds must be ≥ 0, got {interval_seconds}")
        self.interval_seconds = interval_seconds
        self._enabled = True
        self._total: float = math.inf
        self._first_step = 0  # global_step when this fit started (a resumed run starts past 0)
        self._started: float | None = None
        self._printed = -math.inf  # when the last line was printed
        self._shown_step: int | None = None
        self._width = 0  # of the line drawn in place, to clear what a longer one left

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @staticmethod
    def _out() -> TextIO:
        return sys.stderr  # looked up when writing: whatever stands for it then (a capture, a redirect)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # max_steps, or epochs × optimizer steps an epoch, whichever ends the run first (inf: neither is set).
        self._total = trainer.estimated_stepping_batches
        self._first_step = trainer.global_step
        self._started = None
        self._printed, self._shown_step = -math.inf, trainer.global_step

    def on_train_batch_start(self, *args: Any) -> None:
        if self._started is None:  # the clock starts with the first batch, after what runs before training
            self._started = time.monotonic()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if not self._enabled or step == self._shown_step:
            return  # gradient accumulation: no optimizer step with this batch
        self._shown_step = step
        now = time.monotonic()
        last = step >= self._total
        terminal = self._out().isatty()
        if not (terminal or last or step == self._first_step + 1 or now - self._printed >= self.interval_seconds):
            return
        self._printed = now
        seconds = 0.0 if self._started is None else now - self._started
        line = progress_line(step, self._total, step - self._first_step, seconds, self._loss(trainer), self._lr(trainer))
        self._write(line, terminal)
        if terminal and last:  # Lightning's "stopped: max_steps reached" comes before on_train_end
            self._end_line()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end_line()

    def _end_line(self) -> None:
        if self._width:
            self._out().write("\n")
            self._width = 0

    def print(self, *args: Any, sep: str = " ", **kwargs: Any) -> None:
        """Lines printed during training go above the progress line."""
        if self._width:
            self._out().write("\r" + " " * self._width + "\r")
            self._width = 0
        print(*args, sep=sep, file=self._out(), **kwargs)

    def _write(self, line: str, terminal: bool) -> None:
        out = self._out()
        if terminal:
            out.write("\r" + line.ljust(self._width))
            self._width = len(line)
        else:
            out.write(line + "\n")
        out.flush()

    @staticmethod
    def _loss(trainer: L.Trainer) -> float | None:
        loss = trainer.progress_bar_metrics.get("train/loss")
        return None if loss is None else float(loss)

    @staticmethod
    def _lr(trainer: L.Trainer) -> float | None:
        return float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else None
