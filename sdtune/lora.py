"""LoRA on the UNet through peft's diffusers integration, and saving it in the diffusers format.

`unet.add_adapter(LoraConfig)` names parameters the way diffusers expects, so the saved file loads with
`StableDiffusionPipeline.load_lora_weights`. The adapter's peft config (rank, alpha, targets) is stored in the
file's metadata, which is how alpha ≠ rank survives the round trip.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from sdtune.errors import SdtuneError

ADAPTER_WEIGHTS = "pytorch_lora_weights.safetensors"


@dataclass
class LoraSettings:
    """LoRA adapter shape. The update added to a weight W is (alpha / rank) · B·A with A: rank×in, B: out×rank."""

    rank: int = 16
    """Inner dimension of the low-rank update; larger learns more and costs more memory."""
    alpha: float = 16.0
    """Scale numerator: the update is multiplied by alpha / rank (alpha = rank gives scale 1)."""
    dropout: float = 0.0
    """Dropout on the LoRA branch input during training."""
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """UNet module names (or name suffixes) that get an adapter; the default is every attention projection."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise SdtuneError(f"model.lora.rank must be ≥ 1, got {self.rank}")
        if self.alpha <= 0:
            raise SdtuneError(f"model.lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise SdtuneError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise SdtuneError("model.lora.target_modules is empty; name at least one UNet module (e.g. to_q)")


def add_unet_lora(unet: UNet2DConditionModel, settings: LoraSettings) -> None:
    """Freeze the UNet and attach a trainable LoRA adapter named "default"; its B starts at zero (no-op at step 0)."""
    names = [name for name, _ in unet.named_modules()]
    missing = [t for t in settings.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise SdtuneError(f"model.lora.target_modules: no UNet module named {', '.join(missing)} (e.g. to_q, to_k, to_v, to_out.0, proj_in, ff.net.2)")
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=settings.rank,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            init_lora_weights="gaussian",
            target_modules=list(settings.target_modules),
        )
    )
    # peft leaves the new parameters in the base dtype; under mixed precision they must train in fp32.
    for param in unet.parameters():
        if param.requires_grad:
            param.data = param.data.float()


def unet_lora_state_dict(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The adapter's tensors in peft naming (`…to_q.lora_A.weight`), without the "unet." prefix.

    Not diffusers' older `lora.down`/`lora.up` naming: with both attention and conv targets, diffusers 0.42 loads
    only the conv half of such a file (tests/test_adapter_export.py catches it).
    """
    return get_peft_model_state_dict(unet)


def save_diffusers_adapter(unet: UNet2DConditionModel, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write `out_dir/pytorch_lora_weights.safetensors`, loadable by `pipeline.load_lora_weights(out_dir)`."""
    out_dir = Path(out_dir)
    layers = {k: v.detach().to("cpu", dtype).contiguous() for k, v in unet_lora_state_dict(unet).items()}
    StableDiffusionPipeline.save_lora_weights(
        save_directory=out_dir,
        unet_lora_layers=layers,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        weight_name=ADAPTER_WEIGHTS,
    )
    return out_dir / ADAPTER_WEIGHTS
