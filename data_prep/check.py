"""`sdtune prep check DST`: pre-flight a built dataset before spending GPU hours on it.

Reads every image (so truncated files show up now, not in epoch 7) and reports counts, a histogram of the shorter
side, how many images each aspect-ratio bucket holds against one global batch (batch × devices × accumulate), and
caption problems: empty, duplicated, or longer than CLIP's 75-token window. Writes the numbers as JSON and an HTML
contact sheet (thumbnails embedded, grouped by bucket). Exit code 1 when there are errors, else 0.

Errors: missing or unreadable images, rows naming a file outside DST (never read), a bucket with fewer images than
one global batch, no readable image at all.
Warnings: empty captions, duplicate captions, captions over `--max-tokens`, metadata width/height that disagree with
the image, rows naming the same file twice, images in DST that metadata.jsonl does not list.

Token counts: with `--tokenizer PRETRAINED` they come from that model's CLIP tokenizer (exact), else they are
estimated and the report says so (`data_prep.check_captions`).
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from data_prep.check_captions import check_captions
from data_prep.check_report import format_table, issue, write_report
from data_prep.dataset import (
    DEFAULT_AREA,
    IMAGE_ERRORS,
    METADATA,
    Entry,
    bucket_order,
    fill_bucket,
    load_entries,
    quote_names,
    read_rows,
    upright_size,
)
from sdtune.data.buckets import make_buckets
from sdtune.data.images import open_file, upright_rgb
from sdtune.data.records import IMAGE_SUFFIXES
from sdtune.errors import SdtuneError, first_line
from sdtune.paths import check_output_apart

EXAMPLES = """examples:
  sdtune prep check data/my_dog --batch-size 4
  sdtune prep check data/my_dog --batch-size 4 --devices 2 --accumulate 2 --tokenizer runwayml/stable-diffusion-v1-5
  sdtune prep check data/sdxl_set --area 1048576 --batch-size 2 --json check.json --sheet sheet.html
"""

REPORT_NAME = "check_report.json"
SHEET_NAME = "contact_sheet.html"
SIZE_BINS = ((0, "<256"), (256, "256-511"), (512, "512-767"), (768, "768-1023"), (1024, ">=1024"))
THUMB_SIDE = 192
OUTSIDE = ("outside", "leads outside")  # how `sdtune.data.records.outside` reasons start


@dataclass
class CheckResult:
    report: dict[str, Any]
    entries: list[Entry]
    thumbnails: dict[int, str] = field(default_factory=dict)  # entry index -> base64 JPEG


def _size_bin(short_side: int) -> str:
    label = SIZE_BINS[0][1]
    for lower, name in SIZE_BINS:
        if short_side >= lower:
            label = name
    return label


def _thumbnail(image: Image.Image) -> str:
    image = upright_rgb(image)  # as training sees it: a 16-bit PNG is not shown white
    image.thumbnail((THUMB_SIDE, THUMB_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=75)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _read_images(entries: list[Entry], thumbnails_for: int, progress: bool) -> tuple[dict[int, str], list[dict]]:
    """Decode every image: fills upright width/height, sets `problem` on failures, makes the first thumbnails."""
    thumbnails: dict[int, str] = {}
    warnings = []
    bar = tqdm(entries, desc="reading images", unit="img", file=sys.stderr, disable=None if progress else True)
    for entry in bar:
        if entry.problem:
            continue
        try:
            with open_file(entry.path) as image:  # only the formats training reads
                width, height = upright_size(image)
                if entry.index < thumbnails_for:
                    image.draft("RGB", (THUMB_SIDE * 2, THUMB_SIDE * 2))  # JPEG: decode at reduced scale
                image.load()  # full decode: truncated and corrupt files fail here
                if entry.index < thumbnails_for:
                    thumbnails[entry.index] = _thumbnail(image)
        except IMAGE_ERRORS as err:
            entry.problem = f"unreadable ({first_line(err)})"
            entry.width = entry.height = None
            continue
        if entry.width and entry.height and (entry.width, entry.height) != (width, height):
            warnings.append(
                issue(
                    "size_mismatch",
                    f"{entry.file_name}: {METADATA} says {entry.width}x{entry.height}, the image is {width}x{height}",
                    [entry.file_name],
                )
            )
        entry.width, entry.height = width, height
    return thumbnails, warnings


def _bucket_fill(good: list[Entry], batch_size: int, devices: int, accumulate: int) -> tuple[list[dict], list[dict]]:
    """One row per bucket (tall to wide) against one global batch, and an error for each bucket short of one."""
    global_batch = batch_size * devices * accumulate
    per_bucket = Counter(entry.bucket for entry in good)
    rows, errors = [], []
    for bucket in sorted(per_bucket, key=bucket_order):
        count = per_bucket[bucket]
        rows.append(
            {"bucket": bucket, "images": count, "batches": count // global_batch, "leftover": count % global_batch,
             "ok": count >= global_batch}
        )
        if count < global_batch:
            errors.append(
                issue(
                    "bucket_too_small",
                    f"bucket {bucket} has {count} image{'s' if count != 1 else ''}, fewer than one batch of "
                    f"{global_batch} (batch {batch_size} × devices {devices} × accumulate {accumulate}): "
                    "those images would never train with drop_last / form a partial batch — merge buckets or "
                    "lower the batch",
                    [entry.file_name for entry in good if entry.bucket == bucket],
                )
            )
    return rows, errors


def _unlisted_images(root: Path, listed: set[str]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if path.suffix.lower() in IMAGE_SUFFIXES and not any(p.startswith(".") for p in relative.parts):
            if relative.as_posix() not in listed and path.is_file():
                found.append(relative.as_posix())
    return sorted(found)


def _metadata_warnings(root: Path, entries: list[Entry]) -> list[dict]:
    """Rows naming the same file twice, and images in DST that no row names."""
    warnings = []
    names = Counter(entry.file_name for entry in entries)
    twice = sorted(name for name, n in names.items() if n > 1)
    if twice:
        message = f"{len(twice)} file(s) listed more than once in {METADATA} ({quote_names(twice)})"
        warnings.append(issue("duplicate_row", message, twice))
    unlisted = _unlisted_images(root, set(names))
    if unlisted:
        message = (
            f"{len(unlisted)} image(s) in the dataset are not in {METADATA} and will not train "
            f"({quote_names(unlisted)})"
        )
        warnings.append(issue("unlisted_image", message, unlisted))
    return warnings


def check_dataset(
    dst: str | Path,
    batch_size: int = 1,
    devices: int = 1,
    accumulate: int = 1,
    area: int | None = None,
    tokenizer: str | None = None,
    max_tokens: int = 75,
    thumbnails_for: int = 0,
    progress: bool = True,
) -> CheckResult:
    """Inspect DST and return the report (every number, `errors`, `warnings`) and the entries it was built from.

    `area=None` uses each row's stored bucket (rows without one: 512² buckets); an explicit area recomputes all.
    Thumbnails are made for the first `thumbnails_for` rows, for the contact sheet.
    """
    for name, value in (("batch-size", batch_size), ("devices", devices), ("accumulate", accumulate)):
        if value < 1:
            raise SdtuneError(f"check: --{name} must be at least 1, got {value}")
    if max_tokens < 1:
        raise SdtuneError(f"check: --max-tokens must be at least 1, got {max_tokens}")
    if area is not None and area <= 0:
        raise SdtuneError(f"check: --area must be positive, got {area}")

    root = Path(dst).expanduser()
    entries = load_entries(root, area=area, read_headers=False)
    thumbnails, warnings = _read_images(entries, thumbnails_for, progress)
    buckets = make_buckets(area or DEFAULT_AREA)
    for entry in entries:
        if not entry.problem:
            fill_bucket(entry, buckets, recompute=area is not None)
    good = [entry for entry in entries if not entry.problem]
    missing = [entry.file_name for entry in entries if entry.problem == "missing"]
    escaping = [entry for entry in entries if entry.problem and entry.problem.startswith(OUTSIDE)]
    unreadable = [entry for entry in entries if entry.problem and entry.problem != "missing" and entry not in escaping]

    errors = [
        issue("missing_image", f"{name}: listed in {METADATA} but the file does not exist", [name]) for name in missing
    ]
    errors += [issue("outside_dataset", f"{e.file_name}: {e.problem}", [e.file_name]) for e in escaping]
    errors += [issue("unreadable_image", f"{e.file_name}: {e.problem}", [e.file_name]) for e in unreadable]
    if not good:
        errors.append(issue("no_images", f"no readable images in '{dst}'"))
    bucket_rows, bucket_errors = _bucket_fill(good, batch_size, devices, accumulate)
    errors += bucket_errors
    sizes = {label: 0 for _, label in SIZE_BINS}
    for entry in good:
        sizes[_size_bin(min(entry.width, entry.height))] += 1
    captions = check_captions(good, tokenizer, max_tokens)
    warnings += captions.warnings + _metadata_warnings(root, entries)

    report = {
        "dataset": str(root),
        "settings": {
            "batch_size": batch_size, "devices": devices, "accumulate": accumulate,
            "global_batch": batch_size * devices * accumulate, "area": area, "tokenizer": tokenizer,
            "max_tokens": max_tokens,
        },
        "counts": {
            "rows": len(entries), "images": len(good), "missing": len(missing), "unreadable": len(unreadable),
            "outside": len(escaping),
            **captions.counts,
        },
        "sizes": {"measure": "shorter side (px)", "bins": sizes},
        "buckets": bucket_rows,
        "tokens": captions.tokens,
        "long_captions": captions.long,
        "errors": errors,
        "warnings": warnings,
        "ok": not errors,
    }
    return CheckResult(report=report, entries=entries, thumbnails=thumbnails)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dst", help="the dataset folder (written by `sdtune prep build`, or any imagefolder with metadata.jsonl)")
    parser.add_argument("--batch-size", type=_positive_int, default=1, help="per-device batch size (default 1)")
    parser.add_argument("--devices", type=_positive_int, default=1, help="number of GPUs (default 1)")
    parser.add_argument("--accumulate", type=_positive_int, default=1, help="gradient accumulation steps (default 1)")
    parser.add_argument(
        "--area", type=_positive_int, default=None,
        help="training pixel area for buckets, e.g. 262144 (512²) or 1048576 (1024²); recomputes every bucket. "
        "Default: the bucket stored in metadata.jsonl, 512² buckets for rows without one",
    )
    parser.add_argument(
        "--tokenizer", metavar="PRETRAINED", default=None,
        help="model directory or Hub id whose CLIP tokenizer counts caption tokens exactly (default: an estimate)",
    )
    parser.add_argument("--max-tokens", type=_positive_int, default=75, help="warn about captions longer than this (default 75)")
    parser.add_argument("--json", metavar="OUT", default=None, help=f"report path (default DST/{REPORT_NAME})")
    parser.add_argument("--sheet", metavar="OUT.html", default=None, help=f"contact sheet path (default DST/{SHEET_NAME})")
    parser.add_argument("--no-sheet", action="store_true", help="do not write the contact sheet")
    parser.add_argument(
        "--sheet-limit", type=_positive_int, default=2000,
        help="thumbnails in the contact sheet: the first N rows (default 2000; the sheet is one self-contained file)",
    )


def _check_outputs_apart(root: Path, outputs: list[tuple[str, Path]], tokenizer: str | None) -> None:
    """The report and the sheet go beside the dataset's files (in DST by default), never over metadata.jsonl, an
    image it lists or the --tokenizer model."""
    inputs = [(f"DST's {METADATA}", root / METADATA), ("--tokenizer", tokenizer)]
    inputs += [("an image of DST", root / row["file_name"]) for row in read_rows(root)]
    for name, output in outputs:
        check_output_apart(output, inputs, name)


def run(args: argparse.Namespace) -> int:
    from data_prep.contact_sheet import write_contact_sheet

    root = Path(args.dst).expanduser()
    report_out, sheet_out = Path(args.json or root / REPORT_NAME), Path(args.sheet or root / SHEET_NAME)
    outputs = [("--json", report_out)] + ([] if args.no_sheet else [("--sheet", sheet_out)])
    _check_outputs_apart(root, outputs, args.tokenizer)
    result = check_dataset(
        root,
        batch_size=args.batch_size,
        devices=args.devices,
        accumulate=args.accumulate,
        area=args.area,
        tokenizer=args.tokenizer,
        max_tokens=args.max_tokens,
        thumbnails_for=0 if args.no_sheet else args.sheet_limit,
    )
    print(format_table(result.report))
    print()
    report_path = write_report(result.report, report_out)
    print(f"report        {report_path}")
    if not args.no_sheet:
        sheet = write_contact_sheet(
            sheet_out, result.entries, result.thumbnails, title=str(root), limit=args.sheet_limit
        )
        print(f"contact sheet {sheet}")
    errors, warnings = len(result.report["errors"]), len(result.report["warnings"])
    print(f"{'FAILED' if errors else 'OK'}: {errors} error{'s' if errors != 1 else ''}, "
          f"{warnings} warning{'s' if warnings != 1 else ''}")
    return 1 if errors else 0
