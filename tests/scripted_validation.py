"""A LoRAFineTune whose validation loss is scripted, for tests of what follows from it (the best adapters kept,
early stopping): each validation adds `val_offsets[optimizer step - 1]` to the real loss, so the order of the
validation losses is the offsets' (the tiny model's real loss moves by far less between steps)."""

from __future__ import annotations

from typing import Any

from sdtune.finetune import LoRAFineTune


class ScriptedValidationLoss(LoRAFineTune):
    def __init__(self, *args: Any, val_offsets: list[float] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.val_offsets = list(val_offsets or [])

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        if name == "val/loss":
            value = value + self.val_offsets[self.global_step - 1]
        super().log(name, value, *args, **kwargs)
