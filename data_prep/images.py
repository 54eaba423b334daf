"""Decode, validate and normalise one image for `sdtune prep build`: the per-file work, safe to run in a worker.

`process_image` never raises for a bad file: it returns a `Processed` whose `reason` says, in a few words, why the
file was rejected (zero bytes, not an image, truncated, too small, too large...). A kept image comes back as the
bytes to store (the source bytes themselves when they need no change), its size and the hashes `dedupe` compares.

Normalisation is training's own (`sdtune.data.images.upright_rgb`): EXIF orientation applied; every mode (CMYK,
palette, LA, RGBA, 16-bit and float greyscale, ...) becomes 8-bit RGB, transparency over white; 16-bit values are
scaled to 8 bits (PIL's own `convert` clips them at 255, which turns a 16-bit photo white); animated files keep
their first frame. Only the formats training reads are tried (`sdtune.data.images.FORMATS`), by content. Decompression
bombs are rejected from the header, before any pixel is decoded.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from data_prep.dedupe import perceptual_hash, pixel_hash
from sdtune.data.images import identify, readable_formats, upright_rgb
from sdtune.errors import first_line

JPEG_SUFFIXES = (".jpg", ".jpeg")
JPEG_QUALITY = 95
PNG_COMPRESS_LEVEL = 3  # zlib level 6 (PIL's default) is ~3x slower for ~5% smaller files
MODES_WITH_RGB_PROFILE = ("RGB", "RGBA", "RGBa", "P", "PA")  # an ICC profile of these still fits the RGB output
BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)


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
    width: int = 0
    height: int = 0
    pixel_hash: bytes = b""  # of the decoded, normalised pixels (before --max-side)
    phash: int = 0  # 64-bit perceptual hash (dHash)
    thumb: bytes = b""  # 8x8 RGB, to tell apart images whose phash agrees but whose colours do not


@dataclass
class _Decoded:
    """An upright 8-bit RGB image and what deciding how to store it needs to know about its source."""

    rgb: Image.Image
    jpeg: bool  # the source was a JPEG (or MPO), so the stored file is one too
    clean: bool  # the source bytes already are this image, so they can be stored as they are
    icc: bytes | None  # the source's colour profile, carried into a re-encoded file


def process_image(path: str | Path, rel: str, settings: DecodeSettings) -> Processed:
    """Everything about one file; any exception becomes a rejection naming it, so one bad file never stops a build."""
    try:
        return _process(Path(path), rel, settings)
    except MemoryError:
        return Processed(rel, reason="too large to decode (out of memory)")
    except Exception as err:  # noqa: BLE001 - a decoder can raise anything; the build must go on
        return Processed(rel, reason=f"could not be read ({_first_line(err)})")


def _process(path: Path, rel: str, settings: DecodeSettings) -> Processed:
    """Read, decode, hash and (when it must change) re-encode; a string from a step is the rejection reason."""
    data = _read(path, settings.max_pixels)
    if isinstance(data, str):
        return Processed(rel, reason=data)
    result = Processed(rel)
    decoded = _decode(data, settings, result.warnings)
    if isinstance(decoded, str):
        return Processed(rel, reason=decoded)
    rgb = decoded.rgb
    result.pixel_hash = pixel_hash(rgb)
    result.phash, result.thumb = perceptual_hash(rgb)
    clean = decoded.clean
    if settings.max_side and max(rgb.size) > settings.max_side:
        rgb = downscale(rgb, settings.max_side)
        clean = False
    result.width, result.height = rgb.size
    result.suffix = stored_suffix(rel, decoded.jpeg)
    result.data = data if clean else encode(rgb, "JPEG" if decoded.jpeg else "PNG", decoded.icc)
    return result


def _read(path: Path, max_pixels: int) -> bytes | str:
    """The file's bytes, or why they were not read: a file bigger than any image within the limit is not loaded."""
    try:
        size = path.stat().st_size
        # No image within the pixel limit is this big (16 bytes a pixel is float RGBA); a video named .jpg would be.
        if size > max_pixels * 16 + (64 << 20):
            return f"too large: a {size / 1e9:.1f} GB file, above --max-pixels"
        data = path.read_bytes()
    except OSError as err:
        return f"could not be read ({err.strerror or _first_line(err)})"
    return data or "zero bytes"


def _decode(data: bytes, settings: DecodeSettings, notes: list[str]) -> _Decoded | str:
    """The image upright in 8-bit RGB, or why not. Size limits are checked on the header, before decoding."""
    with _pixel_limit(settings.max_pixels), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's chatter about odd EXIF and the like is not the user's problem
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=readable_formats())
        except UnidentifiedImageError:
            return f"not an image ({identify(data)})"
        except Exception as err:  # noqa: BLE001 - a broken or cut-off header, or a bomb
            return _failure(err, settings.max_pixels)
        with image:
            return _size_problem(image.size, settings) or _normalise(image, settings.max_pixels, notes)


def _size_problem(size: tuple[int, int], settings: DecodeSettings) -> str | None:
    """Why an image of this size (from its header) is rejected; None when it is fine."""
    width, height = size
    if width * height > settings.max_pixels:
        pixels, limit = _megapixels(width * height), _megapixels(settings.max_pixels)
        return f"too large: {width}x{height} = {pixels}, above --max-pixels {limit}"
    if min(width, height) < settings.min_side:
        return f"too small: {width}x{height}, shorter side below --min-side {settings.min_side}"
    return None


def _normalise(image: Image.Image, max_pixels: int, notes: list[str]) -> _Decoded | str:
    """Decode the first frame, apply EXIF orientation, convert to RGB; note what the user may not expect."""
    source_format = image.format
    try:
        animated = bool(getattr(image, "is_animated", False))
    except Exception:  # noqa: BLE001 - a broken second frame; the first may still be fine
        animated = False
    if animated and source_format != "MPO":  # MPO's second frame is a depth map or stereo pair
        kind = "multi-page" if source_format == "TIFF" else "animated"
        notes.append(f"{kind} {source_format}: kept the first frame only")
    clean = _is_clean(image, animated)
    source_mode = image.mode
    try:
        image.load()
    except Exception as err:  # noqa: BLE001 - truncated or corrupt pixel data, or a bomb
        return _failure(err, max_pixels)
    icc = image.info.get("icc_profile") if source_mode in MODES_WITH_RGB_PROFILE else None
    rgb = upright_rgb(image, notes)  # the same conversion as training's
    return _Decoded(rgb, jpeg=source_format in ("JPEG", "MPO"), clean=clean and rgb is image, icc=icc)


def stored_suffix(rel: str, jpeg: bool) -> str:
    """The source's own suffix when it names the stored format (.jpeg and .JPG stay), else .jpg or .png."""
    suffix = Path(rel).suffix
    if jpeg:
        return suffix if suffix.lower() in JPEG_SUFFIXES else ".jpg"
    return suffix if suffix.lower() == ".png" else ".png"


# --- decoding helpers ----------------------------------------------------------------------------------------------


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
    """'120 MP', '2.5 MP': as precise as a rejection reason needs."""
    return f"{pixels / 1e6:.0f} MP" if pixels >= 10e6 else f"{pixels / 1e6:.1f} MP"


def _failure(err: Exception, max_pixels: int) -> str:
    """Why PIL could not open or load a file: over the pixel limit, truncated, or otherwise corrupt."""
    if isinstance(err, BOMB_ERRORS):
        found = re.search(r"\((\d+) pixels\)", str(err))
        size = f" {_megapixels(int(found.group(1)))}," if found else ""
        return f"too large:{size} above --max-pixels {_megapixels(max_pixels)} (not decoded)"
    message = _first_line(err)
    lowered = message.lower()
    if isinstance(err, EOFError) or "truncated" in lowered or "broken data stream" in lowered or "eof" in lowered:
        return f"truncated ({message})"
    return f"corrupt ({message})"


def _first_line(err: BaseException) -> str:
    """An exception in at most 200 characters of one line, so a report stays readable."""
    return first_line(err)[:200]


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


def downscale(image: Image.Image, max_side: int) -> Image.Image:
    """LANCZOS to a longer side of `max_side`; reducing_gap=3 box-reduces by whole factors first, which is faster
    and (per Pillow's docs) in most cases indistinguishable from plain resampling."""
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def encode(image: Image.Image, fmt: str, icc_profile: bytes | None = None) -> bytes:
    """The bytes of a re-encoded file: JPEG sources stay JPEG (quality 95), all others become lossless PNG."""
    buffer = io.BytesIO()
    extra = {"icc_profile": icc_profile} if icc_profile else {}
    if fmt == "JPEG":
        image.save(buffer, "JPEG", quality=JPEG_QUALITY, **extra)
    else:
        image.save(buffer, "PNG", compress_level=PNG_COMPRESS_LEVEL, **extra)
    return buffer.getvalue()
