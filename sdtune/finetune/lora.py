"""LoRA fine-tuning of the Stable Diffusion UNet on the noise-prediction loss.

Frozen VAE and CLIP text encoder (eval mode, no grad, left out of checkpoints); a peft LoRA adapter on the UNet is
the only thing that trains. All random draws of the step (latent sampling, noise, timesteps) come from a generator
this module owns and checkpoints, so a run is reproducible from its seed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from diffusers.optimization import get_scheduler
from lightning.pytorch.cli import OptimizerCallable

from sdtune import losses
from sdtune.errors import SdtuneError
from sdtune.lora import LoraSettings, add_unet_lora, save_diffusers_adapter
from sdtune.models import load_stable_diffusion

SCHEDULES_NEEDING_LENGTH = ("cosine", "cosine_with_restarts", "linear", "polynomial")


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


class LoRAFineTune(L.LightningModule):
    """Stable Diffusion UNet + LoRA, trained to predict the noise (or v) added to VAE latents.

    Args:
        pretrained: Diffusers model directory or Hugging Face Hub id, e.g. stable-diffusion-v1-5/stable-diffusion-v1-5.
        revision: Hub revision (branch, tag or commit) of `pretrained`.
        variant: Weight file variant of `pretrained`, e.g. "fp16".
        lora: Adapter shape: rank, alpha, dropout, target modules.
        optimizer: Optimizer for the LoRA parameters (class_path + init_args, e.g. torch.optim.AdamW with lr).
        lr_schedule: Step-wise learning-rate schedule with warmup.
        min_snr_gamma: Min-SNR-γ loss weighting (5 is the paper's value); null turns it off.
        noise_seed: Seed of the generator for latents, noise and timesteps; null takes seed_everything's value.
    """

    def __init__(
        self,
        pretrained: str,
        revision: str | None = None,
        variant: str | None = None,
        lora: LoraSettings = LoraSettings(),
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_schedule: LRSchedule = LRSchedule(),
        min_snr_gamma: float | None = None,
        noise_seed: int | None = None,
    ) -> None:
        super().__init__()
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise SdtuneError(f"model.min_snr_gamma must be > 0 or null, got {min_snr_gamma}")
        lora = LoraSettings(**lora) if isinstance(lora, dict) else lora
        lr_schedule = LRSchedule(**lr_schedule) if isinstance(lr_schedule, dict) else lr_schedule
        # Plain types only, so checkpoints load with torch.load(weights_only=True); `_class_path` lets
        # LightningCLI read them back from `--ckpt_path`.
        self.save_hyperparameters(
            {"_class_path": f"{type(self).__module__}.{type(self).__qualname__}", "pretrained": pretrained, "revision": revision, "variant": variant, "lora": asdict(lora),
             "lr_schedule": asdict(lr_schedule), "min_snr_gamma": min_snr_gamma, "noise_seed": noise_seed}
        )
        self.optimizer_factory = optimizer
        self.lr_schedule = lr_schedule
        self.min_snr_gamma = min_snr_gamma
        self.noise_seed = noise_seed
        # Only the adapter is saved; the frozen base is reloaded from `pretrained`.
        self.strict_loading = False

        parts = load_stable_diffusion(pretrained, revision=revision, variant=variant)
        self.vae, self.text_encoder, self.unet = parts.vae, parts.text_encoder, parts.unet
        self.tokenizer = parts.tokenizer
        self.noise_scheduler = parts.noise_scheduler
        for frozen in (self.vae, self.text_encoder):
            frozen.requires_grad_(False)
            frozen.eval()
        add_unet_lora(self.unet, lora)
        self.register_buffer("alphas_cumprod", self.noise_scheduler.alphas_cumprod.clone().float(), persistent=False)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        self._generator: torch.Generator | None = None
        self._pending_generator_state: torch.Tensor | None = None

    # --- forward ---------------------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> LoRAFineTune:
        """Lightning switches the whole module to train mode; the frozen encoders stay in eval."""
        super().train(mode)
        self.vae.eval()
        self.text_encoder.eval()
        return self

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Pixels in [-1, 1] → scaled VAE latents (a sample of the posterior, as SD was trained)."""
        posterior = self.vae.encode(pixel_values.to(self.vae.dtype)).latent_dist
        latents = posterior.sample(generator=generator)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_prompts(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids → the text encoder's last hidden states (B × tokens × width)."""
        return self.text_encoder(input_ids.to(self.device))[0]

    def diffusion_loss(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        latents = self.encode_images(batch["pixel_values"], generator).float()
        text = self.encode_prompts(batch["input_ids"])
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        num_timesteps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, num_timesteps, (latents.shape[0],), generator=generator, device=latents.device)
        noisy = losses.add_noise(self.alphas_cumprod, latents, noise, timesteps)
        prediction = self.unet(noisy.to(self.unet.dtype), timesteps, text.to(self.unet.dtype)).sample
        target = losses.training_target(self.prediction_type, self.alphas_cumprod, latents, noise, timesteps)
        weights = None
        if self.min_snr_gamma is not None:
            snr = losses.snr(self.alphas_cumprod, timesteps)
            weights = losses.min_snr_weights(snr, self.min_snr_gamma, self.prediction_type)
        return losses.diffusion_loss(prediction, target, weights)

    # --- training hooks --------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        self._make_generator(self.trainer.strategy.root_device)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.diffusion_loss(batch, self._rng())
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["pixel_values"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        # Fixed noise and timesteps per batch, so validation curves compare like with like.
        generator = torch.Generator(self.device).manual_seed(1_000_003 + batch_idx)
        loss = self.diffusion_loss(batch, generator)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["pixel_values"].shape[0])
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        total = self.trainer.estimated_stepping_batches
        if self.lr_schedule.name in SCHEDULES_NEEDING_LENGTH and not math.isfinite(total):
            raise SdtuneError(f"model.lr_schedule.name={self.lr_schedule.name} needs a run length: set trainer.max_steps")
        scheduler = get_scheduler(
            self.lr_schedule.name,
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
        checkpoint["sdtune"] = {"generator": self._rng().get_state()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("state_dict", {})
        own = dict(self.named_parameters())
        expected = [name for name, p in own.items() if p.requires_grad]
        missing = [name for name in expected if name not in saved]
        if missing:
            raise SdtuneError(f"checkpoint has no weights for {len(missing)} adapter tensors (e.g. {missing[0]}); was it trained with other model.lora.target_modules?")
        for name in expected:
            if saved[name].shape != own[name].shape:
                raise SdtuneError(f"checkpoint tensor {name} has shape {tuple(saved[name].shape)}, this model {tuple(own[name].shape)}: model.lora.rank differs from the run that wrote it")
        state = checkpoint.get("sdtune", {}).get("generator")
        if state is not None:
            self._pending_generator_state = state
            if self._generator is not None:
                self._generator.set_state(state)

    def save_adapter(self, out_dir: str | Path) -> Path:
        """Write the UNet adapter in the diffusers format (`pytorch_lora_weights.safetensors`)."""
        return save_diffusers_adapter(self.unet, out_dir)

    # --- randomness ------------------------------------------------------------------------------------------

    def _make_generator(self, device: torch.device) -> None:
        seed = self.noise_seed if self.noise_seed is not None else torch.initial_seed()
        rank = self.trainer.global_rank if self._trainer is not None else 0
        self._generator = torch.Generator(device).manual_seed((seed + rank) % 2**63)
        if self._pending_generator_state is not None:
            self._generator.set_state(self._pending_generator_state)

    def _rng(self) -> torch.Generator:
        if self._generator is None or self._generator.device.type != self.device.type:
            self._make_generator(self.device)
        return self._generator
