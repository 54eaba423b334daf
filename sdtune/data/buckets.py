"""Aspect-ratio buckets: training sizes of about the same pixel area, so wide and tall images are not cropped square.

NovelAI's scheme, as kohya sd-scripts uses it: for a target area (512² for SD1.5, 1024² for SDXL) list every
(width, height) whose sides are multiples of `step`, lie within [min_side, max_side] and whose area does not exceed
the target; each image goes to the bucket whose aspect ratio is closest to its own (in log space, so 2:1 and 1:2
are equally far from 1:1). The image is then resized to cover the bucket and centre- or randomly cropped.
`sdtune prep build`, `check` and `cache` assign buckets; the training DataModule still crops squares.
"""

from __future__ import annotations

import math

from sdtune.errors import SdtuneError

Bucket = tuple[int, int]


def make_buckets(area: int = 512 * 512, step: int = 64, min_side: int | None = None, max_side: int | None = None) -> list[Bucket]:
    """All (width, height) buckets for `area`, sorted by aspect ratio (tall first), square included."""
    if area <= 0 or step <= 0:
        raise SdtuneError(f"buckets: area and step must be positive, got {area} and {step}")
    side = int(math.isqrt(area)) // step * step
    if side < step:
        raise SdtuneError(f"buckets: area {area} is smaller than one {step}×{step} cell")
    min_side = min_side or max(step, side // 2)
    max_side = max_side or side * 2
    buckets = set()
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, area // width // step * step)
        if height >= min_side:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets, key=lambda b: b[0] / b[1])


def assign_bucket(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is closest to width/height (ties go to the larger area)."""
    if width <= 0 or height <= 0:
        raise SdtuneError(f"buckets: image size must be positive, got {width}x{height}")
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def parse_bucket(text: str) -> Bucket:
    """'512x768' → (512, 768), the form buckets take in metadata.jsonl."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise SdtuneError(f"bucket '{text}' is not WIDTHxHEIGHT, e.g. 512x768") from None
    return width, height


def format_bucket(bucket: Bucket) -> str:
    return f"{bucket[0]}x{bucket[1]}"
