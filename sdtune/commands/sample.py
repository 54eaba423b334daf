"""`sdtune sample`: images from a model (plus LoRA adapters) — text-to-image, image-to-image and inpainting.

Writes OUT/<index>_<prompt-slug>_s<seed>.png for every prompt × seed and OUT/samples.json with every setting, the
model, the adapters and their scales, and each image's prompt, seed and file, so any image can be made again.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Callable

from sdtune.commands.options import (
    Parser,
    add_common_arguments,
    check_clip_skip,
    check_common,
    common_inputs,
    image_size,
    parse_adapter,
    pick_device,
    slug,
)
from sdtune.errors import SdtuneError, first_line
from sdtune.inference.schedulers import check_strength
from sdtune.paths import check_output_apart, check_writable

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


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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


def parse_embedding(text: str) -> tuple[Path, str | None]:
    """FILE[:TOKEN] → (file, token or None); a path that exists as written is taken whole (it may contain a colon)."""
    path, token = text, None
    if not Path(text).expanduser().exists() and ":" in text:
        path, token = text.rsplit(":", 1)
    where = Path(path).expanduser()
    if not where.is_file():
        raise SdtuneError(f"--embedding '{text}': {path} is not a file (pass an embedding .safetensors, optionally :TOKEN)")
    return where, token or None


def _open_image(path: str | None, flag: str, load: Callable):
    """`load` (sdtune's image opener: known formats only, decompression bombs refused from the header) on `path`."""
    from sdtune.data.images import IMAGE_ERRORS

    if path is None:
        return None
    if not Path(path).is_file():
        raise SdtuneError(f"{flag} {path} does not exist")
    try:
        return load(path)
    except IMAGE_ERRORS as err:
        raise SdtuneError(f"{flag} {path} is not a readable image: {first_line(err)}") from err


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
    from sdtune.data.images import load_mask, open_image

    init_image = _open_image(ns.init_image, "--init-image", open_image)
    mask = _open_image(ns.mask, "--mask", load_mask)
    strength = ns.strength if ns.strength is not None else (1.0 if mask is not None else 0.8)
    if init_image is not None:
        check_strength(strength, ns.steps)

    out = Path(ns.out)
    check_output_apart(out, [*common_inputs(ns, adapters), *[("--embedding", path) for path, _ in embeddings],
                             ("--init-image", ns.init_image), ("--mask", ns.mask)])  # fmt: skip
    if out.exists() and not out.is_dir():
        raise SdtuneError(f"--out {out} is a file, not a folder")
    jobs = [(p, seed) for p in range(len(prompts)) for seed in seeds]
    width = max(4, len(str(len(jobs) - 1)))
    names = [f"{i:0{width}d}_{slug(prompts[p].prompt)}_s{seed}.png" for i, (p, seed) in enumerate(jobs)]
    existing = [name for name in [*names, "samples.json"] if (out / name).exists()]
    if existing and not ns.overwrite:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise SdtuneError(f"{out / existing[0]}{more} already exist; pass --overwrite to replace them, or choose another --out")
    image_width, image_height = image_size(ns)
    device = pick_device(ns.device)
    check_writable(out)  # last: it creates (and removes) an empty folder where --out goes

    import torch

    from sdtune.inference.sampling import (
        default_guidance,
        iter_images,
        load_adapters,
        load_embedding,
        make_scheduler,
        prepare_condition,
        scheduler_name,
    )  # fmt: skip
    from sdtune.models.pretrained import load_pipeline

    pipe = load_pipeline(ns.model, revision=ns.revision, variant=ns.variant, dtype=getattr(torch, ns.dtype), device=device,
                         pretrained_config=ns.model_config)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    ns.scheduler = scheduler_name(ns.scheduler, pipe.scheduler.config)
    pipe.scheduler = make_scheduler(ns.scheduler, pipe.scheduler.config)
    ns.guidance = default_guidance(pipe) if ns.guidance is None else ns.guidance
    check_clip_skip(pipe, ns)
    adapter_names = load_adapters(pipe, adapters, ns.model)
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

