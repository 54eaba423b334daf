"""Training methods, one LightningModule a file."""

from sdtune.finetune.lora import LoRAFineTune, LRSchedule

__all__ = ["LoRAFineTune", "LRSchedule"]
