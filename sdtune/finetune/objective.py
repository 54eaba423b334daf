"""What the denoiser is trained on: the noise, the timesteps and the loss, as one typed config (`model.objective`).

The UNet families (SD1.x, SD2.x, SDXL) learn DDPM noise prediction (ε or v); the flow-matching families (SD3,
Flux) learn rectified flow, set in `objective.flow` (`sdtune.finetune.flow`). The loss type and DreamBooth's prior
weight apply to both; a setting of the other kind of objective is refused in one line rather than ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

import torch
from diffusers import DDIMScheduler

from sdtune.errors import SdtuneError
from sdtune.finetune.flow import FlowMatching
from sdtune.finetune.losses import LOSS_TYPES
from sdtune.inference.sampling import ZERO_SNR, supports_zero_snr


@dataclass
class Objective:
    """Noise-prediction objective and its common modifications (each off by default)."""

    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    """Override the scheduler's prediction type (e.g. v_prediction to turn an ε model into a v model); null keeps it."""
    loss: Literal["mse", "huber", "smooth_l1"] = "mse"
    """mse, or the pseudo-Huber losses (robust to outliers): huber = 2c(√(r²+c²) − c), smooth_l1 = that / c."""
    huber_c: float = 0.1
    """Huber transition point c: below it the loss is quadratic, above it linear."""
    min_snr_gamma: float | None = None
    """Min-SNR-γ loss weighting (5 is the paper's value); null turns it off."""
    noise_offset: float = 0.0
    """Add offset·N(0, 1) per sample and channel to the noise so the model can learn very dark/bright images (0.05–0.1)."""
    input_perturbation: float = 0.0
    """Perturb the noise fed to the UNet by this·N(0, 1) while the target stays the clean noise (Ning et al., 0.1)."""
    min_timestep: int = 0
    """Lowest timestep sampled (inclusive)."""
    max_timestep: int | None = None
    """Highest timestep sampled (exclusive); null means the scheduler's num_train_timesteps (1000)."""
    prior_loss_weight: float = 1.0
    """DreamBooth's λ: the loss is the instance images' mean + λ × the class images' mean (the data subsets marked
    `prior`), so the model keeps what the class looked like."""
    zero_terminal_snr: bool = False
    """Rescale the noise schedule so its last timestep is pure noise (Lin et al. 2024, "Common Diffusion Noise
    Schedules and Sample Steps are Flawed"), as sampling starts: the model learns very dark and very bright images.
    Needs v_prediction. Samples and saved pipelines then use the rescaled schedule with trailing timesteps; a base
    model not trained this way needs a longer fine-tune to adapt."""
    flow: FlowMatching = field(default_factory=FlowMatching)
    """Rectified flow (SD3, Flux): how σ is drawn and shifted, the loss weighting, Flux dev's guidance."""

    def __post_init__(self) -> None:
        if not isinstance(self.flow, FlowMatching):  # a dict, or the parser's namespace in pre-flight
            self.flow = FlowMatching(**(self.flow if isinstance(self.flow, dict) else vars(self.flow)))
        if self.loss not in LOSS_TYPES:
            raise SdtuneError(f"model.objective.loss must be one of {', '.join(LOSS_TYPES)}, got '{self.loss}'")
        if self.huber_c <= 0:
            raise SdtuneError(f"model.objective.huber_c must be > 0, got {self.huber_c}")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise SdtuneError(f"model.objective.min_snr_gamma must be > 0 or null, got {self.min_snr_gamma}")
        for name in ("noise_offset", "input_perturbation"):
            if getattr(self, name) < 0:
                raise SdtuneError(f"model.objective.{name} must be ≥ 0, got {getattr(self, name)}")
        if self.prior_loss_weight < 0:
            raise SdtuneError(f"model.objective.prior_loss_weight must be ≥ 0, got {self.prior_loss_weight}")
        if self.min_timestep < 0:
            raise SdtuneError(f"model.objective.min_timestep must be ≥ 0, got {self.min_timestep}")

    def check_for(self, objective: str, label: str) -> None:
        """Refuse, in one line, a setting the model's objective ("diffusion" or "flow") does not have."""
        default = Objective()
        if objective == "flow":
            shared = ("loss", "huber_c", "prior_loss_weight", "flow")
            changed = [f.name for f in fields(self) if f.name not in shared and getattr(self, f.name) != getattr(default, f.name)]
            if changed:
                raise SdtuneError(
                    f"model.objective.{changed[0]} is a setting of noise prediction (SD1.x, SD2.x, SDXL); {label} "
                    "models train with rectified flow: see model.objective.flow"
                )
        elif self.flow != default.flow:
            raise SdtuneError(f"model.objective.flow applies to flow-matching models (SD3, Flux), not to {label} models")

    def inference_scheduler(self, scheduler):
        """The base model's inference `scheduler` as this objective trains the model: its prediction type, and with
        zero_terminal_snr the rescaled betas and trailing timesteps (DDIM, the paper's sampler, stands in for a
        scheduler that cannot rescale, such as SD1.5's PNDM)."""
        overrides = {"prediction_type": self.prediction_type} if self.prediction_type else {}
        if not self.zero_terminal_snr:
            if overrides:
                scheduler.register_to_config(**overrides)
            return scheduler
        cls = type(scheduler) if supports_zero_snr(type(scheduler)) else DDIMScheduler
        return cls.from_config(scheduler.config, **overrides, **ZERO_SNR)

    def timestep_range(self, num_train_timesteps: int) -> tuple[int, int]:
        high = num_train_timesteps if self.max_timestep is None else self.max_timestep
        if not self.min_timestep < high <= num_train_timesteps:
            raise SdtuneError(
                f"model.objective: need 0 ≤ min_timestep < max_timestep ≤ {num_train_timesteps}, "
                f"got {self.min_timestep} and {high}"
            )
        return self.min_timestep, high

    def draw(
        self, latents: torch.Tensor, num_train_timesteps: int, generator: torch.Generator | list[torch.Generator]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noise the target is built from, noise mixed into the UNet input, timesteps).

        A list holds one generator per sample: sample i's draws then come from `generator[i]` alone, the same
        whatever batch it is in.

        The base draws come first and in a fixed order, so switching an option on leaves them unchanged.
        """
        if isinstance(generator, list):
            if len(generator) != len(latents):
                raise ValueError(f"{len(generator)} generators for a batch of {len(latents)}")
            draws = [self.draw(latents[i : i + 1], num_train_timesteps, g) for i, g in enumerate(generator)]
            return tuple(torch.cat(parts) for parts in zip(*draws))
        batch, channels = latents.shape[:2]
        options = dict(generator=generator, device=latents.device, dtype=latents.dtype)
        noise = torch.randn(latents.shape, **options)
        low, high = self.timestep_range(num_train_timesteps)
        timesteps = torch.randint(low, high, (batch,), generator=generator, device=latents.device)
        if self.noise_offset:
            noise = noise + self.noise_offset * torch.randn((batch, channels, 1, 1), **options)
        input_noise = noise
        if self.input_perturbation:
            input_noise = noise + self.input_perturbation * torch.randn(latents.shape, **options)
        return noise, input_noise, timesteps
