"""Prompt tokenisation beyond CLIP's 77-token window, the way AUTOMATIC1111 and kohya do it.

CLIP only ever sees `model_max_length` tokens at once (77 for SD1/2: BOS, 75 text tokens, EOS). Longer prompts are
cut into windows of `model_max_length - 2` text tokens; each window becomes its own [BOS] + window + [EOS] row,
the text encoder runs on every row, and the model concatenates the hidden states. One chunk reproduces exactly
what `tokenizer(caption, padding="max_length", truncation=True)` gives, so 75 tokens behaves as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from sdtune.errors import SdtuneError


def chunk_count(tokenizer: Any, max_tokens: int, setting: str = "data.max_token_length") -> int:
    """How many windows `max_tokens` text tokens fill; a partial window would waste a whole encoder pass."""
    window = tokenizer.model_max_length - 2
    if max_tokens < 1 or max_tokens % window:
        raise SdtuneError(
            f"{setting} must be a multiple of {window} ({window}, {2 * window}, {3 * window}), got {max_tokens}"
        )
    return max_tokens // window


def text_token_ids(tokenizer: Any, captions: Sequence[str]) -> list[list[int]]:
    """Token ids without BOS/EOS and without truncation (`verbose=False`: over-long captions are expected here)."""
    if not captions:
        return []
    return tokenizer(list(captions), add_special_tokens=False, truncation=False, verbose=False).input_ids


def caption_ids(tokenizer: Any, max_tokens: int, caption: str) -> torch.LongTensor:
    """`caption`'s (chunks, model_max_length) ids, as training feeds them to the text encoder (picklable with
    functools.partial, for DataLoader workers)."""
    return tokenize_chunks(tokenizer, caption, max_tokens)[0]


def tokenize_chunks(
    tokenizer: Any, caption: str, max_tokens: int, setting: str = "data.max_token_length"
) -> tuple[torch.LongTensor, bool]:
    """`caption` as a (chunks, model_max_length) id tensor, and whether text beyond `max_tokens` was cut off.

    Every chunk, even an empty one, is a full [BOS] ... [EOS] row padded with the tokenizer's pad id, so the batch
    shape is fixed by the setting alone and never by the captions in it.
    """
    chunks = chunk_count(tokenizer, max_tokens, setting)
    length = tokenizer.model_max_length
    window = length - 2
    ids = text_token_ids(tokenizer, [caption])[0]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = torch.full((chunks, length), pad, dtype=torch.long)
    for chunk in range(chunks):
        row = [tokenizer.bos_token_id, *ids[chunk * window : (chunk + 1) * window], tokenizer.eos_token_id]
        out[chunk, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out, len(ids) > chunks * window
