"""`sdtune prep`: the dataset tools of `data_prep` (build, check, caption, cache, shapes)."""

from __future__ import annotations


def main(args: list[str]) -> int:
    from data_prep.cli import main as prep_main

    return prep_main(args)
