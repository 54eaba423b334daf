"""The caption part of `sdtune prep check`: empty captions, duplicated captions, and captions over the token limit.

Token counts: with a tokenizer (a model path or Hub id) they come from that model's CLIP tokenizer (exact). Without
it they are estimated (one token per word of up to 10 letters, one more per further 6 letters, one per digit and per
punctuation mark); CLIP splits rare words further, so pass --tokenizer before trusting a borderline count.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from data_prep.check_report import issue
from data_prep.dataset import Entry, quote_names
from sdtune.errors import SdtuneError

_TOKEN_PIECES = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]", re.IGNORECASE)


def estimate_tokens(caption: str) -> int:
    """Approximate CLIP BPE token count (without BOS/EOS): see the module docstring."""
    count = 0
    for piece in _TOKEN_PIECES.findall(caption.lower()):
        if piece[0].isalpha() and len(piece) > 10:
            count += 1 + -(-(len(piece) - 10) // 6)
        else:
            count += 1
    return count


def count_tokens(captions: list[str], tokenizer: str | None) -> list[int]:
    """Token counts per caption: exact with the CLIP tokenizer of `tokenizer` (a model path or Hub id), else estimated."""
    if tokenizer is None:
        return [estimate_tokens(caption) for caption in captions]
    from sdtune.models.pretrained import load_tokenizer  # imports diffusers: only when asked for
    from sdtune.models.text import text_token_ids

    try:
        loaded = load_tokenizer(tokenizer)
    except SdtuneError as err:  # its messages name model.pretrained; here the option is --tokenizer
        raise SdtuneError(f"check --tokenizer: {err}") from err
    return [len(ids) for ids in text_token_ids(loaded, captions)]


@dataclass
class CaptionFindings:
    counts: dict[str, int]  # captioned, empty_captions, duplicate_captions, long_captions
    tokens: dict[str, Any]  # counted_by, max, mean, over_max
    long: list[dict[str, Any]]  # file_name and tokens, longest first
    warnings: list[dict[str, Any]]


def check_captions(good: list[Entry], tokenizer: str | None, max_tokens: int) -> CaptionFindings:
    """Caption numbers and warnings for the readable entries `good`."""
    warnings = []
    empty = [entry.file_name for entry in good if not entry.text]
    captioned = [entry for entry in good if entry.text]
    if empty:
        warnings.append(
            issue(
                "empty_caption",
                f"{len(empty)} image{'s have' if len(empty) != 1 else ' has'} an empty caption "
                f"({quote_names(empty)}); fill them with `sdtune prep caption` or a prefix",
                empty,
            )
        )
    groups: dict[str, list[Entry]] = defaultdict(list)
    for entry in captioned:  # the same words, ignoring case and spacing
        groups[" ".join(entry.text.split()).casefold()].append(entry)
    duplicated = 0
    for group in groups.values():
        if len(group) > 1:
            duplicated += len(group)
            caption, files = group[0].text, [entry.file_name for entry in group]
            message = f"{len(files)} images share the caption {caption!r} ({quote_names(files)})"
            warnings.append(issue("duplicate_caption", message, files))
    tokens = count_tokens([entry.text for entry in captioned], tokenizer)
    long = sorted(
        ({"file_name": e.file_name, "tokens": n} for e, n in zip(captioned, tokens) if n > max_tokens),
        key=lambda item: -item["tokens"],
    )
    if long:
        how = "CLIP tokenizer" if tokenizer else "estimated; pass --tokenizer for exact counts"
        warnings.append(
            issue(
                "long_caption",
                f"{len(long)} caption{'s are' if len(long) != 1 else ' is'} over {max_tokens} tokens ({how}), longest "
                f"{long[0]['file_name']} with {long[0]['tokens']}: CLIP reads only the first 75 unless "
                "data.max_token_length is 150 or 225",
                [item["file_name"] for item in long],
            )
        )
    return CaptionFindings(
        counts={
            "captioned": len(captioned), "empty_captions": len(empty), "duplicate_captions": duplicated,
            "long_captions": len(long),
        },
        tokens={
            "counted_by": "tokenizer" if tokenizer else "estimate",
            "max": max(tokens, default=0),
            "mean": round(sum(tokens) / len(tokens), 2) if tokens else 0.0,
            "over_max": len(long),
        },
        long=long,
        warnings=warnings,
    )
