"""Rectified flow (SD3, Flux): the settings (`model.objective.flow`) and the training maths as pure functions.

x_σ = (1 − σ)·x₀ + σ·ε, and the transformer predicts the velocity ε − x₀ that the flow-matching scheduler
integrates when sampling. σ ∈ [0, 1] is drawn per sample (`logit_normal`, `mode` or `uniform`: diffusers'
`compute_density_for_timestep_sampling`), then shifted towards noise: a fixed shift s maps σ to s·σ / (1 + (s − 1)·σ)
(SD3.5's scheduler: 3.0), and Flux's resolution-dependent shift maps it to e^μ / (e^μ + 1/σ − 1), with μ linear in
the image's token count between the scheduler's base_shift and max_shift. The denoiser is told σ·1000. The loss may be
weighted per sample (`sigma_sqrt`, `cosmap`: diffusers' `compute_loss_weighting_for_sd3`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from sdtune.errors import SdtuneError

SAMPLINGS = ("logit_normal", "mode", "uniform")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


@dataclass
class FlowMatching:
    """How flow-matching models (SD3, Flux) draw σ and weight the loss; the UNet families do not use these."""

    timestep_sampling: Literal["logit_normal", "mode", "uniform"] = "logit_normal"
    """Distribution of σ before the shift: logit_normal (SD3's paper; mean and std below), mode (mode_scale) or uniform."""
    logit_mean: float = 0.0
    """Mean of the logit-normal draw."""
    logit_std: float = 1.0
    """Standard deviation of the logit-normal draw."""
    mode_scale: float = 1.29
    """Scale of the mode draw."""
    shift: float | Literal["auto"] | None = None
    """Shift of σ towards noise: null takes the scheduler's (SD3.5: 3.0; Flux: resolution-dependent, from each
    image's size), a number is a fixed shift, "auto" the resolution-dependent one with the scheduler's settings."""
    weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"
    """Per-sample loss weighting: none, sigma_sqrt (σ⁻²) or cosmap."""
    guidance: float = 3.5
    """The guidance value Flux.1 dev is told during training (it embeds guidance instead of running two passes);
    models without a guidance embedding ignore it. 3.5 is the value kohya sd-scripts and diffusers train with."""

    def __post_init__(self) -> None:
        key = "model.objective.flow"
        if self.timestep_sampling not in SAMPLINGS:
            raise SdtuneError(f"{key}.timestep_sampling must be one of {', '.join(SAMPLINGS)}, got '{self.timestep_sampling}'")
        if self.weighting not in WEIGHTINGS:
            raise SdtuneError(f"{key}.weighting must be one of {', '.join(WEIGHTINGS)}, got '{self.weighting}'")
        if self.logit_std <= 0:
            raise SdtuneError(f"{key}.logit_std must be > 0, got {self.logit_std}")
        if self.shift is not None and self.shift != "auto" and (isinstance(self.shift, str) or self.shift <= 0):
            raise SdtuneError(f"{key}.shift must be > 0, \"auto\" or null, got {self.shift}")

    def draw_sigmas(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """`count` unshifted σ in [0, 1] from `generator`."""
        return compute_density_for_timestep_sampling(
            self.timestep_sampling, count, logit_mean=self.logit_mean, logit_std=self.logit_std,
            mode_scale=self.mode_scale, generator=generator,
        ).clamp(0.0, 1.0)  # fmt: skip

    def shifted(self, sigmas: torch.Tensor, scheduler_config: Any, image_tokens: int) -> torch.Tensor:
        """σ shifted as this setting and the scheduler say, for an image of `image_tokens` tokens."""
        dynamic = self.shift == "auto" or (self.shift is None and scheduler_config.get("use_dynamic_shifting", False))
        if dynamic:
            mu = resolution_mu(
                image_tokens, scheduler_config.get("base_image_seq_len", 256), scheduler_config.get("max_image_seq_len", 4096),
                scheduler_config.get("base_shift", 0.5), scheduler_config.get("max_shift", 1.15),
            )  # fmt: skip
            return shift_exponential(sigmas, mu)
        shift = float(self.shift if self.shift is not None else scheduler_config.get("shift", 1.0))
        return shift_fixed(sigmas, shift)

    def draw(
        self, latents: torch.Tensor, generator: torch.Generator | list[torch.Generator], scheduler_config: Any,
        image_tokens: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(noise, shifted σ) for each sample; a list holds one generator per sample, whose draws are then the same
        whatever batch the sample is in. The noise is drawn before σ."""
        if isinstance(generator, list):
            if len(generator) != len(latents):
                raise ValueError(f"{len(generator)} generators for a batch of {len(latents)}")
            draws = [self.draw(latents[i : i + 1], g, scheduler_config, image_tokens) for i, g in enumerate(generator)]
            return tuple(torch.cat(parts) for parts in zip(*draws))
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        sigmas = self.draw_sigmas(len(latents), generator).to(latents.device)
        return noise, self.shifted(sigmas, scheduler_config, image_tokens)

    def weights(self, sigmas: torch.Tensor) -> torch.Tensor:
        return compute_loss_weighting_for_sd3(self.weighting, sigmas).float()


def shift_fixed(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """FlowMatchEulerDiscreteScheduler's `shift`: s·σ / (1 + (s − 1)·σ)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def resolution_mu(tokens: int, base_tokens: int, max_tokens: int, base_shift: float, max_shift: float) -> float:
    """μ of the resolution-dependent shift: linear in the token count, base_shift at base_tokens, max_shift at
    max_tokens (FluxPipeline's `calculate_shift`)."""
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return tokens * slope + base_shift - slope * base_tokens


def shift_exponential(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """The scheduler's exponential time shift by μ: e^μ / (e^μ + 1/σ − 1); σ = 0 stays 0."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas.clamp_min(1e-12) - 1)) * (sigmas > 0)


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_σ = (1 − σ)·x₀ + σ·ε, the scheduler's `scale_noise`."""
    sigma = sigmas.reshape(-1, *[1] * (latents.ndim - 1)).to(latents.dtype)
    return (1 - sigma) * latents + sigma * noise


def velocity(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The training target: ε − x₀."""
    return noise - latents
