"""`sdtune toy`: the toy world's base models, built from nothing but sdtune.

`init` writes the toy architecture with random weights. `build` reproduces the base model sdtune ships (`sdtune:toy`)
through the same commands a user runs: generate the shape datasets, train the VAE (`toy/vae`), train the UNet and
text encoder (`toy/base`), store the result in float16 and score it with the shapes judge. With `--flow`, the same
for the flow-matching toy (`sdtune:toy-flow`, an SD3 with a transformer): on sdtune:toy's VAE, the transformer and
its CLIP text encoders train with rectified flow (`toy/flow_base`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from sdtune.commands.options import Parser
from sdtune.errors import SdtuneError
from sdtune.paths import check_output_apart

# The VAE sees every colour the demos use, those held out from the base included; the base UNet only the four base colours.
VAE_COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "magenta")
BASE_COLORS = ("red", "green", "blue", "yellow")
IMAGES = 2400
EPILOG = """examples:
  sdtune toy init --out toy/random
  sdtune toy build --out toy                     # about 16 minutes on 2 CPU cores; toy/toy-base is the result
  sdtune toy build --flow --out toy-flow         # the flow-matching toy: toy-flow/toy-base
  sdtune evaluate --model toy/toy-base --judge shapes --out toy/eval
"""


def judge_sampling(seeds: int = 8, flow: bool = False) -> list[str]:
    """`sdtune evaluate` sampling options toy models are scored with: seeds 0..seeds-1, 25 steps of DPM++ at CFG 4;
    for the flow toy, of the flow-matching Euler sampler at CFG 3 (its shapes come out best at 2.5-3 and lose their
    edges at 4 and above)."""
    options: list[str] = []
    for seed in range(seeds):
        options += ["--seed", str(seed)]
    if flow:
        return options + ["--steps", "25", "--guidance", "3", "--scheduler", "flow_euler"]
    return options + ["--steps", "25", "--guidance", "4", "--scheduler", "dpmpp_2m"]


def run(step: str, args: list[str]) -> None:
    """One sdtune command, printed first so it can be rerun by hand."""
    from sdtune.commands import run as run_command

    print(f"[{step}] sdtune {' '.join(args)}", flush=True)
    code = run_command(args)
    if code != 0:
        raise SdtuneError(f"toy build: step {step} failed (exit code {code}); the command is printed above")


def to_float16(source: Path, dest: Path) -> Path:
    """Copy a diffusers pipeline folder with the denoiser's (UNet or transformer) and VAE's weights stored in float16
    (half the size). diffusers loads them as float32 unless told otherwise; the text encoders stay float32, since
    transformers would load float16 weights as float16 by default. The configs lose `_name_or_path`, the folder on
    the building machine they were loaded from."""
    from safetensors.torch import load_file, save_file

    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(source, dest)
    for part in ("unet", "transformer", "vae"):
        for weights in (dest / part).glob("*.safetensors"):
            tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(weights).items()}
            save_file(tensors, weights, metadata={"format": "pt"})
    for config in dest.glob("*/config.json"):
        settings = json.loads(config.read_text())
        if settings.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return dest


def check_out_apart(out: str | Path, flow: bool) -> None:
    """--out never is, sits inside or contains what a toy model is made from: sdtune's tiny tokenizer and, for the
    flow toy, sdtune:toy (whose VAE it takes)."""
    from sdtune.models.tiny import TOKENIZER_FILES
    from sdtune.paths import local_model_path

    vae_from = local_model_path("sdtune:toy") if flow else None
    check_output_apart(out, {"sdtune's tiny tokenizer": TOKENIZER_FILES, "sdtune:toy": vae_from})


def cmd_init(args: list[str]) -> int:
    parser = Parser(
        prog="sdtune toy init",
        description="Write the toy architecture (32-px images, 8×8×4 latents) with random weights as a diffusers folder.",
        epilog="examples:\n  sdtune toy init --out toy/random\n  sdtune toy init --flow --out toy/flow-random",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="folder to write (a diffusers pipeline directory)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    parser.add_argument("--flow", action="store_true", help="the flow-matching toy (an SD3) on sdtune:toy's trained VAE")
    ns = parser.parse_args(args)
    check_out_apart(ns.out, ns.flow)
    from sdtune.toy.model import build_toy_sd3, build_toy_stable_diffusion

    if ns.flow:
        from sdtune.models.pretrained import resolve_pretrained

        path = build_toy_sd3(ns.out, vae_from=resolve_pretrained("sdtune:toy"), seed=ns.seed)
    else:
        path = build_toy_stable_diffusion(ns.out, seed=ns.seed)
    print(f"wrote the random toy model to {path}")
    return 0


def cmd_build(args: list[str]) -> int:
    parser = Parser(
        prog="sdtune toy build",
        description="Reproduce a shipped toy base model: datasets, VAE, denoiser + text encoders, float16 copy, judge score.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="work folder; the model lands in OUT/toy-base")
    parser.add_argument("--flow", action="store_true", help="the flow-matching toy (sdtune:toy-flow) on sdtune:toy's VAE")
    parser.add_argument("--vae-steps", type=int, help="VAE training steps (default: the toy/vae recipe's)")
    parser.add_argument("--base-steps", type=int, help="denoiser training steps (default: the toy/base or toy/flow_base recipe's)")
    parser.add_argument("--images", type=int, default=IMAGES, help=f"images in each dataset (default: {IMAGES})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and of the runs (default: 0)")
    parser.add_argument("--skip-judge", action="store_true", help="do not score the result with the shapes judge")
    ns = parser.parse_args(args)
    out = Path(ns.out)
    check_out_apart(out, ns.flow)
    if (out / "vae").exists() or (out / "base").exists():
        raise SdtuneError(f"{out} already holds a toy build (vae/ or base/): pass a new --out")
    started = time.perf_counter()
    common = ["--seed_everything", str(ns.seed)]
    steps = ["4", "4"] if ns.flow else ["6", "6"]
    if ns.flow:  # the toy VAE is sdtune:toy's: one step less to train
        run(f"1/{steps[0]}", ["toy", "init", "--flow", "--out", str(out / "random"), "--seed", str(ns.seed)])
        run(f"2/{steps[0]}", ["prep", "shapes", "--out", str(out / "base-data"), "--n", str(ns.images), "--size", "32",
                              "--seed", "2", "--colors", ",".join(BASE_COLORS)])  # fmt: skip
        base_from, recipe, step = out / "random", "toy/flow_base", "3/4"
    else:
        run("1/6", ["toy", "init", "--out", str(out / "random"), "--seed", str(ns.seed)])
        for step, name, colors, seed in (("2/6", "vae-data", VAE_COLORS, 1), ("3/6", "base-data", BASE_COLORS, 2)):
            run(step, ["prep", "shapes", "--out", str(out / name), "--n", str(ns.images), "--size", "32",
                       "--seed", str(seed), "--colors", ",".join(colors)])  # fmt: skip
        vae = ["fit", "--config", "toy/vae", "--model.pretrained", str(out / "random"), "--data.root", str(out / "vae-data"),
               "--trainer.default_root_dir", str(out / "vae"), *common]  # fmt: skip
        if ns.vae_steps:
            vae += ["--trainer.max_steps", str(ns.vae_steps), "--checkpoint.every_n_train_steps", str(ns.vae_steps)]
        run("4/6", vae)
        base_from, recipe, step = out / "vae" / "model", "toy/base", "5/6"
    base = ["fit", "--config", recipe, "--model.pretrained", str(base_from), "--data.root", str(out / "base-data"),
            "--trainer.default_root_dir", str(out / "base"), *common]  # fmt: skip
    if ns.base_steps:
        base += ["--trainer.max_steps", str(ns.base_steps), "--checkpoint.every_n_train_steps", str(ns.base_steps)]
    run(step, base)
    model = to_float16(out / "base" / "model", out / "toy-base")
    print(f"      {model}: float16 copy of {out / 'base' / 'model'} ({sum(f.stat().st_size for f in model.rglob('*')) / 2**20:.1f} MB)")
    score = "not judged (--skip-judge)"
    if not ns.skip_judge:
        run(f"{steps[1]}/{steps[1]}", ["evaluate", "--model", str(model), "--judge", "shapes", "--judge-colors",
                                       ",".join(BASE_COLORS), *judge_sampling(flow=ns.flow), "--out", str(out / "eval")])  # fmt: skip
        judged = json.loads((out / "eval" / "metrics.json").read_text())["judge"]["models"][0]
        score = f"{judged['both']:.1%} of {judged['count']} images judged fully right (colour {judged['color']:.1%}, shape {judged['shape']:.1%})"
    minutes = (time.perf_counter() - started) / 60
    write_model_card(model, " ".join(["sdtune toy build", *args]), minutes, score, ns.flow)
    print(f"toy build: {model} in {minutes:.1f} min; {score}")
    return 0


def write_model_card(model: Path, command: str, minutes: float, score: str, flow: bool = False) -> None:
    """README.md in the model folder: what it is, how it was made and how good it is."""
    if flow:
        what = ("# sdtune flow-matching toy base\n\n"
                "An SD3 (MMDiT transformer, rectified flow) for 32-px images of circles, squares and triangles in red, green,\n"
                "blue and yellow: sdtune:toy's VAE, and a transformer and two CLIP text encoders trained from random weights by\n"
                "the `toy/flow_base` recipe (its T5 stays random and frozen). Transformer and VAE weights are stored in float16.\n\n")  # fmt: skip
        sampler = "flow-matching Euler 25 steps, guidance 3"
    else:
        what = ("# sdtune toy base\n\n"
                "A Stable Diffusion for 32-px images of circles, squares and triangles in red, green, blue and yellow, trained\n"
                "from random weights by sdtune's `toy/vae` and `toy/base` recipes. UNet and VAE weights are stored in float16.\n\n")  # fmt: skip
        sampler = "DPM++ 25 steps, guidance 4"
    (model / "README.md").write_text(
        what + f"- made by: `{command}` ({minutes:.1f} min)\n"
        f"- shapes judge, every colour × shape over seeds 0-7, {sampler}: {score}\n"
    )


def main(args: list[str]) -> int:
    commands = {"init": cmd_init, "build": cmd_build}
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\nusage: sdtune toy {init,build} [options]\n\n" + EPILOG)
        return 0
    if args[0] not in commands:
        print(f"sdtune: error: unknown toy command '{args[0]}' (init or build; see `sdtune toy --help`)", file=sys.stderr)
        return 2
    return commands[args[0]](args[1:])
