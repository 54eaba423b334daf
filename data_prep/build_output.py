"""The destination side of `sdtune prep build`: what may be written where in DST, and writing it.

DST must be empty, or hold a previous build that --overwrite may remove (only the files that build wrote). Kept
images are written under their source path with the stored suffix, never over an existing file; metadata.jsonl and
prep_report.json are replaced atomically, so an interrupted build never leaves half a file behind.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from data_prep.sources import nfc
from sdtune.errors import SdtuneError
from sdtune.paths import check_output_apart

METADATA_NAME = "metadata.jsonl"
REPORT_NAME = "prep_report.json"
ARROW_DIR = "arrow"
TEMPORARY_SUFFIX = ".tmp"  # of metadata and report while they are written


def check_paths(src: Path, out: Path) -> tuple[Path, Path]:
    """SRC and DST resolved, after refusing any layout in which writing DST could touch SRC or read itself."""
    if not src.exists():
        raise SdtuneError(f"source folder '{src}' does not exist")
    if not src.is_dir():
        raise SdtuneError(f"source '{src}' is a file; pass a folder of images")
    check_output_apart(out, {"SRC": src})
    if out.exists() and not out.is_dir():
        raise SdtuneError(f"--out '{out}' is a file; pass a folder")
    return src.resolve(), out.resolve()


def prepare_destination(out: Path, overwrite: bool) -> None:
    """An empty `out`; with `overwrite`, a previous build's files there are removed first (and nothing else)."""
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise SdtuneError(
                f"--out '{out}' is not empty; choose an empty folder or pass --overwrite to replace a previous build"
            )
        remove_previous_build(out)
    out.mkdir(parents=True, exist_ok=True)


def remove_previous_build(out: Path) -> list[Path]:
    """Delete what an earlier `prep build` wrote to `out` (per its metadata and report). Returns what was removed.

    Without a report `out` is not known to be a build at all, so nothing is deleted. Files the user added to an
    earlier build stay, and so do the folders that hold them.
    """
    report_path = out / REPORT_NAME
    if not report_path.is_file():
        raise SdtuneError(
            f"--overwrite: '{out}' is not empty and holds no {REPORT_NAME} from a previous build; "
            "refusing to delete anything there, choose an empty folder"
        )
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        report = {}
    removed: list[Path] = []
    metadata = out / METADATA_NAME
    if metadata.is_file():
        for target in _listed_files(out, metadata):
            target.unlink()
            removed.append(target)
        metadata.unlink()
        removed.append(metadata)
    arrow = out / ARROW_DIR
    if (report.get("settings") or {}).get("arrow") and (arrow / "state.json").is_file():
        shutil.rmtree(arrow)
        removed.append(arrow)
    report_path.unlink()
    removed.append(report_path)
    _remove_empty_folders(out)
    return removed


def _listed_files(out: Path, metadata: Path) -> Iterator[Path]:
    """The regular files inside `out` that `metadata` names; an edited metadata file cannot point elsewhere."""
    out_real = out.resolve()
    for line in metadata.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            file_name = json.loads(line).get("file_name")
        except (ValueError, AttributeError):
            continue
        if not isinstance(file_name, str):
            continue
        target = out / file_name
        if target.resolve().is_relative_to(out_real) and target.is_file() and not target.is_symlink():
            yield target


def _remove_empty_folders(out: Path) -> None:
    """Every empty folder below `out`, deepest first so a folder emptied by its children goes too."""
    for folder, _, _ in sorted(os.walk(out), key=lambda item: -len(item[0])):
        if Path(folder) != out and not any(Path(folder).iterdir()):
            Path(folder).rmdir()


class OutputNames:
    """Stored names: the source's relative path with the stored suffix; clashes get _1, _2, ... never overwrite.

    Names are compared NFC-normalised and case-folded, so a.png and a.PNG (or café in either Unicode form) stay two
    files on case-insensitive file systems too. Top-level names the build itself writes are never used for images.
    """

    def __init__(self, out: Path, arrow: bool = False):
        self.out = out
        reserved = [METADATA_NAME, REPORT_NAME, METADATA_NAME + TEMPORARY_SUFFIX, REPORT_NAME + TEMPORARY_SUFFIX]
        reserved += [ARROW_DIR] if arrow else []
        self.reserved_top = {name.casefold() for name in reserved}
        self.taken: set[str] = set()

    def candidates(self, rel: str, suffix: str) -> Iterator[str]:
        """rel with `suffix`, then with _1, _2, ... added to the stem; a reserved top folder gets a trailing _."""
        path = PurePosixPath(rel).with_suffix(suffix)
        parts = list(path.parts)
        while len(parts) > 1 and parts[0].casefold() in self.reserved_top:
            parts[0] += "_"
        path = PurePosixPath(*parts)
        yield path.as_posix()
        number = 1
        while True:
            yield path.with_name(f"{path.stem}_{number}{path.suffix}").as_posix()
            number += 1

    def claim(self, rel: str, suffix: str, data: bytes) -> str:
        """Write `data` under the first free name for `rel` and return that name."""
        for name in self.candidates(rel, suffix):
            key = nfc(name).casefold()
            if key in self.taken or key in self.reserved_top:
                continue
            self.taken.add(key)
            target = self.out / name
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with open(target, "xb") as handle:  # never replaces a file, even one we did not expect
                    handle.write(data)
            except (FileExistsError, IsADirectoryError):
                continue
            return name
        raise AssertionError("unreachable: candidates() never ends")


def write_metadata(out: Path, rows: list[dict]) -> None:
    """DST/metadata.jsonl, one row per kept image (the imagefolder layout `datasets` and `sdtune train` read)."""
    _atomic_write(out / METADATA_NAME, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_report(out: Path, report: dict) -> None:
    """DST/prep_report.json; its presence is what lets a later --overwrite know DST is a build."""
    _atomic_write(out / REPORT_NAME, json.dumps(report, indent=2, ensure_ascii=False) + "\n")


def _atomic_write(path: Path, text: str) -> None:
    """Write beside `path`, then rename over it: readers see the old file or the new one, never a partial one."""
    temporary = path.with_name(path.name + TEMPORARY_SUFFIX)
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def write_arrow(out: Path, rows: list[dict]) -> Path:
    """A `datasets` copy of the kept images (bytes embedded) and captions in out/arrow, for load_from_disk."""
    import datasets  # slow to import; only --arrow needs it

    target = out / ARROW_DIR
    table = datasets.Dataset.from_dict(
        {"image": [str(out / row["file_name"]) for row in rows], "text": [row["text"] for row in rows]}
    ).cast_column("image", datasets.Image())
    table.save_to_disk(str(target))
    return target
