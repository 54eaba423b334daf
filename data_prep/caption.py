"""`sdtune prep caption DST --model M`: fill empty captions of a built dataset with an image-to-text model.

Any transformers captioning model that `AutoProcessor` + `AutoModelForImageTextToText` load and that captions from
pixels alone or after a plain text prompt: BLIP (Salesforce/blip-image-captioning-base/-large), GIT. Chat-style
VLMs that need a chat template or image tokens in the prompt are not supported.

Only rows whose caption is empty are captioned, unless `--overwrite`. `--prefix` is put in front of each new
caption ("sks dog, a dog on a sofa"). With `--prompt`, BLIP continues that text and the caption starts with it
("a photography of a dog on a sofa"), as the model returns it. metadata.jsonl is rewritten atomically, keeping
row order and every other key; images are never touched. Captions done before an interruption are kept.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from data_prep.dataset import IMAGE_ERRORS, caption_key, load_entries, quote_names, write_rows
from sdtune.data.images import open_image
from sdtune.errors import SdtuneError, first_line

EXAMPLES = """examples:
  sdtune prep caption data/my_dog --model Salesforce/blip-image-captioning-large --prefix "sks dog"
  sdtune prep caption data/my_dog --model ~/models/blip-base --overwrite --prompt "a photography of" --batch-size 16
"""


@dataclass
class CaptionResult:
    filled: int = 0  # empty captions that got text
    replaced: int = 0  # existing captions replaced (--overwrite)
    skipped: int = 0  # rows kept as they were: already captioned without --overwrite
    failed: list[str] = field(default_factory=list)  # unreadable images, or the model returned no text


def _resolve(model: str) -> str:
    from sdtune.paths import HUB_ID

    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SdtuneError(f"caption --model '{model}' is a file; pass a transformers model directory or a Hub id")
        if not (path / "config.json").is_file():
            raise SdtuneError(f"caption --model '{model}' is not a transformers model directory: no config.json")
        return str(path)
    if not HUB_ID.match(model):
        raise SdtuneError(f"caption --model '{model}' does not exist (not a local directory nor a Hub id 'org/name')")
    return model


def _load(cls: Any, model: str, what: str, **kwargs: Any) -> Any:
    """`cls.from_pretrained` with one-line errors, as `sdtune.models.pretrained._load` does for SD parts."""
    from sdtune.models.pretrained import offline_hint

    try:
        return cls.from_pretrained(model, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise SdtuneError(f"caption --model '{model}': {what} could not be loaded{offline_hint()}: {first_line(err)}") from err


def load_captioner(model: str, device: str | None = None) -> tuple[Any, Any]:
    """(processor, model) for `model` (a local directory or Hub id), the model in eval mode on `device`.

    Default device: CUDA in float16 when available, else CPU in float32.
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    source = _resolve(model)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    processor = _load(AutoProcessor, source, "processor")
    if getattr(processor, "image_processor", None) is None:
        raise SdtuneError(f"caption --model '{model}' has no image processor: it is not an image-to-text model")
    loaded = _load(AutoModelForImageTextToText, source, "model", dtype=dtype)
    try:
        loaded = loaded.to(device)
    except (RuntimeError, AssertionError) as err:
        raise SdtuneError(f"caption: cannot move the model to device '{device}': {first_line(err)}") from err
    return processor, loaded.eval()


def _clean(text: str) -> str:
    return " ".join(text.split())


def _with_prefix(prefix: str, caption: str) -> str:
    prefix = prefix.strip().rstrip(",").strip()
    if not prefix or caption.lower().startswith(prefix.lower()):
        return caption
    return f"{prefix}, {caption}"


def generate_captions(
    processor: Any, model: Any, images: list[Image.Image], prompt: str | None = None, max_new_tokens: int = 30
) -> list[str]:
    """One caption per image (whitespace-normalised, possibly "" when the model says nothing)."""
    import torch

    inputs = {"images": images, "return_tensors": "pt"}
    if prompt:
        inputs["text"] = [prompt] * len(images)
    try:
        batch = processor(**inputs).to(model.device)
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
        with torch.inference_mode():
            output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    except (ValueError, TypeError, KeyError) as err:
        raise SdtuneError(
            f"caption: the model could not caption images ({first_line(err)}); use a BLIP- or GIT-style "
            "captioning model"
        ) from err
    return [_clean(text) for text in processor.batch_decode(output, skip_special_tokens=True)]


def caption_dataset(
    dst: str | Path,
    model: str,
    overwrite: bool = False,
    prefix: str = "",
    batch_size: int = 8,
    max_new_tokens: int = 30,
    prompt: str | None = None,
    device: str | None = None,
    progress: bool = True,
) -> CaptionResult:
    """Caption the rows of DST that need it and rewrite metadata.jsonl; see the module docstring."""
    if batch_size < 1:
        raise SdtuneError(f"caption: --batch-size must be at least 1, got {batch_size}")
    if max_new_tokens < 1:
        raise SdtuneError(f"caption: --max-new-tokens must be at least 1, got {max_new_tokens}")
    _resolve(model)  # a typo in --model fails before anything else, even when there is nothing to caption
    entries = load_entries(dst, read_headers=False)
    missing = [entry.file_name for entry in entries if entry.problem == "missing"]
    if missing:
        raise SdtuneError(
            f"caption: metadata.jsonl lists {len(missing)} missing image(s), first '{missing[0]}'; "
            "run `sdtune prep check` and fix the dataset first"
        )
    rows = [entry.row for entry in entries]
    key = caption_key(rows)
    todo = [entry for entry in entries if overwrite or not entry.text]
    result = CaptionResult(skipped=len(entries) - len(todo))
    if not todo:
        return result
    processor, loaded = load_captioner(model, device)

    changed = False
    bar = tqdm(total=len(todo), desc="captioning", unit="img", file=sys.stderr, disable=None if progress else True)
    try:
        for start in range(0, len(todo), batch_size):
            batch, images = [], []
            for entry in todo[start : start + batch_size]:
                if entry.problem:  # a row naming a file outside DST: never read
                    result.failed.append(entry.file_name)
                    continue
                try:
                    images.append(open_image(entry.path))
                    batch.append(entry)
                except IMAGE_ERRORS:
                    result.failed.append(entry.file_name)
            captions = generate_captions(processor, loaded, images, prompt, max_new_tokens) if images else []
            for entry, caption in zip(batch, captions):
                if not caption:
                    result.failed.append(entry.file_name)
                    continue
                if entry.text:
                    result.replaced += 1
                else:
                    result.filled += 1
                entry.row[key] = _with_prefix(prefix, caption)
                changed = True
            bar.update(len(todo[start : start + batch_size]))
    finally:
        bar.close()
        if changed:  # also after an interruption: keep what is done
            write_rows(dst, rows)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dst", help="the dataset folder (with metadata.jsonl)")
    parser.add_argument("--model", required=True, metavar="PATH_OR_ID", help="captioning model: local directory or Hub id")
    parser.add_argument("--overwrite", action="store_true", help="replace existing captions too (default: only empty ones)")
    parser.add_argument("--prefix", default="", help='text put in front of each new caption, e.g. "sks dog"')
    parser.add_argument("--batch-size", type=int, default=8, help="images per generate call (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=30, help="caption length limit in tokens (default 30)")
    parser.add_argument("--prompt", default=None, help='text the caption continues, e.g. "a photography of" (BLIP)')
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def run(args: argparse.Namespace) -> int:
    result = caption_dataset(
        args.dst,
        args.model,
        overwrite=args.overwrite,
        prefix=args.prefix,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        prompt=args.prompt,
        device=args.device,
    )
    print(f"filled {result.filled} empty caption(s), replaced {result.replaced}, skipped {result.skipped} already captioned")
    if result.failed:
        print(
            f"no caption for {len(result.failed)} image(s) (unreadable or the model returned nothing): "
            + quote_names(result.failed)
        )
    return 0
