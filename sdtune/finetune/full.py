"""Full fine-tuning: every denoiser (UNet) weight trains (in float32), the text encoders' too if asked; the VAE
stays frozen."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from sdtune.errors import SdtuneError
from sdtune.finetune.base import ModelFineTune
from sdtune.finetune.diffusion import DiffusionFineTune
from sdtune.models.pretrained import load_inference_scheduler
from sdtune.models.tokenizer_files import save_tokenizer


class FullFineTune(DiffusionFineTune):
    """Stable Diffusion with the whole UNet (and optionally the text encoder) trainable. Saves a complete diffusers
    pipeline folder (`model/`) that `StableDiffusionPipeline.from_pretrained` loads, with the checkpoint's own
    inference scheduler.

    Args:
        pretrained: Diffusers model directory or Hugging Face Hub id, e.g. stable-diffusion-v1-5/stable-diffusion-v1-5,
            or a single-file checkpoint (.safetensors/.ckpt) together with pretrained_config.
        train_text_encoder: Train every weight of the CLIP text encoders too (in float32), e.g. a model trained
            from scratch; fine-tunes usually keep them frozen. T5 (SD3, Flux) always stays frozen.
        text_encoder_lr: The text encoder's learning rate; null uses the optimizer's.
        **kwargs: The options every fine-tune shares (pretrained, optimizer, lr_schedule, objective, …).
    """

    output_dirname: ClassVar[str] = "model"
    mismatch_hint: ClassVar[str] = "it was not written by a full fine-tune of this model"
    fixed_on_resume: ClassVar[tuple[str, ...]] = ("train_text_encoder",)

    def __init__(
        self, pretrained: str, train_text_encoder: bool = False, text_encoder_lr: float | None = None, **kwargs: Any
    ) -> None:
        super().__init__(pretrained=pretrained, **kwargs)
        if text_encoder_lr is not None and not train_text_encoder:
            raise SdtuneError("model.text_encoder_lr is set but model.train_text_encoder is false: set both or neither")
        self.text_encoder_lr = text_encoder_lr
        self.denoiser.requires_grad_(True)
        if train_text_encoder:  # every CLIP; T5 stays frozen
            for name in self.family.trainable_text_encoders():
                getattr(self, name).to(torch.float32).requires_grad_(True)

    @property
    def denoiser_dtype(self) -> torch.dtype:
        # Master weights in float32 whatever weight_dtype says: bf16/fp16 updates of 1e-5 would round away.
        return torch.float32

    def parameter_groups(self) -> list[dict[str, Any]]:
        groups = super().parameter_groups()
        if self.text_encoder_trains:
            groups += self.text_encoder_groups(self.text_encoder_lr)
        return groups

    def save_weights(self, out_dir: str | Path) -> Path:
        """The whole pipeline, with the inference scheduler's prediction type this run trained (if it changed it)."""
        scheduler = load_inference_scheduler(self.pretrained, self.revision, self.pretrained_config)
        return save_pipeline(self, out_dir, self.objective.inference_scheduler(scheduler))


def save_pipeline(module: ModelFineTune, out_dir: str | Path, scheduler=None) -> Path:
    """Write `module`'s components (VAE, text encoders, tokenizers, denoiser) as a diffusers pipeline folder with the
    base model's inference scheduler (or `scheduler`); returns `out_dir`."""
    if scheduler is None:
        scheduler = load_inference_scheduler(module.pretrained, module.revision, module.pretrained_config)
    module.parts.pipeline(scheduler).save_pretrained(out_dir)
    for name in module.family.tokenizers:
        save_tokenizer(getattr(module, name), Path(out_dir) / name)
    return Path(out_dir)
