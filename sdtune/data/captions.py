"""Caption augmentation for tag-style captions ("1girl, red hair, smiling, outdoors"), as kohya sd-scripts does it.

Booru-style captions are unordered tag lists. Shuffling the tags stops the model from tying a concept to a
position, and dropping single tags teaches it to fill in what a prompt leaves out. The first `keep_tokens` tags
(usually the trigger word and the subject) stay put, because the first tokens get the most attention weight.
"""

from __future__ import annotations

import torch


def split_tags(caption: str) -> list[str]:
    """Comma-separated tags, stripped, empties dropped ("a,, b ," -> ["a", "b"])."""
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def with_prefix(caption: str, prefix: str) -> str:
    """The subset's trigger word(s) as the first tag: "sks, <caption>", or just "sks" for an empty caption."""
    prefix = prefix.strip()
    if not prefix:
        return caption
    return f"{prefix}, {caption}" if caption.strip() else prefix


def process_caption(
    caption: str,
    *,
    prefix: str = "",
    shuffle_tags: bool = False,
    keep_tokens: int = 0,
    tag_dropout: float = 0.0,
    generator: torch.Generator | None = None,
) -> str:
    """The caption one sample trains on.

    The prefix is added in front after the tag options, so it is never shuffled or dropped; `keep_tokens` counts
    the caption's own tags. With both tag options off the caption is returned as written (only the prefix added),
    so plain-sentence captions are not rewritten.

    A permutation and one uniform per free tag are always drawn (when there is a generator), so turning shuffling
    on or off leaves the dropped tags unchanged and vice versa. Drop decisions belong to the tags' written
    positions; the permutation then orders whatever survived.
    """
    if generator is None:
        if shuffle_tags or tag_dropout > 0:
            raise ValueError("shuffling or dropping tags needs a torch.Generator")
        return with_prefix(caption, prefix)
    tags = split_tags(caption)
    kept, free = tags[:keep_tokens], tags[keep_tokens:]
    order = torch.randperm(len(free), generator=generator).tolist()
    drops = torch.rand(len(free), generator=generator).tolist()
    if not shuffle_tags and tag_dropout <= 0:
        return with_prefix(caption, prefix)
    if not shuffle_tags:
        order = list(range(len(free)))
    survivors = [free[i] for i in order if drops[i] >= tag_dropout]
    return with_prefix(", ".join(kept + survivors), prefix)
