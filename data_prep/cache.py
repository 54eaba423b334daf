"""`sdtune prep cache`: precompute VAE latent distributions and text-encoder outputs, for training to skip both encoders.

Per image, the VAE posterior's mean and std (unscaled: no scaling or shift factor applied; stored as float32) at
the image's bucket size (resized with LANCZOS to cover the bucket, then centre-cropped), and with `flip` also for the
mirrored image. Training draws `mean + std * eps` and then scales, exactly as encoding on the fly does
(`sdtune.data.cache.index.sample_latents`). Per distinct caption (and always the empty caption, for caption dropout),
the text encoder's output for `sdtune.models.text.tokenize_chunks` ids: (chunks·model_max_length)×width, float32.

The files are laid out as `sdtune.data.cache.index` describes, one folder per VAE + text encoder + tokenizer; each
entry is named by a key over everything its tensors depend on (`sdtune.data.cache.keys`), so a changed input gives a
new key, never a stale entry. Entries are written to a temporary file and renamed, so an interrupted run leaves only
complete entries and a rerun computes only the rest. Old entries are never deleted (switching settings back reuses
them); delete DST/cache to reclaim the space. One `prep cache` at a time writes a DST/cache (`sdtune.runlock`): a
second one on it refuses.

Training with a cache cannot apply per-step image or caption randomness: random crops, tag shuffling or dropout,
and random flips unless the cache was built with `--flip` (the manifest's settings say "flip": false otherwise).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_prep.dataset import DEFAULT_AREA, fill_bucket, load_folder, read_size
from sdtune.data.buckets import format_bucket, make_buckets, parse_bucket
from sdtune.data.cache.encode import DTYPES, Encoders, SourceImage, compute_latents, compute_text
from sdtune.data.cache.index import CacheIndex, CacheRow, cache_root, write_index
from sdtune.data.cache.keys import FORMAT, digest, file_hash, latent_key, model_folder, model_identity, text_key
from sdtune.errors import SdtuneError
from sdtune.models.families import vae_scale_factor
from sdtune.models.pretrained import model_family
from sdtune.runlock import RunLock

CROPS = ("center",)  # a random crop differs every step; it cannot be cached


@dataclass(frozen=True)
class CacheSettings:
    """How images and captions are encoded. `resolution` (square) wins over buckets; without either `area`, the
    bucket comes from DST/metadata.jsonl (`sdtune prep build` writes it) or else from DEFAULT_AREA."""

    area: int | None = None
    resolution: int | None = None
    bucket_step: int = 64
    crop: str = "center"
    flip: bool = False
    clip_skip: int = 1
    max_token_length: int = 75
    batch_size: int = 8
    dtype: str = "float32"  # compute dtype of VAE and text encoder; entries are stored as float32 regardless
    device: str | None = None  # None: cuda if available, else cpu

    def check(self) -> None:
        if self.crop not in CROPS:
            raise SdtuneError(
                f"prep cache: crop must be one of {', '.join(CROPS)} "
                f"(a random crop cannot be cached), got '{self.crop}'"
            )
        for name in ("area", "resolution"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise SdtuneError(f"prep cache: {name} must be positive, got {value}")
        for name in ("bucket_step", "clip_skip", "batch_size", "max_token_length"):
            if getattr(self, name) < 1:
                raise SdtuneError(f"prep cache: {name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise SdtuneError(f"prep cache: dtype must be one of {', '.join(DTYPES)}, got '{self.dtype}'")

    @property
    def bucket_source(self) -> str:
        if self.resolution is not None:
            return f"resolution {self.resolution}"
        if self.area is not None:
            return f"area {self.area}, step {self.bucket_step}"
        return f"metadata.jsonl, else area {DEFAULT_AREA}, step {self.bucket_step}"


def _scan(dst: Path, settings: CacheSettings) -> list[SourceImage]:
    """Every image of DST (any layout `load_folder` reads) with its caption, bucket and content hash."""
    entries = load_folder(dst, setting="DST")
    buckets = make_buckets(settings.area or DEFAULT_AREA, settings.bucket_step) if settings.resolution is None else []
    images = []
    for entry in tqdm(entries, desc="hashing images", unit="image", file=sys.stderr, disable=None):
        if settings.resolution is not None:
            bucket = (settings.resolution, settings.resolution)
        else:  # the bucket in metadata.jsonl, unless --area; else from the image's upright size
            if entry.width is None or entry.height is None:
                read_size(entry)
            if entry.problem:
                raise SdtuneError(f"prep cache: image '{entry.file_name}' is {entry.problem}; fix or remove it")
            fill_bucket(entry, buckets, recompute=settings.area is not None)
            bucket = parse_bucket(entry.bucket)
        images.append(SourceImage(entry.file_name, entry.path, entry.text, bucket, file_hash(entry.path)))
    return images


def _vae_facts(pretrained: str, revision: str | None, settings: CacheSettings, images: list[SourceImage]) -> dict:
    """The manifest's VAE numbers, from its config.json, after checking settings and buckets against the model."""
    folder = model_folder(pretrained, revision)[1]
    vae_config = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
    layers = json.loads((folder / "text_encoder" / "config.json").read_text(encoding="utf-8")).get("num_hidden_layers")
    if layers is not None and settings.clip_skip > layers:
        raise SdtuneError(
            f"prep cache: --clip-skip {settings.clip_skip} is more than the text encoder's {layers} layers"
        )
    scale = vae_scale_factor(vae_config)
    bad = next((image for image in images if any(side % scale for side in image.bucket)), None)
    if bad is not None:
        raise SdtuneError(
            f"prep cache: bucket {format_bucket(bad.bucket)} of '{bad.file_name}' is not a multiple of the VAE's "
            f"{scale} pixels per latent; pick another --resolution / --area / --bucket-step"
        )
    return {
        "scaling_factor": vae_config.get("scaling_factor", 0.18215),
        "shift_factor": vae_config.get("shift_factor") or 0.0,
        "vae_scale_factor": scale,
        "latent_channels": vae_config.get("latent_channels", 4),
    }


def build_cache(
    dst: str | Path, pretrained: str, revision: str | None = None, settings: CacheSettings = CacheSettings()
) -> CacheIndex:
    """Compute the missing entries for every image and caption of DST, then rewrite index.jsonl and manifest.json.

    Returns the index with `counts` of computed and reused entries. Raises SdtuneError for a missing DST, an
    unusable model or settings, unreadable images, and a DST/cache another process is writing.
    """
    settings.check()
    dst = Path(dst).expanduser()
    if not dst.is_dir():
        raise SdtuneError(f"prep cache: DST '{dst}' {'is not a folder' if dst.exists() else 'does not exist'}")
    with RunLock(dst / "cache"):  # a second run would delete this one's temporary files as leftovers
        return _build(dst, pretrained, revision, settings)


def _build(dst: Path, pretrained: str, revision: str | None, settings: CacheSettings) -> CacheIndex:
    encoders = Encoders(pretrained, revision, settings.dtype, settings.device)
    identity = model_identity(pretrained, revision)
    if identity.get("vae") is None:  # a Hub model not downloaded yet: load it (downloads if allowed), then look again
        encoders.parts
        identity = model_identity(pretrained, revision)
    model_key = digest(identity)
    stored = model_family(pretrained, revision).text_cache_dtype
    images = _scan(dst, settings)
    root = cache_root(dst, model_key)
    for folder in ("latents", "text"):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for leftover in (root / folder).glob(".*.tmp"):  # from a run that was killed mid-write
            leftover.unlink(missing_ok=True)

    orientations = (False, True) if settings.flip else (False,)
    rows, latent_work, text_work = [], {}, {}
    empty = text_key(model_key, "", settings.clip_skip, settings.max_token_length, settings.dtype, stored)
    text_work[empty] = ""
    for image in images:
        keys = {
            flip: latent_key(model_key, image.content, image.bucket, settings.crop, flip, settings.dtype)
            for flip in orientations
        }
        for flip, key in keys.items():
            latent_work.setdefault(key, (image, flip))
        caption_key = text_key(model_key, image.caption, settings.clip_skip, settings.max_token_length, settings.dtype, stored)
        text_work.setdefault(caption_key, image.caption)
        rows.append(CacheRow(image.file_name, image.caption, image.bucket, keys[False], keys.get(True), caption_key))

    index = CacheIndex(root, {}, rows)
    missing_latents = [
        (key, *work) for key, work in latent_work.items() if not index.entry_path("latent", key).is_file()
    ]
    missing_text = [(key, caption) for key, caption in text_work.items() if not index.entry_path("text", key).is_file()]
    counts = {
        "latents_computed": len(missing_latents), "latents_reused": len(latent_work) - len(missing_latents),
        "text_computed": len(missing_text), "text_reused": len(text_work) - len(missing_text),
    }
    vae_facts = _vae_facts(pretrained, revision, settings, images)
    if missing_text:
        from sdtune.models.text import chunk_count

        chunk_count(encoders.tokenizer, settings.max_token_length, "--max-token-length")
    total = len(missing_latents) + len(missing_text)
    with tqdm(total=total, desc="encoding", unit="entry", file=sys.stderr, disable=None) as bar:
        if missing_latents:
            compute_latents(encoders, index, missing_latents, settings.batch_size, settings.crop, bar)
        if missing_text:
            compute_text(
                encoders, index, missing_text, settings.batch_size, settings.clip_skip, settings.max_token_length, bar
            )

    manifest: dict[str, Any] = {
        "format": FORMAT,
        "model_key": model_key,
        "model": identity,
        "settings": {**asdict(settings), "bucket_source": settings.bucket_source},
        "storage_dtype": "float32",
        **vae_facts,
        "empty_text": empty,
        "images": len(rows),
    }
    write_index(root, rows, manifest)
    index.manifest, index.counts = manifest, counts
    return index


EXAMPLES = """examples:
  sdtune prep cache data/my_dog --model runwayml/stable-diffusion-v1-5 --flip
  sdtune prep cache data/shapes --model sdtune:toy --resolution 32 --batch-size 16

Without --flip only the upright images are cached (flip=false in the manifest): training with random_flip cannot
use such a cache. Without --resolution / --area, buckets come from DST/metadata.jsonl (sdtune prep build), else
from --area's default 262144 (512x512).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dst", metavar="DST", help="a built dataset (sdtune prep build) or any imagefolder")
    parser.add_argument("--model", required=True, metavar="PRETRAINED", help="diffusers model directory or Hub id")
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--area", type=int, help=f"bucket pixel area, overrides metadata.jsonl (default: its buckets or {DEFAULT_AREA})"
    )
    size.add_argument("--resolution", type=int, help="one square size for every image instead of buckets")
    parser.add_argument("--bucket-step", type=int, default=64, help="bucket sides' multiple (default: %(default)s)")
    parser.add_argument("--flip", action="store_true", help="also cache mirrored images, so training may flip randomly")
    parser.add_argument("--crop", choices=CROPS, default="center", help="crop to the bucket (default: %(default)s)")
    parser.add_argument(
        "--clip-skip", type=int, default=1, help="text-encoder layer from the end, A1111 style (default: %(default)s)"
    )
    parser.add_argument("--max-token-length", type=int, default=75, help="75, 150 or 225 (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="images or captions per call (default: %(default)s)")
    parser.add_argument(
        "--dtype", choices=tuple(DTYPES), default="float32", help="compute dtype; entries are saved as float32 (T5 models' text as float16)"
    )
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")


def run(args: argparse.Namespace) -> int:
    settings = CacheSettings(
        area=args.area, resolution=args.resolution, bucket_step=args.bucket_step, crop=args.crop, flip=args.flip,
        clip_skip=args.clip_skip, max_token_length=args.max_token_length, batch_size=args.batch_size,
        dtype=args.dtype, device=args.device,
    )
    index = build_cache(args.dst, args.model, revision=args.revision, settings=settings)
    counts = index.counts
    buckets = len({row.bucket for row in index.rows})
    print(f"cached {len(index.rows)} images ({buckets} bucket{'s' if buckets != 1 else ''}) in {index.root}")
    print(f"computed {index.computed}, reused {index.reused} "
          f"(latents: computed {counts['latents_computed']}, reused {counts['latents_reused']}; "
          f"text: computed {counts['text_computed']}, reused {counts['text_reused']})")
    if settings.flip:
        print("flip=true: mirrored latents cached, training may use random_flip")
    else:
        print("flip=false: no mirrored latents; training with random_flip cannot use this cache (rerun with --flip)")
    return 0
