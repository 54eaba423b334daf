"""What `sdtune prep cache` entries are named by: the model's identity, file hashes and the entry keys.

An entry's key hashes everything its tensors depend on: the model key (pretrained path or Hub id, revision or the
resolved snapshot commit, VAE / text-encoder / tokenizer file contents, weight files' size and mtime_ns), the
compute dtype, and for latents the image file's bytes (blake2b), bucket, crop and orientation; for text the caption,
clip_skip and max_token_length. A changed input gives a new key, never a stale entry.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from sdtune.data.buckets import Bucket

FORMAT = 1
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx")
MODEL_FOLDERS = ("vae", "text_encoder", "tokenizer")
# Only in the identity of a model that has them (SDXL, SD3, Flux), so an SD1/2 model's keys stay what they were.
MORE_FOLDERS = ("text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")


def digest(value: Any) -> str:
    """blake2b of a JSON value (keys sorted)."""
    return hashlib.blake2b(json.dumps(value, sort_keys=True).encode(), digest_size=32).hexdigest()


def file_hash(path: str | Path) -> str:
    """blake2b of a file's bytes, read in 1 MiB pieces."""
    hashed = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as handle:
        for piece in iter(lambda: handle.read(1 << 20), b""):
            hashed.update(piece)
    return hashed.hexdigest()


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


def model_folder(pretrained: str, revision: str | None) -> tuple[str, Path | None]:
    """(the resolved path or Hub id, its local folder or None when a Hub model is not downloaded yet)."""
    from sdtune.models.pretrained import (
        resolve_pretrained,  # validates the path or Hub id with the usual one-line errors
    )

    source = resolve_pretrained(pretrained)
    if Path(source).is_dir():
        return source, Path(source)
    return source, _hub_snapshot(source, revision)


def model_identity(pretrained: str, revision: str | None = None) -> dict[str, Any]:
    """What the cached tensors depend on in the model: VAE, text encoder and tokenizer (not the UNet).

    A local directory is named by its absolute path; a Hub id by id, revision and the snapshot commit it resolves
    to offline (None when it is not downloaded yet).
    """
    source, folder = model_folder(pretrained, revision)
    local = Path(source).is_dir()
    identity: dict[str, Any] = {"pretrained": str(Path(source).resolve()) if local else source, "revision": revision}
    if not local:
        identity["commit"] = folder.name if folder is not None else None
    if folder is not None:
        for name in MODEL_FOLDERS:
            identity[name] = _folder_identity(folder / name) if (folder / name).is_dir() else None
        for name in MORE_FOLDERS:
            if (folder / name).is_dir():
                identity[name] = _folder_identity(folder / name)
    return identity


def latent_key(model_key: str, content: str, bucket: Bucket, crop: str, flip: bool, dtype: str) -> str:
    return digest({"kind": "latent", "format": FORMAT, "model": model_key, "image": content, "bucket": list(bucket),
                   "crop": crop, "flip": flip, "resample": "lanczos", "dtype": dtype})


def text_key(model_key: str, caption: str, clip_skip: int, max_token_length: int, dtype: str, stored: str = "float32") -> str:
    """`dtype` is what the encoders computed in; `stored` what the hidden states are kept in (float16 for the T5
    families; named in the key only then, so float32 entries keep their keys)."""
    value = {"kind": "text", "format": FORMAT, "model": model_key, "caption": caption, "clip_skip": clip_skip,
             "max_token_length": max_token_length, "dtype": dtype}  # fmt: skip
    return digest(value if stored == "float32" else value | {"stored": stored})
