"""`sdtune env`: the versions to paste into a bug report."""

from __future__ import annotations

import argparse

from sdtune.commands.options import Parser
from sdtune.environment import report


def main(args: list[str]) -> int:
    parser = Parser(
        prog="sdtune env",
        description="Print the versions of sdtune, Python, torch (CUDA/MPS, GPUs), diffusers, transformers, peft, "
        "lightning and the other libraries, and whether each is in sdtune's declared range: paste it into bug reports.",
        epilog="example:\n  sdtune env",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(args)
    print(report())
    return 0
