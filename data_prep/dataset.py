"""Reading (and, for `caption`, rewriting) a built dataset: DST/metadata.jsonl plus the images it names.

Every tool after `build` reads a DST through here. A DST from elsewhere may be a plain imagefolder whose rows only
have `file_name` and `text` (or `caption`); the stored image's width, height and bucket are then read from the image
header (EXIF orientation applied, as training applies it) and the bucket computed for `area`. `load_folder` also
reads folders without metadata.jsonl (a metadata.csv, or images with .txt / .caption sidecars), for `cache`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdtune.data.buckets import Bucket, assign_bucket, format_bucket, make_buckets, parse_bucket
from sdtune.data.images import IMAGE_ERRORS, open_file
from sdtune.data.records import discover_records, jsonl_rows, outside, upright_size
from sdtune.errors import SdtuneError, first_line

METADATA = "metadata.jsonl"
DEFAULT_AREA = 512 * 512


@dataclass
class Entry:
    """One row of metadata.jsonl with what the tools need filled in.

    `row` is the JSON object exactly as read (every key kept, so a rewrite preserves them). `width`/`height` are
    the upright stored size and `bucket` the "WxH" training bucket; they are None when the image is missing or
    unreadable, and `problem` says which.
    """

    index: int
    file_name: str
    path: Path
    text: str
    row: dict[str, Any]
    width: int | None = None
    height: int | None = None
    bucket: str | None = None
    problem: str | None = None


def metadata_path(dst: str | Path) -> Path:
    root = Path(dst).expanduser()
    if not root.is_dir():
        what = "is a file" if root.exists() else "does not exist"
        raise SdtuneError(f"dataset '{dst}' {what}; pass the folder written by `sdtune prep build`")
    path = root / METADATA
    if not path.is_file():
        raise SdtuneError(
            f"dataset '{dst}' has no {METADATA}; build it first with `sdtune prep build SRC --out {dst}`"
        )
    return path


def read_rows(dst: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of DST/metadata.jsonl in file order (blank lines skipped); each must have a `file_name`."""
    path = metadata_path(dst)
    rows = jsonl_rows(path, setting=str(path.parent))
    for number, row in enumerate(rows, start=1):
        if not isinstance(row.get("file_name"), str) or not row["file_name"].strip():
            raise SdtuneError(f"{path}: row {number} has no 'file_name'")
    return rows


def caption_key(rows: Iterable[dict[str, Any]]) -> str:
    """The caption column: `text` as build writes it, or `caption` when only that is present (imagefolders from
    elsewhere); `text` for a file with neither."""
    rows = list(rows)
    if any("text" in row for row in rows):
        return "text"
    return "caption" if any("caption" in row for row in rows) else "text"


def write_rows(dst: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Replace DST/metadata.jsonl atomically: a temporary file in DST, flushed, then `os.replace`."""
    path = Path(dst).expanduser() / METADATA
    handle = tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=path.parent, prefix=f".{METADATA}.", suffix=".tmp", delete=False
    )
    try:
        with handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    return path


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _entry(index: int, root: Path, file_name: str, text: str, row: dict[str, Any]) -> Entry:
    return Entry(
        index=index,
        file_name=file_name,
        path=root / file_name,
        text=text,
        row=row,
        width=_int(row.get("width")),
        height=_int(row.get("height")),
    )


def load_entries(dst: str | Path, area: int | None = None, read_headers: bool = True) -> list[Entry]:
    """Every row of DST/metadata.jsonl as an `Entry`, in file order.

    `area=None` keeps the bucket stored in each row and computes missing ones for DEFAULT_AREA (512²); an explicit
    `area` recomputes every bucket from the image size, for training at another resolution. Width and height come
    from the row when present, else from the image header (`read_headers=False` skips that, leaving them None).
    Missing files, and rows naming a file outside DST (`../x.png`, an absolute path, a symlink leading out), set
    `problem` instead of raising, so `check` can list them all; an outside file is never read.
    """
    root = Path(dst).expanduser()
    rows = read_rows(root)
    buckets: list[Bucket] = make_buckets(area or DEFAULT_AREA)
    key = caption_key(rows)
    entries = []
    for index, row in enumerate(rows):
        entry = _entry(index, root, row["file_name"], str(row.get(key) or "").strip(), row)
        entry.problem = outside(entry.file_name, root, "the dataset folder")
        if entry.problem is None and not entry.path.is_file():
            entry.problem = "missing"
        elif entry.problem is None:
            if (entry.width is None or entry.height is None) and read_headers:
                read_size(entry)
            fill_bucket(entry, buckets, recompute=area is not None)
        entries.append(entry)
    return entries


def load_folder(dst: str | Path, setting: str = "DST") -> list[Entry]:
    """Every image of a folder in any layout `discover_records` reads, sorted by file name.

    The layouts: metadata.jsonl or metadata.csv rows, or image files with optional .txt / .caption sidecars. When
    metadata.jsonl has a row for the image, `row` is that row (with its bucket, width and height), else just
    file_name and text. Reads no image. Raises SdtuneError as `discover_records` does (missing files, no images)
    and for a saved `datasets` folder, which has no image files.
    """
    root = Path(dst).expanduser()
    records = discover_records(root, setting=setting)
    if any(record.table is not None for record in records):
        raise SdtuneError(
            f"{setting} '{dst}' is a saved datasets folder; it needs image files (run sdtune prep build)"
        )
    stored = {}
    if (root / METADATA).is_file():
        stored = {Path(row["file_name"]).as_posix(): row for row in read_rows(root)}
    entries = []
    for index, record in enumerate(records):
        file_name = Path(record.path).relative_to(root).as_posix()
        row = stored.get(file_name) or {"file_name": file_name, "text": record.caption}
        entries.append(_entry(index, root, file_name, record.caption, row))
    return entries


def read_size(entry: Entry) -> None:
    """Set the upright width and height from the image header, or `problem` when the image cannot be read."""
    try:
        with open_file(entry.path) as image:
            entry.width, entry.height = upright_size(image)
    except IMAGE_ERRORS as err:
        entry.problem = f"unreadable ({first_line(err)})"


def fill_bucket(entry: Entry, buckets: list[Bucket], recompute: bool = False) -> None:
    """Set `entry.bucket`: the row's own "WxH" unless `recompute`, else assigned from width/height."""
    stored = entry.row.get("bucket")
    if isinstance(stored, str) and stored.strip() and not recompute:
        try:
            entry.bucket = format_bucket(parse_bucket(stored.strip()))
        except SdtuneError:
            raise SdtuneError(
                f"{METADATA}: '{entry.file_name}' has bucket '{stored}', not WIDTHxHEIGHT (e.g. 512x768); "
                "fix or delete that key"
            ) from None
    elif entry.width and entry.height:
        entry.bucket = format_bucket(assign_bucket(entry.width, entry.height, buckets))
    else:
        entry.bucket = None


def bucket_order(bucket: str) -> tuple[float, str]:
    """Sort key of "WxH" buckets: tall to wide, then by name."""
    width, height = parse_bucket(bucket)
    return width / height, bucket


def quote_names(names: Sequence[str], shown: int = 5) -> str:
    """The first `shown` file names, comma-separated, and how many more there are."""
    text = ", ".join(names[:shown])
    return text + (f" and {len(names) - shown} more" if len(names) > shown else "")
