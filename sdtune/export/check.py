"""Checked on write: reload an exported file with the library that will consume it and compare the UNet's output
on a fixed input (latents, timestep, prompt through the text encoder) with the adapted model in memory.

The tolerance is relative to the adapter's own effect (|adapted − base|), so a file whose keys were silently
skipped fails even when the adapter changes the output only a little; a floor covers the rounding of a merged
fp16/bf16 model."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from sdtune.inference.sampling import denoiser_of, prompt_encoders, vae_scale_factor

# A file that loads right reproduces the adapter's effect to this fraction ...
EFFECT_RTOL = 1e-3
# ... or the output to this fraction of its scale (rounding of a merged model's weights in the export dtype).
OUTPUT_RTOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
PROMPT = "a photo of sks"


@dataclass
class Probe:
    """A fixed UNet input: latents, timesteps and a prompt's token ids for each text encoder (two for SDXL)."""

    latents: torch.Tensor
    timestep: torch.Tensor
    input_ids: list[torch.Tensor]

    @classmethod
    def for_pipeline(cls, pipe) -> Probe:
        family, tokenizers, _ = prompt_encoders(pipe)
        config = denoiser_of(pipe).config
        size = config.get("sample_size") or 32
        size = size if isinstance(size, int) else size[0]
        side = min(size, 32)  # small enough to stay cheap on CPU for SD1.5, large enough for every down block
        # A UNet's own input width (an inpainting UNet reads 9 channels); a transformer reads the VAE's latents.
        channels = config.in_channels if family.objective == "diffusion" else pipe.vae.config.latent_channels
        generator = torch.Generator().manual_seed(0)
        latents = torch.randn(2, channels, side, side, generator=generator)
        per_prompt = [family.tokenize(tokenizers, text, tokenizers[0].model_max_length - 2) for text in (PROMPT, "")]
        ids = [torch.stack(rows) for rows in zip(*per_prompt)]
        return cls(latents, torch.tensor([499, 499]), ids)


@torch.no_grad()
def unet_output(pipe, probe: Probe) -> torch.Tensor:
    """The denoiser's prediction for the probe, conditioned as sampling conditions it (SDXL: pooled text and the
    size and crop numbers of an uncropped image of the probe's size)."""
    family, _, encoders = prompt_encoders(pipe)
    denoiser = denoiser_of(pipe)
    device = denoiser.device
    text = family.encode_prompt(encoders, [ids.to(device) for ids in probe.input_ids])
    side = probe.latents.shape[-1] * vae_scale_factor(pipe)
    out = family.predict(denoiser, probe.latents.to(device), probe.timestep.to(device), text, {}, (side, side))
    return out.float().cpu()


def _tuner_layers(pipe) -> list[BaseTunerLayer]:
    models = [denoiser_of(pipe), *prompt_encoders(pipe)[2]]
    return [m for model in models for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_disabled(pipe):
    layers = _tuner_layers(pipe)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


@contextlib.contextmanager
def adapter_rounded_to(pipe, dtype: torch.dtype):
    """The adapter's tensors rounded to `dtype` (as the file stores them) for the duration; restored after."""
    saved = []
    for layer in _tuner_layers(pipe):
        for name, param in layer.named_parameters():
            if name.startswith(("lora_", "lora_magnitude_vector", "hada_", "lokr_")):
                saved.append((param, param.data))
                param.data = param.data.to(dtype).to(param.dtype)
    try:
        yield
    finally:
        for param, data in saved:
            param.data = data


@dataclass
class Reference:
    """The in-memory outputs the exported file must reproduce."""

    adapted: torch.Tensor
    base: torch.Tensor
    layers: int  # adapted layers the consumer must find

    @property
    def effect(self) -> float:
        return (self.adapted - self.base).abs().max().item()


def reference(pipe, probe: Probe, dtype: torch.dtype, rounded: bool) -> Reference:
    """Outputs of `pipe` with its active adapters (weights rounded to the file's dtype if `rounded`) and without."""
    with adapter_rounded_to(pipe, dtype) if rounded else contextlib.nullcontext():
        adapted = unet_output(pipe, probe)
    with adapters_disabled(pipe):
        base = unet_output(pipe, probe)
    return Reference(adapted, base, count_lora_layers(pipe))


def count_lora_layers(pipe) -> int:
    """Layers of the UNet and text encoder that carry a LoRA (or LoHa/LoKr)."""
    return sum(1 for layer in _tuner_layers(pipe) if any(getattr(layer, name, None) for name in layer.adapter_layer_names))


@dataclass
class Verdict:
    error: float
    tolerance: float
    effect: float
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None and self.error <= self.tolerance

    def describe(self) -> str:
        if self.problem:
            return self.problem
        return f"max |Δ| {self.error:.2e} (tolerance {self.tolerance:.2e}; the adapter changes the output by up to {self.effect:.2e})"


def compare(ref: Reference, loaded: torch.Tensor, dtype: torch.dtype, loaded_layers: int | None) -> Verdict:
    scale = ref.adapted.abs().max().item()
    tolerance = EFFECT_RTOL * ref.effect + OUTPUT_RTOL[dtype] * scale
    error = (loaded - ref.adapted).abs().max().item()
    problem = None
    if loaded_layers is not None and loaded_layers != ref.layers:
        problem = f"the consumer attached {loaded_layers} LoRA layers, the adapter has {ref.layers}"
    elif not torch.isfinite(loaded).all():
        problem = "the reloaded model's output is not finite"
    return Verdict(error, tolerance, ref.effect, problem)
