"""Saves the resolved run config as `<run dir>/config.yaml`, overwriting it when a run is resumed."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback


class SaveRunConfig(SaveConfigCallback):
    """LightningCLI's config saver, writing to the run directory instead of the logger's version folder.

    A resumed run (same command + `--ckpt_path last`) rewrites the file rather than refusing to start.
    """

    def __init__(self, parser, config, config_filename: str = "config.yaml", **kwargs) -> None:
        kwargs.update(overwrite=True, save_to_log_dir=False)
        super().__init__(parser, config, config_filename=config_filename, **kwargs)

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        root = Path(trainer.default_root_dir)
        root.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, str(root / self.config_filename), skip_none=False, overwrite=True, multifile=self.multifile)
