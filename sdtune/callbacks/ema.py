"""An exponential moving average of the weights that train (LoRA adapters included), kept beside them.

After every optimizer step each trainable tensor's float32 shadow moves towards it: shadow ← d·shadow + (1−d)·w.
With warmup, d grows with the number of updates n as diffusers' EMAModel does, d = 1 − (1 + n)^(−power), capped at
`decay`, so the first updates follow the weights and a short run's average is not stuck at the starting point.
The shadow is part of every checkpoint (Lightning saves callback state), so a resumed run's average is the one an
uninterrupted run would have.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from sdtune.callbacks.save_adapter import write_adapter
from sdtune.errors import SdtuneError
from sdtune.finetune.sharding import is_sharded


class EMA(L.Callback):
    """Keep an EMA of the trainable weights; sample with it and save it as `<run dir>/adapter_ema/` (`model_ema/` for
    a full fine-tune), which `sdtune sample`, `evaluate` and `export` read like `adapter/`. Beside its diffusers file
    the adapter is also written for A1111, Forge and ComfyUI as `adapter_ema/<run>-ema.safetensors`.

    Args:
        decay: Highest decay per optimizer step (0.9999 averages over about 10,000 steps; 0.999 suits runs of a few
            thousand).
        warmup: Let the decay grow from 0 as 1 − (1 + n)^(−warmup_power) over the first updates (diffusers'
            use_ema_warmup); false uses `decay` from the first step.
        warmup_power: Growth of the warmup decay: 2/3 reaches 0.999 at 30k steps, 3/4 at 10k (for short runs).
        update_after_step: Start averaging after this many optimizer steps (the shadow copies the weights until then).
        for_samples: Sample images (the `samples:` block) with the EMA weights instead of the trained ones.
        enabled: Keep the average at all; `sdtune fit` defaults to false (`--ema.enabled true` turns it on).
    """

    def __init__(
        self,
        decay: float = 0.9999,
        warmup: bool = True,
        warmup_power: float = 2 / 3,
        update_after_step: int = 0,
        for_samples: bool = True,
        enabled: bool = True,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise SdtuneError(f"ema.decay must be in [0, 1), got {decay}")
        if warmup_power <= 0:
            raise SdtuneError(f"ema.warmup_power must be > 0, got {warmup_power}")
        if update_after_step < 0:
            raise SdtuneError(f"ema.update_after_step must be ≥ 0, got {update_after_step}")
        self.decay, self.warmup, self.warmup_power = decay, warmup, warmup_power
        self.update_after_step, self.for_samples, self.enabled = update_after_step, for_samples, enabled
        self.shadow: dict[str, torch.Tensor] = {}
        self.updates = 0  # averaging updates made (after update_after_step)
        self._last_step = -1

    def decay_at(self, update: int) -> float:
        """The decay of the `update`-th averaging update (0 for the first: it copies the weights)."""
        if self.warmup:
            return min(self.decay, max(0.0, 1.0 - (1.0 + update) ** -self.warmup_power)) if update > 0 else 0.0
        return self.decay

    # --- hooks -----------------------------------------------------------------------------------------------

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled:
            return
        if is_sharded(pl_module):
            raise SdtuneError("ema.enabled true is not supported with trainer.strategy fsdp yet; use ddp for an EMA run")
        own = self._trainable(pl_module)
        if not self.shadow:  # a fresh run; a resumed one has its shadow from the checkpoint
            self.shadow = {name: p.detach().float().clone() for name, p in own.items()}
        elif set(self.shadow) != set(own):
            raise SdtuneError("ema: the checkpoint's average covers other weights than this run trains; was it written by another kind of run?")
        for name, param in own.items():
            self.shadow[name] = self.shadow[name].to(param.device)
        if self.for_samples and hasattr(pl_module, "sampling_weights"):
            pl_module.sampling_weights = ("EMA weights", lambda: self.applied(pl_module))

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        # With gradient accumulation several batches end at the same optimizer step; average once per step.
        if not self.enabled or step == self._last_step:
            return
        self._last_step = step
        own = self._trainable(pl_module)
        if step <= self.update_after_step:
            for name, param in own.items():
                self.shadow[name].copy_(param.detach())
            return
        decay = self.decay_at(self.updates)
        for name, param in own.items():
            self.shadow[name].lerp_(param.detach().float(), 1.0 - decay)
        self.updates += 1

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The average written as the trained weights are (`write_adapter`: its files, the kohya file with "-ema",
        refused when a weight is NaN or infinite)."""
        if not self.enabled or not hasattr(pl_module, "save_weights"):
            return
        folder = Path(trainer.default_root_dir) / f"{getattr(pl_module, 'output_dirname', 'adapter')}_ema"
        with self.applied(pl_module):
            write_adapter(trainer, pl_module, folder, "-ema")
        rank_zero_info(f"{folder.name}/ is the EMA of {self.updates} updates (step {trainer.global_step})")

    def state_dict(self) -> dict[str, Any]:
        shadow = {name: tensor.detach().cpu().clone() for name, tensor in self.shadow.items()}
        return {"shadow": shadow, "updates": self.updates, "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.shadow = dict(state_dict.get("shadow", {}))
        self.updates = int(state_dict.get("updates", 0))
        self._last_step = int(state_dict.get("last_step", -1))

    # --- using the average -----------------------------------------------------------------------------------

    @contextmanager
    def applied(self, pl_module: L.LightningModule) -> Iterator[None]:
        """The module's trainable weights replaced by their averages for the duration; the trained ones after."""
        own = self._trainable(pl_module)
        saved = {name: param.data for name, param in own.items()}
        try:
            for name, param in own.items():
                if name in self.shadow:
                    param.data = self.shadow[name].to(param.device, param.dtype)
            yield
        finally:
            for name, param in own.items():
                param.data = saved[name]

    @staticmethod
    def _trainable(pl_module: L.LightningModule) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in pl_module.named_parameters() if p.requires_grad}

