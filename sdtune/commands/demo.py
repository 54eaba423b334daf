"""`sdtune demo`: teach the toy base model a new colour with a LoRA, offline on CPU in a few minutes, and measure it.

The toy base inside sdtune (`sdtune:toy`, 32-px shapes) draws "a {red, green, blue, yellow} {circle, square,
triangle}" but has never seen orange. The demo generates 24 orange images and 24 of the known colours, trains the
`toy/lora` recipe through the real `sdtune fit`, then `sdtune evaluate --judge shapes` draws every prompt with the
base and with the LoRA on the same seeds and reads each image back: the share judged right for the new colour and
for the known ones, before and after, and a grid image of both.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sdtune.commands.options import Parser

NEW_COLOR = "orange"
KNOWN_COLORS = ("red", "green", "blue", "yellow")
IMAGES = 24  # of each kind


def main(args: list[str]) -> int:
    parser = Parser(
        prog="sdtune demo",
        description=__doc__,
        epilog="examples:\n  sdtune demo --out sdtune-demo\n  tensorboard --logdir sdtune-demo/run/logs\n"
        "  sdtune demo --flow --out sdtune-demo-flow     # the flow-matching toy (an SD3 transformer)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="sdtune-demo", help="folder for the datasets, run and evaluation")
    parser.add_argument("--steps", type=int, default=300, help="LoRA training steps (default: 300, about a minute on 2 CPU cores)")
    parser.add_argument("--seeds", type=int, default=8, help="images per prompt the judge scores (default: 8)")
    parser.add_argument("--model", help="base model (default: sdtune:toy, the shipped toy base; with --flow sdtune:toy-flow)")
    parser.add_argument("--flow", action="store_true", help="the flow-matching toy: sdtune:toy-flow and the toy/flow_lora recipe")
    ns = parser.parse_args(args)
    scores = run_demo(Path(ns.out), ns.steps, ns.seeds, ns.model or ("sdtune:toy-flow" if ns.flow else "sdtune:toy"), ns.flow)
    return 0 if scores is not None else 1


def run_demo(out: Path, steps: int, seeds: int, model: str = "sdtune:toy", flow: bool = False) -> dict[str, dict[str, float]] | None:
    """Prepare, train and judge; returns {"base"|"lora": {"new": share, "known": share}} (None if a step failed)."""
    from sdtune.commands import run as run_command
    from sdtune.commands.toy import judge_sampling
    from sdtune.paths import check_output_apart, local_model_path
    from sdtune.toy.shapes import make_shapes_dataset

    check_output_apart(out, {"the base model (--model)": local_model_path(model)})
    new, known, run = out / NEW_COLOR, out / "known", out / "run"
    make_shapes_dataset(new, count=IMAGES, size=32, seed=3, colors=[NEW_COLOR])
    make_shapes_dataset(known, count=IMAGES, size=32, seed=4, colors=KNOWN_COLORS)
    print(f"[1/3] datasets: {new} ({IMAGES} images of {NEW_COLOR} shapes), {known} ({IMAGES} of {', '.join(KNOWN_COLORS)})")

    subsets = json.dumps([{"root": str(new)}, {"root": str(known)}])
    fit = ["fit", "--config", "toy/flow_lora" if flow else "toy/lora", "--model.pretrained", model, "--data.subsets", subsets,
           "--trainer.default_root_dir", str(run), "--trainer.max_steps", str(steps),
           "--checkpoint.every_n_train_steps", str(steps)]  # fmt: skip
    print(f"[2/3] sdtune {' '.join(fit)}", flush=True)
    started = time.perf_counter()
    if run_command(fit) != 0:
        return None
    print(f"      trained {steps} steps in {time.perf_counter() - started:.0f} s; adapter: {run / 'adapter'}")

    evaluate = ["evaluate", "--model", model, "--adapter", str(run / "adapter"), "--judge", "shapes",
                "--judge-colors", ",".join((NEW_COLOR, *KNOWN_COLORS)), *judge_sampling(seeds, flow),
                "--out", str(out / "eval"), "--overwrite"]  # fmt: skip
    print(f"[3/3] sdtune {' '.join(evaluate)}", flush=True)
    if run_command(evaluate) != 0:
        return None
    scores = split_scores(json.loads((out / "eval" / "metrics.json").read_text()))
    print(f"\n{'':12}{'base':>8}{'LoRA':>8}   (share of images judged right: colour and shape)")
    for group, label in (("new", f"{NEW_COLOR} (new)"), ("known", "known colours")):
        print(f"{label:<12}{scores['base'][group]:>8.0%}{scores['lora'][group]:>8.0%}")
    print(f"grid (rows: prompt × model, columns: seeds): {out / 'eval' / 'grid.png'}")
    return scores


def split_scores(metrics: dict) -> dict[str, dict[str, float]]:
    """metrics.json's judge block → each model's share judged fully right on the new colour's prompts and on the
    known colours' (images counted, not prompts averaged)."""
    scores = {}
    for model, key in zip(metrics["judge"]["models"], ("base", "lora")):
        groups: dict[str, list[float]] = {"new": [0, 0], "known": [0, 0]}
        for prompt in model["prompts"]:
            group = groups["new" if prompt["prompt"].split()[1] == NEW_COLOR else "known"]
            group[0] += prompt["both"] * prompt["count"]
            group[1] += prompt["count"]
        scores[key] = {name: right / count for name, (right, count) in groups.items()}
    return scores
