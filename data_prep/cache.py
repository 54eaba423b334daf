"""`sdtune prep cache`: precompute VAE latent distributions and text-encoder outputs so training skips both encoders.

Per image, the VAE posterior's mean and std (unscaled: no scaling or shift factor applied; stored as float32) at
the image's bucket size (resized with LANCZOS to cover the bucket, then centre-cropped), and with `flip` also for the
mirrored image. Training draws `mean + std * eps` and then scales, exactly as encoding on the fly does
(`sample_latents`). Per distinct caption (and always the empty caption, for caption dropout), the text encoder's
output for `sdtune.text.tokenize_chunks` ids: (chunks·model_max_length)×width, float32.

Layout, under DST/cache/<model_key[:16]>/ (one folder per VAE + text encoder + tokenizer):
    latents/<key>.safetensors   tensors "mean", "std" (C×H/f×W/f) + str metadata (file_name, bucket, flip, ...)
    text/<key>.safetensors      tensor "hidden" (chunks·L×width) + str metadata (caption, clip_skip, ...)
    index.jsonl                 per image: file_name, caption, bucket, latent, latent_flip, text (entry keys)
    manifest.json               model identity, settings of the last run, scaling/shift factors, index digest

An entry's key hashes everything its tensors depend on: the model key (pretrained path or Hub id, revision or the
resolved snapshot commit, VAE / text-encoder / tokenizer file contents, weight files' size and mtime_ns), the
compute dtype, and for latents the image file's bytes (blake2b), bucket, crop and orientation; for text the caption,
clip_skip and max_token_length. A changed input gives a new key, never a stale entry. Entries are written to a
temporary file and renamed, so an interrupted run leaves only complete entries and a rerun computes only the rest.
Old entries are never deleted (switching settings back reuses them); delete DST/cache to reclaim the space.

Training with a cache cannot apply per-step image or caption randomness: random crops, tag shuffling or dropout,
and random flips unless the cache was built with `--flip` (the manifest's settings say "flip": false otherwise).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from sdtune.data.buckets import Bucket, assign_bucket, format_bucket, make_buckets, parse_bucket
from sdtune.data.records import discover_records
from sdtune.data.transforms import Geometry, load_image, to_tensor
from sdtune.errors import SdtuneError

FORMAT = 1
DEFAULT_AREA = 512 * 512
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CROPS = ("center",)  # a random crop differs every step; it cannot be cached
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx")
MODEL_FOLDERS = ("vae", "text_encoder", "tokenizer")


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


@dataclass(frozen=True)
class CacheRow:
    """One image of the cache index: its caption, bucket (width, height) and entry keys."""

    file_name: str
    caption: str
    bucket: Bucket
    latent: str
    latent_flip: str | None
    text: str


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
    generator: torch.Generator | None,
    scaling_factor: float,
    shift_factor: float = 0.0,
) -> torch.Tensor:
    """A posterior sample, scaled as the UNet expects: `(mean + std * eps - shift) * scale`, eps ~ N(0, 1).

    Same draw as `vae.encode(x).latent_dist.sample(generator)` for the same generator state, so a cached run and an
    uncached one see the same latents.
    """
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * eps - shift_factor) * scaling_factor


# --- identity and keys ---------------------------------------------------------------------------------------


def _digest(value: Any) -> str:
    return hashlib.blake2b(json.dumps(value, sort_keys=True).encode(), digest_size=32).hexdigest()


def file_hash(path: str | Path) -> str:
    """blake2b of a file's bytes, read in 1 MiB pieces."""
    digest = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as handle:
        for piece in iter(lambda: handle.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def _folder_identity(folder: Path) -> dict[str, Any]:
    """Weight files by size and mtime_ns (hashing gigabytes on every run is too slow), everything else by content."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if path.name.endswith(WEIGHT_SUFFIXES):
            stat = path.stat()
            files[name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        else:
            files[name] = file_hash(path)
    return files


def _hub_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The local snapshot folder of a Hub model, if it is in the Hugging Face cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "vae/config.json", revision=revision)
    return Path(found).parent.parent if isinstance(found, str) else None


def _model_folder(pretrained: str, revision: str | None) -> tuple[str, Path | None]:
    from sdtune.models.pretrained import _resolve  # validates the path or Hub id with the usual one-line errors

    source = _resolve(pretrained)
    if Path(source).is_dir():
        return source, Path(source)
    return source, _hub_snapshot(source, revision)


def model_identity(pretrained: str, revision: str | None = None) -> dict[str, Any]:
    """What the cached tensors depend on in the model: VAE, text encoder and tokenizer (not the UNet).

    A local directory is named by its absolute path; a Hub id by id, revision and the snapshot commit it resolves
    to offline (None when it is not downloaded yet).
    """
    source, folder = _model_folder(pretrained, revision)
    local = Path(source).is_dir()
    identity: dict[str, Any] = {"pretrained": str(Path(source).resolve()) if local else source, "revision": revision}
    if not local:
        identity["commit"] = folder.name if folder is not None else None
    if folder is not None:
        for name in MODEL_FOLDERS:
            identity[name] = _folder_identity(folder / name) if (folder / name).is_dir() else None
    return identity


def latent_key(model_key: str, content: str, bucket: Bucket, crop: str, flip: bool, dtype: str) -> str:
    return _digest({"kind": "latent", "format": FORMAT, "model": model_key, "image": content, "bucket": list(bucket),
                    "crop": crop, "flip": flip, "resample": "lanczos", "dtype": dtype})


def text_key(model_key: str, caption: str, clip_skip: int, max_token_length: int, dtype: str) -> str:
    return _digest({"kind": "text", "format": FORMAT, "model": model_key, "caption": caption, "clip_skip": clip_skip,
                    "max_token_length": max_token_length, "dtype": dtype})


# --- geometry ------------------------------------------------------------------------------------------------


def upright_size(path: str | Path) -> tuple[int, int]:
    """(width, height) after EXIF orientation, from the header only."""
    with Image.open(path) as opened:
        width, height = opened.size
        orientation = opened.getexif().get(0x0112, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def cover_geometry(size: tuple[int, int], bucket: Bucket, flip: bool = False) -> Geometry:
    """Resize to cover `bucket` keeping the aspect ratio, centre-crop to it; a square bucket equals Geometry.plan."""
    width, height = size
    if bucket[0] == bucket[1]:
        return Geometry.plan(size, bucket[0], True, flip, (0.5, 0.5))
    scale = max(bucket[0] / width, bucket[1] / height)
    resized = (max(bucket[0], round(width * scale)), max(bucket[1], round(height * scale)))
    left, top = (resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2
    return Geometry(resized, (left, top, left + bucket[0], top + bucket[1]), flip)


def cache_pixels(path: str | Path, bucket: Bucket, flip: bool = False) -> torch.Tensor:
    """The 3×H×W pixels in [-1, 1] that a cache entry encodes (alpha becomes white, as in training)."""
    image, _ = load_image(str(path))
    return to_tensor(cover_geometry(image.size, bucket, flip).apply(image))


# --- building ------------------------------------------------------------------------------------------------


@dataclass
class _Image:
    file_name: str
    path: str
    caption: str
    bucket: Bucket
    content: str


def _metadata_buckets(dst: Path) -> dict[str, str]:
    metadata = dst / "metadata.jsonl"
    if not metadata.is_file():
        return {}
    found = {}
    for line in metadata.read_text(encoding="utf-8-sig").splitlines():
        if line.strip():
            row = json.loads(line)  # discover_records already refused malformed lines
            if isinstance(row, dict) and row.get("bucket") and row.get("file_name"):
                found[Path(str(row["file_name"])).as_posix()] = str(row["bucket"])
    return found


def _scan(dst: Path, settings: CacheSettings) -> list[_Image]:
    records = discover_records(dst, setting="DST")
    if any(record.table is not None for record in records):
        raise SdtuneError(
            f"prep cache: DST '{dst}' is a saved datasets folder; cache needs image files (run sdtune prep build)"
        )
    from_metadata = _metadata_buckets(dst) if settings.resolution is None and settings.area is None else {}
    buckets = None
    images = []
    for record in tqdm(records, desc="hashing images", unit="image", file=sys.stderr, disable=None):
        file_name = Path(record.path).relative_to(dst).as_posix()
        if settings.resolution is not None:
            bucket = (settings.resolution, settings.resolution)
        elif file_name in from_metadata:
            bucket = parse_bucket(from_metadata[file_name])
        else:
            if buckets is None:
                buckets = make_buckets(settings.area or DEFAULT_AREA, settings.bucket_step)
            try:
                bucket = assign_bucket(*upright_size(record.path), buckets)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
                raise SdtuneError(
                    f"prep cache: image '{file_name}' could not be read ({err}); fix or remove it"
                ) from err
        images.append(_Image(file_name, record.path, record.caption, bucket, file_hash(record.path)))
    return images


def _encode_latents(vae: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels B×3×H×W in [-1, 1] → the posterior's unscaled (mean, std)."""
    posterior = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return posterior.mean, posterior.std


def _encode_text(text_encoder: torch.nn.Module, input_ids: torch.Tensor, clip_skip: int) -> torch.Tensor:
    from sdtune.models.clip import encode_text

    return encode_text(text_encoder, input_ids, clip_skip)


def _save_entry(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write to a hidden temporary file in the same folder, then rename: readers only ever see whole entries."""
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp")
    try:
        stored = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in tensors.items()}
        save_file(stored, str(temporary), metadata)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _batches(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class _Model:
    """VAE, text encoder and tokenizer, loaded on first use: a rerun with nothing to compute never loads them."""

    def __init__(self, pretrained: str, revision: str | None, settings: CacheSettings) -> None:
        self.pretrained, self.revision, self.settings = pretrained, revision, settings
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
            from sdtune.models.pretrained import load_stable_diffusion

            parts = load_stable_diffusion(self.pretrained, revision=self.revision, dtype=DTYPES[self.settings.dtype])
            parts.unet = None  # not needed; frees its memory
            device = self.settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
            for module in (parts.vae, parts.text_encoder):
                module.to(device).eval().requires_grad_(False)
            self._parts = parts
        return self._parts


def build_cache(
    dst: str | Path, pretrained: str, revision: str | None = None, settings: CacheSettings = CacheSettings()
) -> CacheIndex:
    """Compute the missing entries for every image and caption of DST, then rewrite index.jsonl and manifest.json.

    Returns the index with `counts` of computed and reused entries. Raises SdtuneError for a missing DST, an
    unusable model or settings, and unreadable images.
    """
    settings.check()
    dst = Path(dst).expanduser()
    if not dst.is_dir():
        raise SdtuneError(f"prep cache: DST '{dst}' {'is not a folder' if dst.exists() else 'does not exist'}")
    model = _Model(pretrained, revision, settings)
    identity = model_identity(pretrained, revision)
    if identity.get("vae") is None:  # a Hub model not downloaded yet: load it (downloads if allowed), then look again
        model.parts
        identity = model_identity(pretrained, revision)
    model_key = _digest(identity)
    images = _scan(dst, settings)
    root = dst / "cache" / model_key[:16]
    for folder in ("latents", "text"):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for leftover in (root / folder).glob(".*.tmp"):  # from a run that was killed mid-write
            leftover.unlink(missing_ok=True)

    orientations = (False, True) if settings.flip else (False,)
    rows, latent_work, text_work = [], {}, {}
    empty = text_key(model_key, "", settings.clip_skip, settings.max_token_length, settings.dtype)
    text_work[empty] = ""
    for image in images:
        keys = {
            flip: latent_key(model_key, image.content, image.bucket, settings.crop, flip, settings.dtype)
            for flip in orientations
        }
        for flip, key in keys.items():
            latent_work.setdefault(key, (image, flip))
        caption_key = text_key(model_key, image.caption, settings.clip_skip, settings.max_token_length, settings.dtype)
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
    folder = _model_folder(pretrained, revision)[1]
    vae_config = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
    layers = json.loads((folder / "text_encoder" / "config.json").read_text(encoding="utf-8")).get("num_hidden_layers")
    if layers is not None and settings.clip_skip > layers:
        raise SdtuneError(
            f"prep cache: --clip-skip {settings.clip_skip} is more than the text encoder's {layers} layers"
        )
    vae_scale_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    bad = next((image for image in images if any(side % vae_scale_factor for side in image.bucket)), None)
    if bad is not None:
        raise SdtuneError(
            f"prep cache: bucket {format_bucket(bad.bucket)} of '{bad.file_name}' is not a multiple of the VAE's "
            f"{vae_scale_factor} pixels per latent; pick another --resolution / --area / --bucket-step"
        )

    if missing_text:
        from sdtune.text import chunk_count

        chunk_count(model.tokenizer, settings.max_token_length, "--max-token-length")
    total = len(missing_latents) + len(missing_text)
    with tqdm(total=total, desc="encoding", unit="entry", file=sys.stderr, disable=None) as bar:
        if missing_latents:
            _compute_latents(model, index, missing_latents, settings, bar)
        if missing_text:
            _compute_text(model, index, missing_text, settings, bar)

    index_text = "".join(
        json.dumps({"file_name": row.file_name, "caption": row.caption, "bucket": format_bucket(row.bucket),
                    "latent": row.latent, "latent_flip": row.latent_flip, "text": row.text}) + "\n"
        for row in rows
    )
    manifest = {
        "format": FORMAT,
        "model_key": model_key,
        "model": identity,
        "settings": {**asdict(settings), "bucket_source": _bucket_source(settings, dst)},
        "storage_dtype": "float32",
        "scaling_factor": vae_config.get("scaling_factor", 0.18215),
        "shift_factor": vae_config.get("shift_factor") or 0.0,
        "vae_scale_factor": vae_scale_factor,
        "latent_channels": vae_config.get("latent_channels", 4),
        "empty_text": empty,
        "images": len(rows),
        "index_digest": hashlib.blake2b(index_text.encode(), digest_size=16).hexdigest(),
    }
    _write_atomic(root / "index.jsonl", index_text)
    _write_atomic(root / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    index.manifest, index.counts = manifest, counts
    return index


def _bucket_source(settings: CacheSettings, dst: Path) -> str:
    if settings.resolution is not None:
        return f"resolution {settings.resolution}"
    if settings.area is not None:
        return f"area {settings.area}, step {settings.bucket_step}"
    return f"metadata.jsonl, else area {DEFAULT_AREA}, step {settings.bucket_step}"


def _compute_latents(model: _Model, index: CacheIndex, work: list, settings: CacheSettings, bar: tqdm) -> None:
    vae = model.parts.vae
    work = sorted(work, key=lambda item: (item[1].bucket, item[1].file_name, item[2]))  # one bucket per batch
    by_bucket: dict[Bucket, list] = {}
    for item in work:
        by_bucket.setdefault(item[1].bucket, []).append(item)
    with torch.no_grad():
        for bucket, items in by_bucket.items():
            for batch in _batches(items, settings.batch_size):
                pixels = torch.stack([_pixels(image, bucket, flip) for _, image, flip in batch])
                means, stds = _encode_latents(vae, pixels)
                for (key, image, flip), mean, std in zip(batch, means, stds):
                    metadata = {"kind": "latent", "file_name": image.file_name, "content": image.content,
                                "bucket": format_bucket(bucket), "flip": str(flip).lower(), "crop": settings.crop}
                    _save_entry(index.entry_path("latent", key), {"mean": mean, "std": std}, metadata)
                bar.update(len(batch))


def _pixels(image: _Image, bucket: Bucket, flip: bool) -> torch.Tensor:
    try:
        return cache_pixels(image.path, bucket, flip)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise SdtuneError(f"prep cache: image '{image.file_name}' could not be read ({err}); fix or remove it") from err


def _compute_text(model: _Model, index: CacheIndex, work: list, settings: CacheSettings, bar: tqdm) -> None:
    from sdtune.text import tokenize_chunks

    parts = model.parts
    with torch.no_grad():
        for batch in _batches(work, settings.batch_size):
            tokenized = [
                tokenize_chunks(parts.tokenizer, caption, settings.max_token_length, "--max-token-length")
                for _, caption in batch
            ]
            hidden = _encode_text(parts.text_encoder, torch.stack([ids for ids, _ in tokenized]), settings.clip_skip)
            for (key, caption), (_, truncated), state in zip(batch, tokenized, hidden):
                metadata = {"kind": "text", "caption": caption, "clip_skip": str(settings.clip_skip),
                            "max_token_length": str(settings.max_token_length), "truncated": str(truncated).lower()}
                _save_entry(index.entry_path("text", key), {"hidden": state}, metadata)
            bar.update(len(batch))


def open_cache(dst: str | Path, pretrained: str, revision: str | None = None) -> CacheIndex:
    """The cache `build_cache` last wrote for this model, without loading the model (for training).

    Raises SdtuneError when there is none for this exact model (another or a changed model has another key) or the
    index does not match its manifest. The caller compares `index.settings` with its own (resolution, clip_skip,
    max_token_length, dtype, flip) and should check `file_hash` of images it doubts; entries are immutable.
    """
    dst = Path(dst).expanduser()
    model_key = _digest(model_identity(pretrained, revision))
    root = dst / "cache" / model_key[:16]
    try:
        manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
        index_text = (root / "index.jsonl").read_text(encoding="utf-8")
    except (OSError, ValueError):
        message = (
            f"prep cache: no cache for model '{pretrained}' in '{dst}'; run: sdtune prep cache {dst} --model ..."
        )
        raise SdtuneError(message) from None
    digest = hashlib.blake2b(index_text.encode(), digest_size=16).hexdigest()
    if manifest.get("model_key") != model_key or digest != manifest.get("index_digest"):
        raise SdtuneError(f"prep cache: the cache in '{root}' is inconsistent (interrupted run?); rerun prep cache")
    rows = []
    for line in index_text.splitlines():
        row = json.loads(line)
        bucket = parse_bucket(row["bucket"])
        rows.append(CacheRow(row["file_name"], row["caption"], bucket, row["latent"], row["latent_flip"], row["text"]))
    return CacheIndex(root, manifest, rows)


# --- `sdtune prep cache` -------------------------------------------------------------------------------------

EXAMPLES = """examples:
  sdtune prep cache data/my_dog --model runwayml/stable-diffusion-v1-5 --flip
  sdtune prep cache data/shapes --model sdtune-demo/tiny-sd --resolution 64 --batch-size 16

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
        "--dtype", choices=tuple(DTYPES), default="float32", help="compute dtype; saved as float32"
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
