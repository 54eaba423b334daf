"""Textual inversion: only new tokens' embedding rows train, no adapter; the rest of the model stays frozen."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from sdtune.adapters.new_tokens import NewTokens, TokenEmbedding, add_tokens, embedding_group, save_new_tokens
from sdtune.errors import SdtuneError
from sdtune.finetune.base import as_settings
from sdtune.finetune.diffusion import DiffusionFineTune


class TextualInversion(DiffusionFineTune):
    """New tokens, each a trainable embedding row initialised from a word. Writes `adapter/embeddings/` (diffusers'
    load_textual_inversion) and `adapter/embeddings_a1111/` (AUTOMATIC1111).

    Args:
        pretrained: Diffusers model directory or Hugging Face Hub id, e.g. stable-diffusion-v1-5/stable-diffusion-v1-5.
        new_tokens: The tokens to add, each with a trainable embedding row initialised from a word.
        **kwargs: The options every diffusion method shares (revision, optimizer, lr_schedule, objective, …).
    """

    mismatch_hint: ClassVar[str] = "model.new_tokens differ from the run that wrote it"
    fixed_on_resume: ClassVar[tuple[str, ...]] = ("new_tokens.tokens",)

    def __init__(self, pretrained: str, new_tokens: NewTokens, **kwargs: Any) -> None:
        new_tokens = as_settings(NewTokens, new_tokens)
        super().__init__(pretrained=pretrained, **kwargs)
        if not self.family.new_tokens:
            raise SdtuneError(f"model.new_tokens is not supported for {self.family.label} models yet")
        self.new_tokens = new_tokens
        self.token_embedding: TokenEmbedding = add_tokens(self.tokenizer, self.text_encoder, new_tokens)

    @property
    def added_tokens(self) -> dict[str, int]:
        """The tokens this run added to the tokenizer and their ids (the data module adds them to its own)."""
        return dict(zip(self.new_tokens.tokens, self.tokenizer.convert_tokens_to_ids(self.new_tokens.tokens)))

    def parameter_groups(self) -> list[dict[str, Any]]:
        return [embedding_group(self.token_embedding, self.new_tokens)]

    def save_weights(self, out_dir: str | Path) -> Path:
        return save_new_tokens(out_dir, self.new_tokens, self.token_embedding)
