"""The `sdtune` command: `fit` and `validate` through LightningCLI, plus `ls`, `cp`, `sample`, `evaluate`, `export`, `demo`, `toy`, `prep` and `env`."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
from pathlib import Path

from sdtune.errors import SdtuneError, SdtuneErrors
from sdtune.recipes import find_recipe, list_recipes

USAGE = """usage: sdtune <command> [options]

commands:
  ls          list the packaged recipes
  cp          copy a packaged recipe to edit it
  fit         train with a recipe (LightningCLI)
  validate    compute the validation loss of a model/adapter (LightningCLI)
  sample      images from a model + adapters: text-to-image, image-to-image, inpainting
  evaluate    base vs adapters on the same prompts and seeds: grid, CLIP score, validation loss, shapes judge, report
  export      write an adapter for diffusers, peft or A1111/ComfyUI (kohya), or merge it; checked on write
  demo        offline end-to-end demo on a tiny model (CPU, a few minutes)
  toy         the toy world's base model: init (random weights), build (reproduce the shipped one)
  prep        dataset tools: build, check, caption, cache, shapes (`sdtune prep --help`)
  env         versions of sdtune, Python, torch (and its GPUs) and the libraries, for bug reports

examples:
  sdtune prep build ~/photos/my_dog --out data/my_dog --prefix "sks dog"
  sdtune ls
  sdtune cp sd15/lora my_lora.yaml
  sdtune fit --config sd15/lora --model.pretrained stable-diffusion-v1-5/stable-diffusion-v1-5 \\
             --data.root ./my_dataset --trainer.max_steps 1500 --trainer.default_root_dir runs/my_lora
  sdtune fit --config sd15/lora ... --ckpt_path last        # resume that run
  sdtune sample --model stable-diffusion-v1-5/stable-diffusion-v1-5 --adapter runs/my_lora/adapter:0.8 \\
                --prompt "a photo of sks dog" --seed 0 --seed 1 --out samples/my_lora
  sdtune export runs/my_lora --format kohya --out loras/my_lora.safetensors

Run `sdtune <command> --help` for a command's options.
"""

FIT_EPILOG = """examples:
  sdtune fit --config sd15/lora --model.pretrained stable-diffusion-v1-5/stable-diffusion-v1-5 \\
             --data.root ./my_dataset --trainer.max_steps 1500 --trainer.default_root_dir runs/my_lora
  sdtune fit --config sd15/lora --config overrides.yaml --model.lora.rank 32 --print_config
  sdtune fit --config sd15/lora ... --ckpt_path last       # resume from runs/my_lora/checkpoints/last.ckpt

--config takes a packaged recipe name (see `sdtune ls`) or a YAML path; later configs and flags override earlier.
The run directory (--trainer.default_root_dir) receives config.yaml, logs/ (TensorBoard), checkpoints/ and adapter/.
"""

VALIDATE_EPILOG = """example:
  sdtune validate --config sd15/lora --model.pretrained ./my_model --data.root ./my_dataset \\
                  --data.val_fraction 0.1 --ckpt_path runs/my_lora/checkpoints/last.ckpt
"""


def _resolve_configs(args: list[str]) -> list[str]:
    """Let `--config sd15/lora` name a packaged recipe as well as a file."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg in ("--config", "-c") and i + 1 < len(args):
            out += [arg, str(find_recipe(args[i + 1]))]
            i += 2
            continue
        if arg.startswith("--config="):
            arg = "--config=" + str(find_recipe(arg.split("=", 1)[1]))
        out.append(arg)
        i += 1
    return out


def cmd_ls(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="sdtune ls",
        description="List the packaged recipes: name and what each is for.",
        epilog="example:\n  sdtune ls\n  sdtune cp sd15/lora my_lora.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(args)
    recipes = list_recipes()
    width = max(len(r.name) for r in recipes)
    for recipe in recipes:
        print(f"{recipe.name:<{width}}  {recipe.summary}")
    return 0


def cmd_cp(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="sdtune cp",
        description="Copy a packaged recipe to a file you can edit, then pass it to `sdtune fit --config`.",
        epilog="example:\n  sdtune cp sd15/lora my_lora.yaml\n  sdtune fit --config my_lora.yaml --data.root ./my_dataset",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", help="packaged recipe name, e.g. sd15/lora (see `sdtune ls`)")
    parser.add_argument("dest", help="destination file or directory")
    parser.add_argument("--force", action="store_true", help="overwrite an existing destination file")
    ns = parser.parse_args(args)
    source = find_recipe(ns.name)
    dest = Path(ns.dest)
    if dest.is_dir():
        dest = dest / source.name
    if dest.exists() and not ns.force:
        raise SdtuneError(f"{dest} already exists; pass --force to overwrite it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, dest)
    print(f"copied {ns.name} to {dest}")
    return 0


def cmd_env(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="sdtune env",
        description="Print the versions of sdtune, Python, torch (CUDA/MPS, GPUs), diffusers, transformers, peft, "
        "lightning and the other libraries, and whether each is in sdtune's declared range: paste it into bug reports.",
        epilog="example:\n  sdtune env",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(args)
    from sdtune.environment import report

    print(report())
    return 0


def cmd_lightning(subcommand: str, args: list[str]) -> int:
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from sdtune.callbacks.graceful_stop import received
    from sdtune.lightning_cli import run_cli

    epilog = FIT_EPILOG if subcommand == "fit" else VALIDATE_EPILOG
    try:
        run_cli([subcommand, *_resolve_configs(args)], epilog)
    except SIGTERMException:  # stopped by SIGTERM or Ctrl+C after a checkpoint was saved (GracefulStop)
        return 128 + int(received["signal"] or signal.SIGTERM)
    return 0


def cmd_evaluate(args: list[str]) -> int:
    from sdtune.evaluate_cli import main as evaluate_main

    return evaluate_main(args)


def cmd_sample(args: list[str]) -> int:
    from sdtune.sample_cli import main as sample_main

    return sample_main(args)


def cmd_export(args: list[str]) -> int:
    from sdtune.export.cli import main as export_main

    return export_main(args)


def cmd_demo(args: list[str]) -> int:
    from sdtune.demo import main as demo_main

    return demo_main(args)


def cmd_toy(args: list[str]) -> int:
    from sdtune.toy_cli import main as toy_main

    return toy_main(args)


def cmd_prep(args: list[str]) -> int:
    from data_prep.cli import main as prep_main

    return prep_main(args)


def one_line(err: SdtuneError) -> str:
    """The message itself; a DataLoader worker re-raises it with the worker's traceback in front."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1].removeprefix(f"{SdtuneError.__module__}.{SdtuneError.__name__}: ") if lines else type(err).__name__


# Notices about optional backends sdtune does not use (torchvision image processors, bitsandbytes' 4-bit CPU
# kernels): printed on every command otherwise, and nothing a user can act on.
QUIET_LOGGERS = ("transformers.utils.import_utils", "bitsandbytes.backends.cpu.ops")
# diffusers messages that hold no information: an adapter without text-encoder layers, a cast with nothing to keep.
NOISE = {
    "diffusers.loaders.lora_base": "No LoRA keys associated to",
    "diffusers.loaders.peft": "No LoRA keys associated to",
    "diffusers.models.modeling_utils": "should be kept in float32: [].",
}


# Commands that load no model run whatever is installed; `env` reports what is wrong instead of refusing.
NO_VERSION_CHECK = ("ls", "cp", "env")


def _drop_noise() -> None:
    for name, text in NOISE.items():
        logging.getLogger(name).addFilter(lambda record, text=text: text not in record.getMessage())


def main(argv: list[str] | None = None) -> int:
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    _drop_noise()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    commands = {"ls": cmd_ls, "cp": cmd_cp, "sample": cmd_sample, "evaluate": cmd_evaluate, "export": cmd_export, "demo": cmd_demo, "toy": cmd_toy, "prep": cmd_prep, "env": cmd_env}
    try:
        if command not in NO_VERSION_CHECK and "-h" not in rest and "--help" not in rest:
            from sdtune.environment import check_requirements

            problems = check_requirements()
            if problems:
                raise SdtuneErrors(problems)
        if command in ("fit", "validate"):
            return cmd_lightning(command, rest)
        if command in commands:
            return commands[command](rest)
        print(f"sdtune: error: unknown command '{command}'\n\n{USAGE}", file=sys.stderr)
        return 2
    except SdtuneErrors as err:
        for problem in err.problems:
            print(f"sdtune: error: {problem}", file=sys.stderr)
        return 2
    except SdtuneError as err:
        print(f"sdtune: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sdtune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
