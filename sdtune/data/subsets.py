"""Several image folders in one run, each with its own repeat count, trigger words and fallback caption.

DreamBooth-style runs mix a few instance images (shown many times) with many regularisation images (shown once).
kohya sd-scripts encodes this in folder names, `<repeats>_<class words>` (e.g. `10_sks dog`), under one parent;
such a parent is expanded here into one subset per folder, so kohya datasets work unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info

from sdtune.data.records import IMAGE_SUFFIXES, Record, discover_records, find_mask
from sdtune.errors import SdtuneError

KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")
# Files that mark a folder as one dataset of another layout, even when its images sit in subfolders.
LAYOUT_FILES = ("metadata.jsonl", "metadata.csv", "dataset_dict.json", "state.json")


@dataclass
class Subset:
    """One folder of training images (any layout `data.root` accepts) and how to use it.

    Attributes:
        root: The folder.
        repeats: Times each image is shown per epoch; every repeat gets its own crop, flip and caption draws.
        prefix: Trigger word(s) put in front of every caption as the first tag; never shuffled or dropped by the
            tag options (caption dropout still drops the whole caption).
        default_caption: Caption for images that have none; for class images, the class prompt ("a photo of a dog").
        prior: Class images for DreamBooth's prior preservation (kohya's regularisation images): their loss is
            weighted by model.objective.prior_loss_weight.
        generate: With `prior`: make sure the folder holds this many images, generating the missing ones from
            `default_caption` with the base model through sdtune's sampler before training (once: later runs find
            them).
    """

    root: str
    repeats: int = 1
    prefix: str = ""
    default_caption: str = ""
    prior: bool = False
    generate: int = 0


def check_subsets(subsets: Sequence[Subset | dict]) -> list[Subset]:
    """Validate `data.subsets`; plain dicts (from Python callers) become `Subset`s."""
    if not subsets:
        raise SdtuneError("data.subsets is empty; list at least one folder, or pass data.root instead")
    checked = []
    for index, subset in enumerate(subsets):
        setting = f"data.subsets[{index}]"
        if isinstance(subset, dict):
            try:
                subset = Subset(**subset)
            except TypeError as err:
                raise SdtuneError(f"{setting}: {err} (keys: root, repeats, prefix, default_caption, prior, generate)") from None
        if not str(subset.root).strip():
            raise SdtuneError(f"{setting}.root is empty")
        if subset.repeats < 1:
            raise SdtuneError(f"{setting}.repeats must be ≥ 1, got {subset.repeats}")
        if subset.generate < 0 or (subset.generate and not subset.prior):
            raise SdtuneError(f"{setting}.generate must be ≥ 0 and is for class images only (prior: true), got {subset.generate}")
        if subset.generate and not subset.default_caption.strip():
            raise SdtuneError(f"{setting}.generate needs the class prompt as default_caption (e.g. 'a photo of a dog')")
        checked.append(subset)
    return checked


def kohya_subsets(parent: Subset, setting: str) -> list[Subset] | None:
    """The `<repeats>_<words>` folders of a kohya parent as subsets, or None if `parent.root` is not one.

    A kohya parent has no images of its own, only such folders. Repeats multiply with the parent's; the folder's
    words become the default caption (kohya's class tokens) unless the parent sets one.
    """
    root = Path(parent.root).expanduser()
    if not root.is_dir():
        return None
    entries = sorted(entry for entry in root.iterdir() if not entry.name.startswith("."))
    if any(e.is_file() and (e.suffix.lower() in IMAGE_SUFFIXES or e.name in LAYOUT_FILES) for e in entries):
        return None
    folders = [entry for entry in entries if entry.is_dir()]
    if not any(KOHYA_FOLDER.match(folder.name) for folder in folders):
        return None
    children = []
    for folder in folders:
        match = KOHYA_FOLDER.match(folder.name)
        if match is None:
            raise SdtuneError(
                f"{setting} '{parent.root}' has kohya '<repeats>_<words>' folders but also '{folder.name}'; "
                "rename it to that pattern or move it out"
            )
        if int(match.group(1)) < 1:
            raise SdtuneError(f"{setting}: folder '{folder.name}' must repeat ≥ 1 times, got {match.group(1)}")
        words = match.group(2).strip()
        children.append(
            replace(parent, root=str(folder), repeats=parent.repeats * int(match.group(1)),
                    default_caption=parent.default_caption or words)
        )  # fmt: skip
    return children


def load_subsets(
    subsets: Sequence[Subset], settings: Sequence[str], mask_dir: str | None = None, announce: bool = True,
    skipped: list[str] | None = None,
) -> list[tuple[Record, int]]:
    """Every image of every subset, with its default caption, prefix and mask filled in, and its repeat count.

    Masks are looked up relative to the subset's folder first, then (for kohya folders) relative to the parent,
    so `mask_dir` may mirror either. `announce` logs one line per subset, which is how users check that the
    repeats they meant are the ones in effect. Rows left out (outside their folder) go to `skipped`, as in
    `discover_records`.
    """
    masks = Path(mask_dir).expanduser() if mask_dir else None
    pairs: list[tuple[Record, int]] = []
    for subset, setting in zip(subsets, settings, strict=True):
        children = kohya_subsets(subset, setting)
        parent_root = Path(subset.root).expanduser()
        for child in children or [subset]:
            bases = list(dict.fromkeys([Path(child.root).expanduser(), parent_root]))
            # Class images still to be generated (prepare_data makes them) are not there yet.
            pending = child.generate and not any(Path(child.root).expanduser().glob("*"))
            records = [
                replace(
                    record,
                    caption=record.caption or child.default_caption,
                    prefix=child.prefix,
                    mask=find_mask(record, masks, bases, "data.mask_dir") if masks else None,
                    prior=child.prior,
                )
                for record in ([] if pending else discover_records(child.root, setting, skipped, base=parent_root))
            ]
            if announce and (children or len(subsets) > 1 or child.repeats > 1 or child.prefix):
                name = Path(child.root).name if children else child.root
                rank_zero_info(f"data: subset '{name}': {len(records)} images × {child.repeats} repeats")
            pairs.extend((record, child.repeats) for record in records)
    return pairs
