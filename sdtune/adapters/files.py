"""Where an adapter's weights are on disk: the file names sdtune writes and reads, and an adapter to apply at a
scale. Plain paths, no torch or peft, so commands check `--adapter` before they import anything heavy."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ADAPTER_WEIGHTS = "pytorch_lora_weights.safetensors"
LYCORIS_WEIGHTS = "lycoris_weights.safetensors"  # a LoHa/LoKr run's adapter (sdtune.adapters.lycoris)


def adapter_file(path: Path) -> Path:
    """The weights file of an adapter given as its folder (its diffusers file, else a LoHa/LoKr run's LyCORIS file)
    or as the file itself."""
    if not path.is_dir():
        return path
    lycoris = path / LYCORIS_WEIGHTS
    return lycoris if lycoris.is_file() and not (path / ADAPTER_WEIGHTS).is_file() else path / ADAPTER_WEIGHTS


@dataclass
class Adapter:
    """A LoRA to apply at `scale`: a folder holding pytorch_lora_weights.safetensors, or the weights file itself."""

    path: Path
    scale: float = 1.0

    @property
    def weights_file(self) -> Path:
        return adapter_file(self.path)
