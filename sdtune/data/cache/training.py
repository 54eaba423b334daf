"""The cache `sdtune fit --data.cache true` reads: the entries `sdtune prep cache` writes (same keys, same encoding
code), for exactly the images and captions that training uses.

Entries are content-addressed (`sdtune.data.cache.keys`): an entry written by `prep cache` for the same image, bucket,
crop, orientation and model is the one training needs, and the other way round, so neither recomputes the other's
work. Training needs no index: it derives each sample's keys itself and computes whatever is missing (on the first
run), then loads entries per sample.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from sdtune.data.buckets import Bucket
from sdtune.data.cache.encode import Encoders, SourceImage, compute_latents, compute_text
from sdtune.data.cache.index import CacheIndex, load_cache_entry, model_cache
from sdtune.data.cache.keys import digest, file_hash, latent_key, model_identity, text_key
from sdtune.errors import SdtuneError
from sdtune.models.pretrained import model_family

CROP = "center"  # a random crop differs every step; only centre crops are cached
DTYPE = "float32"  # encoders run in float32, so cached latents equal the ones training computes on the fly


@dataclass(frozen=True)
class SampleKeys:
    """The entries one training image uses: its latents upright (and mirrored) and its caption's text output."""

    latent: str
    latent_flip: str | None
    text: str


def content_hash(record) -> str:
    """blake2b of the image's bytes (a file, or a saved dataset row's bytes), as prep cache names images."""
    source = record.open()
    if isinstance(source, str):
        return file_hash(source)
    return hashlib.blake2b(source.getvalue(), digest_size=32).hexdigest()


class TrainingCache:
    """Keys and entries for a list of training records at one bucket size, under `<folder>/cache/<model key>/`."""

    def __init__(
        self, folder: str | Path, pretrained: str, revision: str | None, clip_skip: int, max_token_length: int,
        flip: bool,
    ) -> None:  # fmt: skip
        self.pretrained, self.revision = pretrained, revision
        self.clip_skip, self.max_token_length, self.flip = clip_skip, max_token_length, flip
        self.model_key = digest(model_identity(pretrained, revision))
        self.stored = model_family(pretrained, revision).text_cache_dtype
        # `folder` is the cache folder: DST/cache (where `prep cache` writes), or data.cache_dir.
        self.index = CacheIndex(model_cache(Path(folder).expanduser(), self.model_key), {}, [])
        self.empty_text = self._text_key("")

    def _text_key(self, caption: str) -> str:
        return text_key(self.model_key, caption, self.clip_skip, self.max_token_length, DTYPE, self.stored)

    def keys(self, contents: Sequence[str], captions: Sequence[str], buckets: Sequence[Bucket]) -> list[SampleKeys]:
        def latent(content: str, bucket: Bucket, flip: bool) -> str:
            return latent_key(self.model_key, content, bucket, CROP, flip, DTYPE)

        return [
            SampleKeys(latent(c, b, False), latent(c, b, True) if self.flip else None, self._text_key(t))
            for c, t, b in zip(contents, captions, buckets, strict=True)
        ]

    def build(self, records: Sequence, contents: Sequence[str], captions: Sequence[str], buckets: Sequence[Bucket]) -> dict[str, int]:
        """Compute the entries that do not exist yet; the encoders load only if there is something to compute."""
        keys = self.keys(contents, captions, buckets)
        latent_work: dict[str, tuple[SourceImage, bool]] = {}
        text_work = {self.empty_text: ""}
        for record, content, caption, bucket, key in zip(records, contents, captions, buckets, keys):
            image = SourceImage(record.path, Path(record.path), caption, bucket, content, opened=record.open)
            latent_work.setdefault(key.latent, (image, False))
            if key.latent_flip is not None:
                latent_work.setdefault(key.latent_flip, (image, True))
            text_work.setdefault(key.text, caption)
        missing_latents = [(k, *w) for k, w in latent_work.items() if not self.index.entry_path("latent", k).is_file()]
        missing_text = [(k, t) for k, t in text_work.items() if not self.index.entry_path("text", k).is_file()]
        if missing_latents or missing_text:
            for folder in ("latents", "text"):
                (self.index.root / folder).mkdir(parents=True, exist_ok=True)
            encoders = Encoders(self.pretrained, self.revision, DTYPE, None)
            total = len(missing_latents) + len(missing_text)
            with tqdm(total=total, desc="caching latents and text", unit="entry", file=sys.stderr, disable=None) as bar:
                if missing_latents:
                    compute_latents(encoders, self.index, missing_latents, 8, CROP, bar)
                if missing_text:
                    compute_text(encoders, self.index, missing_text, 8, self.clip_skip, self.max_token_length, bar)
        return {
            "computed": len(missing_latents) + len(missing_text),
            "reused": len(latent_work) + len(text_work) - len(missing_latents) - len(missing_text),
        }

    def latents(self, key: str):
        """The unscaled posterior (mean, std) of an entry."""
        tensors = self._load("latent", key)
        return tensors["mean"], tensors["std"]

    def text(self, key: str):
        """An entry's text outputs: {"text_embeds": hidden states} and, for SDXL, "pooled_text_embeds"."""
        tensors = self._load("text", key)
        return {"text_embeds": tensors["hidden"]} | ({"pooled_text_embeds": tensors["pooled"]} if "pooled" in tensors else {})

    def _load(self, kind: str, key: str):
        from safetensors import SafetensorError

        path = self.index.entry_path(kind, key)
        try:
            return load_cache_entry(path)[0]
        except (OSError, ValueError, SafetensorError) as err:
            raise SdtuneError(f"data.cache: entry {path} is missing or unreadable ({err}); rerun fit to rebuild it") from err
