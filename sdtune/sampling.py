"""Guided sampling with diffusers pipelines built from modules already in memory (no reload)."""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)
from PIL import Image

from sdtune.errors import SdtuneError

SCHEDULERS = {
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "lms": LMSDiscreteScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
}


def make_scheduler(name: str, training_scheduler_config: dict):
    """An inference scheduler with the checkpoint's betas and prediction type."""
    if name not in SCHEDULERS:
        raise SdtuneError(f"unknown scheduler '{name}'; choose one of {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name].from_config(training_scheduler_config)


@torch.no_grad()
def generate(
    pipe: StableDiffusionPipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = 25,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
) -> list[list[Image.Image]]:
    """Images[prompt][seed]; each image's noise comes from its own seeded CPU generator, so runs are comparable."""
    grid = []
    for prompt in prompts:
        row = []
        for seed in seeds:
            generator = torch.Generator("cpu").manual_seed(seed)
            image = pipe(
                prompt,
                negative_prompt=negative_prompt,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                height=height,
                width=width,
                generator=generator,
            ).images[0]
            row.append(image)
        grid.append(row)
    return grid
