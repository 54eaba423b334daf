"""Sample images during training with the modules in memory, so progress can be judged by eye.

Every sampling writes `<run dir>/samples/step_000500/<prompt index>_s<seed>.png` and a labelled `grid.png` (prompt
rows × seed columns), and logs the grid as the image `samples` at that step to every logger that takes images
(TensorBoard, Weights & Biases, MLflow: `log_image`). Each image's noise
comes from its own seeded generator, so the same prompt and seed at two steps differ only by what was learned.

Sampling leaves training exactly as it was: the random states (torch CPU and CUDA, Python, NumPy, the module's own
generator), each submodule's train/eval mode and every parameter's requires_grad are restored, so a run with
sampling gives bit-identical losses to a run without it.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.rank_zero import rank_prefixed_message
from PIL import Image

from sdtune.errors import SdtuneError
from sdtune.finetune.rng_state import untouched
from sdtune.finetune.sharding import is_sharded
from sdtune.inference.grid import make_grid
from sdtune.inference.sampling import SCHEDULERS, default_guidance, generate, make_scheduler
from sdtune.models.families import vae_scale_factor

log = logging.getLogger("lightning.pytorch")  # Lightning's console logger: shown on every process


class SampleImages(L.Callback):
    """Generate a fixed set of prompts × seeds before training, whenever a checkpoint is saved and/or every N
    optimizer steps; write PNGs and a labelled grid to `<run dir>/samples/step_NNNNNN/` and to the loggers.

    Args:
        prompts: Prompts to sample, one grid row each; use your trigger words and a few held-out ideas.
        negative_prompt: Negative prompt for every sample (null: the empty, unconditional prompt).
        seeds: One image per seed and prompt, one grid column each; the same seeds at every step.
        scheduler: Inference sampler: ddim, pndm, lms, euler, euler_a or dpmpp_2m; flow_euler for SD3 and Flux;
            null takes ddim, or flow_euler for SD3 and Flux.
        steps: Denoising steps per image.
        guidance_scale: Classifier-free guidance scale (≤ 1 turns guidance off); Flux dev's embedded guidance. null
            takes the model's pipeline's default (7.5 SD1/2, 5.0 SDXL, 7.0 SD3, 3.5 Flux).
        width: Image width in pixels; null takes the data's resolution, else the model's native size.
        height: Image height in pixels; null takes the data's resolution, else the model's native size.
        every_n_train_steps: Also sample every N optimizer steps; 0 only samples at checkpoints (and before training).
        at_checkpoints: Sample whenever a checkpoint is saved (ModelCheckpoint), at most once per step.
        before_training: Sample the untrained model at the start of fit (step 0) as the baseline.
        enabled: Sample at all. `sdtune fit` defaults to false: a config's `samples:` block (every packaged recipe
            has one) or `--samples.enabled true` turns it on.
        dirname: Folder inside the run directory.
    """

    def __init__(
        self,
        prompts: list[str] = ["a photo"],  # noqa: B006 - copied below; jsonargparse shows list defaults
        negative_prompt: str | None = None,
        seeds: list[int] = [0, 1],  # noqa: B006
        scheduler: str | None = None,
        steps: int = 25,
        guidance_scale: float | None = None,
        width: int | None = None,
        height: int | None = None,
        every_n_train_steps: int = 0,
        at_checkpoints: bool = True,
        before_training: bool = True,
        enabled: bool = True,
        dirname: str = "samples",
    ) -> None:
        if scheduler is not None and scheduler not in SCHEDULERS:
            raise SdtuneError(f"samples.scheduler: unknown scheduler '{scheduler}'; choose one of {', '.join(SCHEDULERS)}")
        if not prompts:
            raise SdtuneError("samples.prompts is empty; give at least one prompt or set samples.enabled false")
        if not seeds:
            raise SdtuneError("samples.seeds is empty; give at least one seed")
        if steps < 1:
            raise SdtuneError(f"samples.steps must be ≥ 1, got {steps}")
        if every_n_train_steps < 0:
            raise SdtuneError(f"samples.every_n_train_steps must be ≥ 0, got {every_n_train_steps}")
        for name, value in (("width", width), ("height", height)):
            if value is not None and (value <= 0 or value % 8):
                raise SdtuneError(f"samples.{name} must be a positive multiple of 8, got {value}")
        self.prompts = list(prompts)
        self.negative_prompt = negative_prompt
        self.seeds = [int(seed) for seed in seeds]
        self.scheduler = scheduler
        self.steps = steps
        self.guidance_scale = guidance_scale
        self.width, self.height = width, height
        self.every_n_train_steps = every_n_train_steps
        self.at_checkpoints = at_checkpoints
        self.before_training = before_training
        self.enabled = enabled
        self.dirname = dirname
        self.sampled_steps: list[int] = []  # steps sampled (or skipped on a stop signal) in this process, in order; same on every rank
        self.seconds: list[float] = []  # wall time of each sampling on global rank 0

    # --- hooks -----------------------------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.enabled and stage == TrainerFn.FITTING:
            if not hasattr(pl_module, "parts"):
                raise SdtuneError(f"samples: {type(pl_module).__name__} has no model parts to sample; set samples.enabled false")
            self.resolution(trainer, pl_module)  # a size sampling cannot use fails now, not at the first sampling

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A resumed run already has the samples of the step it resumes from.
        resumed = trainer.global_step > 0 and (self.folder(trainer, trainer.global_step) / "grid.png").exists()
        if self.before_training and not resumed:
            self._sample_once(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        # With gradient accumulation several batches end at the same optimizer step; `_sample_once` dedupes.
        if self.every_n_train_steps and step > 0 and step % self.every_n_train_steps == 0:
            self._sample_once(trainer, pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Called on every rank by Trainer.save_checkpoint, whatever triggered the save (steps, epochs, val metric,
        # time, end of training); top-k and last.ckpt at the same step sample once.
        if self.at_checkpoints and trainer.state.fn == TrainerFn.FITTING:
            self._sample_once(trainer, pl_module)

    # --- sampling --------------------------------------------------------------------------------------------

    def folder(self, trainer: L.Trainer, step: int) -> Path:
        return Path(trainer.default_root_dir) / self.dirname / f"step_{step:06d}"

    def _sample_once(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if not self.enabled or step in self.sampled_steps:
            return
        # A stop signal (SIGTERM, Ctrl+C) leaves a grace period that a grid of samples can outlast: the checkpoint
        # comes first and nothing is sampled. Every rank takes the same decision.
        stopping = trainer.strategy.reduce_boolean_decision(bool(trainer.received_sigterm), all=False)
        self.sampled_steps.append(step)
        if stopping:
            rank_zero_info(f"samples: none at step {step}, the run is stopping on a signal")
            return
        if trainer.is_global_zero or is_sharded(pl_module):  # sharded (FSDP): every process runs the denoiser
            self.sample(trainer, pl_module)
        # Every rank reaches this (the decision above depends only on the step), so none waits forever.
        trainer.strategy.barrier("SampleImages")

    def resolution(self, trainer: L.Trainer | None, pl_module: L.LightningModule) -> tuple[int, int]:
        """(width, height): the configured size, else the data's square resolution, else the UNet's native size."""
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        default = getattr(datamodule, "resolution", None)
        if not isinstance(default, int):
            default = pl_module.denoiser.config.sample_size * vae_scale_factor(pl_module.vae)
        width, height = self.width or default, self.height or default
        for name, value in (("width", width), ("height", height)):
            if value % 8:  # diffusers' pipelines refuse other sizes
                raise SdtuneError(f"samples.{name} {value} (from data.resolution) is not a multiple of 8; set samples.{name}")
        return width, height

    def generate(
        self, pl_module: L.LightningModule, width: int, height: int, precision: str | None = None
    ) -> list[list[Image.Image]]:
        """Images[prompt][seed] from the module's current weights; leaves randomness, modes and flags as found."""
        config = dict(pl_module.noise_scheduler.config)
        if pl_module.family.objective == "diffusion":  # sample with the prediction type this run trains
            config["prediction_type"] = pl_module.prediction_type
        scheduler = make_scheduler(self.scheduler, config)
        pipe = pl_module.parts.pipeline(scheduler)
        pipe.set_progress_bar_config(disable=True)
        guidance = default_guidance(pipe) if self.guidance_scale is None else self.guidance_scale
        # bf16 autocast matches how bf16-mixed training runs the UNet; fp16 autocast would risk the VAE overflowing.
        device_type = pl_module.denoiser.device.type
        autocast = torch.autocast(device_type, dtype=torch.bfloat16) if precision == "bf16-mixed" else nullcontext()
        with untouched(pl_module), torch.inference_mode(False), torch.no_grad(), autocast:
            pl_module.eval()
            return generate(
                pipe, self.prompts, self.seeds, steps=self.steps, guidance_scale=guidance, height=height, width=width,
                negative_prompt=self.negative_prompt, clip_skip=getattr(pl_module, "clip_skip", 1),
            )  # fmt: skip

    def sample(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        """Sample now, write the PNGs and grid for the current step, log the grid; returns the step's folder. With
        sharded weights every process calls it and takes part in each denoiser call; rank 0 alone writes."""
        started = time.perf_counter()
        step = trainer.global_step
        width, height = self.resolution(trainer, pl_module)
        weights, swapped = pl_module.weights_for_sampling() if hasattr(pl_module, "weights_for_sampling") else (None, nullcontext())
        with swapped:
            images = self.generate(pl_module, width, height, precision=str(trainer.precision))
        folder = self.folder(trainer, step)
        if not trainer.is_global_zero:  # a sharded run's other processes took part in the denoising; rank 0 writes
            log.info(rank_prefixed_message(f"samples: step {step}'s images denoised with this shard", trainer.global_rank))
            return folder
        folder.mkdir(parents=True, exist_ok=True)
        for index, row in enumerate(images):
            for seed, image in zip(self.seeds, row):
                image.save(folder / f"{index}_s{seed}.png")
        grid = make_grid(images, self.prompts, [f"seed {seed}" for seed in self.seeds])
        grid.save(folder / "grid.png")
        seconds = time.perf_counter() - started
        self.seconds.append(seconds)
        log_image(trainer.loggers, "samples", grid, step)
        for logger in trainer.loggers:
            logger.log_metrics({"samples/seconds": seconds}, step=step)
        rank_zero_info(f"samples: {folder / 'grid.png'} ({seconds:.1f} s{f', {weights}' if weights else ''})")
        return folder


def log_image(loggers: list[Logger], key: str, image: Image.Image, step: int) -> None:
    """`image` as `key` at `step` through each logger's own image API: TensorBoard's `add_image`, W&B's `log_image`
    (a `wandb.Image` at `trainer/global_step` = step), MLflow's `log_image` (an image series the MLflow UI shows by
    step). Loggers without images (CSV) get none."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            chw = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
            logger.experiment.add_image(key, chw, step, dataformats="CHW")
        elif isinstance(logger, WandbLogger):
            logger.log_image(key, [image], step=step)
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_image(logger.run_id, image, key=key, step=step)
