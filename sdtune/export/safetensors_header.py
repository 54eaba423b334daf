"""A .safetensors file read without its tensors: the 8-byte header length, the JSON header (each tensor's dtype,
shape and byte range; the `__metadata__` strings), and the few bytes of the scalars asked for (LoRA alphas).

No torch import, so `sdtune inspect` answers in a fraction of a second whatever the file's size.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from sdtune.errors import SdtuneError

# Headers of real files are a few MB at most; a larger length means the file is not a safetensors file.
MAX_HEADER = 100_000_000
SCALAR_FORMATS = {"F64": "<d", "F32": "<f", "F16": "<e", "I64": "<q", "I32": "<i"}


@dataclass
class TensorInfo:
    dtype: str  # safetensors' names: F32, F16, BF16, ...
    shape: tuple[int, ...]
    begin: int  # byte range in the data section
    end: int


@dataclass
class Header:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int  # offset of the data section in the file

    def scalar(self, key: str) -> float:
        """The value of a one-element tensor, read from its own bytes."""
        info = self.tensors[key]
        if info.dtype not in SCALAR_FORMATS and info.dtype != "BF16":
            raise SdtuneError(f"{self.path}: {key} is a {info.dtype} tensor, not a number")
        with self.path.open("rb") as file:
            file.seek(self.data_start + info.begin)
            raw = file.read(info.end - info.begin)
        if info.dtype == "BF16":  # the upper half of a float32
            return struct.unpack("<f", b"\0\0" + raw[:2])[0]
        return float(struct.unpack(SCALAR_FORMATS[info.dtype], raw[: struct.calcsize(SCALAR_FORMATS[info.dtype])])[0])


def read_header(path: Path) -> Header:
    """The header of `path`; a file that is not a complete safetensors file is one SdtuneError line."""
    size = path.stat().st_size
    with path.open("rb") as file:
        start = file.read(8)
        if len(start) < 8:
            raise SdtuneError(f"{path}: {'an empty file' if not start else 'not a safetensors file (shorter than its header)'}")
        length = int.from_bytes(start, "little")
        if length > min(MAX_HEADER, size - 8):
            raise SdtuneError(f"{path}: not a safetensors file, or truncated (its header would be {length} bytes of {size})")
        raw = file.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SdtuneError(f"{path}: not a safetensors file (its header is not JSON: {err})") from err
    if not isinstance(header, dict):
        raise SdtuneError(f"{path}: not a safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    tensors, end = {}, 0
    try:
        for key, value in header.items():
            begin, stop = value["data_offsets"]
            tensors[key] = TensorInfo(value["dtype"], tuple(value["shape"]), begin, stop)
            end = max(end, stop)
    except (TypeError, KeyError, ValueError) as err:
        raise SdtuneError(f"{path}: not a safetensors file (tensor entry {key!r} is malformed)") from err
    if 8 + length + end > size:
        raise SdtuneError(f"{path}: truncated: its header names {8 + length + end} bytes, the file has {size}")
    return Header(path, tensors, {str(k): str(v) for k, v in metadata.items()}, 8 + length)
