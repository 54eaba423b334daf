"""LoRA (or DoRA) fine-tuning: adapters on the UNet and, optionally, the text encoder; the base stays frozen."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdtune.errors import SdtuneError
from sdtune.finetune.base import DiffusionFineTune, as_settings
from sdtune.lora import LoraSettings, TextEncoderLora, add_lora, save_diffusers_adapter
from sdtune.lora_init import load_init_adapter
from sdtune.new_tokens import DIFFUSERS_DIR, NewTokens, TokenEmbedding, add_tokens, check_embeddings, save_embeddings


class LoRAFineTune(DiffusionFineTune):
    """Stable Diffusion with a peft LoRA adapter on the UNet (and the text encoder if asked) as the only weights that
    train. Saves `adapter/pytorch_lora_weights.safetensors`, which diffusers' `load_lora_weights` reads.

    Args:
        pretrained: Diffusers model directory or Hugging Face Hub id, e.g. stable-diffusion-v1-5/stable-diffusion-v1-5.
        lora: UNet adapter: rank, alpha, dropout, targets, DoRA, conv rank/alpha (LoCon).
        text_encoder_lora: Text-encoder adapter with its own learning rate; null keeps the text encoder frozen. For
            SDXL it adapts both text encoders, with the same settings.
        new_tokens: Tokens to add to the text encoder, each with a trainable embedding row initialised from a word
            (textual inversion; with the LoRA: pivotal tuning). Written beside the adapter for diffusers'
            load_textual_inversion (`embeddings/`) and AUTOMATIC1111 (`embeddings_a1111/`). `TextualInversion`
            trains them without a LoRA.
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
        new_tokens: NewTokens | None = None,
        init_adapter: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(pretrained=pretrained, **kwargs)
        self._attach(as_settings(LoraSettings, lora), as_settings(TextEncoderLora, text_encoder_lora),
                     as_settings(NewTokens, new_tokens), init_adapter)  # fmt: skip
        self._record_hparams(lora=self.lora, text_encoder_lora=self.text_encoder_lora, new_tokens=self.new_tokens,
                             init_adapter=self.init_adapter)  # fmt: skip

    def _attach(
        self, lora: LoraSettings | None, text_encoder_lora: TextEncoderLora | None, new_tokens: NewTokens | None,
        init_adapter: str | None,
    ) -> None:  # fmt: skip
        """Attach what trains: the adapters (`lora` None: none on the UNet, for TextualInversion) and new tokens."""
        self.lora, self.text_encoder_lora, self.new_tokens = lora, text_encoder_lora, new_tokens
        if lora is None and new_tokens is None:
            raise SdtuneError("model.lora is null and there are no model.new_tokens: nothing would train")
        if self.new_tokens is not None and self.is_sdxl:
            raise SdtuneError("model.new_tokens is not supported for SDXL models yet")
        self.init_adapter = None if init_adapter is None else str(init_adapter)
        if self.init_adapter is not None and self.is_sdxl:
            raise SdtuneError("model.init_adapter is not supported for SDXL models yet; train from a fresh adapter")
        if self.lora is not None:
            add_lora(self.unet, self.lora)
        if self.text_encoder_lora is not None:  # on both of SDXL's text encoders, as kohya's sdxl_train_network
            for encoder in self.text_encoders:
                add_lora(encoder, self.text_encoder_lora)
        if self.init_adapter is not None:
            load_init_adapter(self.init_adapter, self.unet, self.text_encoder, self.lora, self.text_encoder_lora)
        if self.new_tokens is not None:  # after the adapters, which freeze everything else in the text encoder
            add_tokens(self.tokenizer, self.text_encoder, self.new_tokens)

    @property
    def token_embedding(self) -> TokenEmbedding | None:
        """The text encoder's embedding with the new tokens' rows, or None without new tokens."""
        embedding = self.text_encoder.get_input_embeddings()
        return embedding if isinstance(embedding, TokenEmbedding) else None

    @property
    def added_tokens(self) -> list[str]:
        """The tokens this run added to the tokenizer (the data module adds them to its own)."""
        return list(self.new_tokens.tokens) if self.new_tokens is not None else []

    def parameter_groups(self) -> list[dict[str, Any]]:
        groups = super().parameter_groups()
        if self.text_encoder_lora is not None:
            groups += self.text_encoder_groups(self.text_encoder_lora.lr)
        if self.token_embedding is not None:  # in a group of their own, without weight decay (it pulls them to 0)
            added = self.token_embedding.added
            groups = [{**group, "params": [p for p in group["params"] if p is not added]} for group in groups]
            group = {"name": "embeddings", "params": [added], "weight_decay": 0.0}
            groups.append(group | ({"lr": self.new_tokens.lr} if self.new_tokens.lr is not None else {}))
        return groups

    def save_weights(self, out_dir: str | Path) -> Path:
        """Write the adapter(s) in the diffusers format (`pytorch_lora_weights.safetensors`) and the new tokens'
        embeddings beside them, each read back by diffusers' reader."""
        path = Path(out_dir)
        if self.token_embedding is not None:
            rows = self.token_embedding.added
            check_embeddings(save_embeddings(out_dir, self.new_tokens.tokens, rows), self.new_tokens.tokens, rows)
            path = path / DIFFUSERS_DIR
        if self.lora is None:
            return path
        if self.text_encoder_lora is None:
            return save_diffusers_adapter(self.unet, out_dir)
        return save_diffusers_adapter(self.unet, out_dir, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2)


class TextualInversion(LoRAFineTune):
    """Textual inversion: only the new tokens' embedding rows train, no LoRA. Writes `adapter/embeddings/` (diffusers'
    load_textual_inversion) and `adapter/embeddings_a1111/` (AUTOMATIC1111).

    Args:
        pretrained: Diffusers model directory or Hugging Face Hub id, e.g. stable-diffusion-v1-5/stable-diffusion-v1-5.
        new_tokens: The tokens to add, each with a trainable embedding row initialised from a word.
        **kwargs: The options every fine-tune shares (pretrained, optimizer, lr_schedule, objective, …).
    """

    mismatch_hint = "model.new_tokens differ from the run that wrote it"

    def __init__(self, pretrained: str, new_tokens: NewTokens, **kwargs: Any) -> None:
        DiffusionFineTune.__init__(self, pretrained=pretrained, **kwargs)
        self._attach(None, None, as_settings(NewTokens, new_tokens), None)
        self._record_hparams(new_tokens=self.new_tokens)
