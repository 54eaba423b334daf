"""The source side of `sdtune prep build`: which files under SRC are images, and what each image's caption is.

SRC is only ever read, and nothing outside it: a symlink in SRC that leads out of it (to a file or a folder) is
reported, never followed, so a folder from someone else cannot pull in files from elsewhere on the disk. Captions
come from SRC/metadata.jsonl or metadata.csv, from .txt/.caption files next to the images (sidecars), from file
names, or from a fixed template; whatever could not be matched up (an image without a caption, a caption without an
image, a file that is not UTF-8) becomes a warning for the report, never an error.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import operator
import os
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from sdtune.data.records import outside
from sdtune.errors import SdtuneError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tiff", ".tif"})
CAPTION_SUFFIXES = (".txt", ".caption")  # in order of preference when an image has both
# Image files this tool cannot read; named in the report rather than silently ignored.
UNSUPPORTED_SUFFIXES = frozenset(
    {".heic", ".heif", ".avif", ".jxl", ".jp2", ".svg", ".psd", ".raw", ".cr2", ".cr3", ".nef", ".arw", ".dng", ".orf"}
)
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
CAPTION_FROM = ("auto", "sidecar", "metadata", "filename")

Sidecars = dict[tuple[str, str], list[tuple[str, Path]]]  # (folder, stem) -> [(rel, path)], preferred first


@dataclass
class SourceScan:
    images: list[tuple[str, Path]]  # (path relative to SRC, posix; absolute path), sorted by the relative path
    sidecars: Sidecars
    unsupported: list[str]
    # {"path", "reason"} of each symlink leading out of SRC, never followed or read: images and folders (a folder's
    # path ends in "/"), which the report lists as rejected, and caption files, which it lists as warnings.
    outside: list[dict]
    outside_captions: list[dict]

    def unsupported_warnings(self) -> list[dict]:
        """Image files PIL cannot read are named in the report, so a user is not left wondering where they went."""
        return [
            {"path": rel, "reason": f"unsupported format ({PurePosixPath(rel).suffix.lower()}), skipped: "
             "convert it to JPEG or PNG"}
            for rel in self.unsupported
        ]


def scan_source(src: Path, avoid: Path | None = None) -> SourceScan:
    """Every image and caption file under `src`, hidden ones skipped; symlinked folders followed once.

    `avoid` (the output folder) is never entered, so a symlink inside SRC pointing at DST cannot feed a build its
    own output. Results are sorted, so the first of two duplicates, and every report, is the same on every run.
    """
    images, unsupported, leaving, leaving_captions = [], [], [], []
    sidecars: Sidecars = {}
    seen: set[str] = set()
    avoid_real = os.path.realpath(avoid) if avoid is not None else None
    for folder, dirnames, filenames in os.walk(src, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen or (avoid_real and (real == avoid_real or real.startswith(avoid_real + os.sep))):
            dirnames[:] = []
            continue
        seen.add(real)
        rel_folder = _posix_folder(Path(folder).relative_to(src).as_posix())
        subfolders = []
        for name in sorted(d for d in dirnames if not d.startswith(".")):
            rel = f"{rel_folder}/{name}" if rel_folder else name
            reason = outside(rel, src, "SRC")  # a linked folder is judged before it is listed
            if reason is None:
                subfolders.append(name)
            else:
                leaving.append({"path": f"{rel}/", "reason": reason})
        dirnames[:] = subfolders
        for name in filenames:
            if name.startswith("."):
                continue
            path = Path(folder, name)
            rel = f"{rel_folder}/{name}" if rel_folder else name
            suffix = path.suffix.lower()
            if suffix in IMAGE_SUFFIXES or suffix in CAPTION_SUFFIXES:
                reason = outside(rel, src, "SRC")
                if reason is not None:
                    entry = {"path": rel, "reason": reason}
                    (leaving if suffix in IMAGE_SUFFIXES else leaving_captions).append(entry)
                    continue
            if suffix in IMAGE_SUFFIXES:
                images.append((rel, path))
            elif suffix in CAPTION_SUFFIXES:
                sidecars.setdefault((rel_folder, path.stem), []).append((rel, path))
            elif suffix in UNSUPPORTED_SUFFIXES:
                unsupported.append(rel)
    images.sort(key=lambda item: item[0])
    for entries in sidecars.values():
        entries.sort(key=lambda item: (CAPTION_SUFFIXES.index(Path(item[0]).suffix.lower()), item[0]))
    by_path = operator.itemgetter("path")
    return SourceScan(
        images, sidecars, sorted(unsupported), sorted(leaving, key=by_path), sorted(leaving_captions, key=by_path)
    )


def _posix_folder(folder: str) -> str:
    """'' for the top of SRC (pathlib spells it '.'), else the folder as given."""
    return "" if folder == "." else folder


def sidecar_key(rel: str) -> tuple[str, str]:
    """(folder, stem) of an image or caption path: an image and its sidecars share it."""
    path = PurePosixPath(rel)
    return _posix_folder(path.parent.as_posix()), path.stem


def nfc(text: str) -> str:
    """One Unicode spelling of a name: macOS writes é as e + accent, most other tools as one character."""
    return unicodedata.normalize("NFC", text)


# --- caption text ----------------------------------------------------------------------------------------------------


def clean_caption(text: str) -> str:
    """Stripped, every run of whitespace (newlines too) one space."""
    return " ".join(text.split())


def decode_caption(data: bytes) -> tuple[str, str | None]:
    """Caption text and, when it was not UTF-8, a note saying how it was read. Never raises.

    Caption tools write UTF-8 (maybe with a BOM), some Windows ones UTF-16 or Windows-1252; latin-1 accepts any
    byte, so a caption is always read, and the note tells the user to check it.
    """
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16"), None
        except UnicodeDecodeError:
            pass
    try:
        return data.decode("utf-8-sig"), None
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252"), "caption is not UTF-8; read as Windows-1252"
    except UnicodeDecodeError:
        return data.decode("latin-1"), "caption is not UTF-8; read as latin-1"


def caption_from_filename(rel: str) -> str:
    """'red_car-2.jpg' -> 'red car 2': for folders whose file names are the only description there is."""
    return clean_caption(PurePosixPath(rel).stem.replace("_", " ").replace("-", " "))


def read_metadata_rows(path: Path, warn: Callable[[str, str], None]) -> list[dict]:
    """The rows of a metadata.jsonl or .csv; undecodable lines are skipped with `warn(path_name, reason)`."""
    name = path.name
    text, note = decode_caption(path.read_bytes())
    if note:
        warn(name, note.replace("caption", "file"))
    if not name.endswith(".jsonl"):
        return list(csv.DictReader(io.StringIO(text)))
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            warn(name, f"line {number} is not valid JSON ({err.msg}); skipped")
            continue
        if not isinstance(row, dict):
            warn(name, f"line {number} is not a JSON object; skipped")
            continue
        rows.append(row)
    return rows


# --- captions per image ----------------------------------------------------------------------------------------------


class Captions:
    """Resolves the caption of each kept image, and collects the warnings that go with it.

    One object per build because the warnings need the whole picture: a sidecar or metadata row is only known to
    match no image once every image has asked for its caption (see `warnings_after`).
    """

    def __init__(self, src: Path, scan: SourceScan, caption_from: str, template: str | None, prefix: str):
        if caption_from not in CAPTION_FROM:
            raise SdtuneError(f"--caption-from must be one of {', '.join(CAPTION_FROM)}, got '{caption_from}'")
        self.sidecars = scan.sidecars
        self.template = template
        self.prefix = clean_caption(prefix or "")
        self.warnings: list[dict] = []
        self.metadata_file = next((src / name for name in METADATA_FILES if (src / name).is_file()), None)
        self.metadata_name = self.metadata_file.name if self.metadata_file else ""
        if caption_from == "auto":
            caption_from = "metadata" if self.metadata_file else "sidecar"
        if caption_from == "metadata" and self.metadata_file is None:
            raise SdtuneError(f"--caption-from metadata: '{src}' has no metadata.jsonl or metadata.csv")
        self.mode = caption_from
        # A fixed template reads no captions at all; "{caption}" in it still needs them.
        self.needs_source = template is None or "{caption}" in template
        self.table: dict[str, str] = {}  # NFC relative name -> caption
        self.listed: dict[str, str] = {}  # NFC relative name -> as written in the metadata file, until matched
        if self.mode == "metadata" and self.needs_source:
            self._read_metadata()

    def _warn(self, path: str, reason: str) -> None:
        self.warnings.append({"path": path, "reason": reason})

    def _read_metadata(self) -> None:
        """Fill `table` from the metadata file; a file without the needed columns is a mistake worth stopping for."""
        rows = read_metadata_rows(self.metadata_file, self._warn)
        columns = set().union(*(row.keys() for row in rows))
        if "file_name" not in columns:
            raise SdtuneError(f"'{self.metadata_file}' has no 'file_name' column; use --caption-from sidecar")
        column = next((c for c in ("text", "caption") if c in columns), None)
        if column is None:
            raise SdtuneError(f"'{self.metadata_file}' has no 'text' or 'caption' column")
        for row in rows:
            file_name = str(row.get("file_name") or "").replace("\\", "/").removeprefix("./")
            if not file_name:
                continue
            value = row.get(column)
            key = nfc(file_name)
            self.table[key] = "" if value is None else str(value)
            self.listed[key] = file_name

    def caption(self, rel: str) -> str:
        """The caption for the image at `rel`: from --caption-from, through the template, after the prefix."""
        if not self.needs_source:
            return self._with_prefix(clean_caption(self.template or ""))
        if self.mode == "filename":
            found = caption_from_filename(rel)
        elif self.mode == "metadata":
            found = self._from_metadata(rel)
        else:
            found = self._from_sidecar(rel)
        if self.template is not None:
            found = clean_caption(self.template.replace("{caption}", found))
        return self._with_prefix(found)

    def _with_prefix(self, caption: str) -> str:
        if self.prefix:
            return f"{self.prefix}, {caption}" if caption else self.prefix
        return caption

    def _from_metadata(self, rel: str) -> str:
        key = nfc(rel)
        if key not in self.table:
            self._warn(rel, f"no caption: not listed in {self.metadata_name}")
            return ""
        self.listed.pop(key, None)
        caption = clean_caption(self.table[key])
        if not caption:
            self._warn(rel, f"empty caption in {self.metadata_name}")
        return caption

    def _from_sidecar(self, rel: str) -> str:
        """The preferred sidecar's text (.txt over .caption); an unreadable one is a warning, not a failed build."""
        entries = self.sidecars.get(sidecar_key(rel))
        if not entries:
            self._warn(rel, "no caption: no .txt or .caption file next to it")
            return ""
        sidecar_rel, sidecar = entries[0]
        try:
            text, note = decode_caption(sidecar.read_bytes())
        except OSError as err:
            self._warn(sidecar_rel, f"caption file could not be read ({err.strerror or err})")
            return ""
        if note:
            self._warn(sidecar_rel, note)
        caption = clean_caption(text)
        if not caption:
            self._warn(rel, f"empty caption: {PurePosixPath(sidecar_rel).name} is blank")
        return caption

    def warnings_after(self, all_images: set[str]) -> list[dict]:
        """Every caption warning, then one for each caption source that matched none of `all_images`.

        `all_images` is every image found, kept or not: a rejected image's sidecar is not an orphan.
        """
        if not self.needs_source:
            return self.warnings
        if self.mode == "sidecar":
            image_keys = {sidecar_key(rel) for rel in all_images}
            for key, entries in sorted(self.sidecars.items()):
                if key not in image_keys:
                    for sidecar_rel, _ in entries:
                        self._warn(sidecar_rel, "caption file with no image")
        if self.mode == "metadata":
            image_names = {nfc(rel) for rel in all_images}
            for key, file_name in sorted(self.listed.items()):
                if key not in image_names:
                    leaves = outside(file_name, self.metadata_file.parent, "SRC")
                    self._warn(file_name, f"listed in {self.metadata_name} but {leaves or 'there is no such image'}")
        return self.warnings
