"""Decode, validate and normalise one image for `sdtune prep build`: the per-file work, safe to run in a worker.

`process_image` never raises for a bad file: it returns a `Processed` whose `reason` says, in a few words, why the
file was rejected (zero bytes, not an image, truncated, too small, too large...). A kept image comes back as the
bytes to store (the source bytes themselves when they need no change), its size and the hashes `dedupe` compares.

Normalisation: EXIF orientation applied; every mode (CMYK, palette, LA, RGBA, 16-bit and float greyscale, ...)
becomes 8-bit RGB, transparency over white; 16-bit values are scaled to 8 bits (PIL's own `convert` clips them at
255, which turns a 16-bit photo white); animated files keep their first frame. Decompression bombs are rejected
from the header, before any pixel is decoded.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

WHITE = (255, 255, 255)
ORIENTATION = 0x0112
# Formats PIL may try. Anything else (EPS runs Ghostscript, PDF, PSD, ...) is "not an image" here.
SAFE_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "DIB", "GIF", "TIFF", "AVIF")
JPEG_SUFFIXES = (".jpg", ".jpeg")
JPEG_QUALITY = 95
PNG_COMPRESS_LEVEL = 3  # zlib level 6 (PIL's default) is ~3x slower for ~5% smaller files
MODES_WITH_RGB_PROFILE = ("RGB", "RGBA", "RGBa", "P", "PA")  # an ICC profile of these still fits the RGB output


@dataclass(frozen=True)
class DecodeSettings:
    min_side: int = 256  # the shorter side must be at least this
    max_pixels: int = 100_000_000  # width * height from the header; above it the file is never decoded
    max_side: int | None = None  # downscale (LANCZOS) so the longer side is at most this


@dataclass
class Processed:
    """The outcome for one source file. `reason` set means rejected; otherwise `data` is the file to store."""

    rel: str
    reason: str | None = None
    warnings: list[str] = field(default_factory=list)
    data: bytes = b""
    suffix: str = ""  # of the stored file: the source's own when it fits the stored format, else .png / .jpg
    copied: bool = False  # `data` is the source file, byte for byte
    width: int = 0
    height: int = 0
    pixel_hash: bytes = b""  # of the decoded, normalised pixels (before --max-side)
    phash: int = 0  # 64-bit perceptual hash (dHash)
    thumb: bytes = b""  # 8x8 RGB, to tell apart images whose phash agrees but whose colours do not


def process_image(path: str | Path, rel: str, settings: DecodeSettings) -> Processed:
    """Everything about one file; any exception becomes a rejection naming it, so one bad file never stops a build."""
    try:
        return _process(Path(path), rel, settings)
    except MemoryError:
        return Processed(rel, reason="too large to decode (out of memory)")
    except Exception as err:  # noqa: BLE001 - a decoder can raise anything; the build must go on
        return Processed(rel, reason=f"could not be read ({_first_line(err)})")


def _process(path: Path, rel: str, settings: DecodeSettings) -> Processed:
    try:
        size = path.stat().st_size
        # No image within the pixel limit is this big (16 bytes a pixel is float RGBA); a video named .jpg would be.
        if size > settings.max_pixels * 16 + (64 << 20):
            return Processed(rel, reason=f"too large: a {size / 1e9:.1f} GB file, above --max-pixels")
        data = path.read_bytes()
    except OSError as err:
        return Processed(rel, reason=f"could not be read ({err.strerror or _first_line(err)})")
    if not data:
        return Processed(rel, reason="zero bytes")
    result = Processed(rel)
    with _pixel_limit(settings.max_pixels), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's chatter about odd EXIF and the like is not the user's problem
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=_formats())
        except UnidentifiedImageError:
            return Processed(rel, reason=f"not an image ({sniff(data)})")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            return Processed(rel, reason=_bomb_reason(err, settings.max_pixels))
        except Exception as err:  # noqa: BLE001 - a broken or cut-off header
            return Processed(rel, reason=_load_failure(err))
        with image:
            width, height = image.size
            if width * height > settings.max_pixels:
                return Processed(rel, reason=_too_large(width, height, settings.max_pixels))
            if min(width, height) < settings.min_side:
                return Processed(
                    rel, reason=f"too small: {width}x{height}, shorter side below --min-side {settings.min_side}"
                )
            source_format, source_mode = image.format, image.mode
            try:
                animated = bool(getattr(image, "is_animated", False))
            except Exception:  # noqa: BLE001 - a broken second frame; the first may still be fine
                animated = False
            if animated and source_format != "MPO":  # MPO's second frame is a depth map or stereo pair
                kind = "multi-page" if source_format == "TIFF" else "animated"
                result.warnings.append(f"{kind} {source_format}: kept the first frame only")
            clean = _is_clean(image, animated)
            try:
                image.load()
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
                return Processed(rel, reason=_bomb_reason(err, settings.max_pixels))
            except Exception as err:  # noqa: BLE001
                return Processed(rel, reason=_load_failure(err))
            orientation = image.getexif().get(ORIENTATION, 1)
            icc = image.info.get("icc_profile") if source_mode in MODES_WITH_RGB_PROFILE else None
            if orientation not in (None, 1):
                clean = False
                image = ImageOps.exif_transpose(image)
            rgb = to_rgb(image, result.warnings)

    if rgb is not image:
        clean = False
    result.pixel_hash = pixel_hash(rgb)
    result.phash, result.thumb = perceptual_hash(rgb)
    if settings.max_side and max(rgb.size) > settings.max_side:
        rgb = downscale(rgb, settings.max_side)
        clean = False
    result.width, result.height = rgb.size

    jpeg = source_format in ("JPEG", "MPO")
    suffix = Path(rel).suffix
    if jpeg:
        result.suffix = suffix if suffix.lower() in JPEG_SUFFIXES else ".jpg"
    else:
        result.suffix = suffix if suffix.lower() == ".png" else ".png"
    if clean:
        result.data, result.copied = data, True
    else:
        result.data = encode(rgb, "JPEG" if jpeg else "PNG", icc)
    return result


# --- decoding helpers ----------------------------------------------------------------------------------------------


def _formats() -> list[str]:
    Image.init()
    return [name for name in SAFE_FORMATS if name in Image.OPEN]


@contextlib.contextmanager
def _pixel_limit(max_pixels: int):
    """PIL's bomb guard at our limit: it warns above it (made an error) and refuses outright above twice it."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.0f} MP" if pixels >= 10e6 else f"{pixels / 1e6:.1f} MP"


def _too_large(width: int, height: int, max_pixels: int) -> str:
    return f"too large: {width}x{height} = {_megapixels(width * height)}, above --max-pixels {_megapixels(max_pixels)}"


def _bomb_reason(err: Exception, max_pixels: int) -> str:
    found = re.search(r"\((\d+) pixels\)", str(err))
    size = f" {_megapixels(int(found.group(1)))}," if found else ""
    return f"too large:{size} above --max-pixels {_megapixels(max_pixels)} (not decoded)"


def _load_failure(err: Exception) -> str:
    message = _first_line(err)
    lowered = message.lower()
    if isinstance(err, EOFError) or "truncated" in lowered or "broken data stream" in lowered or "eof" in lowered:
        return f"truncated ({message})"
    return f"corrupt ({message})"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]


def sniff(data: bytes) -> str:
    """What a file PIL cannot identify most likely is, for the rejection reason."""
    head = data[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head or b"<head" in head:
        return "an HTML page"
    if head.startswith(b"<?xml") or head.startswith(b"<svg"):
        return "SVG or XML text" if b"<svg" in head else "XML text"
    if head.startswith(b"%pdf"):
        return "a PDF"
    if data[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypmsf1", b"ftyphevc"):
        return "HEIC, which PIL cannot read; convert it to JPEG"
    if head.startswith(b"pk\x03\x04"):
        return "a zip archive"
    sample = data[:512]
    if sample and sum(32 <= b < 127 or b in (9, 10, 13) for b in sample) > 0.95 * len(sample):
        return "a text file"
    return "unrecognised format"


def _is_clean(image: Image.Image, animated: bool) -> bool:
    """Whether the source bytes can be stored as they are: 8-bit RGB JPEG/PNG, one frame, no transparency.

    Orientation and resizing are checked by the caller. Must run before `load()`, which clears `tile`.
    """
    if image.mode != "RGB" or animated or "transparency" in image.info:
        return False
    if image.format == "JPEG":
        return True
    if image.format == "PNG":
        rawmode = image.tile[0][3] if image.tile else None
        return rawmode == "RGB"  # 48-bit PNGs open as RGB too, with rawmode "RGB;16B"
    return False


# --- normalisation -------------------------------------------------------------------------------------------------


def to_rgb(image: Image.Image, notes: list[str] | None = None) -> Image.Image:
    """8-bit RGB; the image itself when it already is. Transparency becomes white, 16-bit values are scaled."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(image), mode, notes), "L").convert("RGB")
    if mode == "CMYK":
        return _cmyk_to_rgb(image)
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("L", "1") and "transparency" in image.info:
        image = image.convert("LA")
    elif mode == "RGB":  # a tRNS colour key: that colour is transparent
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _to_uint8(values: np.ndarray, mode: str, notes: list[str] | None) -> np.ndarray:
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


def downscale(image: Image.Image, max_side: int) -> Image.Image:
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def encode(image: Image.Image, fmt: str, icc_profile: bytes | None = None) -> bytes:
    buffer = io.BytesIO()
    extra = {"icc_profile": icc_profile} if icc_profile else {}
    if fmt == "JPEG":
        image.save(buffer, "JPEG", quality=JPEG_QUALITY, **extra)
    else:
        image.save(buffer, "PNG", compress_level=PNG_COMPRESS_LEVEL, **extra)
    return buffer.getvalue()


# --- hashes --------------------------------------------------------------------------------------------------------


def pixel_hash(image: Image.Image) -> bytes:
    """128 bits, equal for exactly equal decoded pixels whatever the file format or metadata.

    xxHash3 (installed with `datasets`) hashes a 768x768 image in ~0.03 ms, blake2b in ~1.7 ms: a third of a JPEG
    decode. Collisions are not a concern at 128 bits; nothing here needs resistance to crafted inputs.
    """
    digest = _new_digest()
    digest.update(f"{image.mode} {image.width}x{image.height}".encode())
    digest.update(image.tobytes())
    return digest.digest()


try:
    import xxhash

    def _new_digest():
        return xxhash.xxh3_128()

except ImportError:  # pragma: no cover - datasets depends on xxhash

    def _new_digest():
        return hashlib.blake2b(digest_size=16)


def perceptual_hash(image: Image.Image) -> tuple[int, bytes]:
    """64-bit difference hash (dHash) and an 8x8 RGB thumbnail.

    dHash: greyscale shrunk to 9x8, one bit per horizontal neighbour pair (is the right one brighter?). Rescaling
    and recompression move at most a bit or two, while unrelated images are ~32 bits apart. (A DCT pHash moved up
    to 8 bits on blocky images under a 6% resize.) Box-reducing to >=144 px first keeps it cheap on big images.
    """
    factor = min(image.size) // 144
    small = image.reduce(factor) if factor > 1 else image
    grey = np.asarray(small.convert("L").resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).ravel()
    dhash = int.from_bytes(np.packbits(bits).tobytes(), "big")
    thumb = small.resize((8, 8), Image.Resampling.BOX).tobytes()
    return dhash, thumb
