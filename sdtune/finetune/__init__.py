"""Training methods: the shared base, LoRA/DoRA adapters, and full UNet fine-tuning."""

from sdtune.finetune.base import DiffusionFineTune, LRSchedule
from sdtune.finetune.full import FullFineTune
from sdtune.finetune.lora import LoRAFineTune
from sdtune.finetune.objective import Objective

__all__ = ["DiffusionFineTune", "FullFineTune", "LoRAFineTune", "LRSchedule", "Objective"]
