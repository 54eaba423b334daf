"""Training methods, one LightningModule a file: LoRA/DoRA adapters (`lora.py`), textual inversion, full fine-tuning
and VAE training, on the shared base (`base.py`: loading, optimizer, checkpoints, randomness) and the diffusion
objective (`diffusion.py`, `objective.py`, `losses.py`)."""

from sdtune.finetune.base import LRSchedule, ModelFineTune
from sdtune.finetune.diffusion import DiffusionFineTune
from sdtune.finetune.full import FullFineTune
from sdtune.finetune.lora import LoRAFineTune
from sdtune.finetune.objective import Objective
from sdtune.finetune.textual_inversion import TextualInversion
from sdtune.finetune.vae import VAEFineTune

# The methods by the class path their checkpoints record, for readers of checkpoints (sdtune export).
METHODS = {f"{cls.__module__}.{cls.__qualname__}": cls for cls in (LoRAFineTune, TextualInversion, FullFineTune, VAEFineTune)}

__all__ = ["METHODS", "DiffusionFineTune", "FullFineTune", "LoRAFineTune", "LRSchedule", "ModelFineTune", "Objective",
           "TextualInversion", "VAEFineTune"]  # fmt: skip
