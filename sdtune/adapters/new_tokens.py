"""New tokens for the text encoder: textual inversion, alone or beside a LoRA (pivotal tuning).

Each new token (e.g. "<sks>") is added to the tokenizer as one token and gets one embedding row, which starts as
the mean of its init words' embeddings ("dog") and trains; every other row is the base model's and stays frozen.
The new rows are a parameter of their own (`TokenEmbedding.added`), so the optimizer holds state for them alone,
checkpoints hold only them, and no other row can move, whatever the optimizer does with zero gradients.

They are written beside the adapter in the two formats people load embeddings from: diffusers'
`load_textual_inversion` ({token: rows}) and AUTOMATIC1111's embeddings folder ({"emb_params": rows}, the file
name being the word typed in prompts).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sdtune.errors import SdtuneError

KEY = "model.new_tokens"
DIFFUSERS_DIR, A1111_DIR = "embeddings", "embeddings_a1111"


@dataclass
class NewTokens:
    """Tokens to add to the tokenizer, each with a trainable embedding row."""

    tokens: list[str] = field(default_factory=list)
    """The new tokens, e.g. ["<sks>"]; each must be new to the tokenizer. Write them in your captions and prompts."""
    init_words: list[str] = field(default_factory=list)
    """One per token: its embedding starts as the mean embedding of this word's tokens (e.g. "dog")."""
    lr: float | None = None
    """Learning rate of the new embeddings (textual inversion usually takes 5e-4 to 5e-3); null: the optimizer's."""

    def __post_init__(self) -> None:
        if not self.tokens:
            raise SdtuneError(f"{KEY}.tokens is empty; name at least one new token (e.g. <sks>)")
        if len(self.init_words) != len(self.tokens):
            raise SdtuneError(f"{KEY}: {len(self.tokens)} tokens but {len(self.init_words)} init_words; give one word per token")
        if len(set(self.tokens)) != len(self.tokens):
            raise SdtuneError(f"{KEY}.tokens has duplicates: {self.tokens}")
        bad = [token for token in self.tokens if not token.strip() or any(c.isspace() for c in token)]
        if bad:
            raise SdtuneError(f"{KEY}.tokens: '{bad[0]}' is not one word; a token has no spaces")


class TokenEmbedding(torch.nn.Module):
    """The text encoder's token embedding with rows appended: `weight` (the base rows, frozen) and `added`."""

    def __init__(self, base: torch.nn.Embedding, added: torch.Tensor) -> None:
        super().__init__()
        self.weight = base.weight
        self.added = torch.nn.Parameter(added.detach().float().clone())

    @property
    def base_rows(self) -> int:
        return self.weight.shape[0]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        table = torch.cat([self.weight, self.added.to(self.weight.dtype)])
        return F.embedding(input_ids, table)


def add_tokens(tokenizer, text_encoder: torch.nn.Module, settings: NewTokens) -> TokenEmbedding:
    """Add the tokens to `tokenizer` and their rows to `text_encoder` (initialised from the init words)."""
    embedding = text_encoder.get_input_embeddings()
    vocab = tokenizer.get_vocab()
    for token in settings.tokens:
        if token in vocab or token.lower() in vocab or f"{token.lower()}</w>" in vocab:
            raise SdtuneError(f"{KEY}.tokens: '{token}' is already in the tokenizer's vocabulary; pick a new word (e.g. <{token}>)")
    if len(tokenizer) != embedding.weight.shape[0]:
        raise SdtuneError(f"{KEY}: the tokenizer has {len(tokenizer)} tokens but the text encoder {embedding.weight.shape[0]} rows")
    rows = []
    for token, word in zip(settings.tokens, settings.init_words):
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if not ids:
            raise SdtuneError(f"{KEY}.init_words: '{word}' (for {token}) has no tokens")
        rows.append(embedding.weight.detach()[ids].float().mean(dim=0))
    tokenizer.add_tokens(settings.tokens)
    ids = tokenizer.convert_tokens_to_ids(settings.tokens)
    expected = list(range(embedding.weight.shape[0], embedding.weight.shape[0] + len(settings.tokens)))
    if ids != expected:
        raise SdtuneError(f"{KEY}: the tokenizer gave the new tokens ids {ids}, expected {expected}")
    extended = TokenEmbedding(embedding, torch.stack(rows))
    text_encoder.set_input_embeddings(extended)
    return extended


def token_file_name(token: str) -> str:
    """A file name for `token` that every OS accepts ("<sks>" → "sks"); A1111 takes it as the prompt word."""
    name = re.sub(r'[<>:"/\\|?*\s]', "", token)
    return name or "token"


def save_embeddings(out_dir: str | Path, tokens: list[str], rows: torch.Tensor) -> list[Path]:
    """Write each token's row as `embeddings/<name>.safetensors` ({token: 1×width}, diffusers'
    `load_textual_inversion`) and `embeddings_a1111/<name>.safetensors` ({"emb_params": 1×width}, A1111)."""
    out_dir = Path(out_dir)
    written = []
    for token, row in zip(tokens, rows):
        name, vector = token_file_name(token), row.detach().to("cpu", torch.float32).reshape(1, -1).contiguous()
        for folder, tensors in ((DIFFUSERS_DIR, {token: vector}), (A1111_DIR, {"emb_params": vector})):
            (out_dir / folder).mkdir(parents=True, exist_ok=True)
            path = out_dir / folder / f"{name}.safetensors"
            save_file(tensors, str(path), metadata={"format": "pt", "token": token})
            written.append(path)
    return written


def check_embeddings(paths: list[Path], tokens: list[str], rows: torch.Tensor) -> None:
    """Read each written file back with diffusers' textual-inversion reader and compare it with `rows`."""
    from diffusers.loaders.textual_inversion import load_textual_inversion_state_dicts

    expected = {token_file_name(token): (token, row.detach().float().cpu()) for token, row in zip(tokens, rows)}
    for path in paths:
        (state,) = load_textual_inversion_state_dicts([str(path)])
        token, row = expected[path.stem]
        key = token if path.parent.name == DIFFUSERS_DIR else "emb_params"
        if list(state) != [key] or not torch.equal(state[key].reshape(-1), row):
            raise SdtuneError(f"{path}: diffusers does not read back the embedding of {token} that was written")


def token_embedding(text_encoder: torch.nn.Module) -> TokenEmbedding | None:
    """The text encoder's embedding with new rows, or None when it has none."""
    embedding = text_encoder.get_input_embeddings()
    return embedding if isinstance(embedding, TokenEmbedding) else None


def embedding_group(embedding: TokenEmbedding, settings: NewTokens) -> dict:
    """The new rows as an optimizer parameter group of their own: no weight decay (it would pull them to 0), and
    the tokens' own learning rate when set."""
    group = {"name": "embeddings", "params": [embedding.added], "weight_decay": 0.0}
    return group | ({"lr": settings.lr} if settings.lr is not None else {})


def save_new_tokens(out_dir: str | Path, settings: NewTokens, embedding: TokenEmbedding) -> Path:
    """Write the new rows for diffusers and A1111 (each file read back by diffusers' reader); returns the diffusers
    folder."""
    check_embeddings(save_embeddings(out_dir, settings.tokens, embedding.added), settings.tokens, embedding.added)
    return Path(out_dir) / DIFFUSERS_DIR
