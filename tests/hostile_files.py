"""Hostile files for the tests: an EPS file, a PNG header that claims a decompression bomb, and a snapshot of a tree
that proves nothing in it was added, changed or removed."""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from pathlib import Path

# A minimal EPS file: what Pillow's EPS reader would hand to Ghostscript.
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n"


def snapshot(*roots: Path) -> dict[str, str]:
    """Content hash and mtime of every file under `roots`, symlinks not followed: proves nothing was changed."""
    state = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            stat = path.lstat()
            content = os.readlink(path) if path.is_symlink() else path.read_bytes() if path.is_file() else b""
            state[str(path)] = f"{hashlib.sha256(os.fsencode(content)).hexdigest()} {stat.st_mtime_ns}"
    return state


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height: a few dozen bytes on disk, a decompression bomb if decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
