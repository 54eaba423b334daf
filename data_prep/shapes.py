"""`sdtune prep shapes`: write the toy world's synthetic dataset of coloured shapes (`sdtune.toy.shapes`).

    sdtune prep shapes --out data/shapes --n 64 --size 64
"""

from __future__ import annotations

import argparse

from sdtune.toy.shapes import COLORS, SHAPES, make_shapes_dataset

EXAMPLES = """examples:
  sdtune prep shapes --out data/shapes --n 64
  sdtune prep shapes --out data/shapes_big --n 300 --size 128 --seed 1 --colors red,blue,purple --shapes circle,square
"""


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder to write (created if missing; files overwritten)")
    parser.add_argument("--n", type=int, default=32, help="number of images (default: %(default)s)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels, at least 16 (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default: %(default)s)")
    parser.add_argument("--colors", type=_names, default=list(COLORS), help="comma-separated PIL colour names")
    parser.add_argument("--shapes", type=_names, default=list(SHAPES), help=f"comma-separated, from {','.join(SHAPES)}")


def run(args: argparse.Namespace) -> int:
    path = make_shapes_dataset(
        args.out, count=args.n, size=args.size, seed=args.seed, colors=args.colors, shapes=args.shapes
    )
    print(f"wrote {args.n} images and metadata.jsonl to {path}")
    return 0
