"""`sdtune sample`: images from a model (plus LoRA adapters) — text-to-image, image-to-image and inpainting.

Writes OUT/<index>_<prompt-slug>_s<seed>.png for every prompt × seed and OUT/samples.json with every setting, the
model, the adapters and their scales, and each image's prompt, seed and file, so any image can be made again.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from sdtune.errors import SdtuneError

EPILOG = """examples:
  sdtune sample --model stable-diffusion-v1-5/stable-diffusion-v1-5 --prompt "a photo of sks dog on a beach" \\
                --seed 0 --seed 1 --out samples/base
  sdtune sample --model stable-diffusion-v1-5/stable-diffusion-v1-5 --adapter runs/my_lora/adapter:0.8 \\
                --prompts-file prompts.txt --seed 0 --steps 30 --scheduler dpmpp_2m --out samples/lora
  sdtune sample --model ./my_model --adapter style.safetensors:0.6 --adapter runs/my_lora/adapter \\
                --prompt "sks dog, watercolor" --negative-prompt "blurry" --clip-skip 2 --out samples/mix
  sdtune sample --model stable-diffusion-v1-5/stable-diffusion-v1-5 --adapter runs/sks_pivotal/adapter \\
                --embedding runs/sks_pivotal/adapter/embeddings/sks.safetensors --prompt "a photo of <sks> dog" --out samples/sks
  sdtune sample --model ./my_model --init-image photo.png --strength 0.5 --prompt "an oil painting" --out samples/img2img
  sdtune sample --model ./my_model --init-image photo.png --mask mask.png --prompt "a red hat" --out samples/inpaint
  sdtune sample --model models/dreamshaper_8.safetensors --model-config stable-diffusion-v1-5/stable-diffusion-v1-5 \\
                --prompt "a lighthouse at dusk" --out samples/single_file

--prompts-file: .txt (one prompt a line; blank lines and lines starting with # are skipped) or .jsonl
({"prompt": "...", "negative_prompt": "..."} a line; negative_prompt is optional and overrides --negative-prompt).
--adapter PATH[:SCALE]: an adapter folder (pytorch_lora_weights.safetensors inside, as `sdtune fit` writes) or a
LoRA .safetensors file; SCALE defaults to 1.0; 0 gives exactly the base model (LoRA; not DoRA). Repeat it to mix adapters.
--mask: white = repaint, black = keep. Existing files in --out are never replaced unless --overwrite.
"""

DTYPES = ("float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one `sdtune: error:` line like every other bad input."""

    def error(self, message: str):
        raise SdtuneError(f"{message} (see `{self.prog} --help`)")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, adapters, prompts and sampling settings: what `sample` and `evaluate` share."""
    from sdtune.sampling import SCHEDULERS

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
    run.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale; ≤ 1 disables it (default: 7.5)")
    run.add_argument("--scheduler", default="ddim", choices=list(SCHEDULERS), help="sampler (default: ddim)")
    run.add_argument("--width", type=int, help="image width, a multiple of the VAE factor (default: the UNet's native size)")
    run.add_argument("--height", type=int, help="image height (default: the UNet's native size)")
    run.add_argument("--clip-skip", type=int, default=1, help="use the k-th last text-encoder layer (1 = last; 2 for NovelAI-style models)")
    run.add_argument("--device", default="auto", choices=DEVICES, help="auto = cuda when available, else cpu")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sdtune sample",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_arguments(parser)
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="weights dtype (the VAE always decodes in float32)")
    image = parser.add_argument_group("image-to-image and inpainting")
    parser.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]",
                        help="a textual-inversion embedding (diffusers or A1111 .safetensors, as sdtune fit writes "
                             "beside the adapter) and the token prompts name it by; repeatable")  # fmt: skip
    image.add_argument("--init-image", metavar="IMG", help="start from this image (resized to --width × --height)")
    image.add_argument("--strength", type=float,
                       help="fraction of the denoising re-run on the init image, in (0, 1] (default: 0.8; 1.0 with --mask)")  # fmt: skip
    image.add_argument("--mask", metavar="MASK", help="inpainting mask for --init-image: white = repaint, black = keep")
    out = parser.add_argument_group("output")
    out.add_argument("--out", required=True, metavar="DIR", help="folder for the PNGs and samples.json")
    out.add_argument("--overwrite", action="store_true", help="replace files of the same names in --out")
    return parser


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
    if ns.steps < 1:
        raise SdtuneError(f"--steps must be at least 1, got {ns.steps}")
    if ns.clip_skip < 1:
        raise SdtuneError(f"--clip-skip must be at least 1 (1 = the last layer), got {ns.clip_skip}")
    for flag, value in (("--width", ns.width), ("--height", ns.height)):
        if value is not None and value < 1:
            raise SdtuneError(f"{flag} must be positive, got {value}")
    return prompts, ns.seed if ns.seed is not None else [0]


def image_size(pipe, ns: argparse.Namespace) -> tuple[int, int]:
    """--width/--height or the UNet's native size, checked against the VAE factor and the text encoder's depth."""
    from sdtune.sampling import default_size, vae_scale_factor

    factor = vae_scale_factor(pipe)
    native_width, native_height = default_size(pipe)
    width, height = ns.width or native_width, ns.height or native_height
    for flag, value in (("--width", width), ("--height", height)):
        if value % factor:
            raise SdtuneError(f"{flag} {value} is not a multiple of {factor} (this model's VAE factor); try {max(factor, value // factor * factor)}")
    from sdtune.models.clip import max_clip_skip
    from sdtune.sampling import text_encoders

    allowed = max_clip_skip(text_encoders(pipe)[1])
    if ns.clip_skip > allowed:
        raise SdtuneError(f"--clip-skip {ns.clip_skip} is more than this model's text encoders allow ({allowed})")
    return width, height


def parse_adapter(text: str):
    """PATH[:SCALE] → Adapter; a path that exists as written is taken whole (it may contain a colon)."""
    from sdtune.lora import ADAPTER_WEIGHTS
    from sdtune.sampling import Adapter

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
    if where.is_dir() and not (where / ADAPTER_WEIGHTS).is_file():
        raise SdtuneError(f"--adapter '{text}': the folder has no {ADAPTER_WEIGHTS}")
    return Adapter(where, scale)


def parse_embedding(text: str) -> tuple[Path, str | None]:
    """FILE[:TOKEN] → (file, token or None); a path that exists as written is taken whole (it may contain a colon)."""
    path, token = text, None
    if not Path(text).expanduser().exists() and ":" in text:
        path, token = text.rsplit(":", 1)
    where = Path(path).expanduser()
    if not where.is_file():
        raise SdtuneError(f"--embedding '{text}': {path} is not a file (pass an embedding .safetensors, optionally :TOKEN)")
    return where, token or None


def slug(text: str, limit: int = 40) -> str:
    """Lower-case words joined by '-', at most `limit` characters: safe in a file name on every system."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "prompt"


def _open_image(path: str | None, flag: str, mode: str):
    from PIL import Image, UnidentifiedImageError

    if path is None:
        return None
    if not Path(path).is_file():
        raise SdtuneError(f"{flag} {path} does not exist")
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except (UnidentifiedImageError, OSError) as err:
        raise SdtuneError(f"{flag} {path} is not a readable image ({type(err).__name__})") from err


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SdtuneError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return name


def _write_json(path: Path, data: dict) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    temporary.replace(path)


def main(args: list[str]) -> int:
    ns = build_parser().parse_args(args)

    # Everything that can be checked without the model is checked first: a typo fails in a second, not after a load.
    prompts, seeds = check_common(ns)
    adapters = [parse_adapter(text) for text in ns.adapter]
    embeddings = [parse_embedding(text) for text in ns.embedding]
    if ns.mask is not None and ns.init_image is None:
        raise SdtuneError("--mask needs --init-image (the image to inpaint)")
    if ns.strength is not None and ns.init_image is None:
        raise SdtuneError("--strength needs --init-image (text-to-image always starts from pure noise)")
    init_image = _open_image(ns.init_image, "--init-image", "RGB")
    mask = _open_image(ns.mask, "--mask", "L")
    strength = ns.strength if ns.strength is not None else (1.0 if mask is not None else 0.8)
    if init_image is not None:
        from sdtune.sampling import check_strength

        check_strength(strength, ns.steps)
    device = _device(ns.device)

    out = Path(ns.out)
    if out.exists() and not out.is_dir():
        raise SdtuneError(f"--out {out} is a file, not a folder")
    jobs = [(p, seed) for p in range(len(prompts)) for seed in seeds]
    width = max(4, len(str(len(jobs) - 1)))
    names = [f"{i:0{width}d}_{slug(prompts[p].prompt)}_s{seed}.png" for i, (p, seed) in enumerate(jobs)]
    existing = [name for name in [*names, "samples.json"] if (out / name).exists()]
    if existing and not ns.overwrite:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise SdtuneError(f"{out / existing[0]}{more} already exist; pass --overwrite to replace them, or choose another --out")

    import torch

    from sdtune.models.pretrained import load_pipeline
    from sdtune.sampling import iter_images, load_adapters, load_embedding, make_scheduler, prepare_condition

    pipe = load_pipeline(ns.model, revision=ns.revision, variant=ns.variant, dtype=getattr(torch, ns.dtype), device=device,
                         pretrained_config=ns.model_config)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler(ns.scheduler, pipe.scheduler.config)
    image_width, image_height = image_size(pipe, ns)
    adapter_names = load_adapters(pipe, adapters)
    tokens = [load_embedding(pipe, path, token) for path, token in embeddings]
    condition = None
    if init_image is not None:
        condition = prepare_condition(pipe, init_image, image_width, image_height, strength, mask)
    mode = condition.mode if condition is not None else "text-to-image"

    out.mkdir(parents=True, exist_ok=True)
    record = {
        "command": shlex.join(["sdtune", "sample", *args]),
        "mode": mode,
        "model": {"pretrained": ns.model, "pretrained_config": ns.model_config, "revision": ns.revision, "variant": ns.variant},
        "adapters": [
            {"name": name, "path": str(a.path), "file": str(a.weights_file), "scale": a.scale}
            for name, a in zip(adapter_names, adapters)
        ],
        "embeddings": [{"token": token, "file": str(path)} for token, (path, _) in zip(tokens, embeddings)],
        "settings": {
            "steps": ns.steps, "guidance": ns.guidance, "scheduler": ns.scheduler,
            "scheduler_class": type(pipe.scheduler).__name__, "width": image_width, "height": image_height,
            "clip_skip": ns.clip_skip, "device": device, "dtype": ns.dtype, "negative_prompt": ns.negative_prompt,
            "prompts_file": ns.prompts_file, "seeds": seeds, "init_image": ns.init_image, "mask": ns.mask,
            "strength": strength if init_image is not None else None,
        },  # fmt: skip
        "images": [],
    }
    images = iter_images(
        pipe, [p.prompt for p in prompts], seeds, steps=ns.steps, guidance_scale=ns.guidance, height=image_height,
        width=image_width, negative_prompts=[p.negative_prompt for p in prompts], clip_skip=ns.clip_skip,
        condition=condition,
    )  # fmt: skip
    for i, (prompt_index, seed, image) in enumerate(images):
        image.save(out / names[i])
        spec = prompts[prompt_index]
        record["images"].append(
            {"index": i, "file": names[i], "prompt": spec.prompt, "negative_prompt": spec.negative_prompt, "seed": seed}
        )
        _write_json(out / "samples.json", record)
        print(f"[{i + 1}/{len(jobs)}] {out / names[i]}", flush=True)
    print(f"wrote {len(jobs)} {mode} image{'s' if len(jobs) != 1 else ''} and samples.json to {out}")
    return 0


if __name__ == "__main__":
    from sdtune.cli import main as sdtune_main

    sys.exit(sdtune_main(["sample", *sys.argv[1:]]))
