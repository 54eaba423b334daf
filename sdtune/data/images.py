"""Opening an image the one way all of sdtune does: training, the latent cache, `prep build`, `prep check`.

Only the formats in FORMATS are tried, recognised by content, never by suffix: left alone, Pillow tries every reader
it has, and some hand the file to another program (EPS runs Ghostscript). `upright_rgb` turns whatever was opened into
the 8-bit RGB that is trained on and stored: EXIF orientation applied; palette, LA, RGBA and CMYK (through its ICC
profile) converted, transparency over white; 16-bit and float greyscale scaled to 8 bits (PIL's own `convert` clips
them at 255, which turns a 16-bit photo white); animated files keep their first frame.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# What Pillow raises for a file that is not a readable image (UnidentifiedImageError is an OSError).
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
# The formats sdtune reads. Anything else (EPS, PDF, PSD, TGA, ...) is "not an image" here, whatever its name.
FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "DIB", "GIF", "TIFF", "AVIF")
WHITE = (255, 255, 255)
ORIENTATION = 0x0112
DEEP_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")

Source = str | Path | IO[bytes]


class NotAnImage(UnidentifiedImageError):
    """A file none of FORMATS reads; the message says what it looks like instead."""


def readable_formats() -> list[str]:
    """FORMATS this Pillow build can open: format sniffing must never reach a reader outside them."""
    Image.init()
    return [name for name in FORMATS if name in Image.OPEN]


def open_file(source: Source) -> Image.Image:
    """The image lazily opened (header read, no pixels decoded) by one of FORMATS' readers.

    Raises NotAnImage naming what the file looks like, and DecompressionBombError in one line for a file whose header
    claims more pixels than Pillow's bomb limit; both are in IMAGE_ERRORS.
    """
    try:
        return Image.open(source, formats=readable_formats())
    except UnidentifiedImageError:
        what = identify(_head(source))
        raise NotAnImage(f"not an image format sdtune reads ({what}); convert it to PNG or JPEG") from None
    except Image.DecompressionBombError as err:
        found = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{int(found.group(1)) / 1e6:.0f} MP, " if found else ""
        message = f"too large: {size}above Pillow's decompression-bomb limit; not decoded"
        raise Image.DecompressionBombError(message) from None


def open_image(source: Source) -> Image.Image:
    """The image decoded, upright, in 8-bit RGB with transparency over white: what training sees."""
    return load_image(source)[0]


def load_image(source: Source) -> tuple[Image.Image, Image.Image | None]:
    """`open_image`, plus the alpha channel ('L', upright) when the image has transparency, for alpha masks."""
    with open_file(source) as opened:
        image = upright(opened)
    return to_rgb(image), alpha_channel(image)


def upright(image: Image.Image) -> Image.Image:
    """The first frame decoded and turned by its EXIF orientation; the image itself when it is already upright."""
    image.load()
    if image.getexif().get(ORIENTATION, 1) not in (None, 1):
        image = ImageOps.exif_transpose(image)
    return image


def upright_rgb(image: Image.Image, notes: list[str] | None = None) -> Image.Image:
    """An opened image as it is trained on: `upright`, then `to_rgb`."""
    return to_rgb(upright(image), notes)


def to_rgb(image: Image.Image, notes: list[str] | None = None) -> Image.Image:
    """8-bit RGB; the image itself when it already is. Transparency becomes white, 16-bit values are scaled.

    `notes` gets a line when values had to be stretched, which changes how the image looks."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in DEEP_GREY_MODES:
        return Image.fromarray(to_uint8(np.asarray(image), mode, notes), "L").convert("RGB")
    if mode == "CMYK":
        return _cmyk_to_rgb(image)
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("L", "1") and "transparency" in image.info:
        image = image.convert("LA")
    elif mode == "RGB":  # a tRNS colour key: that colour is transparent
        image = image.convert("RGBA")
    if image.mode in ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def alpha_channel(image: Image.Image) -> Image.Image | None:
    """The transparency of a decoded image as 'L' (255 opaque), or None when it has none."""
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        return image.convert("RGBA").getchannel("A")
    return None


def has_alpha(source: Source) -> bool:
    """Whether the file carries transparency; reads the header only, so checking a whole dataset is cheap."""
    with open_file(source) as opened:
        return opened.mode in ALPHA_MODES or "transparency" in opened.info


def load_mask(source: Source) -> Image.Image:
    """A loss-weight mask as grayscale 'L' (white = full weight), upright like the images it belongs to."""
    with open_file(source) as opened:
        mask = upright(opened)
    if mask.mode in DEEP_GREY_MODES:
        return Image.fromarray(to_uint8(np.asarray(mask), mask.mode), "L")
    return mask.convert("L")


def to_uint8(values: np.ndarray, mode: str, notes: list[str] | None = None) -> np.ndarray:
    """Greyscale of any depth to 0..255, using the range the format implies rather than clipping."""
    if mode.startswith("I;16"):
        return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode == "F" and 0.0 <= low and high <= 1.0:
        return np.rint(values * 255.0).astype(np.uint8)
    if 0 <= low and high <= 255:
        return np.rint(values).astype(np.uint8)
    if 0 <= low and high <= 65535:
        return np.rint(values.astype(np.float64) / 257.0).astype(np.uint8)
    if notes is not None:
        notes.append(f"{mode} values {low:g}..{high:g} stretched to 0..255")
    span = high - low or 1.0
    return np.rint((values.astype(np.float64) - low) * (255.0 / span)).astype(np.uint8)


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    """Through the embedded ICC profile when there is one (print CMYK is far from PIL's naive formula)."""
    icc = image.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            converted = ImageCms.profileToProfile(
                image, io.BytesIO(icc), ImageCms.createProfile("sRGB"), outputMode="RGB"
            )
            if converted is not None:
                return converted
        except Exception:  # noqa: BLE001 - a broken profile: the naive conversion is still an image
            pass
    return image.convert("RGB")


# --- what a file is, for messages ----------------------------------------------------------------------------------


def identify(data: bytes) -> str:
    """What a file that none of FORMATS reads most likely is, from its first bytes; decodes nothing."""
    head = data[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head or b"<head" in head:
        return "an HTML page"
    if head.startswith(b"<?xml") or head.startswith(b"<svg"):
        return "SVG or XML text" if b"<svg" in head else "XML text"
    if head.startswith(b"%pdf"):
        return "a PDF"
    if data.startswith(b"%!PS") or data.startswith(b"\xc5\xd0\xd3\xc6"):
        return "PostScript or EPS"
    if data[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypmsf1", b"ftyphevc"):
        return "HEIC, which PIL cannot read; convert it to JPEG"
    if head.startswith(b"pk\x03\x04"):
        return "a zip archive"
    sample = data[:512]
    if sample and sum(32 <= b < 127 or b in (9, 10, 13) for b in sample) > 0.95 * len(sample):
        return "a text file"
    return _pillow_format(data) or "unrecognised format"


def _pillow_format(data: bytes) -> str | None:
    """'perhaps ICO': the first other format whose magic number matches (Pillow's `accept` checks compare bytes only,
    and some are loose, hence the "perhaps")."""
    Image.init()
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        if name not in FORMATS and accept is not None and len(data) >= 16 and accept(data[:16]) is True:
            return f"perhaps {name}"
    return None


def _head(source: Source) -> bytes:
    """The first 512 bytes of a file or stream (the stream's position is kept); b"" when they cannot be read."""
    try:
        if hasattr(source, "read"):
            position = source.tell()
            source.seek(0)
            try:
                return source.read(512)
            finally:
                source.seek(position)
        with open(source, "rb") as handle:
            return handle.read(512)
    except (OSError, ValueError):
        return b""
