"""The samplers by the names settings and flags use (`--scheduler`, `samples.scheduler`), their diffusers classes
by name, and the check of a sampling setting that needs no model: the command line offers and checks them without
importing torch or diffusers."""

import math

from sdtune.errors import SdtuneError

SCHEDULER_CLASSES = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "flow_euler": "FlowMatchEulerDiscreteScheduler",
}
FLOW_SCHEDULERS = ("flow_euler",)  # the samplers of flow-matching models (SD3, Flux); the others are DDPM samplers


def check_strength(strength: float, steps: int) -> None:
    """diffusers runs int(steps × strength) of the `steps` denoising steps; zero of them is an error, said up front."""
    if not 0.0 < strength <= 1.0:
        raise SdtuneError(f"--strength must be in (0, 1] (the fraction of the denoising re-run), got {strength}")
    if int(steps * strength) < 1:
        needed = math.ceil(1 / strength - 1e-9)
        raise SdtuneError(f"--strength {strength} with --steps {steps} runs no denoising step (int(steps × strength) = 0); use --steps {needed} or more")
