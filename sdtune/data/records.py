"""Finding (image, caption) pairs in the three layouts people actually have on disk.

1. An imagefolder with `metadata.jsonl` / `metadata.csv` (`file_name` + `text`, or `caption`), as the Hugging Face
   `imagefolder` builder reads it.
2. Plain image files, each with an optional `.txt` / `.caption` sidecar of the same stem (kohya-style folders).
3. A folder written by `datasets.Dataset.save_to_disk` (`image` + `text`/`caption` columns).

Every problem is an `SdtuneError` naming the setting (`data.root` or `data.val_root`) so the CLI prints one line.
"""

from __future__ import annotations

import csv
import io
import json
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


def discover_records(root: str | Path, setting: str = "data.root") -> list[Record]:
    """All records under `root`, in a deterministic order. `setting` is the option name used in error messages."""
    path = Path(root).expanduser()
    if not path.exists():
        raise SdtuneError(f"{setting} '{root}' does not exist")
    if not path.is_dir():
        raise SdtuneError(f"{setting} '{root}' is a file; pass a folder of images")
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        records = _from_saved_dataset(path, setting)
    elif (path / "metadata.jsonl").is_file():
        records = _from_metadata(path, path / "metadata.jsonl", jsonl_rows(path / "metadata.jsonl", setting), setting)
    elif (path / "metadata.csv").is_file():
        records = _from_metadata(path, path / "metadata.csv", _csv_rows(path / "metadata.csv"), setting)
    else:
        records = _from_sidecars(path)
    if not records:
        raise SdtuneError(
            f"{setting} '{root}' has no images ({', '.join(sorted(IMAGE_SUFFIXES))}, searched recursively)"
        )
    return records


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def _hidden(path: Path, root: Path) -> bool:
    # Skips .ipynb_checkpoints, .cache and friends, which hold stale copies of images.
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _from_sidecars(root: Path) -> list[Record]:
    images = sorted(p for p in root.rglob("*") if _is_image(p) and not _hidden(p, root))
    records = []
    for image in images:
        sidecars = [image.with_suffix(suffix) for suffix in CAPTION_SUFFIXES]
        caption = next((read_text(s).strip() for s in sidecars if s.is_file()), "")
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


def _from_metadata(root: Path, metadata: Path, rows: list[dict], setting: str) -> list[Record]:
    if not rows:
        return []
    columns = set().union(*(row.keys() for row in rows))
    if "file_name" not in columns:
        names = ", ".join(sorted(columns))
        raise SdtuneError(f"{setting}: {metadata.name} has no 'file_name' column (columns: {names})")
    text = _caption_column(columns, metadata.name, setting)
    records, missing = [], []
    for row in rows:
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


def _from_saved_dataset(root: Path, setting: str) -> list[Record]:
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
        paths = [str(root / p) for p in list(images["image"])]
        return [Record(path=p, caption=str(c or "").strip()) for p, c in zip(paths, captions)]
    # Row order is the dataset's own, already deterministic; paths are names for messages only.
    return [
        Record(path=f"{root}#{row}", caption=str(caption or "").strip(), table=images, row=row)
        for row, caption in enumerate(captions)
    ]


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
