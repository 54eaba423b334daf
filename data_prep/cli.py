"""`sdtune prep <tool>`: one argparse subcommand per module of `data_prep`.

Each tool module defines `EXAMPLES` (shown in its --help), `add_arguments(parser)` and `run(args) -> int` (the exit
code). Problems users can cause raise `SdtuneError`, which the `sdtune` command prints as one line.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from sdtune.commands.options import Parser

TOOLS = {
    "build": "normalise a folder of images and captions into a clean imagefolder, with a report",
    "check": "pre-flight a built dataset: counts, sizes, buckets vs batch size, captions; HTML contact sheet",
    "caption": "fill empty captions with an image-to-text model (BLIP-style)",
    "cache": "precompute VAE latents and text-encoder outputs for training",
    "shapes": "write a synthetic captioned dataset of coloured shapes (demos and tests)",
}

USAGE = "usage: sdtune prep <tool> [options]\n\ntools:\n" + "".join(
    f"  {name:<9} {what}\n" for name, what in TOOLS.items()
) + """
examples:
  sdtune prep build ~/photos/my_dog --out data/my_dog --prefix "sks dog" --min-side 512
  sdtune prep check data/my_dog --batch-size 4
  sdtune prep shapes --out data/shapes --n 64

Run `sdtune prep <tool> --help` for a tool's options.
"""


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in TOOLS:
        print(f"sdtune: error: unknown prep tool '{name}' (see `sdtune prep --help` for the tools)", file=sys.stderr)
        return 2
    tool = importlib.import_module(f"data_prep.{name}")
    parser = Parser(
        prog=f"sdtune prep {name}",
        description=TOOLS[name][0].upper() + TOOLS[name][1:] + ".",
        epilog=tool.EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tool.add_arguments(parser)
    return tool.run(parser.parse_args(rest))
