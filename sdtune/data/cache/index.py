"""Reading a cache `sdtune prep cache` built (what training imports), and the index files it writes.

Layout, under DST/cache/<model_key[:16]>/ (one folder per VAE + text encoder + tokenizer):
    latents/<key>.safetensors   tensors "mean", "std" (C×H/f×W/f) + str metadata (file_name, bucket, flip, ...)
    text/<key>.safetensors      tensor "hidden" (chunks·L×width) + str metadata (caption, clip_skip, ...)
    index.jsonl                 per image: file_name, caption, bucket, latent, latent_flip, text (entry keys)
    manifest.json               model identity, settings of the last run, scaling/shift factors, index digest

Every file is written to a hidden temporary file and renamed, so readers only ever see whole files.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor
from safetensors import safe_open

from sdtune.data.buckets import Bucket, format_bucket, parse_bucket
from sdtune.data.cache.keys import digest, model_identity
from sdtune.errors import SdtuneError


@dataclass(frozen=True)
class CacheRow:
    """One image of the cache index: its caption, bucket (width, height) and entry keys."""

    file_name: str
    caption: str
    bucket: Bucket
    latent: str
    latent_flip: str | None
    text: str

    def to_json(self) -> str:
        return json.dumps({"file_name": self.file_name, "caption": self.caption, "bucket": format_bucket(self.bucket),
                           "latent": self.latent, "latent_flip": self.latent_flip, "text": self.text})

    @classmethod
    def from_json(cls, line: str) -> CacheRow:
        row = json.loads(line)
        bucket = parse_bucket(row["bucket"])
        return cls(row["file_name"], row["caption"], bucket, row["latent"], row["latent_flip"], row["text"])


@dataclass
class CacheIndex:
    """A built cache: the rows of index.jsonl, the manifest, and what the run that returned it did.

    `latents(file_name)` gives the unscaled (mean, std); `sample_latents(mean, std, generator, index.scaling_factor,
    index.shift_factor)` turns them into what the UNet trains on. `text(file_name)` gives the text-encoder output.
    """

    root: Path
    manifest: dict[str, Any]
    rows: list[CacheRow]
    counts: dict[str, int] = field(default_factory=dict)  # latents_computed, latents_reused, text_computed, text_reused
    _by_name: dict[str, CacheRow] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._by_name = {row.file_name: row for row in self.rows}

    @property
    def computed(self) -> int:
        return self.counts.get("latents_computed", 0) + self.counts.get("text_computed", 0)

    @property
    def reused(self) -> int:
        return self.counts.get("latents_reused", 0) + self.counts.get("text_reused", 0)

    @property
    def settings(self) -> dict[str, Any]:
        return self.manifest["settings"]

    @property
    def flip(self) -> bool:
        """Whether mirrored latents are cached too; without them training must not flip randomly."""
        return bool(self.settings["flip"])

    @property
    def scaling_factor(self) -> float:
        return float(self.manifest["scaling_factor"])

    @property
    def shift_factor(self) -> float:
        return float(self.manifest["shift_factor"])

    @property
    def empty_text(self) -> str:
        """The key of the empty caption's entry (what caption dropout trains on)."""
        return self.manifest["empty_text"]

    def row(self, file_name: str) -> CacheRow:
        try:
            return self._by_name[file_name]
        except KeyError:
            message = f"prep cache: '{file_name}' is not in the cache at {self.root}; rerun sdtune prep cache"
            raise SdtuneError(message) from None

    def entry_path(self, kind: str, key: str) -> Path:
        return self.root / ("latents" if kind == "latent" else kind) / f"{key}.safetensors"

    def latents(self, file_name: str, flipped: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The unscaled posterior (mean, std) of one image, C×H/f×W/f float32; `flipped` needs a `--flip` cache."""
        row = self.row(file_name)
        key = row.latent_flip if flipped else row.latent
        if key is None:
            raise SdtuneError(f"prep cache: {self.root} has no flipped latents; rebuild it with --flip")
        tensors, _ = load_cache_entry(self.entry_path("latent", key))
        return tensors["mean"], tensors["std"]

    def text(self, file_name: str | None) -> torch.Tensor:
        """The text-encoder output of an image's caption ((chunks·L)×width); None gives the empty caption's."""
        key = self.empty_text if file_name is None else self.row(file_name).text
        return load_cache_entry(self.entry_path("text", key))[0]["hidden"]


def load_cache_entry(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and string metadata of one entry file."""
    with safe_open(str(path), framework="pt") as opened:
        return {name: opened.get_tensor(name) for name in opened.keys()}, dict(opened.metadata() or {})


def sample_latents(
    mean: torch.Tensor,
    std: torch.Tensor,
    generator: torch.Generator | list[torch.Generator] | None,
    scaling_factor: float,
    shift_factor: float = 0.0,
) -> torch.Tensor:
    """A posterior sample, scaled as the UNet expects: `(mean + std * eps - shift) * scale`, eps ~ N(0, 1).

    Same draw as `vae.encode(x).latent_dist.sample(generator)` for the same generator state (or list of per-sample
    generators), so a cached run and an uncached one see the same latents.
    """
    eps = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * eps - shift_factor) * scaling_factor


def cache_root(dst: Path, model_key: str) -> Path:
    """Where `prep cache` keeps DST's entries for one model."""
    return model_cache(dst / "cache", model_key)


def model_cache(cache_folder: Path, model_key: str) -> Path:
    """One model's entries inside a cache folder (DST/cache, or a training run's data.cache_dir)."""
    return cache_folder / model_key[:16]


def _index_digest(index_text: str) -> str:
    return hashlib.blake2b(index_text.encode(), digest_size=16).hexdigest()


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write` on a hidden temporary file next to `path`, then rename it to `path`."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_index(root: Path, rows: list[CacheRow], manifest: dict[str, Any]) -> None:
    """Write index.jsonl, then manifest.json with the index's digest added (`open_cache` checks it)."""
    index_text = "".join(row.to_json() + "\n" for row in rows)
    manifest["index_digest"] = _index_digest(index_text)
    write_atomic(root / "index.jsonl", lambda path: path.write_text(index_text, encoding="utf-8"))
    manifest_text = json.dumps(manifest, indent=2) + "\n"
    write_atomic(root / "manifest.json", lambda path: path.write_text(manifest_text, encoding="utf-8"))


def open_cache(dst: str | Path, pretrained: str, revision: str | None = None) -> CacheIndex:
    """The cache `build_cache` last wrote for this model, without loading the model (for training).

    Raises SdtuneError when there is none for this exact model (another or a changed model has another key) or the
    index does not match its manifest. The caller compares `index.settings` with its own (resolution, clip_skip,
    max_token_length, dtype, flip) and should check `file_hash` of images it doubts; entries are immutable.
    """
    dst = Path(dst).expanduser()
    model_key = digest(model_identity(pretrained, revision))
    root = cache_root(dst, model_key)
    try:
        manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
        index_text = (root / "index.jsonl").read_text(encoding="utf-8")
    except (OSError, ValueError):
        message = (
            f"prep cache: no cache for model '{pretrained}' in '{dst}'; run: sdtune prep cache {dst} --model ..."
        )
        raise SdtuneError(message) from None
    if manifest.get("model_key") != model_key or _index_digest(index_text) != manifest.get("index_digest"):
        raise SdtuneError(f"prep cache: the cache in '{root}' is inconsistent (interrupted run?); rerun prep cache")
    return CacheIndex(root, manifest, [CacheRow.from_json(line) for line in index_text.splitlines()])
