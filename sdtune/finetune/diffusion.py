"""What the diffusion methods (LoRA, textual inversion, full fine-tuning) share: prompts through the frozen text
encoders, noise added to VAE latents, the denoiser's prediction and the loss to its target (`objective.py`; the
maths in `losses.py` for DDPM noise prediction, `flow.py` for rectified flow). Subclasses decide what trains and
what gets saved."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from sdtune.data.batch import ID_KEYS, Batch
from sdtune.data.cache.index import sample_latents
from sdtune.errors import SdtuneError
from sdtune.finetune import flow, losses
from sdtune.finetune.base import ModelFineTune, as_settings
from sdtune.finetune.objective import Objective
from sdtune.models.families import TextConditioning


class DiffusionFineTune(ModelFineTune):
    """Base of the diffusion methods: the denoiser learns to predict the noise (or v) added to VAE latents.

    Args:
        pretrained: Diffusers model directory or Hugging Face Hub id, e.g. stable-diffusion-v1-5/stable-diffusion-v1-5,
            or a single-file checkpoint in the original layout (.safetensors or .ckpt, as AUTOMATIC1111 uses).
        objective: Prediction type, loss, timestep range, noise offset, input perturbation, min-SNR-γ.
        clip_skip: Use the text encoder's k-th hidden state from the end (1 = last layer, 2 for anime-style models).
        **kwargs: What every method shares (`ModelFineTune`: revision, optimizer, lr_schedule, weight_dtype, …).
    """

    def __init__(self, pretrained: str, objective: Objective = Objective(), clip_skip: int = 1, **kwargs: Any) -> None:
        if clip_skip < 1:
            raise SdtuneError(f"model.clip_skip must be ≥ 1, got {clip_skip}")
        objective = as_settings(Objective, objective)
        super().__init__(pretrained=pretrained, **kwargs)
        self.objective, self.clip_skip = objective, clip_skip
        objective.check_for(self.family.objective, self.family.label)
        allowed = self.family.max_clip_skip(self.text_encoders)
        if clip_skip > allowed:
            raise SdtuneError(f"model.clip_skip {clip_skip} is more than this model's text encoders allow ({allowed})")
        self.num_train_timesteps = self.noise_scheduler.config.num_train_timesteps
        if self.family.objective == "flow":
            self.prediction_type = "flow"  # the velocity ε − x₀
            return
        self.prediction_type = self.objective.prediction_type or self.noise_scheduler.config.prediction_type
        if self.objective.zero_terminal_snr:
            if self.prediction_type != "v_prediction":
                raise SdtuneError(
                    f"model.objective.zero_terminal_snr needs v_prediction (at zero SNR an {self.prediction_type} target "
                    "carries no signal): set model.objective.prediction_type: v_prediction, or train a v model (SD2.x 768)"
                )
            self.noise_scheduler = DDPMScheduler.from_config(self.noise_scheduler.config, rescale_betas_zero_snr=True)
        self.objective.timestep_range(self.num_train_timesteps)  # fail now, not at step 1
        self.register_buffer("alphas_cumprod", self.noise_scheduler.alphas_cumprod.clone().float(), persistent=False)

    # --- forward ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, generator: torch.Generator | list[torch.Generator]) -> torch.Tensor:
        """Pixels in [-1, 1] → scaled VAE latents (a sample of the posterior, as SD was trained)."""
        posterior = self.vae.encode(pixel_values.to(self.vae.encoder.conv_in.weight.dtype)).latent_dist
        latents = posterior.sample(generator=generator)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def encode_prompts(self, batch: Batch) -> TextConditioning:
        """The batch's token ids (one tensor per text encoder; B×L or B×chunks×L) → the denoiser's text
        conditioning; with gradients only when a text encoder trains."""
        ids = [batch[key] for key in ID_KEYS[: len(self.text_encoders)]]
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.text_encoder_trains):
            return self.family.encode_prompt(self.text_encoders, ids, self.clip_skip)

    def sample_cached_latents(
        self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | list[torch.Generator]
    ) -> torch.Tensor:
        """A cached posterior (data.cache) → scaled latents: the same draw `encode_images` makes from the VAE's."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return sample_latents(mean, std, generator, self.vae.config.scaling_factor, shift)

    def diffusion_loss(self, batch: Batch, generator: torch.Generator | list[torch.Generator]) -> torch.Tensor:
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
        pixel_size = tuple(side * self.vae_scale_factor for side in latents.shape[-2:])
        if self.family.objective == "flow":
            prediction, target, weights = self.flow_prediction(latents, text, batch, pixel_size, generator)
        else:
            prediction, target, weights = self.noise_prediction(latents, text, batch, pixel_size, generator)
        mask = batch.get("mask")
        if mask is not None:  # pixel-resolution weights → latent cells (area average)
            mask = F.interpolate(mask.float(), size=latents.shape[-2:], mode="area")
        return losses.diffusion_loss(
            prediction, target, weights, self.objective.loss, self.objective.huber_c, mask,
            prior=batch.get("is_prior"), prior_weight=self.objective.prior_loss_weight,
        )  # fmt: skip

    def noise_prediction(
        self, latents: torch.Tensor, text: TextConditioning, batch: Batch, pixel_size: tuple[int, int],
        generator: torch.Generator | list[torch.Generator],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """DDPM: (the denoiser's prediction of the noise or v, that target, min-SNR weights or None)."""
        noise, input_noise, timesteps = self.objective.draw(latents, self.num_train_timesteps, generator)
        noisy = losses.add_noise(self.alphas_cumprod, latents, input_noise, timesteps)
        prediction = self.family.predict(self.denoiser, noisy, timesteps, text, batch, pixel_size)
        target = losses.training_target(self.prediction_type, self.alphas_cumprod, latents, noise, timesteps)
        weights = None
        if self.objective.min_snr_gamma is not None:
            snr = losses.snr(self.alphas_cumprod, timesteps)
            weights = losses.min_snr_weights(snr, self.objective.min_snr_gamma, self.prediction_type)
        return prediction, target, weights

    def flow_prediction(
        self, latents: torch.Tensor, text: TextConditioning, batch: Batch, pixel_size: tuple[int, int],
        generator: torch.Generator | list[torch.Generator],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """Rectified flow: (the denoiser's velocity, the target ε − x₀, the per-sample loss weights)."""
        settings = self.objective.flow
        tokens = self.family.image_tokens(tuple(latents.shape[-2:]))
        noise, sigmas = settings.draw(latents, generator, self.noise_scheduler.config, tokens)
        noisy = flow.noisy_latents(latents, noise, sigmas)
        timesteps = sigmas * self.num_train_timesteps
        prediction = self.family.predict(self.denoiser, noisy, timesteps, text, batch, pixel_size, guidance=settings.guidance)
        return prediction, flow.velocity(latents, noise), settings.weights(sigmas)

    # --- training hooks --------------------------------------------------------------------------------------

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = self.diffusion_loss(batch, self.step_generator(batch))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["path"]))
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = self.diffusion_loss(batch, self.validation_generator(batch, batch_idx))
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["path"]))
        return loss
