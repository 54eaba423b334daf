"""`sdtune prep build SRC --out DST`: turn a folder of images and captions into a clean imagefolder, with a report.

Every image under SRC (recursive; hidden files and folders skipped) is decoded in full, so broken files are found
now rather than mid-training, and normalised to upright 8-bit RGB (see `data_prep.images`). Files that cannot be
used are listed in DST/prep_report.json with a short reason; the build goes on without them. Images that need no
change are copied byte for byte; others are stored as JPEG (quality 95) when they were JPEGs, else PNG. Each kept
image keeps its path relative to SRC (suffix aside) and gets a row in DST/metadata.jsonl: file_name, text,
source, bucket, width, height. SRC is only ever read.

This module runs the build and the command line; reading SRC is `data_prep.sources`, writing DST
`data_prep.build_output`, the per-image work `data_prep.images` and duplicate detection `data_prep.dedupe`.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from data_prep.build_output import (
    METADATA_NAME,
    REPORT_NAME,
    OutputNames,
    check_paths,
    prepare_destination,
    write_arrow,
    write_metadata,
    write_report,
)
from data_prep.dedupe import DuplicateIndex
from data_prep.images import DecodeSettings, Processed, process_image
from data_prep.sources import CAPTION_FROM, IMAGE_SUFFIXES, Captions, scan_source
from sdtune.errors import SdtuneError

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
    """What a build did; the same lists as DST/prep_report.json, for callers that do not want to read it back."""

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


# --- decoding, in worker processes -----------------------------------------------------------------------------------

_WORKER_SETTINGS: DecodeSettings | None = None


def _init_worker(settings: DecodeSettings) -> None:
    """Settings sent once per worker rather than pickled with every task."""
    global _WORKER_SETTINGS
    _WORKER_SETTINGS = settings


def _work(task: tuple[str, str]) -> Processed:
    """One task in a worker; module level so the pool can send it by name."""
    assert _WORKER_SETTINGS is not None
    return process_image(task[0], task[1], _WORKER_SETTINGS)


def _decode_all(tasks: list[tuple[str, str]], settings: DecodeSettings, workers: int, progress: bool | None,
                consume: Callable[[Processed], None]) -> None:
    """Decode every task in `workers` processes (in this one for 1) and hand each result to `consume`, in order.

    In order, so that which of two duplicates is kept, and every name and report, is the same for any --workers.
    Small chunks keep the progress bar moving and the last worker from finishing long after the others. A callback
    rather than a generator, so an error in `consume` (or Ctrl-C) stops the pool at once.
    """
    with contextlib.ExitStack() as stack:
        if workers <= 1 or len(tasks) < 2:
            results = (process_image(path, rel, settings) for path, rel in tasks)
        else:
            pool = stack.enter_context(multiprocessing.Pool(workers, initializer=_init_worker, initargs=(settings,)))
            results = pool.imap(_work, tasks, chunksize=max(1, min(8, len(tasks) // (workers * 4))))
        disable = None if progress is None else not progress
        with tqdm(total=len(tasks), desc="prep build", unit="img", file=sys.stderr, disable=disable) as bar:
            for item in results:
                bar.update(1)
                consume(item)


# --- the build -------------------------------------------------------------------------------------------------------


class _Collector:
    """Takes each decoded image, in source order: rejects it, or checks it for duplicates, captions and stores it."""

    def __init__(self, captions: Captions, names: OutputNames, dedupe: bool, phash_distance: int,
                 bucket_of: Callable[[int, int], str], warnings: list[dict]):
        self.captions, self.names, self.dedupe, self.bucket_of = captions, names, dedupe, bucket_of
        self.duplicates = DuplicateIndex(phash_distance)
        self.rows: list[dict] = []
        self.rejected: list[dict] = []
        self.warnings = warnings

    def add(self, item: Processed) -> None:
        """Record `item`. Only kept images enter the duplicate index, so every match names an image in DST."""
        if item.reason is not None:
            self.rejected.append({"path": item.rel, "reason": item.reason})
            return
        self.warnings.extend({"path": item.rel, "reason": note} for note in item.warnings)
        match = self.duplicates.find(item.pixel_hash, item.phash, item.thumb)
        if match is not None and self.dedupe:
            self.rejected.append({"path": item.rel, "reason": match.describe()})
            return
        if match is not None:
            self.warnings.append({"path": item.rel, "reason": match.describe() + " (kept; --dedupe removes it)"})
        self.duplicates.add(item.rel, item.pixel_hash, item.phash, item.thumb)
        text = self.captions.caption(item.rel)
        name = self.names.claim(item.rel, item.suffix, item.data)
        self.rows.append({
            "file_name": name, "text": text, "source": item.rel, "bucket": self.bucket_of(item.width, item.height),
            "width": item.width, "height": item.height,
        })


def _check_numbers(min_side: int, max_side: int | None, max_pixels: int, phash_distance: int, workers: int) -> None:
    """Refuse settings that make no sense before anything is read or written."""
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

    Every argument is checked, and SRC scanned, before DST is touched. The report is written even when the build
    is interrupted (marked "interrupted"), so --overwrite can clean up after it. `progress=None` shows the bar only
    on a terminal (tqdm's `disable=None`).
    """
    # Imported here: `sdtune.data` may load the DataModule (Lightning, torch), seconds that --help need not pay.
    from sdtune.data.buckets import assign_bucket, format_bucket, make_buckets

    src, out = Path(src).expanduser(), Path(out).expanduser()
    _check_numbers(min_side, max_side, max_pixels, phash_distance, workers)
    workers = workers or os.cpu_count() or 1
    buckets = make_buckets(area)
    src_real, out_real = check_paths(src, out)
    scan = scan_source(src, avoid=out_real)
    if not scan.images and scan.outside:
        raise SdtuneError(
            f"no usable images in '{src}': {len(scan.outside)} symlink(s) lead outside it and were not followed, "
            f"first '{scan.outside[0]['path']}'; copy the files into it instead"
        )
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
    collector = _Collector(captions, OutputNames(out, arrow), dedupe, phash_distance,
                           lambda width, height: format_bucket(assign_bucket(width, height, buckets)),
                           warnings=scan.unsupported_warnings() + scan.outside_captions)
    collector.rejected.extend(scan.outside)  # symlinks leading out of SRC: named, never read
    tasks = [(str(path), rel) for rel, path in scan.images]
    complete = False
    try:
        decode = DecodeSettings(min_side=min_side, max_pixels=max_pixels, max_side=max_side)
        _decode_all(tasks, decode, workers, progress, collector.add)
        complete = True
    finally:
        caption_warnings = captions.warnings_after({rel for rel, _ in scan.images})
        warnings = sorted(collector.warnings + caption_warnings, key=lambda w: w["path"])
        rows, rejected = collector.rows, sorted(collector.rejected, key=lambda entry: entry["path"])
        found = len(tasks) + len(scan.outside)
        if rows:
            write_metadata(out, rows)
        write_report(out, {
            "source": str(src_real),
            "settings": settings,
            "totals": {"found": found, "kept": len(rows), "rejected": len(rejected), "warnings": len(warnings)},
            "rejected": rejected,
            "warnings": warnings,
            **({} if complete else {"interrupted": True}),
        })

    result = BuildResult(out=out, found=found, kept=len(rows), rejected=rejected, warnings=warnings)
    if not rows:
        raise SdtuneError(
            f"no usable images: all {found} in '{src}' were rejected ({_reason_counts(rejected)}); "
            f"see {result.report_path}"
        )
    if arrow:
        write_arrow(out, rows)
    return result


def _category(reason: str) -> str:
    """'too small: 1x1, ...' -> 'too small'; 'duplicate of a.png' -> 'duplicate'."""
    for marker in (" of ", ":", " ("):
        reason = reason.split(marker)[0]
    return reason.strip()


def _reason_counts(entries: list[dict]) -> str:
    """'3 too small, 1 duplicate': a one-line summary of rejections or warnings, most common first."""
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
