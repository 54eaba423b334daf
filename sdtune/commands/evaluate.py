"""`sdtune evaluate`: the base model and each adapter side by side, on the same prompts and seeds.

Writes one labelled grid (rows: prompt × model, columns: seeds), the images, `metrics.json` (CLIP score with
--clip-model, validation loss on a dataset with --data, shapes-judge accuracy with --judge shapes) and
`report.html` showing them.
"""

from __future__ import annotations

import argparse
import html
import json
import shlex
from pathlib import Path

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
from sdtune.errors import SdtuneError
from sdtune.paths import check_output_apart, check_writable
from sdtune.toy.judging import accuracy, format_table, judge_palette, shape_prompts
from sdtune.toy.shapes import COLORS, SHAPES, judge

EPILOG = """examples:
  sdtune evaluate --model stable-diffusion-v1-5/stable-diffusion-v1-5 --adapter runs/my_lora/adapter \\
                  --adapter runs/my_lora/adapter/step_000500 --prompts-file prompts.txt --seed 0 --seed 1 \\
                  --clip-model openai/clip-vit-large-patch14 --data data/my_dog_val --out eval/my_lora
  sdtune evaluate --model ./my_model --adapter a.safetensors --adapter b.safetensors:0.7 --prompt "sks dog" --out eval/ab
  sdtune evaluate --model runs/toy-base/model --adapter runs/purple/adapter --judge shapes --judge-colors purple,red \\
                  --seed 0 --seed 1 --seed 2 --out eval/purple

Every model sees the same prompts, seeds and scheduler. --clip-model adds the CLIP score (100 · cosine of image and
prompt embeddings, averaged); --data adds the validation loss on a dataset at fixed noise and timesteps (the same
draws for every model, as `val/loss` in training; pass the run's --clip-skip, --max-token-length and
--prediction-type when it changed them). --adapter PATH[:SCALE] is repeatable; each is compared alone.
--model may be a single-file .safetensors/.ckpt checkpoint; --model-config then gives its configs, tokenizer and scheduler.
--judge shapes scores each image of the shapes world (`sdtune prep shapes`) against its prompt "a {color} {shape}":
the share of images showing the right colour, the right shape, and both (an unreadable image, or a colour that is
none of the judge's, is wrong). Without --prompt/--prompts-file the prompts are --judge-colors × --judge-shapes;
with --judge, --adapter is optional (the base model alone is scored).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="sdtune evaluate", description=__doc__, epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_common_arguments(parser)
    metrics = parser.add_argument_group("metrics")
    metrics.add_argument("--clip-model", metavar="PATH_OR_ID", help="CLIP model for the CLIP score (e.g. openai/clip-vit-large-patch14)")
    metrics.add_argument("--data", metavar="DST", help="dataset folder for the validation loss (any layout data.root reads)")
    metrics.add_argument("--resolution", type=int, help="validation-loss crop size (default: the sample width)")
    metrics.add_argument("--batch-size", type=int, default=4, help="validation-loss batch size (default: 4)")
    metrics.add_argument("--max-token-length", type=int, help="caption tokens, as data.max_token_length in training (default: one window of the tokenizer, 75 for CLIP; 150, 225)")
    metrics.add_argument("--prediction-type", choices=("epsilon", "v_prediction"),
                         help="loss target, as model.objective.prediction_type in training (default: the scheduler's)")  # fmt: skip
    metrics.add_argument("--judge", choices=("shapes",), help="score each image against its prompt 'a {color} {shape}' (sdtune/toy/shapes.py)")
    metrics.add_argument("--judge-colors", type=_names, metavar="C1,C2",
                         help=f"without prompts: the prompts' colours, PIL names (default: {','.join(COLORS)})")  # fmt: skip
    metrics.add_argument("--judge-shapes", type=_names, metavar="S1,S2",
                         help=f"without prompts: the prompts' shapes (default: {','.join(SHAPES)})")  # fmt: skip
    out = parser.add_argument_group("output")
    out.add_argument("--out", required=True, metavar="DIR", help="folder for grid.png, images/, metrics.json, report.html")
    out.add_argument("--overwrite", action="store_true", help="replace a previous evaluation in --out")
    return parser


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def main(args: list[str]) -> int:
    ns = build_parser().parse_args(args)
    _judge_prompts(ns)
    prompts, seeds = check_common(ns)
    # Every prompt must be "a {color} {shape}"; the judge can name each prompt colour besides its usual ones.
    palette = judge_palette(p.prompt for p in prompts) if ns.judge is not None else None
    adapters = [parse_adapter(text) for text in ns.adapter]
    if not adapters and ns.judge is None:
        raise SdtuneError("no --adapter to compare with the base model (pass one or more, or score the base model alone with --judge shapes)")
    if ns.data is not None and not Path(ns.data).is_dir():
        raise SdtuneError(f"--data {ns.data} is not a folder")
    out = Path(ns.out)
    from sdtune.paths import local_model_path

    clip_model = local_model_path(ns.clip_model)
    check_output_apart(out, [*common_inputs(ns, adapters), ("--data", ns.data), ("--clip-model", clip_model)])
    if (out / "metrics.json").exists() and not ns.overwrite:
        raise SdtuneError(f"{out} already holds an evaluation; pass --overwrite or choose another --out")
    width, height = image_size(ns)
    check_writable(out)  # last: it creates (and removes) an empty folder where --out goes

    from sdtune.finetune import DiffusionFineTune, Objective
    from sdtune.inference.grid import make_grid
    from sdtune.inference.sampling import default_guidance, iter_images, load_adapters, make_scheduler, scheduler_name

    device = pick_device(ns.device)
    # The frozen model with its diffusion loss (nothing of it trains). One copy of the weights: the pipeline is
    # built from its parts, so an adapter loaded into the pipeline is the adapter the validation loss sees.
    objective = Objective(prediction_type=ns.prediction_type)
    module = DiffusionFineTune(ns.model, revision=ns.revision, variant=ns.variant, pretrained_config=ns.model_config,
                               objective=objective, clip_skip=ns.clip_skip).to(device)  # fmt: skip
    module.eval()  # diffusers pipelines never switch modes; LoRA dropout must stay off while sampling
    ns.scheduler = scheduler_name(ns.scheduler, module.noise_scheduler.config)
    scheduler = make_scheduler(ns.scheduler, module.noise_scheduler.config)
    pipe = module.parts.pipeline(scheduler)
    pipe.set_progress_bar_config(disable=True)
    ns.guidance = default_guidance(pipe) if ns.guidance is None else ns.guidance
    check_clip_skip(pipe, ns)
    clip = _load_clip(ns.clip_model, device)
    batches = _validation_batches(ns, module, width) if ns.data else None

    for adapter in adapters:  # an adapter this model cannot take fails now, not after the base images
        load_adapters(pipe, [adapter], ns.model)
        pipe.unload_lora_weights()
    variants = [("base", None)] + [(f"{a.path.name}" + (f" @{a.scale:g}" if a.scale != 1 else ""), a) for a in adapters]
    results, judged, rows, labels = [], [], [[] for _ in prompts], [[] for _ in prompts]
    out.mkdir(parents=True, exist_ok=True)
    for number, (name, adapter) in enumerate(variants):
        pipe.unload_lora_weights()
        if adapter is not None:
            load_adapters(pipe, [adapter], ns.model)
        images: list[list] = [[] for _ in prompts]
        for p, _, image in iter_images(
            pipe, [p.prompt for p in prompts], seeds, steps=ns.steps, guidance_scale=ns.guidance, height=height,
            width=width, negative_prompts=[p.negative_prompt for p in prompts], clip_skip=ns.clip_skip,
        ):  # fmt: skip
            images[p].append(image)
        result = {"name": name, "adapter": str(adapter.path) if adapter else None, "scale": adapter.scale if adapter else None,
                  "images": []}  # fmt: skip
        folder = out / "images" / f"{number}_{slug(name)}"
        folder.mkdir(parents=True, exist_ok=True)
        judgements = []
        for p, row in enumerate(images):
            rows[p].append(row)
            labels[p].append(f"{name}: {prompts[p].prompt}")
            for seed, image in zip(seeds, row):
                path = folder / f"{p}_s{seed}.png"
                image.save(path)
                result["images"].append({"prompt": prompts[p].prompt, "seed": seed, "file": str(path.relative_to(out))})
                if palette is not None:
                    judgement = judge(image, palette)
                    judgements.append((prompts[p].prompt, judgement))
                    result["images"][-1]["judged"] = judgement.caption if judgement is not None else None
        if palette is not None:
            judged.append({"name": name, **accuracy(judgements)})
        if clip is not None:
            from sdtune.inference.metrics import clip_scores

            flat = [(prompts[p].prompt, image) for p, row in enumerate(images) for image in row]
            scores = clip_scores(*clip, [image for _, image in flat], [prompt for prompt, _ in flat])
            result["clip_score"] = sum(scores) / len(scores)
        if batches is not None:
            from sdtune.finetune.evaluation import dataset_loss

            result["val_loss"] = dataset_loss(module, batches)
        results.append(result)
        done = [f"{k} {result[k]:.4f}" for k in ("clip_score", "val_loss") if k in result]
        done += [f"judged both right {judged[-1]['both']:.0%}"] if palette is not None else []
        print(f"{name}: " + ", ".join(done), flush=True)
    pipe.unload_lora_weights()
    if palette is not None:
        print("judge shapes: share of images with the prompt's colour, shape, and both")
        print(format_table([(j["name"], j) for j in judged]), flush=True)

    grid_rows = [row for p in range(len(prompts)) for row in rows[p]]
    grid_labels = [label for p in range(len(prompts)) for label in labels[p]]
    make_grid(grid_rows, grid_labels, [f"seed {s}" for s in seeds]).save(out / "grid.png")
    metrics = {
        "command": shlex.join(["sdtune", "evaluate", *args]),
        "model": {"pretrained": ns.model, "pretrained_config": ns.model_config, "revision": ns.revision, "variant": ns.variant},
        "settings": {"steps": ns.steps, "guidance": ns.guidance, "scheduler": ns.scheduler, "width": width,
                     "height": height, "clip_skip": ns.clip_skip, "seeds": seeds, "clip_model": ns.clip_model,
                     "data": ns.data, "negative_prompt": ns.negative_prompt, "max_token_length": ns.max_token_length,
                     "prediction_type": module.prediction_type, "judge": ns.judge},  # fmt: skip
        "prompts": [{"prompt": p.prompt, "negative_prompt": p.negative_prompt} for p in prompts],
        "models": results,
    }
    if palette is not None:
        metrics["judge"] = {"palette": list(palette), "models": judged}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    (out / "report.html").write_text(_report(metrics), encoding="utf-8")
    print(f"wrote grid.png, metrics.json and report.html to {out}")
    return 0


def _judge_prompts(ns: argparse.Namespace) -> None:
    """Check the --judge flags; with --judge and no prompts, set --prompt to --judge-colors × --judge-shapes."""
    choosing = ns.judge_colors is not None or ns.judge_shapes is not None
    if ns.judge is None:
        if choosing:
            raise SdtuneError("--judge-colors and --judge-shapes need --judge shapes")
    elif ns.prompt or ns.prompts_file:
        if choosing:
            raise SdtuneError("--judge-colors and --judge-shapes make the prompts; pass them or --prompt/--prompts-file, not both")
    else:
        colors = ns.judge_colors if ns.judge_colors is not None else COLORS
        ns.prompt = shape_prompts(colors, ns.judge_shapes if ns.judge_shapes is not None else SHAPES)


def _load_clip(source: str | None, device: str):
    if source is None:
        return None
    from sdtune.inference.metrics import load_clip

    return load_clip(source, device)


def _validation_batches(ns: argparse.Namespace, module, width: int) -> list:
    """The dataset's batches, loaded once: centre crops, captions as written (the val_dataloader of training)."""
    from sdtune.data import CaptionDataModule

    if ns.batch_size < 1:
        raise SdtuneError(f"--batch-size must be at least 1, got {ns.batch_size}")
    data = CaptionDataModule(root=ns.data, val_root=ns.data, resolution=ns.resolution or width,
                             batch_size=ns.batch_size, max_token_length=ns.max_token_length, pretrained=ns.model,
                             revision=ns.revision, pretrained_config=ns.model_config)  # fmt: skip
    data.setup("validate")
    return list(data.val_dataloader())


def _report(metrics: dict) -> str:
    """A one-file HTML page: the metrics table, the judge's table (with --judge) and the grid."""
    columns = [k for k in ("clip_score", "val_loss") if any(k in m for m in metrics["models"])]
    head = "".join(f"<th>{html.escape(c.replace('_', ' '))}</th>" for c in columns)
    rows = "".join(
        f"<tr><td>{html.escape(m['name'])}</td>" + "".join(f"<td>{m[c]:.4f}</td>" for c in columns) + "</tr>"
        for m in metrics["models"]
    )
    settings = html.escape(json.dumps(metrics["settings"]))
    judged = _judge_report(metrics["judge"]) if "judge" in metrics else ""
    table = f"<table border=1 cellpadding=4><tr><th>model</th>{head}</tr>{rows}</table>" if columns or not judged else ""
    return (
        "<!doctype html><meta charset='utf-8'><title>sdtune evaluate</title>"
        f"<h1>{html.escape(metrics['model']['pretrained'])}</h1><p><code>{html.escape(metrics['command'])}</code></p>"
        f"{table}{judged}"
        f"<p><small>{settings}</small></p><img src='grid.png' alt='grid: prompt × model rows, seed columns'>\n"
    )


def _judge_report(judge: dict) -> str:
    """The judge's accuracies in percent: each model's overall row, then one row per prompt."""

    def cells(result: dict) -> str:
        shares = "".join(f"<td>{100 * result[k]:.1f} %</td>" for k in ("color", "shape", "both"))
        return f"{shares}<td>{result['count']}</td>"

    rows = ""
    for model in judge["models"]:
        rows += f"<tr><th>{html.escape(model['name'])}</th><th>all prompts</th>{cells(model)}</tr>"
        rows += "".join(f"<tr><td></td><td>{html.escape(p['prompt'])}</td>{cells(p)}</tr>" for p in model["prompts"])
    return (
        "<h2>shapes judge: images showing the prompt's colour, shape, both</h2><table border=1 cellpadding=4>"
        f"<tr><th>model</th><th>prompt</th><th>colour</th><th>shape</th><th>both</th><th>images</th></tr>{rows}</table>"
    )
