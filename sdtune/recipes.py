"""Packaged YAML recipes: find them, list them, resolve `sd15/lora` to a file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdtune.errors import SdtuneError


def recipes_dir() -> Path:
    """Inside an installed wheel the recipes sit in the package; in a source checkout, at the repo's top level."""
    packaged = Path(__file__).parent / "recipes"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "recipes"


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
