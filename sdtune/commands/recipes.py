"""Packaged YAML recipes: `sdtune ls` lists them, `sdtune cp` copies one to edit, and `--config sd15/lora` resolves
a name to its file."""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass
from pathlib import Path

from sdtune.commands.options import Parser
from sdtune.errors import SdtuneError


def recipes_dir() -> Path:
    """Inside an installed wheel the recipes sit in the package; in a source checkout, at the repo's top level."""
    packaged = Path(__file__).parents[1] / "recipes"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "recipes"


@dataclass
class Recipe:
    name: str
    path: Path

    @property
    def summary(self) -> str:
        """The first comment line of the file: what the recipe is for."""
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if line.startswith("#") and line.strip("# ").strip():
                return line.strip("# ").strip()
        return ""


def list_recipes() -> list[Recipe]:
    root = recipes_dir()
    return [Recipe(str(p.relative_to(root).with_suffix("")), p) for p in sorted(root.rglob("*.yaml"))]


def find_recipe(name_or_path: str) -> Path:
    """A packaged recipe name (`sd15/lora`, `.yaml` optional) or an existing file."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    packaged = recipes_dir() / (name_or_path if name_or_path.endswith(".yaml") else name_or_path + ".yaml")
    if packaged.is_file():
        return packaged
    names = ", ".join(r.name for r in list_recipes())
    raise SdtuneError(f"no recipe file or packaged recipe named '{name_or_path}' (packaged: {names}; see `sdtune ls`)")


def ls(args: list[str]) -> int:
    parser = Parser(
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


def cp(args: list[str]) -> int:
    parser = Parser(
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
