"""Computing `sdtune prep cache` entries: the VAE posterior of an image at its bucket, the text encoder's output of
a caption, each saved as one safetensors file (float32, whatever the compute dtype)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from sdtune.data.buckets import Bucket, format_bucket
from sdtune.data.cache.index import CacheIndex, write_atomic
from sdtune.data.images import IMAGE_ERRORS, open_image
from sdtune.data.transforms import Geometry, to_tensor
from sdtune.errors import SdtuneError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class SourceImage:
    """An image to cache: where it is, its caption, its bucket and the hash of its bytes. `opened` is what
    `PIL.Image.open` reads when that is not `path` (a row of a saved dataset: its bytes)."""

    file_name: str
    path: Path
    caption: str
    bucket: Bucket
    content: str
    opened: Callable[[], str | IO[bytes]] | None = None


def cover_geometry(size: tuple[int, int], bucket: Bucket, flip: bool = False) -> Geometry:
    """Resize to cover `bucket` keeping the aspect ratio, centre-crop to it: training's geometry with center_crop."""
    return Geometry.plan(size, bucket, True, flip, (0.5, 0.5))


def cache_pixels(path: str | Path | IO[bytes], bucket: Bucket, flip: bool = False) -> torch.Tensor:
    """The 3×H×W pixels in [-1, 1] that a cache entry encodes (alpha becomes white, as in training)."""
    image = open_image(path)
    return to_tensor(cover_geometry(image.size, bucket, flip).apply(image))


class Encoders:
    """VAE, text encoder and tokenizer, loaded on first use: a rerun with nothing to compute never loads them."""

    def __init__(self, pretrained: str, revision: str | None, dtype: str, device: str | None) -> None:
        self.pretrained, self.revision, self.dtype, self.device = pretrained, revision, dtype, device
        self._parts = None
        self._tokenizer = None

    @property
    def tokenizer(self):
        """The tokenizer alone (cheap), to check settings before loading any weights."""
        if self._parts is not None:
            return self._parts.tokenizer
        if self._tokenizer is None:
            from sdtune.models.pretrained import load_tokenizer

            self._tokenizer = load_tokenizer(self.pretrained, revision=self.revision)
        return self._tokenizer

    @property
    def parts(self):
        if self._parts is None:
            from sdtune.models.pretrained import load_model

            # The denoiser is not needed: at SD1.5 size it would add 3.4 GB (in float32) to the peak while encoding.
            dtype = DTYPES[self.dtype]
            parts = load_model(self.pretrained, revision=self.revision, dtype=dtype, load_denoiser=False)
            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            for module in (parts.vae, *parts.text_encoder_list):
                module.to(device).eval().requires_grad_(False)
            self._parts = parts
        return self._parts


def _encode_latents(vae: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels B×3×H×W in [-1, 1] → the posterior's unscaled (mean, std)."""
    posterior = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return posterior.mean, posterior.std


def _save_entry(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], hidden_dtype: str = "float32") -> None:
    """Float32 tensors, but "hidden" in `hidden_dtype` (float16 for T5 sequences)."""
    stored = {name: t.detach().to("cpu", DTYPES[hidden_dtype] if name == "hidden" else torch.float32).contiguous()
              for name, t in tensors.items()}  # fmt: skip
    write_atomic(path, lambda temporary: save_file(stored, str(temporary), metadata))


def _batches(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _pixels(image: SourceImage, bucket: Bucket, flip: bool) -> torch.Tensor:
    try:
        return cache_pixels(image.opened() if image.opened else image.path, bucket, flip)
    except IMAGE_ERRORS as err:
        raise SdtuneError(f"prep cache: image '{image.file_name}' could not be read ({err}); fix or remove it") from err


def compute_latents(
    encoders: Encoders, index: CacheIndex, work: list[tuple[str, SourceImage, bool]], batch_size: int, crop: str,
    bar: tqdm,
) -> None:
    """Encode and save each (key, image, flip) of `work`, one bucket per batch."""
    vae = encoders.parts.vae
    work = sorted(work, key=lambda item: (item[1].bucket, item[1].file_name, item[2]))
    by_bucket: dict[Bucket, list] = {}
    for item in work:
        by_bucket.setdefault(item[1].bucket, []).append(item)
    with torch.no_grad():
        for bucket, items in by_bucket.items():
            for batch in _batches(items, batch_size):
                pixels = torch.stack([_pixels(image, bucket, flip) for _, image, flip in batch])
                means, stds = _encode_latents(vae, pixels)
                for (key, image, flip), mean, std in zip(batch, means, stds):
                    metadata = {"kind": "latent", "file_name": image.file_name, "content": image.content,
                                "bucket": format_bucket(bucket), "flip": str(flip).lower(), "crop": crop}
                    _save_entry(index.entry_path("latent", key), {"mean": mean, "std": std}, metadata)
                bar.update(len(batch))


def compute_text(
    encoders: Encoders, index: CacheIndex, work: list[tuple[str, str]], batch_size: int, clip_skip: int,
    max_token_length: int, bar: tqdm,
) -> None:
    """Encode and save each (key, caption) of `work`: each tokenizer's ids as the family tokenizes, then the family's
    `encode_prompt` at `clip_skip`. An entry holds "hidden" (tokens×width, in the family's text_cache_dtype) and,
    for SDXL, SD3 and Flux, "pooled"."""
    from sdtune.models.text import tokenize_chunks

    parts = encoders.parts
    family, tokenizers, text_encoders = parts.family, parts.tokenizer_list, parts.text_encoder_list
    with torch.no_grad():
        for batch in _batches(work, batch_size):
            per_caption = [family.tokenize(tokenizers, caption, max_token_length) for _, caption in batch]
            ids = [torch.stack(rows) for rows in zip(*per_caption)]
            text = family.encode_prompt(text_encoders, ids, clip_skip)
            for i, (key, caption) in enumerate(batch):
                truncated = tokenize_chunks(tokenizers[0], caption, max_token_length, "--max-token-length")[1]
                metadata = {"kind": "text", "caption": caption, "clip_skip": str(clip_skip),
                            "max_token_length": str(max_token_length), "truncated": str(truncated).lower()}
                tensors = {"hidden": text.hidden[i]} | ({"pooled": text.pooled[i]} if text.pooled is not None else {})
                _save_entry(index.entry_path("text", key), tensors, metadata, family.text_cache_dtype)
            bar.update(len(batch))
