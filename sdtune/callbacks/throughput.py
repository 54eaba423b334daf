"""Training speed and memory in the logs, every N optimizer steps, and one summary line when training ends.

What is timed: each micro-batch from `on_train_batch_start` to `on_train_batch_end` (forward, backward, optimizer
step; CUDA synchronized at both ends), summed over the micro-batches of one optimizer step. Fetching the batch,
validation and checkpoint saving happen outside these hooks and are not counted, so a data-loading bottleneck does
not show here (compare with the progress bar's it/s). A callback whose `on_train_batch_end` runs before this one
(e.g. SampleImages listed first) lands in that step's time; the medians keep such steps from moving the numbers.

Logged (the logger's step is the optimizer step), over the optimizer steps since the previous log:

- `perf/step_time_ms`: median wall time of an optimizer step.
- `perf/samples_per_sec`: median of each step's samples ÷ its time, times the number of devices (every rank is
  assumed to run batches as large as rank 0's, as Lightning's ThroughputMonitor assumes). A step's samples are the
  batch sizes of all its micro-batches, so gradient accumulation counts every sample once.
- `perf/peak_memory_gb` in GiB (2^30 bytes): on CUDA the peak of `torch.cuda.max_memory_allocated` since the
  previous log (tensors only, not the caching allocator's reserve; the peak statistics are reset at every log); on
  CPU and other devices the process's peak resident set size since it started (`ru_maxrss`), which never goes down.
- `perf/tflops` and `perf/mfu`, with `flops: true` only: the UNet's forward + backward FLOPs per sample are counted
  once per input shape by running the UNet on meta tensors (no memory, no arithmetic, no random numbers drawn; the
  VAE and text encoder are not counted), `perf/tflops` is the median of FLOPs ÷ step time on one device and
  `perf/mfu` that divided by the device's peak FLOPs for the training precision, logged only when Lightning knows
  the device (`get_available_flops`; never on CPU).
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops, measure_flops
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.data import extract_batch_size

from sdtune.errors import SdtuneError, first_line
from sdtune.finetune.rng_state import untouched
from sdtune.models.families import vae_scale_factor

GIB = 2**30


class Throughput(L.Callback):
    """Training speed and memory: perf/step_time_ms, perf/samples_per_sec, perf/peak_memory_gb every N steps.

    The medians over the steps since the previous log; peak memory is CUDA's allocated tensors on a GPU, the
    process's peak RSS on CPU. Optionally `perf/tflops` and `perf/mfu`. One summary line (median step time,
    samples/s, peak memory) is printed when training ends.

    Args:
        log_every_n_steps: Log every N optimizer steps; null takes the trainer's log_every_n_steps.
        warmup_steps: Leave out the first N optimizer steps of each fit (allocation, kernel selection, caches).
        flops: Count the UNet's forward + backward FLOPs per sample (on meta tensors, once per image size) and log
            the achieved `perf/tflops`, and `perf/mfu` where Lightning knows the GPU's peak FLOPs (not on CPU).
        enabled: Set false to measure and log nothing.
    """

    def __init__(
        self, log_every_n_steps: int | None = None, warmup_steps: int = 3, flops: bool = False, enabled: bool = True
    ) -> None:
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise SdtuneError(f"throughput.log_every_n_steps must be ≥ 1, got {log_every_n_steps}")
        if warmup_steps < 0:
            raise SdtuneError(f"throughput.warmup_steps must be ≥ 0, got {warmup_steps}")
        self.log_every_n_steps = log_every_n_steps
        self.warmup_steps = warmup_steps
        self.flops = flops
        self.enabled = enabled
        self.available_flops: int | None = None
        self.flops_per_sample: dict[tuple, int | None] = {}  # UNet input shape → FLOPs (None: could not count)
        # Every measured optimizer step of the current fit, after warm-up: (global step, seconds, samples, FLOPs).
        self.steps: list[tuple[int, float, int, int | None]] = []
        self.summary: dict[str, float] = {}
        self._reset()

    def _reset(self) -> None:
        self._optimizer_steps = 0  # completed in this fit, warm-up included
        self._window_start = 0  # index into self.steps of the first step not logged yet
        self._started: float | None = None
        self._step_at_start = 0
        self._seconds, self._samples, self._step_flops = 0.0, 0, 0
        self._peak_bytes = 0  # CUDA: highest peak of the windows logged so far

    # --- hooks -----------------------------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.enabled and self.flops and stage == TrainerFn.FITTING:
            try:  # private in Lightning (what its ThroughputMonitor uses), so a newer Lightning only loses perf/mfu
                from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype
            except ImportError:
                rank_zero_warn("throughput: this Lightning cannot tell the training dtype; no perf/mfu")
                return
            dtype = _plugin_to_compute_dtype(trainer.precision_plugin)
            self.available_flops = get_available_flops(trainer.strategy.root_device, dtype)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.steps, self.summary = [], {}
        self._reset()
        if self.enabled and _is_cuda(trainer):
            torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if not self.enabled:
            return
        if self.flops and trainer.is_global_zero:
            self._count_flops(pl_module, batch)  # before the clock starts
        if _is_cuda(trainer):
            torch.cuda.synchronize(trainer.strategy.root_device)
        self._step_at_start = trainer.global_step
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.enabled or self._started is None:
            return
        if _is_cuda(trainer):
            torch.cuda.synchronize(trainer.strategy.root_device)
        self._seconds += time.perf_counter() - self._started
        self._started = None
        samples = batch_size(batch)
        self._samples += samples
        if self._step_flops is not None:
            per_sample = self.flops_per_sample.get(unet_input_shape(pl_module, batch)) if self.flops else None
            self._step_flops = None if per_sample is None else self._step_flops + per_sample * samples
        if trainer.global_step == self._step_at_start:
            return  # gradient accumulation: the optimizer step comes with a later micro-batch
        self._optimizer_steps += 1
        if self._optimizer_steps > self.warmup_steps:
            self.steps.append((trainer.global_step, self._seconds, self._samples, self._step_flops))
        self._seconds, self._samples, self._step_flops = 0.0, 0, 0
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if trainer.global_step % every == 0 and len(self.steps) > self._window_start:
            self._log(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled:
            return
        if not self.steps:
            rank_zero_info(f"throughput: no step measured (the first {self.warmup_steps} are warm-up)")
            return
        memory, kind = self._peak_memory(trainer, reset=False)
        self.summary = {
            "steps": len(self.steps),
            "step_time_ms": 1000 * statistics.median(seconds for _, seconds, _, _ in self.steps),
            "samples_per_sec": trainer.world_size * statistics.median(n / s for _, s, n, _ in self.steps),
            "peak_memory_gb": memory,
        }
        rank_zero_info(
            f"throughput: median step {self.summary['step_time_ms']:.0f} ms, "
            f"{self.summary['samples_per_sec']:.2f} samples/s, peak memory {memory:.2f} GiB ({kind}) "
            f"over {len(self.steps)} steps after {self.warmup_steps} warm-up"
        )

    # --- measuring -------------------------------------------------------------------------------------------

    def _log(self, trainer: L.Trainer) -> None:
        window = self.steps[self._window_start :]
        self._window_start = len(self.steps)
        memory, _ = self._peak_memory(trainer, reset=True)
        metrics = {
            "perf/step_time_ms": 1000 * statistics.median(seconds for _, seconds, _, _ in window),
            "perf/samples_per_sec": trainer.world_size * statistics.median(n / s for _, s, n, _ in window),
            "perf/peak_memory_gb": memory,
        }
        counted = [flops / seconds for _, seconds, _, flops in window if flops]
        if counted:
            flops_per_sec = statistics.median(counted)
            metrics["perf/tflops"] = flops_per_sec / 1e12
            if self.available_flops:
                metrics["perf/mfu"] = flops_per_sec / self.available_flops
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def _peak_memory(self, trainer: L.Trainer, reset: bool) -> tuple[float, str]:
        """(GiB, what it is): CUDA's peak allocated since the last reset, else the process's peak RSS."""
        if _is_cuda(trainer):
            device = trainer.strategy.root_device
            peak = torch.cuda.max_memory_allocated(device)
            self._peak_bytes = max(self._peak_bytes, peak)
            if reset:
                torch.cuda.reset_peak_memory_stats(device)
                return peak / GIB, "CUDA allocated"
            return self._peak_bytes / GIB, "CUDA allocated"
        return peak_rss_bytes() / GIB, "process RSS"

    def _count_flops(self, pl_module: L.LightningModule, batch: Any) -> None:
        shape = unet_input_shape(pl_module, batch)
        if shape is None or shape in self.flops_per_sample:
            return
        try:
            self.flops_per_sample[shape] = unet_flops_per_sample(pl_module, *shape)
        except Exception as err:  # an unusual UNet must not stop training; it only loses perf/tflops
            self.flops_per_sample[shape] = None
            rank_zero_warn(f"throughput: could not count the UNet's FLOPs ({first_line(err)}); no perf/tflops or perf/mfu")


# --- helpers -------------------------------------------------------------------------------------------------


def _is_cuda(trainer: L.Trainer) -> bool:
    return trainer.strategy.root_device.type == "cuda"


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since it started (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def batch_size(batch: Any) -> int:
    """Samples in a batch: the images' (or cached latents') first dimension, else Lightning's guess."""
    if isinstance(batch, dict):
        for key in ("pixel_values", "latent_mean"):
            if isinstance(batch.get(key), torch.Tensor):
                return int(batch[key].shape[0])
    return extract_batch_size(batch)


def unet_input_shape(pl_module: L.LightningModule, batch: Any) -> tuple[tuple[int, ...], tuple[int, int]] | None:
    """One sample's UNet inputs for this batch, ((channels, h, w) of the latents, (tokens, width) of the text), or
    None when the batch or module does not say (then no FLOPs are counted)."""
    unet = getattr(pl_module, "unet", None)
    if unet is None or not isinstance(batch, dict):
        return None
    config = unet.config
    if isinstance(batch.get("latent_mean"), torch.Tensor):
        height, width = batch["latent_mean"].shape[-2:]
    elif isinstance(batch.get("pixel_values"), torch.Tensor) and hasattr(pl_module, "vae"):
        factor = vae_scale_factor(pl_module.vae)
        height, width = (size // factor for size in batch["pixel_values"].shape[-2:])
    else:
        return None
    if isinstance(batch.get("text_embeds"), torch.Tensor):
        tokens = batch["text_embeds"].shape[-2]
    elif isinstance(batch.get("input_ids"), torch.Tensor):
        ids = batch["input_ids"]
        tokens = ids.shape[-1] * (ids.shape[1] if ids.ndim == 3 else 1)  # long prompts: chunks × window
    else:
        return None
    if not isinstance(config.cross_attention_dim, int):
        return None
    return (config.in_channels, int(height), int(width)), (int(tokens), config.cross_attention_dim)


def unet_flops_per_sample(pl_module: L.LightningModule, latent_shape: tuple[int, ...], text_shape: tuple[int, int]) -> int:
    """FLOPs of the UNet's forward and backward for one sample, as training runs it (gradients flow back only as
    far as trainable weights need them), counted with Lightning's `measure_flops`. These are model FLOPs, as MFU
    counts them: what gradient checkpointing recomputes is not counted.

    The UNet runs with meta-device stand-ins for its weights and inputs (`torch.func.functional_call`), so nothing
    is computed or allocated and the real weights and their gradients are not touched; random states, modes and
    requires_grad flags are restored afterwards all the same.
    """
    unet = pl_module.denoiser
    tensors = {**dict(unet.named_parameters()), **dict(unet.named_buffers())}
    meta = {name: torch.empty_like(t, device="meta").requires_grad_(t.requires_grad) for name, t in tensors.items()}
    dtype = unet.dtype
    latents = torch.empty((1, *latent_shape), dtype=dtype, device="meta")
    timesteps = torch.zeros(1, dtype=torch.long, device="meta")
    text = torch.empty((1, *text_shape), dtype=dtype, device="meta")
    added = None
    if unet.config.addition_embed_type == "text_time":  # SDXL: the pooled text embedding and six size numbers
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.empty((1, pooled), dtype=dtype, device="meta"),
                 "time_ids": torch.empty((1, 6), device="meta")}  # fmt: skip

    def forward() -> torch.Tensor:
        return torch.func.functional_call(unet, meta, (latents, timesteps, text), {"added_cond_kwargs": added}).sample

    # Checkpointing would recompute in the backward pass, after functional_call has put the real weights back.
    checkpointing = [m for m in unet.modules() if getattr(m, "gradient_checkpointing", None) is True]
    try:
        for module in checkpointing:
            module.gradient_checkpointing = False
        with untouched(pl_module), torch.enable_grad():
            return measure_flops(unet, forward, loss_fn=lambda prediction: prediction.float().sum())
    finally:
        for module in checkpointing:
            module.gradient_checkpointing = True
