"""`sdtune export`: write a trained adapter for diffusers, peft or A1111/ComfyUI/Forge (kohya), or merge it into a
full pipeline — and check every file by loading it back with its consumer before calling it done."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from sdtune.commands.options import Parser, check_model_names
from sdtune.errors import SdtuneError
from sdtune.paths import check_output_apart, check_writable, local_model_path

# Arguments are checked before torch, diffusers and peft are imported (seconds), so a typo fails at once.
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
FORMATS = ("diffusers", "peft", "kohya", "single-file")
ONE_FILE = ("kohya", "single-file")  # formats written as one .safetensors
# What an export folder holds (adapter or pipeline); --force replaces a folder only if it holds nothing else.
EXPORT_NAMES = {"pytorch_lora_weights.safetensors", "adapter_config.json", "adapter_model.safetensors", "README.md",
                "model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler", "text_encoder_2",
                "tokenizer_2", "samples.png"}  # fmt: skip

EPILOG = """examples:
  sdtune export runs/my_lora --format kohya --out loras/my_lora.safetensors          # A1111, ComfyUI, Forge
  sdtune export runs/my_lora --format diffusers --out export/my_lora --dtype fp16     # load_lora_weights + README.md
  sdtune export runs/my_lora --format peft --out export/my_lora_peft                  # PeftModel.from_pretrained
  sdtune export runs/my_lora --merge --scale 0.8 --out models/my_model                # a full diffusers pipeline
  sdtune export runs/my_lora --merge --format single-file --dtype fp16 --out my_model.safetensors  # A1111 checkpoint
  sdtune export runs/my_lora/checkpoints/last.ckpt --format kohya --out last.safetensors
  sdtune export some_lora.safetensors --model ./sd15 --format diffusers --out export/converted
  sdtune export runs/my_loha --format kohya --out loras/my_loha.safetensors          # LoHa/LoKr: LyCORIS naming

SOURCE is a run directory (its adapter/, or checkpoints/last.ckpt when training did not finish), a checkpoint, or
an adapter folder or file (diffusers, kohya, or a LoHa/LoKr in LyCORIS naming). The base model is the run's, unless
--model is given. A LoHa/LoKr exports as kohya (its LyCORIS file), peft or --merge; diffusers reads LoRA only.
Every file is loaded back by its consumer and its UNet output compared with the adapter's; a file that does not
match is renamed *.invalid and the command fails.
"""


def _parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="sdtune export",
        description="Export a trained LoRA as a diffusers, peft or kohya (A1111/ComfyUI) file, or merge it into the model "
        "(a diffusers pipeline, or with --format single-file one A1111/ComfyUI checkpoint).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", help="run directory, checkpoint (.ckpt), or adapter folder / .safetensors file")
    parser.add_argument("--out", required=True, help="output folder (diffusers, peft, --merge) or .safetensors file (kohya, single-file)")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="adapter format (default diffusers); with --merge, single-file: one checkpoint in the original layout")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="dtype of the written weights (default fp32, the trained dtype)")
    parser.add_argument("--merge", action="store_true", help="fold the adapter into the UNet/text encoder and write a full pipeline")
    parser.add_argument("--scale", type=float, default=None, help="with --merge: strength of the folded adapter (default 1)")
    parser.add_argument("--model", help="base model (diffusers folder, Hub id or single-file checkpoint) instead of the run's")
    parser.add_argument("--model-config", metavar="DIR_OR_ID", help="for a single-file --model: diffusers folder or Hub id with its configs")
    parser.add_argument("--force", action="store_true", help="replace an earlier export at --out (once the new one has passed its check; never an input)")
    return parser


def _check_arguments(ns: argparse.Namespace) -> Path:
    out = Path(ns.out).expanduser()
    if ns.merge and ns.format not in (None, "single-file"):
        raise SdtuneError("--merge writes a full diffusers pipeline (or with --format single-file one checkpoint); drop --format")
    if ns.format == "single-file" and not ns.merge:
        raise SdtuneError("--format single-file writes the whole model with the adapter folded in: add --merge")
    if ns.scale is not None and not ns.merge:
        raise SdtuneError("--scale only applies with --merge (adapter files are scaled when they are loaded)")
    if ns.format in ONE_FILE and out.suffix != ".safetensors":
        raise SdtuneError(f"--format {ns.format} writes one file: --out must end in .safetensors, got {out}")
    if ns.format not in ONE_FILE and out.suffix == ".safetensors":
        raise SdtuneError(f"--format {ns.format or 'diffusers'}{' --merge' if ns.merge else ''} writes a folder: --out {out} names a .safetensors file")
    if ns.model_config and not ns.model:
        raise SdtuneError("--model-config goes with --model (a run's own base model comes with its config)")
    return out


def _check_replaceable(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise SdtuneError(f"{out} already exists; pass --force to replace it")
    if out.is_dir() and not {p.name for p in out.iterdir()} <= EXPORT_NAMES:
        raise SdtuneError(f"{out} is a folder holding other files than an export; --force only replaces exports, pick another --out")


def _check_apart(ns: argparse.Namespace) -> None:
    """--out never is, sits inside or contains SOURCE, the run it belongs to or the base model (whatever --force)."""
    from sdtune.export.source import RunRecord

    source = Path(ns.source).expanduser()
    run = RunRecord.around(source if source.is_dir() else source.parent)
    inputs = {"SOURCE": source, "the run's config": run.config_path, "the run's checkpoint": run.checkpoint}
    if ns.model:
        inputs.update({"--model": local_model_path(ns.model), "--model-config": local_model_path(ns.model_config)})
    else:
        inputs.update({"the run's model.pretrained": local_model_path(run.model_arg("pretrained")),
                       "the run's model.pretrained_config": local_model_path(run.model_arg("pretrained_config"))})  # fmt: skip
    check_output_apart(ns.out, inputs)


def _staging(out: Path) -> Path:
    """A sibling path to write to; it becomes `out` only after the check passes."""
    staging = out.parent / f".{out.stem}.partial{out.suffix}"
    _remove(staging)
    return staging


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def export(ns: argparse.Namespace) -> Path:
    out = _check_arguments(ns)
    if not Path(ns.source).expanduser().exists():
        raise SdtuneError(f"{ns.source} does not exist (pass a run directory, a checkpoint or an adapter)")
    check_model_names(ns)
    import diffusers
    import torch
    import transformers

    from sdtune.export.check import Probe, compare, count_lora_layers, reference, unet_output
    from sdtune.export.formats import READ_BY, WRITERS, load_back, write_merged
    from sdtune.export.single_file import check_family
    from sdtune.export.source import load_source

    _check_apart(ns)
    _check_replaceable(out, ns.force)
    check_writable(out)  # last: it creates (and removes) an empty folder where --out goes
    # Loading and saving whole models prints progress bars; the export reports what it did in one line.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()

    dtype = getattr(torch, DTYPES[ns.dtype])
    kind = ns.format if ns.format == "single-file" else "merged" if ns.merge else ns.format or "diffusers"
    scale = 1.0 if ns.scale is None else ns.scale
    started = time.perf_counter()
    adapted = load_source(ns.source, ns.model, ns.model_config)
    # A checkpoint outside its run names its base model only inside: checked again now that it is known.
    check_output_apart(ns.out, {"the base model": local_model_path(adapted.pretrained),
                                "the base model's configs": local_model_path(adapted.pretrained_config)})  # fmt: skip
    if kind == "single-file":
        check_family(adapted.family)
    print(f"exporting {adapted.described} on {adapted.pretrained} as {kind}")

    probe = Probe.for_pipeline(adapted.pipe)
    adapted.pipe.set_adapters(["default"], [scale])
    # Adapter files are compared with the adapter rounded as stored; a merged model's rounding is in the tolerance.
    ref = reference(adapted.pipe, probe, dtype, rounded=not ns.merge)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging(out)
    try:
        if ns.merge:
            write_merged(adapted, staging, dtype, scale, single_file=kind == "single-file")
        else:
            WRITERS[kind](adapted, staging, dtype)
        base_model = adapted.pretrained, adapted.revision, adapted.pretrained_config
        del adapted  # one copy of the model at a time
        loaded = load_back(kind, base_model, staging)
        verdict = compare(ref, unet_output(loaded, probe), dtype if ns.merge else torch.float32,
                          None if ns.merge else count_lora_layers(loaded))  # fmt: skip
    except BaseException:
        _remove(staging)
        raise
    if not verdict.ok:
        invalid = out.with_name(out.name + ".invalid")
        _remove(invalid)
        staging.rename(invalid)
        raise SdtuneError(f"export check failed: {kind} reloaded by its consumer does not match the adapter: {verdict.describe()}; kept as {invalid}")
    _remove(out)
    staging.rename(out)
    print(f"wrote {out} ({kind}, {ns.dtype}) in {time.perf_counter() - started:.0f} s; checked: {verdict.describe()}")
    if kind in READ_BY:
        print(f"read by {READ_BY[kind]}")
    return out


def main(args: list[str]) -> int:
    export(_parser().parse_args(args))
    return 0
