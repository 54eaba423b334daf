"""Training a Stable Diffusion's VAE: the whole autoencoder (e.g. a new model's, from random weights) or its decoder
alone (a fine-tune of SD's decoder that keeps its latent space, so the UNet still fits it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

from sdtune.errors import SdtuneError
from sdtune.finetune.base import ModelFineTune
from sdtune.finetune.full import save_pipeline

MOMENTS_DECAY = 0.99  # the latent statistics behind scaling_factor "auto" follow the last ~100 steps


class VAEFineTune(ModelFineTune):
    """The VAE learns to reconstruct the training images: reconstruction loss (L1 or MSE, per pixel) plus `kl_weight`
    times the posterior's KL divergence to N(0, 1) (per latent element). Each image is encoded, a latent drawn from
    the posterior and decoded. UNet and text encoder stay frozen. Saves a complete diffusers pipeline folder
    (`model/`) with the trained VAE, ready for sampling or for the next training run.

    Args:
        pretrained: Diffusers model directory or Hugging Face Hub id (or single file with pretrained_config).
        loss: Reconstruction loss between decoded and input pixels.
        kl_weight: Weight of the KL term (per latent element; the latent space's regulariser). Ignored with
            decoder_only, where the encoder and so the posterior do not train.
        decoder_only: Train the decoder (and post_quant_conv) only; the encoder and so the latent space stay as they
            are, as SD's fine-tuned VAE decoders (ft-MSE) were trained.
        scaling_factor: The `scaling_factor` written in the saved VAE's config: null keeps the model's; "auto" sets
            1 / std of the latents drawn in the last ~100 training steps (as SD's 0.18215 was found), for a VAE whose
            latent space is new; or a number.
        **kwargs: The options every method shares (revision, optimizer, lr_schedule, weight_dtype, noise_seed, …).
    """

    output_dirname: ClassVar[str] = "model"
    mismatch_hint: ClassVar[str] = "it was not written by a VAE fine-tune of this model"
    fixed_on_resume: ClassVar[tuple[str, ...]] = ("decoder_only",)

    def __init__(
        self,
        pretrained: str,
        loss: Literal["l1", "mse"] = "l1",
        kl_weight: float = 1e-4,
        decoder_only: bool = False,
        scaling_factor: float | Literal["auto"] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(pretrained=pretrained, **kwargs)
        if loss not in ("l1", "mse"):
            raise SdtuneError(f"model.loss must be l1 or mse, got '{loss}'")
        if kl_weight < 0:
            raise SdtuneError(f"model.kl_weight must be ≥ 0, got {kl_weight}")
        if isinstance(scaling_factor, (int, float)) and scaling_factor <= 0:
            raise SdtuneError(f"model.scaling_factor must be > 0, \"auto\" or null, got {scaling_factor}")
        if decoder_only and scaling_factor is not None:
            raise SdtuneError("model.scaling_factor: with decoder_only the latent space stays the model's, and so does its factor; leave it null")
        self.loss, self.kl_weight, self.decoder_only, self.scaling_factor = loss, kl_weight, decoder_only, scaling_factor
        self.vae.to(torch.float32)  # master weights in float32 whatever weight_dtype says
        trained = (self.vae.decoder, self.vae.post_quant_conv) if decoder_only else (self.vae,)
        for part in trained:
            part.requires_grad_(True)
        # Running mean of the latents and of their squares, and the steps seen: scaling_factor "auto".
        self.register_buffer("latent_moments", torch.zeros(3, dtype=torch.float64))

    def train(self, mode: bool = True) -> VAEFineTune:
        super().train(mode)
        self.vae.train(mode)
        if self.decoder_only:
            self.vae.encoder.eval()
            self.vae.quant_conv.eval()
        return self

    def reconstruction_loss(
        self, batch: dict[str, Any], generator: torch.Generator | list[torch.Generator]
    ) -> dict[str, torch.Tensor]:
        """The batch's loss and its parts: {"loss", "reconstruction", "kl"}, and the latents drawn."""
        if "pixel_values" not in batch:
            raise SdtuneError("data.cache stores VAE latents, but the VAE trains: set data.cache false")
        pixels = batch["pixel_values"].float()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.decoder_only):
            posterior = self.vae.encode(pixels).latent_dist
        latents = posterior.sample(generator=generator)
        decoded = self.vae.decode(latents).sample
        reconstruction = (F.l1_loss if self.loss == "l1" else F.mse_loss)(decoded, pixels)
        kl = posterior.kl().mean() / latents[0].numel()  # diffusers sums the KL over a sample's latent elements
        loss = reconstruction if self.decoder_only else reconstruction + self.kl_weight * kl
        return {"loss": loss, "reconstruction": reconstruction.detach(), "kl": kl.detach(), "latents": latents.detach()}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        parts = self.reconstruction_loss(batch, self.step_generator(batch))
        self._track_latents(parts["latents"])
        size = len(batch["pixel_values"])
        self.log("train/loss", parts["loss"], prog_bar=True, batch_size=size)
        self.log_dict({"train/reconstruction": parts["reconstruction"], "train/kl": parts["kl"]}, batch_size=size)
        return parts["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        parts = self.reconstruction_loss(batch, self.validation_generator(batch, batch_idx))
        size = len(batch["pixel_values"])
        self.log("val/loss", parts["loss"], prog_bar=True, sync_dist=True, batch_size=size)
        self.log("val/reconstruction", parts["reconstruction"], sync_dist=True, batch_size=size)
        return parts["loss"]

    def parameter_groups(self) -> list[dict[str, Any]]:
        return [{"name": "vae", "params": [p for p in self.vae.parameters() if p.requires_grad]}]

    # --- scaling factor ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def _track_latents(self, latents: torch.Tensor) -> None:
        batch = torch.stack([latents.double().mean(), latents.double().square().mean()])
        steps = self.latent_moments[2]
        weight = max(1.0 / float(steps + 1), 1 - MOMENTS_DECAY)  # a plain mean over the first 100 steps
        self.latent_moments[:2] += weight * (batch - self.latent_moments[:2])
        self.latent_moments[2] += 1

    def measured_scaling_factor(self) -> float | None:
        """1 / std of the recently drawn latents, or None before the first training step."""
        mean, square, steps = self.latent_moments.tolist()
        if steps == 0:
            return None
        return 1.0 / max(square - mean * mean, 1e-12) ** 0.5

    # --- checkpoints and export ------------------------------------------------------------------------------

    def save_weights(self, out_dir: str | Path) -> Path:
        factor = self.scaling_factor
        if factor == "auto":
            factor = self.measured_scaling_factor()
            if factor is None:
                rank_zero_info("scaling_factor auto: no training step yet, the model's own is kept")
        if factor is not None:
            self.vae.register_to_config(scaling_factor=float(factor))
        return save_pipeline(self, out_dir)
