"""LoRA (or DoRA) fine-tuning: adapters on the UNet and, optionally, the text encoder; the base stays frozen."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdtune.finetune.base import DiffusionFineTune, _as
from sdtune.lora import LoraSettings, TextEncoderLora, add_lora, save_diffusers_adapter


class LoRAFineTune(DiffusionFineTune):
    """Stable Diffusion with a peft LoRA adapter on the UNet (and the text encoder if asked) as the only weights that
    train. Saves `adapter/pytorch_lora_weights.safetensors`, which diffusers' `load_lora_weights` reads.

    Args:
        pretrained: Diffusers model directory or Hugging Face Hub id, e.g. stable-diffusion-v1-5/stable-diffusion-v1-5.
        lora: UNet adapter: rank, alpha, dropout, targets, DoRA, conv rank/alpha (LoCon).
        text_encoder_lora: Text-encoder adapter with its own learning rate; null keeps the text encoder frozen.
        **kwargs: The options every fine-tune shares (pretrained, optimizer, lr_schedule, objective, …).
    """

    mismatch_hint = "model.lora.rank or target modules differ from the run that wrote it"

    def __init__(
        self,
        pretrained: str,
        lora: LoraSettings = LoraSettings(),
        text_encoder_lora: TextEncoderLora | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(pretrained=pretrained, **kwargs)
        self.lora = _as(LoraSettings, lora)
        self.text_encoder_lora = _as(TextEncoderLora, text_encoder_lora)
        self._record_hparams(lora=self.lora, text_encoder_lora=self.text_encoder_lora)
        add_lora(self.unet, self.lora)
        if self.text_encoder_lora is not None:
            add_lora(self.text_encoder, self.text_encoder_lora)

    def parameter_groups(self) -> list[dict[str, Any]]:
        groups = super().parameter_groups()
        if self.text_encoder_lora is not None:
            group = {"name": "text_encoder", "params": [p for p in self.text_encoder.parameters() if p.requires_grad]}
            if self.text_encoder_lora.lr is not None:
                group["lr"] = self.text_encoder_lora.lr
            groups.append(group)
        return groups

    def save_weights(self, out_dir: str | Path) -> Path:
        """Write the adapter(s) in the diffusers format (`pytorch_lora_weights.safetensors`)."""
        text_encoder = self.text_encoder if self.text_encoder_lora is not None else None
        return save_diffusers_adapter(self.unet, out_dir, text_encoder=text_encoder)
