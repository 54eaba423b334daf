"""Writes the trained adapter in the diffusers format into the run directory when training ends."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


class SaveAdapter(L.Callback):
    """Save `<run dir>/<dirname>/pytorch_lora_weights.safetensors` at the end of `fit`.

    Args:
        dirname: Folder inside the run directory (`trainer.default_root_dir`).
        enabled: Set false to skip writing the adapter (checkpoints still hold it).
    """

    def __init__(self, dirname: str = "adapter", enabled: bool = True) -> None:
        self.dirname = dirname
        self.enabled = enabled

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or not trainer.is_global_zero or not hasattr(pl_module, "save_adapter"):
            return
        path = pl_module.save_adapter(Path(trainer.default_root_dir) / self.dirname)
        rank_zero_info(f"adapter saved: {path} (step {trainer.global_step})")
