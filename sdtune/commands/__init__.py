"""The `sdtune` commands: one module each, one table from command name to the function that runs it.

Every function takes the command's arguments (`sys.argv` after the command name) and returns the exit code; a
problem the user can fix is raised as `SdtuneError`, which `sdtune.cli` prints as one line. Modules are imported
only when their command runs, so `sdtune ls` or a typo costs no torch import.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Callable


@dataclass(frozen=True)
class Command:
    module: str
    function: str
    summary: str

    def load(self) -> Callable[[list[str]], int]:
        return getattr(import_module(f"sdtune.commands.{self.module}"), self.function)


COMMANDS = {
    "ls": Command("recipes", "ls", "list the packaged recipes"),
    "cp": Command("recipes", "cp", "copy a packaged recipe to edit it"),
    "fit": Command("fit", "fit", "train with a recipe (LightningCLI)"),
    "validate": Command("fit", "validate", "compute the validation loss of a model/adapter (LightningCLI)"),
    "sample": Command("sample", "main", "images from a model + adapters: text-to-image, image-to-image, inpainting"),
    "evaluate": Command("evaluate", "main", "base vs adapters on the same prompts and seeds: grid, CLIP score, validation loss, shapes judge, report"),
    "export": Command("export", "main", "write an adapter for diffusers, peft or A1111/ComfyUI (kohya), or merge it; checked on write"),
    "report": Command("report", "main", "one self-contained HTML page for a run: config, curves, sample grids by step, files"),
    "inspect": Command("inspect", "main", "what an adapter, embedding or checkpoint file is: format, family, rank/alpha, metadata, readers"),
    "demo": Command("demo", "main", "offline end-to-end demo on a tiny model (CPU, a few minutes)"),
    "toy": Command("toy", "main", "the toy world's base model: init (random weights), build (reproduce the shipped one)"),
    "prep": Command("prep", "main", "dataset tools: build, check, caption, cache, shapes (`sdtune prep --help`)"),
    "env": Command("env", "main", "versions of sdtune, Python, torch (and its GPUs) and the libraries, for bug reports"),
}  # fmt: skip


def run(argv: list[str]) -> int:
    """Run `sdtune ARGV` in this process (`sdtune demo` and `sdtune toy build` run their steps this way)."""
    command, *rest = argv
    return COMMANDS[command].load()(rest)
