"""Validation loss outside a training run: the same fixed (noise, timestep) draws as `val/loss`, for any weights."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from sdtune.finetune.diffusion import DiffusionFineTune


@torch.no_grad()
def dataset_loss(module: DiffusionFineTune, batches: Iterable[dict[str, Any]]) -> float:
    """Sample-weighted mean diffusion loss over `batches`, drawn as `val/loss` is (`module.validation_generator`).

    The same data and seed give the same draws for every set of weights, so the numbers of two adapters differ
    only by what the adapters learned.
    """
    modes = {submodule: submodule.training for submodule in module.modules()}
    module.eval()
    total, count = 0.0, 0
    try:
        for index, batch in enumerate(batches):
            size = batch["pixel_values"].shape[0]
            batch = {k: v.to(module.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            total += module.diffusion_loss(batch, module.validation_generator(batch, index)).item() * size
            count += size
    finally:
        for submodule, training in modes.items():
            submodule.training = training
    if count == 0:
        raise ValueError("no batches to evaluate")
    return total / count
