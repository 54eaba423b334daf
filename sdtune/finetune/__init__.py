"""Training methods: the shared base, LoRA/DoRA adapters, textual inversion, full UNet fine-tuning and VAE training."""

from sdtune.finetune.base import DiffusionFineTune, LRSchedule
from sdtune.finetune.full import FullFineTune
from sdtune.finetune.lora import LoRAFineTune, TextualInversion
from sdtune.finetune.objective import Objective
from sdtune.finetune.vae import VAEFineTune

__all__ = ["DiffusionFineTune", "FullFineTune", "LoRAFineTune", "LRSchedule", "Objective", "TextualInversion", "VAEFineTune"]
