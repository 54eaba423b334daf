"""What every Stable Diffusion fine-tune shares: frozen VAE and text encoder, the diffusion loss, optimizer and
LR schedule, reproducible randomness and lean checkpoints. Subclasses decide what trains and what gets saved.

The random draws of a training step (latent sampling, noise, timesteps) come from one generator per sample, seeded
by (noise seed, epoch, dataset index), the key the DataModule's samples carry. A sample's draws are then the same
whatever batch, batch size, process or resume it is trained in, so two processes with batch b train like one with
batch b and two accumulated batches. A batch without keys (built by hand) draws from a generator this module owns
and checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info

from sdtune import losses
from sdtune.data.dataset import derive_seed
from sdtune.errors import SdtuneError
from sdtune.finetune.objective import Objective
from sdtune.models import load_stable_diffusion
from sdtune.models.clip import TextConditioning, encode_ids, max_clip_skip
from sdtune.models.sdxl import added_cond_kwargs, time_ids
from sdtune.text import ID_KEYS
from sdtune.rng_state import gather_states, restore_states

SCHEDULES_NEEDING_LENGTH = ("cosine", "cosine_with_restarts", "linear", "polynomial")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LRSchedule:
    """Learning-rate schedule, stepped every optimizer step (diffusers' `get_scheduler`)."""

    name: Literal["constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "polynomial"] = (
        "constant_with_warmup"
    )
    """Shape after warmup; cosine/linear/polynomial decay to zero at the run's last step (needs trainer.max_steps)."""
    warmup_steps: int = 0
    """Linear warmup from 0 over this many optimizer steps."""
    num_cycles: int = 1
    """Hard restarts for cosine_with_restarts."""

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise SdtuneError(f"model.lr_schedule.warmup_steps must be ≥ 0, got {self.warmup_steps}")
        if self.num_cycles < 1:
            raise SdtuneError(f"model.lr_schedule.num_cycles must be ≥ 1, got {self.num_cycles}")


def as_settings(cls, value):
    """A settings dataclass from a dict (Python callers) or a parsed config's Namespace (pre-flight checks)."""
    if value is None or isinstance(value, cls):
        return value
    return cls(**(value if isinstance(value, dict) else vars(value)))


class DiffusionFineTune(L.LightningModule):
    """Base of the fine-tuning modules: the UNet learns to predict the noise (or v) added to VAE latents.

    Args:
        pretrained: Diffusers model directory or Hugging Face Hub id, e.g. stable-diffusion-v1-5/stable-diffusion-v1-5,
            or a single-file checkpoint in the original layout (.safetensors or .ckpt, as AUTOMATIC1111 uses).
        revision: Hub revision (branch, tag or commit) of `pretrained`, or of `pretrained_config` for a single file.
        variant: Weight file variant of `pretrained`, e.g. "fp16" (not used for a single file).
        pretrained_config: For a single-file `pretrained` only: the diffusers directory or Hub id whose configs,
            tokenizer and scheduler describe it (same architecture), e.g. stable-diffusion-v1-5/stable-diffusion-v1-5.
            Only its json/txt files are needed; the weights come from the file. Ignored for a directory or Hub id.
        optimizer: Optimizer (class_path + init_args): torch.optim.AdamW, bitsandbytes.optim.AdamW8bit,
            prodigyopt.Prodigy, transformers.optimization.Adafactor, …
        lr_schedule: Step-wise learning-rate schedule with warmup.
        objective: Prediction type, loss, timestep range, noise offset, input perturbation, min-SNR-γ.
        clip_skip: Use the text encoder's k-th hidden state from the end (1 = last layer, 2 for anime-style models).
        weight_dtype: Dtype of the frozen weights (VAE, text encoder, LoRA base UNet); trainable ones stay float32.
        gradient_checkpointing: Recompute UNet activations in the backward pass: less memory, ~30 % slower.
        channels_last: Keep the UNet's (and VAE's) 4-D tensors in NHWC layout: faster convolutions on recent GPUs
            (tensor cores), usually slower on CPU.
        compile: `torch.compile` the UNet in place (names and saved files unchanged): faster steps on GPU after a
            compilation of minutes at the first step; the attention already uses PyTorch's fused SDPA kernels.
        noise_seed: Seed of each sample's latent, noise and timestep draws; null takes seed_everything's value.
    """

    output_dirname = "adapter"  # where SaveAdapter writes `save_weights` output inside the run directory
    mismatch_hint = "was it written by another kind of run?"  # ends the error when a checkpoint does not fit

    def __init__(
        self,
        pretrained: str,
        revision: str | None = None,
        variant: str | None = None,
        pretrained_config: str | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_schedule: LRSchedule = LRSchedule(),
        objective: Objective = Objective(),
        clip_skip: int = 1,
        weight_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        gradient_checkpointing: bool = False,
        channels_last: bool = False,
        compile: bool = False,
        noise_seed: int | None = None,
    ) -> None:
        super().__init__()
        self.lr_schedule = as_settings(LRSchedule, lr_schedule)
        self.objective = as_settings(Objective, objective)
        if clip_skip < 1:
            raise SdtuneError(f"model.clip_skip must be ≥ 1, got {clip_skip}")
        if weight_dtype not in DTYPES:
            raise SdtuneError(f"model.weight_dtype must be one of {', '.join(DTYPES)}, got '{weight_dtype}'")
        self._hparams_common = {
            "pretrained": pretrained, "revision": revision, "variant": variant, "pretrained_config": pretrained_config,
            "lr_schedule": self.lr_schedule, "objective": self.objective, "clip_skip": clip_skip,
            "weight_dtype": weight_dtype, "gradient_checkpointing": gradient_checkpointing,
            "channels_last": channels_last, "compile": compile, "noise_seed": noise_seed,
        }
        self.pretrained, self.revision, self.pretrained_config = pretrained, revision, pretrained_config
        self.optimizer_factory = optimizer
        self.clip_skip = clip_skip
        self.weight_dtype = DTYPES[weight_dtype]
        self.noise_seed = noise_seed
        self._initial_seed = torch.initial_seed()  # seed_everything's value: LightningCLI seeds before building
        # Only trainable weights are saved; the frozen base is reloaded from `pretrained`.
        self.strict_loading = False

        parts = load_stable_diffusion(
            pretrained, revision=revision, variant=variant, dtype=self.weight_dtype, unet_dtype=self.unet_dtype,
            pretrained_config=pretrained_config,
        )
        self.vae, self.text_encoder, self.unet = parts.vae, parts.text_encoder, parts.unet
        self.tokenizer = parts.tokenizer
        # SDXL's second text encoder and tokenizer (None for SD1/2).
        self.text_encoder_2, self.tokenizer_2 = parts.text_encoder_2, parts.tokenizer_2
        self.force_zeros_for_empty_prompt = parts.force_zeros_for_empty_prompt
        self.vae_scale_factor = parts.vae_scale_factor
        self.noise_scheduler = parts.noise_scheduler
        if clip_skip > max_clip_skip(self.text_encoders):
            raise SdtuneError(f"model.clip_skip {clip_skip} is more than this model's text encoders allow ({max_clip_skip(self.text_encoders)})")
        for frozen in (self.vae, self.unet, *self.text_encoders):
            frozen.requires_grad_(False)
        self.vae.eval()
        for encoder in self.text_encoders:
            encoder.eval()
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
        if compile:
            self.unet.compile()  # nn.Module.compile: in place, so parameter names (and checkpoints) stay the same
        self.prediction_type = self.objective.prediction_type or self.noise_scheduler.config.prediction_type
        if self.objective.zero_terminal_snr:
            if self.prediction_type != "v_prediction":
                raise SdtuneError(
                    f"model.objective.zero_terminal_snr needs v_prediction (at zero SNR an {self.prediction_type} target "
                    "carries no signal): set model.objective.prediction_type: v_prediction, or train a v model (SD2.x 768)"
                )
            self.noise_scheduler = DDPMScheduler.from_config(self.noise_scheduler.config, rescale_betas_zero_snr=True)
        self.num_train_timesteps = self.noise_scheduler.config.num_train_timesteps
        self.objective.timestep_range(self.num_train_timesteps)  # fail now, not at step 1
        self.register_buffer("alphas_cumprod", self.noise_scheduler.alphas_cumprod.clone().float(), persistent=False)
        self._generator: torch.Generator | None = None
        self._pending_generator_state: torch.Tensor | None = None

    @property
    def unet_dtype(self) -> torch.dtype:
        """Dtype the UNet is loaded in: frozen-weight dtype by default; full fine-tunes override it."""
        return self.weight_dtype

    def _record_hparams(self, **own: Any) -> None:
        """Save plain types only, so checkpoints load with torch.load(weights_only=True); `_class_path` lets
        LightningCLI read them back from `--ckpt_path`."""
        values = {**self._hparams_common, **own}
        plain = {k: asdict(v) if is_dataclass(v) else v for k, v in values.items()}
        self.save_hyperparameters({"_class_path": f"{type(self).__module__}.{type(self).__qualname__}", **plain})

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        """The model's text encoders: one for SD1/2, two for SDXL."""
        return [self.text_encoder] + ([self.text_encoder_2] if self.text_encoder_2 is not None else [])

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def text_encoder_trains(self) -> bool:
        return any(p.requires_grad for encoder in self.text_encoders for p in encoder.parameters())

    # --- forward ---------------------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> DiffusionFineTune:
        """Lightning switches the whole module to train mode; the frozen encoders stay in eval."""
        super().train(mode)
        self.vae.eval()
        for encoder in self.text_encoders:
            encoder.train(mode and any(p.requires_grad for p in encoder.parameters()))
        return self

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, generator: torch.Generator | list[torch.Generator]) -> torch.Tensor:
        """Pixels in [-1, 1] → scaled VAE latents (a sample of the posterior, as SD was trained)."""
        posterior = self.vae.encode(pixel_values.to(self.vae.encoder.conv_in.weight.dtype)).latent_dist
        latents = posterior.sample(generator=generator)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def encode_prompts(self, batch: dict[str, Any]) -> TextConditioning:
        """The batch's token ids ("input_ids", and "input_ids_2" for SDXL; B×L or B×chunks×L) → the UNet's text
        conditioning; with gradients only when a text encoder trains."""
        ids = [batch[key] for key in ID_KEYS[: len(self.text_encoders)]]
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.text_encoder_trains):
            return encode_ids(self.text_encoders, ids, self.clip_skip)

    def sample_cached_latents(
        self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | list[torch.Generator]
    ) -> torch.Tensor:
        """A cached posterior (data.cache) → scaled latents: the same draw `encode_images` makes from the VAE's."""
        from data_prep.cache_index import sample_latents

        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return sample_latents(mean, std, generator, self.vae.config.scaling_factor, shift)

    def diffusion_loss(self, batch: dict[str, Any], generator: torch.Generator | list[torch.Generator]) -> torch.Tensor:
        """The batch's loss; `generator` draws latents, noise and timesteps (a list: one per sample)."""
        if "latent_mean" in batch:  # data.cache: no VAE forward, no text-encoder forward unless it trains
            latents = self.sample_cached_latents(batch["latent_mean"], batch["latent_std"], generator).float()
            if self.text_encoder_trains:
                text = self.encode_prompts(batch)
            else:
                text = TextConditioning(batch["text_embeds"], batch.get("pooled_text_embeds"))
        else:
            latents = self.encode_images(batch["pixel_values"], generator).float()
            text = self.encode_prompts(batch)
        noise, input_noise, timesteps = self.objective.draw(latents, self.num_train_timesteps, generator)
        noisy = losses.add_noise(self.alphas_cumprod, latents, input_noise, timesteps)
        # The dtype of the UNet's first weight: diffusers' `unet.dtype` walks every module (ms per call at SD size).
        dtype = self.unet.conv_in.weight.dtype
        added = None
        if self.is_sdxl:
            target = tuple(side * self.vae_scale_factor for side in latents.shape[-2:])
            added = added_cond_kwargs(text, time_ids(batch, target, len(latents)), dtype)
        prediction = self.unet(noisy.to(dtype), timesteps, text.hidden.to(dtype), added_cond_kwargs=added).sample
        target = losses.training_target(self.prediction_type, self.alphas_cumprod, latents, noise, timesteps)
        weights = None
        if self.objective.min_snr_gamma is not None:
            snr = losses.snr(self.alphas_cumprod, timesteps)
            weights = losses.min_snr_weights(snr, self.objective.min_snr_gamma, self.prediction_type)
        mask = batch.get("mask")
        if mask is not None:  # pixel-resolution weights → latent cells (area average)
            mask = F.interpolate(mask.float(), size=latents.shape[-2:], mode="area")
        return losses.diffusion_loss(
            prediction, target, weights, self.objective.loss, self.objective.huber_c, mask,
            prior=batch.get("is_prior"), prior_weight=self.objective.prior_loss_weight,
        )  # fmt: skip

    # --- training hooks --------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        self._make_generator(self.trainer.strategy.root_device)

    def on_fit_start(self) -> None:
        # from_pretrained returns modules in eval mode and Lightning keeps the mode it finds; LoRA dropout (and any
        # dropout in the UNet) needs train mode. `train` keeps the frozen encoders in eval.
        self.train()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.diffusion_loss(batch, self.step_generator(batch))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["path"]))
        return loss

    def validation_generator(self, batch: dict[str, Any], batch_idx: int) -> torch.Generator | list[torch.Generator]:
        """Fixed noise and timesteps per validation sample (dataset index; per batch index for a batch without keys),
        whatever the seed, epoch or batch size, so validation curves (and adapters) compare like with like."""
        keys = batch.get("sample_key")
        if keys is None:
            return torch.Generator(self.device).manual_seed(1_000_003 + batch_idx)
        return [torch.Generator(self.device).manual_seed(derive_seed("validation", index)) for _, index in keys]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.diffusion_loss(batch, self.validation_generator(batch, batch_idx))
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["path"]))
        return loss

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups; a group's own "lr" overrides the optimizer's. "name" labels the LR logs."""
        return [{"name": "unet", "params": [p for p in self.unet.parameters() if p.requires_grad]}]

    def text_encoder_groups(self, lr: float | None) -> list[dict[str, Any]]:
        """Each text encoder's trainable weights as a parameter group ("text_encoder", SDXL's "text_encoder_2"),
        with its own `lr` unless None."""
        groups = []
        for name, encoder in zip(("text_encoder", "text_encoder_2"), self.text_encoders):
            group = {"name": name, "params": [p for p in encoder.parameters() if p.requires_grad]}
            if lr is not None:
                group["lr"] = lr
            groups.append(group)
        return groups

    def configure_optimizers(self) -> dict[str, Any]:
        groups = [group for group in self.parameter_groups() if group["params"]]
        optimizer = self.optimizer_factory(groups)
        if any(group.get("lr") is None for group in optimizer.param_groups):
            raise SdtuneError(
                "model.optimizer has no lr (e.g. Adafactor with relative_step: true), but model.lr_schedule scales one: "
                "set relative_step: false and an lr"
            )
        total = self.trainer.estimated_stepping_batches
        if self.lr_schedule.name in SCHEDULES_NEEDING_LENGTH and not math.isfinite(total):
            raise SdtuneError(f"model.lr_schedule.name={self.lr_schedule.name} needs a run length: set trainer.max_steps")
        # diffusers' "constant" ignores warmup; here warmup always applies and `name` is the shape after it.
        name = "constant_with_warmup" if self.lr_schedule.name == "constant" else self.lr_schedule.name
        scheduler = get_scheduler(
            name,
            optimizer,
            num_warmup_steps=self.lr_schedule.warmup_steps,
            num_training_steps=int(total) if math.isfinite(total) else None,
            num_cycles=self.lr_schedule.num_cycles,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- checkpoints and export ------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["sdtune"] = {"rng": gather_states(self._rng())}  # every rank's; see sdtune.rng_state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("state_dict", {})
        own = dict(self.named_parameters())
        expected = [name for name, p in own.items() if p.requires_grad]
        missing = [name for name in expected if name not in saved]
        if missing:
            raise SdtuneError(f"checkpoint has no weights for {len(missing)} trainable tensors (e.g. {missing[0]}); {self.mismatch_hint}")
        for name in expected:
            if saved[name].shape != own[name].shape:
                raise SdtuneError(f"checkpoint tensor {name} has shape {tuple(saved[name].shape)}, this model {tuple(own[name].shape)}: {self.mismatch_hint}")
        step, epoch = checkpoint.get("global_step"), checkpoint.get("epoch")
        rank_zero_info(f"resuming after optimizer step {step} (epoch {epoch})")
        extra = checkpoint.get("sdtune", {})
        if "rng" in extra:
            world_size, rank = (self.trainer.world_size, self.trainer.global_rank) if self._trainer else (1, 0)
            state = restore_states(extra["rng"], rank, world_size)
        else:  # written before per-rank states: the noise generator alone
            state = extra.get("generator")
        if state is not None:
            self._pending_generator_state = state
            if self._generator is not None:
                self._generator.set_state(state)

    def save_weights(self, out_dir: str | Path) -> Path:
        """Write what this run trained into `out_dir`; returns the main file or folder written."""
        raise NotImplementedError

    # --- randomness ------------------------------------------------------------------------------------------

    def step_generator(self, batch: dict[str, Any]) -> torch.Generator | list[torch.Generator]:
        """Where a training batch's draws come from: a generator per sample, seeded by its (epoch, index) key; the
        module's own generator for a batch without keys."""
        keys = batch.get("sample_key")
        if keys is None:
            return self._rng()
        seed = self._seed()
        return [torch.Generator(self.device).manual_seed(derive_seed(seed, "noise", *key)) for key in keys]

    def _seed(self) -> int:
        """`noise_seed`, or the seed of torch's global generator when the module was built."""
        return self.noise_seed if self.noise_seed is not None else self._initial_seed

    def _make_generator(self, device: torch.device) -> None:
        rank = self.trainer.global_rank if self._trainer is not None else 0
        self._generator = torch.Generator(device).manual_seed((self._seed() + rank) % 2**63)
        if self._pending_generator_state is not None:
            self._generator.set_state(self._pending_generator_state)

    def _rng(self) -> torch.Generator:
        if self._generator is None or self._generator.device.type != self.device.type:
            self._make_generator(self.device)
        return self._generator
