"""The toy world's data, also the offline demo and test dataset: small PNGs of one coloured shape, captioned "a {color} {shape}", and a judge.

It needs no download, builds in well under a second, and has captions a tiny model can actually learn, so the
demo recipes and the tests train on real (image, caption) pairs. The output is an imagefolder
(`metadata.jsonl` with `file_name` and `text`), the layout `sdtune.data` reads first.

`judge(image)` reads such an image back: which colour and which shape it shows, or None when there is no single
clear shape. A shape whose colour is far from every named one (a grey or washed-out blob) gets colour None,
"nothing", rather than the nearest name. It is meant for images a model generated after training on this dataset
(soft edges, colour noise), so samples can be scored against their prompts.

`sdtune prep shapes` writes such a dataset from the command line.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageColor, ImageDraw

from sdtune.errors import SdtuneError

BACKGROUNDS = ((255, 255, 255), (235, 235, 235))
SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow")
# What `judge` can name by default: the dataset's colours and a few more that are far apart in RGB. Close pairs
# (red/brown, white on a light background, pink) are left out on purpose: model outputs drift in hue and a crowded
# palette would turn that drift into wrong answers. Pass `colors=` to judge images drawn with other colours.
JUDGE_COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "magenta", "black")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple) -> None:
    left, top, right, bottom = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:  # triangle
        draw.polygon([((left + right) // 2, top), (right, bottom), (left, bottom)], fill=fill)


def make_shapes_dataset(
    out: str | Path,
    count: int = 32,
    size: int = 64,
    seed: int = 0,
    colors: Sequence[str] = COLORS,
    shapes: Sequence[str] = SHAPES,
) -> Path:
    """Write `count` images and their metadata.jsonl to `out`; the same arguments give the same bytes."""
    if count < 1:
        raise SdtuneError(f"shapes: count must be at least 1, got {count}")
    if size < 16:
        raise SdtuneError(f"shapes: size must be at least 16 pixels, got {size}")
    if not colors or not shapes:
        raise SdtuneError("shapes: colors and shapes must not be empty")
    unknown = [shape for shape in shapes if shape not in SHAPES]
    if unknown:
        raise SdtuneError(f"shapes: unknown shape '{unknown[0]}' (choose from {', '.join(SHAPES)})")
    try:
        rgb = {name: ImageColor.getrgb(name) for name in colors}
    except ValueError as err:
        raise SdtuneError(f"shapes: {err} (use PIL colour names such as 'red')") from err

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    # Cycling through every (color, shape) pair keeps the captions balanced even for small counts.
    pairs = list(itertools.product(colors, shapes))
    rows = []
    for i in range(count):
        color, shape = pairs[i % len(pairs)]
        side = rng.randint(size // 3, size * 2 // 3)
        left, top = rng.randint(0, size - side - 1), rng.randint(0, size - side - 1)
        image = Image.new("RGB", (size, size), rng.choice(BACKGROUNDS))
        _draw_shape(ImageDraw.Draw(image), shape, (left, top, left + side, top + side), rgb[color])
        name = f"{i:05d}.png"
        image.save(out / name)
        rows.append({"file_name": name, "text": f"a {color} {shape}"})
    (out / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return out




# --- judging ---------------------------------------------------------------------------------------------------


class Judgement(NamedTuple):
    """What `judge` saw: a (color, shape) tuple with names, plus the measurements it decided on.

    `color` is None when the shape's colour is none of the palette's (further than MAX_COLOR_DISTANCE from all)."""

    color: str | None
    shape: str
    fill: float  # foreground pixels / bounding-box area: square ≈ 1, circle ≈ π/4, triangle ≈ 1/2
    imbalance: float  # |area in one half of the box − other half| / area, worst axis: triangle ≈ 1/2, others ≈ 0
    coverage: float  # foreground pixels / image pixels

    @property
    def caption(self) -> str:
        """'a purple square', or just 'a square' when the colour is nothing named (so it matches no prompt)."""
        return f"a {self.color} {self.shape}" if self.color is not None else f"a {self.shape}"


MIN_CONTRAST = 48.0  # RGB distance from the background below which a pixel is background whatever else happens
MIN_BORDER_BACKGROUND = 0.6  # share of border pixels that must look like the background (noise images fail here)
MIN_COVERAGE = 0.01  # the shape must cover at least 1 % of the image (and 12 pixels)
MIN_MAIN_SHARE = 0.75  # the largest blob must hold this share of all foreground pixels: one shape, not several
MIN_COLOR_AGREEMENT = 0.65  # share of the inner pixels whose nearest named colour is the answer (far from all: None)
# RGB distance from the shape's median colour to the nearest named colour beyond which the colour is "nothing".
# Measured with JUDGE_COLORS: every grey from (60, 60, 60) to white is at least 104 from all of them (128 for grey
# 128, which is nearest purple; 204 for light grey 192), and so is a 50/50 mix with grey 128 of red, blue, cyan,
# magenta and black (110; green, yellow, orange 90-94; purple 64, as purple is half grey already). The medians of
# 486 `make_shapes_dataset` shapes (all 9 colours × 3 shapes, 32/64/128 px) stay within 26 of the drawn colour under
# ±20 noise and a 1-pixel blur, and within 74 under a 1.5-pixel blur (a 32-pixel green triangle washed towards the
# background). 80 keeps all of those named and leaves a margin of 24 below the nearest grey.
MAX_COLOR_DISTANCE = 80.0
SQUARE_MIN_FILL = 0.895  # between circle (0.785) and square (1.0)
CIRCLE_MIN_FILL = 0.65  # between triangle (0.5) and circle (0.785)
TRIANGLE_MIN_IMBALANCE = 0.25  # a triangle holds 3/4 of its area on its base's side; blur shaves the apex, not that


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected blob of `mask` as a boolean array (a breadth-first fill; no scipy needed)."""
    height, width = mask.shape
    flat = mask.ravel().tolist()
    seen = bytearray(height * width)
    best: list[int] = []
    for start in np.flatnonzero(mask).tolist():
        if seen[start]:
            continue
        seen[start] = 1
        component, stack = [start], [start]
        while stack:
            pixel = stack.pop()
            y, x = divmod(pixel, width)
            up, down, left, right = pixel - width, pixel + width, pixel - 1, pixel + 1
            for other, inside in ((up, y > 0), (down, y < height - 1), (left, x > 0), (right, x < width - 1)):
                if inside and flat[other] and not seen[other]:
                    seen[other] = 1
                    stack.append(other)
                    component.append(other)
        if len(component) > len(best):
            best = component
    out = np.zeros(height * width, dtype=bool)
    out[best] = True
    return out.reshape(height, width)


def _imbalance(profile: np.ndarray, span: np.ndarray) -> float:
    """|mass before the middle of the box − mass after it| along one axis (a middle line counts half each way)."""
    middle = (span[0] + span[-1]) / 2.0
    index = np.arange(len(profile))
    before = profile[index < middle].sum() + 0.5 * profile[index == middle].sum()
    after = profile[index > middle].sum() + 0.5 * profile[index == middle].sum()
    return float(abs(before - after))


def _erode(mask: np.ndarray) -> np.ndarray:
    """Pixels whose 4 neighbours are all in `mask`: the inside of a shape, without its anti-aliased rim."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    inner[0, :] = inner[-1, :] = False
    inner[:, 0] = inner[:, -1] = False
    return inner


def judge(image: Image.Image, colors: Sequence[str] = JUDGE_COLORS) -> Judgement | None:
    """The (color, shape) one coloured shape on a plain background shows, or None if there is no clear single one.

    Background = the median colour of the image border; foreground = pixels further from it than half the
    strongest contrast in the image (so blur and anti-aliasing do not change the measured area). The largest
    connected blob is the shape; its colour is the nearest of `colors` (PIL names) to the median of its inner
    pixels, or None when that median is further than MAX_COLOR_DISTANCE from every one of them, and its shape
    follows from how much of its bounding box it fills. None for a blank or noise image, a tiny blob, several
    blobs of similar size, a stretched blob, or a blob of mixed colours.
    """
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    height, width, _ = pixels.shape
    if min(height, width) < 8:
        return None
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    background = np.median(border, axis=0)
    distance = np.linalg.norm(pixels - background, axis=-1)
    threshold = max(MIN_CONTRAST, 0.5 * float(np.percentile(distance, 99)))
    border_distance = np.linalg.norm(border - background, axis=-1)
    if np.mean(border_distance < threshold) < MIN_BORDER_BACKGROUND:
        return None  # no plain background: noise, a photo, or a shape filling the frame
    mask = distance > threshold
    total = int(mask.sum())
    if total < max(12, MIN_COVERAGE * height * width):
        return None
    shape_mask = _largest_component(mask)
    area = int(shape_mask.sum())
    if area < max(12, MIN_COVERAGE * height * width) or area < MIN_MAIN_SHARE * total:
        return None

    rows, cols = np.flatnonzero(shape_mask.any(axis=1)), np.flatnonzero(shape_mask.any(axis=0))
    box_h, box_w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    if not 0.5 <= box_w / box_h <= 2.0:
        return None
    fill = area / float(box_w * box_h)
    imbalance = max(_imbalance(shape_mask.sum(axis=1), rows), _imbalance(shape_mask.sum(axis=0), cols)) / area
    if fill >= SQUARE_MIN_FILL:
        shape = "square"
    elif fill >= CIRCLE_MIN_FILL and imbalance < TRIANGLE_MIN_IMBALANCE:
        shape = "circle"
    else:
        shape = "triangle"

    inner = _erode(shape_mask)
    inside = pixels[inner if inner.sum() >= 4 else shape_mask]
    palette = np.array([ImageColor.getrgb(name)[:3] for name in colors], dtype=np.float32)
    pixel_distance = np.linalg.norm(inside[:, None, :] - palette[None], axis=-1)
    median_distance = np.linalg.norm(palette - np.median(inside, axis=0), axis=-1)
    choice = int(median_distance.argmin())
    if median_distance[choice] > MAX_COLOR_DISTANCE:
        # "Nothing" only if the blob itself is of such a colour: a mix of named colours can have a far median too.
        color, agreement = None, np.mean(pixel_distance.min(axis=1) > MAX_COLOR_DISTANCE)
    else:
        color, agreement = colors[choice], np.mean(pixel_distance.argmin(axis=1) == choice)
    if agreement < MIN_COLOR_AGREEMENT:
        return None
    return Judgement(color, shape, fill, imbalance, area / float(height * width))


# --- `sdtune prep shapes` --------------------------------------------------------------------------------------
