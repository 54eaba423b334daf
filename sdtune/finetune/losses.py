"""Diffusion training maths as pure functions: noise targets, SNR, min-SNR-γ weights, the weighted MSE.

No Lightning here; the LightningModule only wires these together. Conventions follow diffusers' schedulers:
`alphas_cumprod[t]` is ᾱ_t, noisy = √ᾱ·x0 + √(1-ᾱ)·ε, and v = √ᾱ·ε − √(1-ᾱ)·x0.
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction")


def _gather(values: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] per sample, shaped to broadcast against `like` (B×C×H×W)."""
    out = values.to(device=timesteps.device)[timesteps].float()
    return out.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def add_noise(alphas_cumprod: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """Forward diffusion q(x_t | x_0)."""
    alpha = _gather(alphas_cumprod, timesteps, latents)
    return alpha.sqrt() * latents + (1 - alpha).sqrt() * noise


def velocity(alphas_cumprod: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """The v-prediction target (Salimans & Ho, 2022)."""
    alpha = _gather(alphas_cumprod, timesteps, latents)
    return alpha.sqrt() * noise - (1 - alpha).sqrt() * latents


def training_target(
    prediction_type: str,
    alphas_cumprod: torch.Tensor,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """What the UNet is trained to output, by the scheduler's `prediction_type`."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return velocity(alphas_cumprod, latents, noise, timesteps)
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got '{prediction_type}'")


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) per sample."""
    alpha = alphas_cumprod.to(device=timesteps.device)[timesteps].float()
    return alpha / (1 - alpha)


def min_snr_weights(snr_values: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al., 2023): min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR+1) for v.

    A zero-terminal-SNR schedule has SNR = 0 at the last step; that weight is 0/0 and is defined here as 1.
    """
    clipped = torch.minimum(snr_values, torch.full_like(snr_values, gamma))
    denominator = snr_values + 1 if prediction_type == "v_prediction" else snr_values
    weights = clipped / denominator
    return torch.where(denominator == 0, torch.ones_like(weights), weights)


LOSS_TYPES = ("mse", "huber", "smooth_l1")


def elementwise_loss(prediction: torch.Tensor, target: torch.Tensor, kind: str = "mse", huber_c: float = 0.1):
    """Per-element loss in fp32. Huber and smooth-L1 are the pseudo-Huber forms kohya sd-scripts uses
    (Khrapov et al., 2024): ≈ r² for |r| ≪ c, linear beyond, so outlier pixels pull less than under MSE.
    """
    residual_sq = (prediction.float() - target.float()) ** 2
    if kind == "mse":
        return residual_sq
    pseudo = torch.sqrt(residual_sq + huber_c**2) - huber_c
    if kind == "huber":
        return 2 * huber_c * pseudo
    if kind == "smooth_l1":
        return 2 * pseudo
    raise ValueError(f"loss must be one of {LOSS_TYPES}, got '{kind}'")


def diffusion_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    kind: str = "mse",
    huber_c: float = 0.1,
    mask: torch.Tensor | None = None,
    prior: torch.Tensor | None = None,
    prior_weight: float = 1.0,
) -> torch.Tensor:
    """Mean loss in fp32. `weights` scale each sample's loss before the batch mean; a `mask` (B×1×h×w in [0, 1],
    at latent size) makes each sample's loss the mask-weighted mean, so a small subject is not a small loss.

    `prior` (B booleans) marks DreamBooth's class images: the loss is then the instance samples' mean plus
    `prior_weight` × the class samples' mean, as DreamBooth's prior preservation defines it (a term is left out
    when the batch has none of its samples)."""
    elementwise = elementwise_loss(prediction, target, kind, huber_c)
    dims = list(range(1, prediction.ndim))
    if mask is None:
        per_sample = elementwise.mean(dim=dims)
    else:
        mask = mask.float().expand_as(elementwise)
        per_sample = (elementwise * mask).sum(dim=dims) / mask.sum(dim=dims).clamp_min(1e-8)
    if weights is not None:
        per_sample = per_sample * weights.float()
    if prior is None or not prior.any():
        return per_sample.mean()
    prior = prior.to(per_sample.device).bool()
    loss = prior_weight * per_sample[prior].mean()
    return loss + per_sample[~prior].mean() if (~prior).any() else loss
