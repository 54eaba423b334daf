"""`sdtune prep build SRC --out DST`: turn a folder of images and captions into a clean imagefolder, with a report.

Every image under SRC (recursive; hidden files and folders skipped) is decoded in full, so broken files are found
now rather than mid-training, and normalised to upright 8-bit RGB (see `data_prep.images`). Files that cannot be
used are listed in DST/prep_report.json with a short reason; the build goes on without them. Images that need no
change are copied byte for byte; others are stored as JPEG (quality 95) when they were JPEGs, else PNG. Each kept
image keeps its path relative to SRC (suffix aside) and gets a row in DST/metadata.jsonl: file_name, text,
source, bucket, width, height. SRC is only ever read.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import csv
import io
import json
import multiprocessing
import os
import shutil
import sys
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from data_prep.dedupe import DuplicateIndex
from data_prep.images import DecodeSettings, Processed, process_image
from sdtune.errors import SdtuneError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tiff", ".tif"})
CAPTION_SUFFIXES = (".txt", ".caption")  # in order of preference when an image has both
# Image files this tool cannot read; named in the report rather than silently ignored.
UNSUPPORTED_SUFFIXES = frozenset(
    {".heic", ".heif", ".avif", ".jxl", ".jp2", ".svg", ".psd", ".raw", ".cr2", ".cr3", ".nef", ".arw", ".dng", ".orf"}
)
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
CAPTION_FROM = ("auto", "sidecar", "metadata", "filename")
METADATA_NAME = "metadata.jsonl"
REPORT_NAME = "prep_report.json"
ARROW_DIR = "arrow"

EXAMPLES = """examples:
  sdtune prep build ~/photos/my_dog --out data/my_dog --prefix "sks dog"
  sdtune prep build raw/ --out data/clean --min-side 512 --max-side 1536 --dedupe --workers 2
  sdtune prep build raw/ --out data/clean --caption-from filename       # "red_car-2.jpg" -> "red car 2"
  sdtune prep build raw/ --out data/clean --caption-template "photo of sks dog" --overwrite

Captions come from (--caption-from auto) SRC/metadata.jsonl or metadata.csv if present (file_name + text or
caption), else .txt/.caption files next to each image. Bad files are listed in DST/prep_report.json; the build
exits 0 as long as at least one image was kept. Duplicates are only reported unless --dedupe is given.
"""


@dataclass
class BuildResult:
    out: Path
    found: int
    kept: int
    rejected: list[dict] = field(default_factory=list)
    warnings: list[dict] = field(default_factory=list)

    @property
    def report_path(self) -> Path:
        return self.out / REPORT_NAME

    @property
    def metadata_path(self) -> Path:
        return self.out / METADATA_NAME


# --- the source folder -----------------------------------------------------------------------------------------------


@dataclass
class SourceScan:
    images: list[tuple[str, Path]]  # (path relative to SRC, posix; absolute path), sorted by the relative path
    sidecars: dict[tuple[str, str], list[tuple[str, Path]]]  # (folder, stem) -> [(rel, path)], .txt first
    unsupported: list[str]


def scan_source(src: Path, avoid: Path | None = None) -> SourceScan:
    """Every image and caption file under `src`, hidden ones skipped; symlinked folders followed once."""
    images, unsupported = [], []
    sidecars: dict[tuple[str, str], list[tuple[str, Path]]] = {}
    seen: set[str] = set()
    avoid_real = os.path.realpath(avoid) if avoid is not None else None
    for folder, dirnames, filenames in os.walk(src, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen or (avoid_real and (real == avoid_real or real.startswith(avoid_real + os.sep))):
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        base = Path(folder)
        rel_folder = base.relative_to(src).as_posix()
        rel_folder = "" if rel_folder == "." else rel_folder
        for name in filenames:
            if name.startswith("."):
                continue
            path = base / name
            rel = f"{rel_folder}/{name}" if rel_folder else name
            suffix = path.suffix.lower()
            if suffix in IMAGE_SUFFIXES:
                images.append((rel, path))
            elif suffix in CAPTION_SUFFIXES:
                sidecars.setdefault((rel_folder, path.stem), []).append((rel, path))
            elif suffix in UNSUPPORTED_SUFFIXES:
                unsupported.append(rel)
    images.sort(key=lambda item: item[0])
    for entries in sidecars.values():
        entries.sort(key=lambda item: (CAPTION_SUFFIXES.index(Path(item[0]).suffix.lower()), item[0]))
    return SourceScan(images, sidecars, sorted(unsupported))


# --- captions --------------------------------------------------------------------------------------------------------


def clean_caption(text: str) -> str:
    """Stripped, every run of whitespace (newlines too) one space."""
    return " ".join(text.split())


def decode_caption(data: bytes) -> tuple[str, str | None]:
    """Caption text and, when it was not UTF-8, a note saying how it was read. Never raises."""
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
    return clean_caption(PurePosixPath(rel).stem.replace("_", " ").replace("-", " "))


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


class Captions:
    """Resolves the caption of each kept image, and collects the warnings that go with it."""

    def __init__(self, src: Path, scan: SourceScan, caption_from: str, template: str | None, prefix: str):
        if caption_from not in CAPTION_FROM:
            raise SdtuneError(f"--caption-from must be one of {', '.join(CAPTION_FROM)}, got '{caption_from}'")
        self.src, self.scan = src, scan
        self.template = template
        self.prefix = clean_caption(prefix or "")
        self.warnings: list[dict] = []
        self.used_sidecars: set[str] = set()
        self.metadata_file: Path | None = next(
            (src / name for name in METADATA_FILES if (src / name).is_file()), None
        )
        self.metadata_name = self.metadata_file.name if self.metadata_file else ""
        if caption_from == "auto":
            caption_from = "metadata" if self.metadata_file else "sidecar"
        if caption_from == "metadata" and self.metadata_file is None:
            raise SdtuneError(f"--caption-from metadata: '{src}' has no metadata.jsonl or metadata.csv")
        self.mode = caption_from
        # A fixed template reads no captions at all; "{caption}" in it still needs them.
        self.needs_source = template is None or "{caption}" in template
        self.table: dict[str, str] = {}
        self.listed: dict[str, str] = {}  # NFC relative name -> as written in the metadata file
        if self.mode == "metadata" and self.needs_source:
            self._read_metadata()

    def _warn(self, path: str, reason: str) -> None:
        self.warnings.append({"path": path, "reason": reason})

    def _read_metadata(self) -> None:
        assert self.metadata_file is not None
        name = self.metadata_file.name
        text, note = decode_caption(self.metadata_file.read_bytes())
        if note:
            self._warn(name, note.replace("caption", "file"))
        rows: list[dict] = []
        if name.endswith(".jsonl"):
            for number, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    self._warn(name, f"line {number} is not valid JSON ({err.msg}); skipped")
                    continue
                if not isinstance(row, dict):
                    self._warn(name, f"line {number} is not a JSON object; skipped")
                    continue
                rows.append(row)
        else:
            rows = list(csv.DictReader(io.StringIO(text)))
        columns = set().union(*(row.keys() for row in rows)) if rows else set()
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
            key = _nfc(file_name)
            self.table[key] = "" if value is None else str(value)
            self.listed[key] = file_name

    def caption(self, rel: str) -> str:
        if not self.needs_source:
            return self._finish(clean_caption(self.template or ""))
        if self.mode == "filename":
            found = caption_from_filename(rel)
        elif self.mode == "metadata":
            found = self._from_metadata(rel)
        else:
            found = self._from_sidecar(rel)
        if self.template is not None:
            found = clean_caption(self.template.replace("{caption}", found))
        return self._finish(found)

    def _finish(self, caption: str) -> str:
        if self.prefix:
            return f"{self.prefix}, {caption}" if caption else self.prefix
        return caption

    def _from_metadata(self, rel: str) -> str:
        key = _nfc(rel)
        if key not in self.table:
            self._warn(rel, f"no caption: not listed in {self.metadata_name}")
            return ""
        self.listed.pop(key, None)
        caption = clean_caption(self.table[key])
        if not caption:
            self._warn(rel, f"empty caption in {self.metadata_name}")
        return caption

    def _from_sidecar(self, rel: str) -> str:
        path = PurePosixPath(rel)
        folder = "" if str(path.parent) == "." else path.parent.as_posix()
        entries = self.scan.sidecars.get((folder, path.stem))
        if not entries:
            self._warn(rel, "no caption: no .txt or .caption file next to it")
            return ""
        for sidecar_rel, _ in entries:
            self.used_sidecars.add(sidecar_rel)
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

    def finish(self, all_images: set[str]) -> list[dict]:
        """Warnings about caption sources that matched no image, then every caption warning, in order."""
        if self.mode == "sidecar" and self.needs_source:
            image_keys = set()
            for rel in all_images:
                path = PurePosixPath(rel)
                image_keys.add(("" if str(path.parent) == "." else path.parent.as_posix(), path.stem))
            for key, entries in sorted(self.scan.sidecars.items()):
                if key not in image_keys:
                    for sidecar_rel, _ in entries:
                        self._warn(sidecar_rel, "caption file with no image")
        if self.mode == "metadata" and self.needs_source:
            image_names = {_nfc(rel) for rel in all_images}
            for key, file_name in sorted(self.listed.items()):
                if key not in image_names:
                    self._warn(file_name, f"listed in {self.metadata_name} but there is no such image")
        return self.warnings


# --- the destination folder ------------------------------------------------------------------------------------------


def check_paths(src: Path, out: Path) -> tuple[Path, Path]:
    if not src.exists():
        raise SdtuneError(f"source folder '{src}' does not exist")
    if not src.is_dir():
        raise SdtuneError(f"source '{src}' is a file; pass a folder of images")
    src_real, out_real = src.resolve(), out.resolve()
    if out_real == src_real:
        raise SdtuneError("--out is the source folder; prep tools never write into SRC, choose another folder")
    if out_real.is_relative_to(src_real):
        raise SdtuneError(f"--out '{out}' is inside the source folder; prep tools never write into SRC")
    if src_real.is_relative_to(out_real):
        raise SdtuneError(f"the source folder is inside --out '{out}'; choose an --out outside it")
    if out.exists() and not out.is_dir():
        raise SdtuneError(f"--out '{out}' is a file; pass a folder")
    return src_real, out_real


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
    """Delete what an earlier `prep build` wrote to `out` (per its metadata and report). Returns what was removed."""
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
    out_real = out.resolve()
    removed: list[Path] = []
    metadata = out / METADATA_NAME
    if metadata.is_file():
        for line in metadata.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                file_name = json.loads(line).get("file_name")
            except (ValueError, AttributeError):
                continue
            if not isinstance(file_name, str):
                continue
            target = out / file_name
            if target.resolve().is_relative_to(out_real) and target.is_file() and not target.is_symlink():
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
    for folder, _, _ in sorted(os.walk(out), key=lambda item: -len(item[0])):  # deepest first
        if Path(folder) != out and not any(Path(folder).iterdir()):
            Path(folder).rmdir()
    return removed


class OutputNames:
    """Stored names: the source's relative path with the stored suffix; clashes get _1, _2, ... never overwrite.

    Names are compared NFC-normalised and case-folded, so a.png and a.PNG (or café in either Unicode form) stay two
    files on case-insensitive file systems too. Top-level names the build itself writes are never used for images.
    """

    def __init__(self, out: Path, reserved_top: tuple[str, ...]):
        self.out = out
        self.reserved_top = {name.casefold() for name in reserved_top}
        self.taken: set[str] = set()

    def _key(self, rel: str) -> str:
        return _nfc(rel).casefold()

    def candidates(self, rel: str, suffix: str) -> Iterator[str]:
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
            key = self._key(name)
            if key in self.taken or key in self.reserved_top:
                continue
            target = self.out / name
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with open(target, "xb") as handle:  # never replaces a file, even one we did not expect
                    handle.write(data)
            except (FileExistsError, IsADirectoryError):
                self.taken.add(key)
                continue
            self.taken.add(key)
            return name
        raise AssertionError("unreachable")


# --- the build -------------------------------------------------------------------------------------------------------

_WORKER_SETTINGS: DecodeSettings | None = None


def _init_worker(settings: DecodeSettings) -> None:
    global _WORKER_SETTINGS
    _WORKER_SETTINGS = settings


def _work(task: tuple[str, str]) -> Processed:
    assert _WORKER_SETTINGS is not None
    return process_image(task[0], task[1], _WORKER_SETTINGS)


@contextlib.contextmanager
def _processed(tasks: list[tuple[str, str]], settings: DecodeSettings, workers: int) -> Iterator[Iterator[Processed]]:
    """Results in the order of `tasks`, decoded in `workers` processes (in this one when workers is 1)."""
    if workers <= 1 or len(tasks) < 2:
        yield (process_image(path, rel, settings) for path, rel in tasks)
        return
    chunksize = max(1, min(8, len(tasks) // (workers * 4)))
    with multiprocessing.Pool(workers, initializer=_init_worker, initargs=(settings,)) as pool:
        yield pool.imap(_work, tasks, chunksize=chunksize)


def _atomic_write(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def build_dataset(
    src: str | Path,
    out: str | Path,
    *,
    caption_from: str = "auto",
    caption_template: str | None = None,
    prefix: str = "",
    min_side: int = 256,
    max_side: int | None = None,
    max_pixels: int = 100_000_000,
    phash_distance: int = 4,
    dedupe: bool = False,
    area: int = 512 * 512,
    workers: int = 1,
    arrow: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
) -> BuildResult:
    """Build DST from SRC; see the module docstring. Raises SdtuneError for bad arguments or when nothing is kept.

    `progress=None` shows the bar only on a terminal (tqdm's `disable=None`).
    """
    # Imported here: `sdtune.data` loads the DataModule (Lightning, torch), ~4 s that --help need not pay.
    from sdtune.data.buckets import assign_bucket, format_bucket, make_buckets

    src, out = Path(src).expanduser(), Path(out).expanduser()
    if min_side < 1:
        raise SdtuneError(f"--min-side must be at least 1, got {min_side}")
    if max_side is not None and max_side < min_side:
        raise SdtuneError(f"--max-side ({max_side}) must be at least --min-side ({min_side})")
    if max_pixels < 1:
        raise SdtuneError(f"--max-pixels must be positive, got {max_pixels}")
    if phash_distance > 64:
        raise SdtuneError(f"--phash-distance is a Hamming distance between 64-bit hashes (0..64), got {phash_distance}")
    if workers < 0:
        raise SdtuneError(f"--workers must be 0 (all cores) or more, got {workers}")
    workers = workers or os.cpu_count() or 1
    buckets = make_buckets(area)
    src_real, out_real = check_paths(src, out)
    scan = scan_source(src, avoid=out_real)
    if not scan.images:
        raise SdtuneError(
            f"no images in '{src}' ({', '.join(sorted(IMAGE_SUFFIXES))}; searched recursively, hidden folders skipped)"
        )
    captions = Captions(src, scan, caption_from, caption_template, prefix)
    prepare_destination(out, overwrite)

    settings = {
        "caption_from": captions.mode, "caption_template": caption_template, "prefix": prefix, "min_side": min_side,
        "max_side": max_side, "max_pixels": max_pixels, "phash_distance": phash_distance, "dedupe": dedupe,
        "area": area, "workers": workers, "arrow": arrow,
    }
    decode = DecodeSettings(min_side=min_side, max_pixels=max_pixels, max_side=max_side)
    reserved = (METADATA_NAME, REPORT_NAME, METADATA_NAME + ".tmp", REPORT_NAME + ".tmp")
    reserved += (ARROW_DIR,) if arrow else ()
    names = OutputNames(out, reserved_top=reserved)
    duplicates = DuplicateIndex(phash_distance)
    rows: list[dict] = []
    rejected: list[dict] = []
    image_warnings: list[dict] = [
        {"path": rel, "reason": f"unsupported format ({Path(rel).suffix.lower()}), skipped: convert it to JPEG or PNG"}
        for rel in scan.unsupported
    ]
    tasks = [(str(path), rel) for rel, path in scan.images]
    complete = False
    try:
        with _processed(tasks, decode, workers) as results, tqdm(
            total=len(tasks), desc="prep build", unit="img", file=sys.stderr,
            disable=None if progress is None else not progress,
        ) as bar:
            for item in results:
                bar.update(1)
                if item.reason is not None:
                    rejected.append({"path": item.rel, "reason": item.reason})
                    continue
                image_warnings.extend({"path": item.rel, "reason": note} for note in item.warnings)
                match = duplicates.find(item.pixel_hash, item.phash, item.thumb)
                if match is not None and dedupe:
                    rejected.append({"path": item.rel, "reason": match.describe()})
                    continue
                if match is not None:
                    reason = match.describe() + " (kept; --dedupe removes it)"
                    image_warnings.append({"path": item.rel, "reason": reason})
                duplicates.add(item.rel, item.pixel_hash, item.phash, item.thumb)
                text = captions.caption(item.rel)
                name = names.claim(item.rel, item.suffix, item.data)
                rows.append({
                    "file_name": name, "text": text, "source": item.rel,
                    "bucket": format_bucket(assign_bucket(item.width, item.height, buckets)),
                    "width": item.width, "height": item.height,
                })
        complete = True
    finally:
        caption_warnings = captions.finish({rel for rel, _ in scan.images})
        warnings = sorted(image_warnings + caption_warnings, key=lambda w: w["path"])
        if rows:
            _atomic_write(out / METADATA_NAME, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        report = {
            "source": str(src_real),
            "settings": settings,
            "totals": {"found": len(scan.images), "kept": len(rows), "rejected": len(rejected),
                       "warnings": len(warnings)},
            "rejected": rejected,
            "warnings": warnings,
        }
        if not complete:
            report["interrupted"] = True
        _atomic_write(out / REPORT_NAME, json.dumps(report, indent=2, ensure_ascii=False) + "\n")

    result = BuildResult(out=out, found=len(scan.images), kept=len(rows), rejected=rejected, warnings=warnings)
    if not rows:
        reasons = _reason_counts(rejected)
        raise SdtuneError(
            f"no usable images: all {len(scan.images)} in '{src}' were rejected ({reasons}); "
            f"see {result.report_path}"
        )
    if arrow:
        write_arrow(out, rows)
    return result


def write_arrow(out: Path, rows: list[dict]) -> Path:
    """A `datasets` copy of the kept images (bytes embedded) and captions in out/arrow, for load_from_disk."""
    import datasets  # slow to import; only --arrow needs it

    target = out / ARROW_DIR
    table = datasets.Dataset.from_dict(
        {"image": [str(out / row["file_name"]) for row in rows], "text": [row["text"] for row in rows]}
    ).cast_column("image", datasets.Image())
    table.save_to_disk(str(target))
    return target


def _category(reason: str) -> str:
    """'too small: 1x1, ...' -> 'too small'; 'duplicate of a.png' -> 'duplicate'."""
    for marker in (" of ", ":", " ("):
        reason = reason.split(marker)[0]
    return reason.strip()


def _reason_counts(entries: list[dict]) -> str:
    counts = Counter(_category(entry["reason"]) for entry in entries)
    return ", ".join(f"{count} {category}" for category, count in counts.most_common())


# --- command line ----------------------------------------------------------------------------------------------------


def _pixels(text: str) -> int:
    """'100000000', '1e8', '100M' or '100MP'."""
    value = text.strip().upper().removesuffix("P")
    scale = 1
    if value.endswith("M"):
        value, scale = value[:-1], 1_000_000
    try:
        return int(float(value) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a pixel count such as 100000000 or 100M") from None


def _area(text: str) -> int:
    """'262144' or '512x512'."""
    try:
        if "x" in text.lower():
            width, height = (int(part) for part in text.lower().split("x"))
            return width * height
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an area such as 262144 or 512x512") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="folder of images (searched recursively; never modified)")
    parser.add_argument("--out", required=True, metavar="DST", help="folder to write: images + metadata.jsonl")
    captions = parser.add_argument_group("captions")
    captions.add_argument(
        "--caption-from", choices=CAPTION_FROM, default="auto",
        help="auto: SRC/metadata.jsonl or .csv if present, else sidecars; sidecar: IMAGE.txt / IMAGE.caption; "
        "metadata: file_name + text/caption columns; filename: the file's stem, _ and - as spaces (default: auto)",
    )
    captions.add_argument(
        "--caption-template", metavar="TEXT",
        help='one caption for every image, e.g. "photo of sks dog"; "{caption}" in it is replaced by the caption '
        "from --caption-from",
    )
    captions.add_argument("--prefix", default="", metavar="TEXT", help='trigger word(s) put first: "PREFIX, caption"')
    images = parser.add_argument_group("images")
    images.add_argument("--min-side", type=int, default=256, metavar="N",
                        help="reject images whose shorter side is below N pixels (default: 256)")
    images.add_argument("--max-side", type=int, default=None, metavar="N",
                        help="downscale (LANCZOS) so the longer side is at most N (default: keep the size)")
    images.add_argument("--max-pixels", type=_pixels, default=100_000_000, metavar="N",
                        help="reject images above N pixels from their header, without decoding (default: 100M)")
    images.add_argument("--area", type=_area, default=512 * 512, metavar="N",
                        help="bucket area for the metadata's bucket column, e.g. 1024x1024 for SDXL (default: 512x512)")
    dupes = parser.add_argument_group("duplicates")
    dupes.add_argument("--dedupe", action="store_true",
                       help="drop duplicates (the first in sorted order is kept); by default they are only reported")
    dupes.add_argument("--phash-distance", type=int, default=4, metavar="D",
                       help="near-duplicates: perceptual hashes at most D bits apart (default: 4; -1: exact only)")
    output = parser.add_argument_group("output")
    output.add_argument("--arrow", action="store_true",
                        help="also write DST/arrow, a datasets.save_to_disk copy (images embedded)")
    output.add_argument("--overwrite", action="store_true",
                        help="replace a previous build in DST (only the files it wrote are removed)")
    output.add_argument("--workers", type=int, default=1, metavar="N",
                        help="decoding processes (default: 1; 0: one per CPU core)")


def run(args: argparse.Namespace) -> int:
    result = build_dataset(
        args.src, args.out, caption_from=args.caption_from, caption_template=args.caption_template,
        prefix=args.prefix, min_side=args.min_side, max_side=args.max_side, max_pixels=args.max_pixels,
        phash_distance=args.phash_distance, dedupe=args.dedupe, area=args.area, workers=args.workers,
        arrow=args.arrow, overwrite=args.overwrite,
    )
    print(f"kept {result.kept} of {result.found} images in {result.out} "
          f"({len(result.rejected)} rejected, {len(result.warnings)} warnings)")
    if result.rejected:
        print(f"  rejected: {_reason_counts(result.rejected)}")
    if result.warnings:
        print(f"  warnings: {_reason_counts(result.warnings)}")
    print(f"report: {result.report_path}")
    return 0
