"""A hostile source folder for the prep tools: broken files, odd modes, rotated photos, bad captions, duplicates.

`make_hostile_src(root)` writes it and returns what a correct `prep build` must do with each file. Images are small
(96x64 or so) so tests stay fast; pass `--min-side 32` or lower (the 1x1 image is the one meant to be too small).
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def pattern(size: tuple[int, int], seed: int) -> Image.Image:
    """A random 6x4 grid of colour blocks: distinct seeds give perceptually distinct images."""
    rng = random.Random(seed)
    grid = Image.new("RGB", (6, 4))
    grid.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(24)])
    return grid.resize(size, Image.Resampling.NEAREST)


def save(image: Image.Image, path: Path, fmt: str | None = None, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt, **options)
    return path


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A valid-looking PNG whose IHDR claims width x height RGB: a few dozen bytes on disk, a bomb if decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@dataclass
class Expected:
    rejected: dict[str, str] = field(default_factory=dict)  # rel -> a word the reason must contain
    kept: dict[str, str] = field(default_factory=dict)  # rel -> caption
    warned: dict[str, str] = field(default_factory=dict)  # rel -> a word the warning must contain
    images: int = 0  # image files a build must find (hidden ones excluded)


def make_hostile_src(root: Path) -> Expected:
    root.mkdir(parents=True, exist_ok=True)
    expected = Expected()
    size = (96, 64)

    # Broken files.
    full = encoded(pattern(size, 1), "JPEG", quality=90)
    write(root / "broken/truncated.jpg", full[: len(full) // 2])
    write(root / "broken/empty.png", b"")
    write(root / "broken/page.png", b"<!DOCTYPE html>\n<html><head><title>403</title></head><body>No</body></html>")
    save(Image.new("RGB", (1, 1), RED), root / "broken/tiny.png")
    write(root / "broken/bomb.png", png_header_only(40000, 40000))
    expected.rejected.update({
        "broken/truncated.jpg": "truncated", "broken/empty.png": "zero bytes", "broken/page.png": "not an image",
        "broken/tiny.png": "too small", "broken/bomb.png": "too large",
    })

    # Odd modes: left half one colour, right half another, so the tests can check pixels.
    cmyk = Image.new("CMYK", size, (0, 255, 255, 0))  # red
    cmyk.paste((255, 255, 0, 0), (48, 0, 96, 64))  # blue
    save(cmyk, root / "modes/cmyk.jpg", quality=95)
    gray16 = Image.new("I;16", (256, 64))
    gray16.putdata([x * 257 for _ in range(64) for x in range(256)])  # 0 .. 65535 left to right
    save(gray16, root / "modes/gray16.png")
    palette = Image.new("P", size, 0)
    palette.putpalette([255, 0, 255, 0, 255, 0] + [0] * 762)  # index 0 magenta (transparent), 1 green
    palette.paste(1, (48, 0, 96, 64))
    save(palette, root / "modes/palette.png", transparency=0)
    la = Image.new("LA", size, (0, 255))  # opaque black ...
    la.paste((0, 0), (0, 0, 96, 32))  # ... top half transparent
    save(la, root / "modes/la.png")
    rgba = Image.new("RGBA", size, (255, 0, 0, 0))  # transparent red: must come out white, not red or black
    rgba.paste((0, 0, 255, 255), (48, 0, 96, 64))
    save(rgba, root / "modes/rgba.png")
    frames = [pattern(size, 2).convert("P", palette=Image.Palette.ADAPTIVE), pattern(size, 3).convert("P")]
    save(frames[0], root / "modes/animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    expected.warned["modes/animated.gif"] = "animated"

    # A phone photo stored landscape (96x64) with "rotate 90° clockwise" in EXIF; red marker at stored top-left.
    photo = pattern(size, 4)
    photo.paste(RED, (0, 0, 16, 16))
    exif = Image.Exif()
    exif[0x0112] = 6
    save(photo, root / "rotated.jpg", quality=95, exif=exif.tobytes())

    # Clean files; nested and non-ASCII names.
    save(pattern(size, 5), root / "clean.jpg", quality=90)
    write(root / "clean.txt", b"  a clean photo\n\n  of   a   thing \n")
    save(pattern(size, 6), root / "ñandú/café.png")
    write(root / "ñandú/café.txt", "ave corredora, ñandú".encode())
    save(pattern(size, 7), root / "nested/deeper/leaf.webp", quality=90)
    write(root / "nested/deeper/leaf.caption", b"a leaf")

    # Caption trouble.
    save(pattern(size, 8), root / "captions/latin.png")
    write(root / "captions/latin.txt", "café crème".encode("latin-1"))
    save(pattern(size, 9), root / "captions/long.png")
    long_caption = " ".join(f"word{i}" for i in range(300))
    write(root / "captions/long.txt", long_caption.encode())
    save(pattern(size, 10), root / "captions/blank.png")
    write(root / "captions/blank.txt", b"  \n ")
    save(pattern(size, 11), root / "captions/missing.png")
    write(root / "captions/orphan.txt", b"nobody reads me")
    expected.warned.update({
        "captions/latin.txt": "not UTF-8", "captions/blank.png": "empty caption",
        "captions/missing.png": "no caption", "captions/orphan.txt": "no image",
    })

    # Duplicates: an exact copy and a resized, recompressed one; sorted names put the original first.
    original = pattern((128, 96), 12)
    save(original, root / "dup/a_original.png")
    save(original, root / "dup/b_copy.png", compress_level=9)  # other bytes, same pixels
    save(original.resize((120, 90), Image.Resampling.LANCZOS), root / "dup/c_near.jpg", quality=80)
    expected.warned.update({"dup/b_copy.png": "duplicate of dup/a_original.png",
                            "dup/c_near.jpg": "duplicate of dup/a_original.png"})

    # Names that collide once stored: a.png / a.PNG, and b.bmp stored as b.png next to b.png.
    save(pattern(size, 13), root / "a.png")
    save(pattern(size, 14), root / "a.PNG")
    save(pattern(size, 15), root / "b.bmp")
    save(pattern(size, 16), root / "b.png")

    # Hidden things are skipped entirely.
    save(pattern(size, 17), root / ".cache/stale.png")
    save(pattern(size, 18), root / ".hidden.png")

    expected.kept.update({
        "modes/cmyk.jpg": "", "modes/gray16.png": "", "modes/palette.png": "", "modes/la.png": "",
        "modes/rgba.png": "", "modes/animated.gif": "", "rotated.jpg": "", "clean.jpg": "a clean photo of a thing",
        "ñandú/café.png": "ave corredora, ñandú", "nested/deeper/leaf.webp": "a leaf",
        "captions/latin.png": "café crème",
        "captions/long.png": long_caption, "captions/blank.png": "", "captions/missing.png": "",
        "dup/a_original.png": "", "dup/b_copy.png": "", "dup/c_near.jpg": "", "a.png": "", "a.PNG": "", "b.bmp": "",
        "b.png": "",
    })
    expected.images = len(expected.kept) + len(expected.rejected)
    return expected


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and folder under root (hidden ones too): content hash, size and mtime, to prove nothing changed."""
    state: dict[str, tuple] = {}
    for folder, dirnames, filenames in os.walk(root):
        for name in dirnames:
            path = Path(folder) / name
            state[path.relative_to(root).as_posix() + "/"] = (path.stat().st_mtime_ns,)
        for name in filenames:
            path = Path(folder) / name
            stat = path.stat()
            state[path.relative_to(root).as_posix()] = (
                hashlib.sha256(path.read_bytes()).hexdigest(), stat.st_size, stat.st_mtime_ns
            )
    return state
