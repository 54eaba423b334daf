"""What the model-loading commands share: one argparse style (a usage error is one `sdtune: error:` line), the
model, adapter, prompt and sampling flags of `sample` and `evaluate`, and the checks that need no model."""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from sdtune.adapters.files import ADAPTER_WEIGHTS, Adapter, adapter_file
from sdtune.errors import SdtuneError
from sdtune.inference.schedulers import SCHEDULER_CLASSES
from sdtune.paths import model_name_problem

DEVICES = ("auto", "cpu", "cuda")
# Images above this many pixels a side squared are refused without --allow-large: SD's self-attention over the latent
# grid grows with the square of its cells, and 4096² is already 16× the pixels of SDXL's native size.
MAX_SIDE = 4096
# Stable Diffusion's and SDXL's pipelines refuse other sizes whatever the VAE's factor (the tiny test models' is 2).
PIPELINE_MULTIPLE = 8


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one `sdtune: error:` line like every other bad input."""

    def error(self, message: str):
        raise SdtuneError(f"{message} (see `{self.prog} --help`)")


def command_parser(name: str, description: str, epilog: str) -> Parser:
    """The parser of `sdtune NAME`, its examples (`epilog`) shown in --help as written."""
    return Parser(prog=f"sdtune {name}", description=description, epilog=epilog,
                  formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, adapters, prompts and sampling settings: what `sample` and `evaluate` share."""
    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True, metavar="PRETRAINED",
                       help="diffusers model directory, Hub id, or single-file .safetensors/.ckpt checkpoint (with --model-config)")  # fmt: skip
    model.add_argument("--model-config", metavar="DIR_OR_ID",
                       help="for a single-file --model: diffusers directory or Hub id with its configs, tokenizer and scheduler")  # fmt: skip
    model.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    model.add_argument("--variant", help='weight variant, e.g. "fp16"')
    model.add_argument("--adapter", action="append", default=[], metavar="PATH[:SCALE]",
                       help="LoRA adapter folder or .safetensors file, optional :SCALE (default 1.0); repeatable")  # fmt: skip
    prompts = parser.add_argument_group("prompts")
    prompts.add_argument("--prompt", action="append", default=[], help="a prompt; repeatable")
    prompts.add_argument("--prompts-file", metavar="FILE", help=".txt (one prompt a line) or .jsonl (prompt, negative_prompt)")
    prompts.add_argument("--negative-prompt", metavar="TEXT", help="negative prompt for every prompt (default: none)")
    run = parser.add_argument_group("sampling")
    run.add_argument("--seed", type=int, action="append", metavar="N", help="noise seed; repeat for several images per prompt (default: 0)")
    run.add_argument("--steps", type=int, default=25, help="denoising steps (default: 25)")
    run.add_argument("--guidance", type=float,
                     help="classifier-free guidance scale, ≤ 1 disables it; Flux dev's embedded guidance (default: the "
                          "model's pipeline's: 7.5 SD1/2, 5.0 SDXL, 7.0 SD3, 3.5 Flux)")  # fmt: skip
    run.add_argument("--scheduler", choices=list(SCHEDULER_CLASSES), help="sampler (default: ddim; flow_euler for SD3 and Flux)")
    run.add_argument("--width", type=int, help="image width, a multiple of the VAE factor (default: the UNet's native size)")
    run.add_argument("--height", type=int, help="image height (default: the UNet's native size)")
    run.add_argument("--allow-large", action="store_true",
                     help=f"allow images above {MAX_SIDE}×{MAX_SIDE} pixels (their latents and attention need more memory than most GPUs have)")  # fmt: skip
    run.add_argument("--clip-skip", type=int, default=1, help="use the k-th last text-encoder layer (1 = last; 2 for NovelAI-style models)")
    run.add_argument("--device", default="auto", choices=DEVICES, help="auto = cuda when available, else cpu")


@dataclass
class PromptSpec:
    prompt: str
    negative_prompt: str | None


def read_prompts_file(path: Path, negative_prompt: str | None) -> list[PromptSpec]:
    """Prompts from a .txt (one a line, # comments) or .jsonl ({"prompt", "negative_prompt"}) file."""
    if not path.is_file():
        raise SdtuneError(f"--prompts-file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise SdtuneError(f"--prompts-file {path}: expected a .txt or .jsonl file, got '{suffix or 'no extension'}'")
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or (suffix == ".txt" and line.startswith("#")):
            continue
        if suffix == ".txt":
            out.append(PromptSpec(line, negative_prompt))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise SdtuneError(f"--prompts-file {path} line {number}: not valid JSON ({err.msg})") from err
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise SdtuneError(f'--prompts-file {path} line {number}: expected {{"prompt": "...", "negative_prompt": "..."}}')
        negative = record.get("negative_prompt", negative_prompt)
        if negative is not None and not isinstance(negative, str):
            raise SdtuneError(f"--prompts-file {path} line {number}: negative_prompt must be a string")
        out.append(PromptSpec(record["prompt"], negative))
    if not out:
        raise SdtuneError(f"--prompts-file {path} has no prompts")
    return out


def check_model_names(ns: argparse.Namespace) -> None:
    """--model and --model-config name a local path, a Hub id or a model sdtune ships (what the folder holds is
    checked when its configs are read)."""
    for flag, name in (("--model", ns.model), ("--model-config", ns.model_config)):
        problem = None if name is None else model_name_problem(name, flag)
        if problem is not None:
            raise SdtuneError(problem)


def check_common(ns: argparse.Namespace) -> tuple[list[PromptSpec], list[int]]:
    """Prompts and seeds from the shared flags, and the checks that need no model."""
    if ns.prompt and ns.prompts_file:
        raise SdtuneError("pass --prompt or --prompts-file, not both")
    if ns.prompts_file:
        prompts = read_prompts_file(Path(ns.prompts_file), ns.negative_prompt)
    elif ns.prompt:
        prompts = [PromptSpec(p, ns.negative_prompt) for p in ns.prompt]
    else:
        raise SdtuneError("no prompt: pass --prompt TEXT or --prompts-file FILE")
    check_model_names(ns)
    if ns.steps < 1:
        raise SdtuneError(f"--steps must be at least 1, got {ns.steps}")
    if ns.clip_skip < 1:
        raise SdtuneError(f"--clip-skip must be at least 1 (1 = the last layer), got {ns.clip_skip}")
    for flag, value in (("--width", ns.width), ("--height", ns.height)):
        if value is not None and value < 1:
            raise SdtuneError(f"{flag} must be positive, got {value}")
    return prompts, ns.seed if ns.seed is not None else [0]


def image_size(ns: argparse.Namespace) -> tuple[int, int]:
    """--width/--height or the denoiser's native size, checked against the model's config files before any weights
    load: multiples of what the model requires, and at most MAX_SIDE² pixels unless --allow-large."""
    from sdtune.models.pretrained import image_geometry

    geometry = image_geometry(ns.model, ns.revision, ns.model_config)
    width, height = ns.width or geometry.width, ns.height or geometry.height
    multiple = math.lcm(geometry.multiple, PIPELINE_MULTIPLE)
    why = f"{geometry.why} of this model" if multiple == geometry.multiple else "what diffusers' pipelines take"
    for flag, value in (("--width", width), ("--height", height)):
        if value % multiple:
            raise SdtuneError(f"{flag} {value} is not a multiple of {multiple} ({why}); try {max(multiple, value // multiple * multiple)}")
    if width * height > MAX_SIDE**2 and not ns.allow_large:
        raise SdtuneError(
            f"--width {width} × --height {height} is {width * height / 1e6:.1f} megapixels, above the "
            f"{MAX_SIDE**2 / 1e6:.1f} ({MAX_SIDE}×{MAX_SIDE}) sdtune samples without --allow-large: its latents and "
            "attention would need more memory than most GPUs have; choose a smaller size or pass --allow-large"
        )
    return width, height


def check_clip_skip(pipe, ns: argparse.Namespace) -> None:
    """--clip-skip against the depth of the loaded text encoders."""
    from sdtune.inference.sampling import prompt_encoders

    family, _, encoders = prompt_encoders(pipe)
    allowed = family.max_clip_skip(encoders)
    if ns.clip_skip > allowed:
        raise SdtuneError(f"--clip-skip {ns.clip_skip} is more than this model's text encoders allow ({allowed})")


def parse_adapter(text: str):
    """PATH[:SCALE] → Adapter; a path that exists as written is taken whole (it may contain a colon)."""

    path, scale = text, 1.0
    if not Path(text).expanduser().exists() and ":" in text:
        path, tail = text.rsplit(":", 1)
        try:
            scale = float(tail)
        except ValueError:
            scale = math.nan
        if not math.isfinite(scale):
            raise SdtuneError(f"--adapter '{text}': '{tail}' is not a scale; use PATH or PATH:SCALE, e.g. runs/my_lora/adapter:0.8")
    where = Path(path).expanduser()
    if not where.exists():
        raise SdtuneError(f"--adapter '{text}': {path} does not exist")
    if where.is_dir() and not adapter_file(where).is_file():
        raise SdtuneError(f"--adapter '{text}': the folder has no {ADAPTER_WEIGHTS}")
    return Adapter(where, scale)


def common_inputs(ns: argparse.Namespace, adapters: list) -> list[tuple[str, Path | None]]:
    """What the shared flags read from disk, for `check_output_apart`: the model, its configs, the prompts file and
    each adapter (a Hub id is not on disk, so it is no input here)."""
    from sdtune.paths import local_model_path

    return [("--model", local_model_path(ns.model)), ("--model-config", local_model_path(ns.model_config)),
            ("--prompts-file", ns.prompts_file), *[("--adapter", adapter.path) for adapter in adapters]]  # fmt: skip


def slug(text: str, limit: int = 40) -> str:
    """Lower-case words joined by '-', at most `limit` characters: safe in a file name on every system."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "prompt"


def pick_device(name: str) -> str:
    """"auto": cuda when available, else cpu."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SdtuneError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return name
