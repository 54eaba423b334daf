"""The offline demo and test dataset: small PNGs of one coloured shape, captioned "a {color} {shape}".

It needs no download, builds in well under a second, and has captions a tiny model can actually learn, so the
demo recipes and the tests train on real (image, caption) pairs. The output is an imagefolder
(`metadata.jsonl` with `file_name` and `text`), the layout `sdtune.data` reads first.

    python -m data_prep.shapes data/shapes --count 64 --size 64
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageColor, ImageDraw

from sdtune.errors import SdtuneError

BACKGROUNDS = ((255, 255, 255), (235, 235, 235))
SHAPES = ("circle", "square", "triangle")


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
    colors: Sequence[str] = ("red", "green", "blue", "yellow"),
    shapes: Sequence[str] = ("circle", "square", "triangle"),
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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder to write (created if missing)")
    parser.add_argument("--count", type=int, default=32, help="number of images")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = make_shapes_dataset(args.out, count=args.count, size=args.size, seed=args.seed)
    print(f"wrote {args.count} images to {path}")


if __name__ == "__main__":
    main()
