"""`sdtune prep check DST`: pre-flight a built dataset before spending GPU hours on it.

Reads every image (so truncated files show up now, not in epoch 7) and reports counts, a histogram of the shorter
side, how many images each aspect-ratio bucket holds against one global batch (batch × devices × accumulate), and
caption problems: empty, duplicated, or longer than CLIP's 75-token window. Writes the numbers as JSON and an HTML
contact sheet (thumbnails embedded, grouped by bucket). Exit code 1 when there are errors, else 0.

Errors: missing or unreadable images, a bucket with fewer images than one global batch, no readable image at all.
Warnings: empty captions, duplicate captions, captions over `--max-tokens`, metadata width/height that disagree with
the image, rows naming the same file twice, images in DST that metadata.jsonl does not list.

Token counts: with `--tokenizer PRETRAINED` they come from that model's CLIP tokenizer (exact). Without it they are
estimated (one token per word of up to 10 letters, one more per further 6 letters, one per digit and per punctuation
mark), and the report says so; CLIP splits rare words further, so pass --tokenizer before trusting a borderline count.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps
from tqdm import tqdm

from data_prep.dataset import DEFAULT_AREA, IMAGE_ERRORS, METADATA, Entry, fill_bucket, load_entries, upright_size
from sdtune.data.buckets import make_buckets, parse_bucket
from sdtune.data.records import IMAGE_SUFFIXES
from sdtune.errors import SdtuneError

EXAMPLES = """examples:
  sdtune prep check data/my_dog --batch-size 4
  sdtune prep check data/my_dog --batch-size 4 --devices 2 --accumulate 2 --tokenizer runwayml/stable-diffusion-v1-5
  sdtune prep check data/sdxl_set --area 1048576 --batch-size 2 --json check.json --sheet sheet.html
"""

REPORT_NAME = "check_report.json"
SHEET_NAME = "contact_sheet.html"
SIZE_BINS = ((0, "<256"), (256, "256-511"), (512, "512-767"), (768, "768-1023"), (1024, ">=1024"))
THUMB_SIDE = 192
SHOWN_FILES = 5  # file names quoted in one message
_TOKEN_PIECES = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]", re.IGNORECASE)


@dataclass
class CheckResult:
    report: dict[str, Any]
    entries: list[Entry]
    thumbnails: dict[int, str] = field(default_factory=dict)  # entry index -> base64 JPEG


def estimate_tokens(caption: str) -> int:
    """Approximate CLIP BPE token count (without BOS/EOS): see the module docstring."""
    count = 0
    for piece in _TOKEN_PIECES.findall(caption.lower()):
        if piece[0].isalpha() and len(piece) > 10:
            count += 1 + -(-(len(piece) - 10) // 6)
        else:
            count += 1
    return count


def count_tokens(captions: list[str], tokenizer: str | None) -> list[int]:
    """Token counts per caption: exact with the CLIP tokenizer of `tokenizer` (a model path or Hub id), else estimated."""
    if tokenizer is None:
        return [estimate_tokens(caption) for caption in captions]
    from sdtune.models.pretrained import load_tokenizer  # imports diffusers: only when asked for
    from sdtune.text import text_token_ids

    try:
        loaded = load_tokenizer(tokenizer)
    except SdtuneError as err:  # its messages name model.pretrained; here the option is --tokenizer
        raise SdtuneError(f"check --tokenizer: {err}") from err
    return [len(ids) for ids in text_token_ids(loaded, captions)]


def _issue(code: str, message: str, files: list[str] | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "files": list(files or [])}


def _quote(files: list[str]) -> str:
    shown = ", ".join(files[:SHOWN_FILES])
    return shown + (f" and {len(files) - SHOWN_FILES} more" if len(files) > SHOWN_FILES else "")


def _size_bin(short_side: int) -> str:
    label = SIZE_BINS[0][1]
    for lower, name in SIZE_BINS:
        if short_side >= lower:
            label = name
    return label


def _thumbnail(image: Image.Image) -> str:
    image = ImageOps.exif_transpose(image).convert("RGB")
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
            with Image.open(entry.path) as image:
                width, height = upright_size(image)
                if entry.index < thumbnails_for:
                    image.draft("RGB", (THUMB_SIDE * 2, THUMB_SIDE * 2))  # JPEG: decode at reduced scale
                image.load()  # full decode: truncated and corrupt files fail here
                if entry.index < thumbnails_for:
                    thumbnails[entry.index] = _thumbnail(image)
        except IMAGE_ERRORS as err:
            text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            entry.problem = f"unreadable ({text})"
            entry.width = entry.height = None
            continue
        if entry.width and entry.height and (entry.width, entry.height) != (width, height):
            warnings.append(
                _issue(
                    "size_mismatch",
                    f"{entry.file_name}: {METADATA} says {entry.width}x{entry.height}, the image is {width}x{height}",
                    [entry.file_name],
                )
            )
        entry.width, entry.height = width, height
    return thumbnails, warnings


def _unlisted_images(root: Path, listed: set[str]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if path.suffix.lower() in IMAGE_SUFFIXES and not any(p.startswith(".") for p in relative.parts):
            if relative.as_posix() not in listed and path.is_file():
                found.append(relative.as_posix())
    return sorted(found)


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
    errors: list[dict[str, Any]] = []
    good = [entry for entry in entries if not entry.problem]
    missing = [entry.file_name for entry in entries if entry.problem == "missing"]
    unreadable = [entry for entry in entries if entry.problem and entry.problem != "missing"]

    for name in missing:
        errors.append(_issue("missing_image", f"{name}: listed in {METADATA} but the file does not exist", [name]))
    for entry in unreadable:
        errors.append(_issue("unreadable_image", f"{entry.file_name}: {entry.problem}", [entry.file_name]))
    if not good:
        errors.append(_issue("no_images", f"no readable images in '{dst}'"))

    # Buckets against one global batch.
    global_batch = batch_size * devices * accumulate
    per_bucket = Counter(entry.bucket for entry in good)
    bucket_rows = []
    for bucket in sorted(per_bucket, key=lambda b: (parse_bucket(b)[0] / parse_bucket(b)[1], b)):
        count = per_bucket[bucket]
        bucket_rows.append(
            {"bucket": bucket, "images": count, "batches": count // global_batch, "leftover": count % global_batch,
             "ok": count >= global_batch}
        )
        if count < global_batch:
            errors.append(
                _issue(
                    "bucket_too_small",
                    f"bucket {bucket} has {count} image{'s' if count != 1 else ''}, fewer than one batch of "
                    f"{global_batch} (batch {batch_size} × devices {devices} × accumulate {accumulate}): "
                    "those images would never train with drop_last / form a partial batch — merge buckets or "
                    "lower the batch",
                    [entry.file_name for entry in good if entry.bucket == bucket],
                )
            )

    # Sizes.
    sizes = {label: 0 for _, label in SIZE_BINS}
    for entry in good:
        sizes[_size_bin(min(entry.width, entry.height))] += 1

    # Captions.
    empty = [entry.file_name for entry in good if not entry.text]
    captioned = [entry for entry in good if entry.text]
    if empty:
        warnings.append(
            _issue(
                "empty_caption",
                f"{len(empty)} image{'s have' if len(empty) != 1 else ' has'} an empty caption ({_quote(empty)}); "
                "fill them with `sdtune prep caption` or a prefix",
                empty,
            )
        )
    groups: dict[str, list[Entry]] = defaultdict(list)
    for entry in captioned:  # the same words, ignoring case and spacing
        groups[" ".join(entry.text.split()).casefold()].append(entry)
    duplicated = 0
    for group in groups.values():
        if len(group) > 1:
            duplicated += len(group)
            caption, files = group[0].text, [entry.file_name for entry in group]
            warnings.append(
                _issue("duplicate_caption", f"{len(files)} images share the caption {caption!r} ({_quote(files)})", files)
            )
    counts_from = "tokenizer" if tokenizer else "estimate"
    tokens = count_tokens([entry.text for entry in captioned], tokenizer)
    long = sorted(
        ({"file_name": e.file_name, "tokens": n} for e, n in zip(captioned, tokens) if n > max_tokens),
        key=lambda item: -item["tokens"],
    )
    if long:
        how = "CLIP tokenizer" if tokenizer else "estimated; pass --tokenizer for exact counts"
        warnings.append(
            _issue(
                "long_caption",
                f"{len(long)} caption{'s are' if len(long) != 1 else ' is'} over {max_tokens} tokens ({how}), longest "
                f"{long[0]['file_name']} with {long[0]['tokens']}: CLIP reads only the first 75 unless "
                "data.max_token_length is 150 or 225",
                [item["file_name"] for item in long],
            )
        )

    # Metadata hygiene.
    names = Counter(entry.file_name for entry in entries)
    twice = sorted(name for name, n in names.items() if n > 1)
    if twice:
        warnings.append(
            _issue("duplicate_row", f"{len(twice)} file(s) listed more than once in {METADATA} ({_quote(twice)})", twice)
        )
    unlisted = _unlisted_images(root, set(names))
    if unlisted:
        warnings.append(
            _issue(
                "unlisted_image",
                f"{len(unlisted)} image(s) in the dataset are not in {METADATA} and will not train ({_quote(unlisted)})",
                unlisted,
            )
        )

    report = {
        "dataset": str(root),
        "settings": {
            "batch_size": batch_size, "devices": devices, "accumulate": accumulate, "global_batch": global_batch,
            "area": area, "tokenizer": tokenizer, "max_tokens": max_tokens,
        },
        "counts": {
            "rows": len(entries),
            "images": len(good),
            "missing": len(missing),
            "unreadable": len(unreadable),
            "captioned": len(captioned),
            "empty_captions": len(empty),
            "duplicate_captions": duplicated,
            "long_captions": len(long),
        },
        "sizes": {"measure": "shorter side (px)", "bins": sizes},
        "buckets": bucket_rows,
        "tokens": {
            "counted_by": counts_from,
            "max": max(tokens, default=0),
            "mean": round(sum(tokens) / len(tokens), 2) if tokens else 0.0,
            "over_max": len(long),
        },
        "long_captions": long,
        "errors": errors,
        "warnings": warnings,
        "ok": not errors,
    }
    return CheckResult(report=report, entries=entries, thumbnails=thumbnails)


def format_table(report: dict[str, Any], listed: int = 10) -> str:
    """The report as plain text for the terminal (the JSON has every file name)."""
    c, s, t = report["counts"], report["settings"], report["tokens"]
    lines = [
        f"dataset   {report['dataset']}",
        f"images    {c['images']} readable of {c['rows']} rows ({c['missing']} missing, {c['unreadable']} unreadable)",
        f"captions  {c['captioned']} captioned, {c['empty_captions']} empty, {c['duplicate_captions']} duplicated, "
        f"{c['long_captions']} over {s['max_tokens']} tokens",
        f"tokens    max {t['max']}, mean {t['mean']} ("
        + ("CLIP tokenizer" if t["counted_by"] == "tokenizer" else "estimated; pass --tokenizer for exact counts")
        + ")",
        "",
        "shorter side   images",
        *(f"  {label:<12}{n:>7}" for label, n in report["sizes"]["bins"].items()),
        "",
        f"bucket       images  batches  leftover   one batch = {s['global_batch']} "
        f"(batch {s['batch_size']} × devices {s['devices']} × accumulate {s['accumulate']})",
        *(
            f"  {b['bucket']:<11}{b['images']:>6}{b['batches']:>9}{b['leftover']:>10}"
            + ("" if b["ok"] else "   ERROR: fewer than one batch")
            for b in report["buckets"]
        ),
    ]
    if s["global_batch"] == 1:
        lines.append("  (pass --batch-size/--devices/--accumulate to check bucket fill against your batch)")
    for kind in ("errors", "warnings"):
        issues = report[kind]
        if issues:
            lines += ["", f"{kind} ({len(issues)}):"]
            lines += [f"  - {issue['message']}" for issue in issues[:listed]]
            if len(issues) > listed:
                lines.append(f"  ... {len(issues) - listed} more in the JSON report")
    return "\n".join(lines)


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


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


def run(args: argparse.Namespace) -> int:
    from data_prep.contact_sheet import write_contact_sheet

    root = Path(args.dst).expanduser()
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
    report_path = write_report(result.report, args.json or root / REPORT_NAME)
    print(f"report        {report_path}")
    if not args.no_sheet:
        sheet = write_contact_sheet(
            args.sheet or root / SHEET_NAME, result.entries, result.thumbnails, title=str(root), limit=args.sheet_limit
        )
        print(f"contact sheet {sheet}")
    errors, warnings = len(result.report["errors"]), len(result.report["warnings"])
    print(f"{'FAILED' if errors else 'OK'}: {errors} error{'s' if errors != 1 else ''}, "
          f"{warnings} warning{'s' if warnings != 1 else ''}")
    return 1 if errors else 0
