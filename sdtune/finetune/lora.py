"""LoRA (or DoRA) fine-tuning: adapters on the UNet and, optionally, the text encoder; the base stays frozen."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdtune.errors import SdtuneError
from sdtune.finetune.base import DiffusionFineTune, as_settings
from sdtune.lora import LoraSettings, TextEncoderLora, add_lora, save_diffusers_adapter
from sdtune.lora_init import load_init_adapter


class LoRAFineTune(DiffusionFineTune):
    """Stable Diffusion with a peft LoRA adapter on the UNet (and the text encoder if asked) as the only weights that
    train. Saves `adapter/pytorch_lora_weights.safetensors`, which diffusers' `load_lora_weights` reads.

    Args:
        pretrained: Diffusers model directory or Hugging Face Hub id, e.g. stable-diffusion-v1-5/stable-diffusion-v1-5.
        lora: UNet adapter: rank, alpha, dropout, targets, DoRA, conv rank/alpha (LoCon).
        text_encoder_lora: Text-encoder adapter with its own learning rate; null keeps the text encoder frozen. For
            SDXL it adapts both text encoders, with the same settings.
        init_adapter: A LoRA whose weights start training: an sdtune/diffusers adapter folder or
            pytorch_lora_weights.safetensors, or a kohya/AUTOMATIC1111 .safetensors; its ranks must match model.lora
            (and model.text_encoder_lora). Its alpha may differ: the weights are rescaled to the same update.
            A checkpoint given with --ckpt_path overrides these weights.
        **kwargs: The options every fine-tune shares (pretrained, optimizer, lr_schedule, objective, …).
    """

    mismatch_hint = "model.lora.rank or target modules differ from the run that wrote it"

    def __init__(
        self,
        pretrained: str,
        lora: LoraSettings = LoraSettings(),
        text_encoder_lora: TextEncoderLora | None = None,
        init_adapter: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(pretrained=pretrained, **kwargs)
        self.lora = as_settings(LoraSettings, lora)
        self.text_encoder_lora = as_settings(TextEncoderLora, text_encoder_lora)
        self.init_adapter = None if init_adapter is None else str(init_adapter)
        if self.init_adapter is not None and self.is_sdxl:
            raise SdtuneError("model.init_adapter is not supported for SDXL models yet; train from a fresh adapter")
        self._record_hparams(lora=self.lora, text_encoder_lora=self.text_encoder_lora, init_adapter=self.init_adapter)
        add_lora(self.unet, self.lora)
        if self.text_encoder_lora is not None:  # on both of SDXL's text encoders, as kohya's sdxl_train_network
            for encoder in self.text_encoders:
                add_lora(encoder, self.text_encoder_lora)
        if self.init_adapter is not None:
            load_init_adapter(self.init_adapter, self.unet, self.text_encoder, self.lora, self.text_encoder_lora)

    def parameter_groups(self) -> list[dict[str, Any]]:
        groups = super().parameter_groups()
        if self.text_encoder_lora is not None:
            groups += self.text_encoder_groups(self.text_encoder_lora.lr)
        return groups

    def save_weights(self, out_dir: str | Path) -> Path:
        """Write the adapter(s) in the diffusers format (`pytorch_lora_weights.safetensors`)."""
        if self.text_encoder_lora is None:
            return save_diffusers_adapter(self.unet, out_dir)
        return save_diffusers_adapter(self.unet, out_dir, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2)
