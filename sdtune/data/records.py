"""Finding (image, caption) pairs in the three layouts people actually have on disk.

1. An imagefolder with `metadata.jsonl` / `metadata.csv` (`file_name` + `text`, or `caption`), as the Hugging Face
   `imagefolder` builder reads it.
2. Plain image files, each with an optional `.txt` / `.caption` sidecar of the same stem (kohya-style folders).
3. A folder written by `datasets.Dataset.save_to_disk` (`image` + `text`/`caption` columns).

Every problem is an `SdtuneError` naming the setting (`data.root` or `data.val_root`) so the CLI prints one line.

Only files inside the folder are read. A row naming `../elsewhere.png`, an absolute path, or a symlink that leads
outside the folder is skipped with its reason (`skipped`), never read: a shared folder must not be able to pull a
user's private images into a LoRA trained on it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from sdtune.data.images import open_file
from sdtune.errors import SdtuneError, first_line

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
MASK_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # PNG first: the lossless format masks are usually in
CAPTION_SUFFIXES = (".txt", ".caption")
CAPTION_COLUMNS = ("text", "caption")
# EXIF orientations that turn the stored pixels by 90°: the upright image has width and height swapped.
_TRANSPOSED = frozenset({5, 6, 7, 8})


@dataclass(frozen=True)
class Record:
    """One training example. `path` names the image in messages; rows of a saved dataset are read from `table`.

    `prefix` (the subset's trigger words) is kept apart from `caption` because tag shuffling must not move it.
    `mask` is the loss-weight image matched to this one, if any.
    """

    path: str
    caption: str
    # A `datasets.Dataset` with one undecoded `image` column; images stay on disk until a worker asks for them.
    table: Any = field(default=None, compare=False, repr=False)
    row: int = -1
    prefix: str = ""
    mask: str | None = None
    prior: bool = False  # a DreamBooth class image (its subset's `prior`)

    def open(self) -> str | io.BytesIO:
        """What `PIL.Image.open` should read: the file itself, or the row's encoded bytes."""
        if self.table is None:
            return self.path
        cell = self.table[self.row]["image"]
        if cell.get("bytes"):
            return io.BytesIO(cell["bytes"])
        return cell["path"]

    def upright_size(self) -> tuple[int, int]:
        """The image's (width, height) as training sees it (EXIF orientation applied), from its header alone."""
        with open_file(self.open()) as image:
            return upright_size(image)


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) after EXIF orientation, which is how training sees the image; reads no pixels."""
    width, height = image.size
    try:
        orientation = image.getexif().get(0x0112)
    except (OSError, ValueError, SyntaxError):
        orientation = None
    return (height, width) if orientation in _TRANSPOSED else (width, height)


def read_text(path: Path) -> str:
    """Captions come from many tools; most write UTF-8, some Windows ones latin-1."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def outside(path: str | Path, root: str | Path, name: str, base: str | Path | None = None) -> str | None:
    """Why `path` (relative to the folder `root`, or absolute) is not inside `base` (default: `root`), or None when it
    is; `name` is what the reason calls `base`.

    Checked on the path as written (`..`, absolute paths) and again with symlinks resolved, so a link inside the
    folder that leads out of it (a file or a folder) counts as leaving it.
    """
    base = root if base is None else base
    written = os.path.normpath(os.path.join(os.path.abspath(root), path))
    if not _within(written, os.path.abspath(base)):
        return f"outside {name}; not read"
    try:
        resolved = os.path.realpath(written)
    except (OSError, ValueError):  # a NUL byte in the name, a symlink loop
        return "not a usable file name; not read"
    if not _within(resolved, os.path.realpath(base)):
        return f"leads outside {name} through a symlink; not read"
    return None


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def discover_records(
    root: str | Path, setting: str = "data.root", skipped: list[str] | None = None, base: str | Path | None = None
) -> list[Record]:
    """All records under `root`, in a deterministic order. `setting` is the option name used in error messages.

    Every file must be inside `base` (default: `root`; a kohya folder's is its parent, the `setting`'s folder). Rows
    and files left out (pointing outside it) are appended to `skipped`, one "SETTING: skipped 'name': reason"
    each; without a list, each is a warning. Nothing left after that is an error that gives the first reason.
    """
    path = Path(root).expanduser()
    if not path.exists():
        raise SdtuneError(f"{setting} '{root}' does not exist")
    if not path.is_dir():
        raise SdtuneError(f"{setting} '{root}' is a file; pass a folder of images")
    left_out: list[str] = []
    inside = _Inside(path, Path(base).expanduser() if base is not None else path, setting, left_out)
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        records = _from_saved_dataset(path, setting, inside)
    elif (path / "metadata.jsonl").is_file():
        rows = jsonl_rows(path / "metadata.jsonl", setting)
        records = _from_metadata(path, path / "metadata.jsonl", rows, setting, inside)
    elif (path / "metadata.csv").is_file():
        records = _from_metadata(path, path / "metadata.csv", _csv_rows(path / "metadata.csv"), setting, inside)
    else:
        records = _from_sidecars(path, inside)
    if not records and left_out:
        raise SdtuneError(f"{setting} '{root}' has no usable images: {len(left_out)} skipped, first {left_out[0]}")
    if not records:
        raise SdtuneError(
            f"{setting} '{root}' has no images ({', '.join(sorted(IMAGE_SUFFIXES))}, searched recursively)"
        )
    for reason in left_out:
        if skipped is not None:
            skipped.append(f"{setting}: skipped {reason}")
        else:
            warnings.warn(f"{setting}: skipped {reason}", stacklevel=2)
    return records


@dataclass
class _Inside:
    """Checks that each file a layout names is inside `base`, and notes the ones that are not in `skipped`."""

    root: Path
    base: Path
    setting: str
    skipped: list[str]

    def __call__(self, path: str | Path, label: str | None = None) -> bool:
        """Whether `path` (relative to `root`) is inside; `label` names it in the note, by default its path from
        `base`."""
        reason = outside(path, self.root, self.setting, self.base)
        if reason is not None:
            label = label or f"'{os.path.relpath(os.path.join(self.root, path), self.base)}'"
            self.skipped.append(f"{label}: {reason}")
        return reason is None


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def _hidden(path: Path, root: Path) -> bool:
    # Skips .ipynb_checkpoints, .cache and friends, which hold stale copies of images.
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _from_sidecars(root: Path, inside: _Inside) -> list[Record]:
    images = sorted(p for p in root.rglob("*") if _is_image(p) and not _hidden(p, root))
    records = []
    for image in images:
        name = image.relative_to(root)
        if not inside(name):
            continue
        sidecars = [name.with_suffix(suffix) for suffix in CAPTION_SUFFIXES if image.with_suffix(suffix).is_file()]
        # A caption file that leads outside is not read either: its text would end up in logs and samples.
        caption = next((read_text(root / s).strip() for s in sidecars if inside(s)), "")
        records.append(Record(path=str(image), caption=caption))
    return records


def jsonl_rows(path: Path, setting: str) -> list[dict]:
    rows = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise SdtuneError(f"{setting}: {path.name} line {number} is not valid JSON ({err.msg})") from err
        if not isinstance(row, dict):
            raise SdtuneError(f"{setting}: {path.name} line {number} is not a JSON object")
        rows.append(row)
    return rows


def _csv_rows(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(read_text(path))))


def _caption_column(columns: set[str] | list[str], where: str, setting: str) -> str:
    found = next((name for name in CAPTION_COLUMNS if name in columns), None)
    if found is None:
        raise SdtuneError(
            f"{setting}: {where} has no caption column 'text' or 'caption' (columns: {', '.join(sorted(columns))})"
        )
    return found


def _from_metadata(root: Path, metadata: Path, rows: list[dict], setting: str, inside: _Inside) -> list[Record]:
    if not rows:
        return []
    columns = set().union(*(row.keys() for row in rows))
    if "file_name" not in columns:
        names = ", ".join(sorted(columns))
        raise SdtuneError(f"{setting}: {metadata.name} has no 'file_name' column (columns: {names})")
    text = _caption_column(columns, metadata.name, setting)
    records, missing = [], []
    for number, row in enumerate(rows, start=1):
        if not inside(str(row["file_name"]), f"{metadata.name} row {number} '{row['file_name']}'"):
            continue
        image = root / str(row["file_name"])
        if not image.is_file():
            missing.append(str(row["file_name"]))
            continue
        records.append(Record(path=str(image), caption=str(row.get(text) or "").strip()))
    if missing:
        raise SdtuneError(
            f"{setting}: {metadata.name} lists {len(missing)} missing image(s), first '{missing[0]}'; "
            "fix the file_name entries or restore the files"
        )
    return sorted(records, key=lambda r: r.path)


def _from_saved_dataset(root: Path, setting: str, inside: _Inside) -> list[Record]:
    import datasets  # imported here: slow to import and only this layout needs it

    try:
        loaded = datasets.load_from_disk(str(root))
    except (OSError, ValueError) as err:
        raise SdtuneError(f"{setting} '{root}' could not be loaded as a saved dataset ({first_line(err)})") from err
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise SdtuneError(f"{setting} '{root}' has no 'train' split (splits: {', '.join(loaded)})")
        loaded = loaded["train"]
    if "image" not in loaded.column_names:
        raise SdtuneError(f"{setting} '{root}' has no 'image' column (columns: {', '.join(loaded.column_names)})")
    text = _caption_column(loaded.column_names, f"dataset '{root}'", setting)
    captions = list(loaded[text])
    images = loaded.select_columns(["image"])
    if isinstance(images.features["image"], datasets.Image):
        images = images.cast_column("image", datasets.Image(decode=False))
    else:  # a plain string column of paths, relative to the dataset folder
        records = []
        for row, (name, caption) in enumerate(zip(images["image"], captions)):
            if not inside(str(name), f"row {row} '{name}'"):
                continue
            records.append(Record(path=str(root / str(name)), caption=str(caption or "").strip()))
        return records
    # Row order is the dataset's own, already deterministic; paths are names for messages only.
    linked = _linked_files(images)
    records = []
    for row, caption in enumerate(captions):
        # Pillow would open such a path from the working directory, so that is where it is checked from.
        if row in linked and not inside(os.path.abspath(linked[row]), f"row {row} '{linked[row]}'"):
            continue
        records.append(Record(path=f"{root}#{row}", caption=str(caption or "").strip(), table=images, row=row))
    return records


def _linked_files(images: Any) -> dict[int, str]:
    """Rows of an undecoded image column that hold a file path instead of the image's bytes, and the path.

    `save_to_disk` embeds the bytes, so these are rare. Read through Arrow, so that finding them does not copy a
    large dataset's bytes into Python."""
    import pyarrow.compute as pc

    column = images.data.column("image")
    has_bytes = pc.greater(pc.binary_length(pc.struct_field(column, "bytes")), 0)
    without_bytes = pc.invert(pc.fill_null(has_bytes, False))
    paths = pc.struct_field(column, "path")
    return {
        int(row): path
        for row in pc.indices_nonzero(without_bytes).to_pylist()
        if (path := paths[int(row)].as_py())
    }


def find_mask(record: Record, mask_dir: Path, bases: list[Path], setting: str) -> str | None:
    """The mask for `record`: its path relative to the first matching base, under `mask_dir`, any image suffix.

    Masks are usually exported as PNG whatever the photo's format, hence the suffix is free. A saved dataset has
    no file path to mirror, so masks for it must come from the alpha channel instead.
    """
    if record.table is not None:
        raise SdtuneError(
            f"{setting} cannot be matched to rows of a saved dataset ('{record.path}'); use data.alpha_mask instead"
        )
    image = Path(record.path)
    suffixes = dict.fromkeys([image.suffix, *MASK_SUFFIXES])
    for base in bases:
        if not image.is_relative_to(base):
            continue
        relative = image.relative_to(base)
        for suffix in suffixes:
            candidate = mask_dir / relative.with_suffix(suffix)
            if candidate.is_file():
                return str(candidate)
    return None
