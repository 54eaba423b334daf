"""Progress bars of the data passes that come before training (image headers, content hashes)."""

from __future__ import annotations

import sys
from typing import Iterable, TypeVar

from lightning.pytorch.utilities import rank_zero_only
from tqdm import tqdm

T = TypeVar("T")


def progress_bar(items: Iterable[T], desc: str, unit: str = "image") -> Iterable[T]:
    """`items`, with a bar on stderr while they are gone through: on a terminal (a log gets no bar), on rank 0 only,
    cleared when done."""
    shown = None if rank_zero_only.rank == 0 else True  # None: tqdm shows it on a terminal only
    return tqdm(items, desc=desc, unit=unit, file=sys.stderr, disable=shown, leave=False)
