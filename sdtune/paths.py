"""Where a command writes, kept apart from what it reads: an output never is an input, never sits inside one and
never contains one, so no command (not even with --force or --overwrite) can replace or clear the user's files.

Paths are compared as the file system sees them: `~`, `..`, symlinks, trailing slashes and relative spellings are
resolved, for outputs that do not exist yet too (their nearest existing parent is resolved), and a folder reached
by a second name (a bind mount, another case on a case-insensitive disk) is recognised by its inode.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Union

from sdtune.errors import SdtuneError

PathLike = Union[str, os.PathLike]

# How a model setting (`model.pretrained`, `--model`) names a model: a Hub id, a single-file checkpoint by its
# suffix, or one of the models inside the sdtune package.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
EMBEDDED = {
    "sdtune:toy": Path(__file__).parent / "toy" / "base",
    "sdtune:toy-flow": Path(__file__).parent / "toy" / "flow_base",
}


def local_model_path(pretrained: str | None) -> Path | None:
    """The folder or file a model setting names on this machine (a `sdtune:` model's folder in the package); None
    for a Hub id or no setting."""
    if pretrained is None:
        return None
    path = EMBEDDED.get(str(pretrained), Path(str(pretrained)).expanduser())
    return path if path.exists() else None


def model_name_problem(name: str, setting: str) -> str | None:
    """Why a model setting names nothing (no such local path, and not a Hub id or a model sdtune ships), as one
    line; None when it may name a model. Only names and paths are looked at: what the folder holds is checked when
    its configs are read (`sdtune.models.pretrained`)."""
    if name.startswith("sdtune:"):
        return None if name in EMBEDDED else f"{setting} '{name}' is not a model sdtune ships (those are: {', '.join(EMBEDDED)})"
    path = Path(name).expanduser()
    if path.exists():
        return None
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        return f"{setting} '{name}' does not exist"
    if not HUB_ID.match(name):
        return f"{setting} '{name}' does not exist (not a local directory nor a Hub id 'org/name')"
    return None


def real_path(path: PathLike) -> Path:
    """`path` absolute, with `~`, `..` and every symlink of its existing part resolved."""
    return Path(path).expanduser().resolve()


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samestat(a.stat(), b.stat())
    except OSError:
        return False


def _within(path: Path, folder: Path) -> bool:
    """`path` is `folder` or lies below it (both resolved)."""
    if path.is_relative_to(folder):
        return True
    return folder.exists() and any(_same(part, folder) for part in (path, *path.parents))


def overlap(output: PathLike, source: PathLike) -> str | None:
    """How `output` meets the input `source`: "is", "is inside", "contains", or None when they are apart."""
    out, read = real_path(output), real_path(source)
    if _within(out, read):
        return "is" if _within(read, out) else "is inside"
    return "contains" if _within(read, out) else None


def _shown(path: PathLike) -> str:
    real, written = real_path(path), Path(path).expanduser().absolute()
    return f"'{path}'" if real == written else f"'{path}' (= {real})"


def check_output_apart(
    output: PathLike,
    inputs: Mapping[str, PathLike | None] | Iterable[tuple[str, PathLike | None]],
    output_name: str = "--out",
    *,
    may_contain: bool = False,
    setting: str | None = None,
) -> None:
    """Raise SdtuneError when `output` is one of `inputs` (name → path), lies inside one or contains one.

    Inputs that are None or do not exist (a Hub id, an option not given) are skipped. `may_contain` allows an
    output folder above an input, for commands that only add named entries to it (`fit`'s run directory).
    `setting` is the option the message asks to change (default: `output_name`)."""
    pairs = inputs.items() if isinstance(inputs, Mapping) else inputs
    for input_name, source in pairs:
        if source is None or not Path(source).expanduser().exists():
            continue
        relation = overlap(output, source)
        if relation is None or (relation == "contains" and may_contain):
            continue
        raise SdtuneError(
            f"{output_name} {_shown(output)} {relation} {input_name} {_shown(source)}: outputs never replace, sit "
            "inside or contain a command's inputs, not even with --force or --overwrite; "
            f"choose another {setting or output_name}"
        )


def check_writable(output: PathLike, output_name: str = "--out") -> None:
    """Raise SdtuneError when nothing could be written at `output`: the nearest part of it that exists is a file
    where a folder is needed, or a folder this process cannot create entries in (read-only, another user's, /proc).

    Checked by creating and removing an empty folder there: the file system decides, not the permission bits, which
    say nothing of read-only mounts or of what root may do. Nothing else is created."""
    path = Path(output).expanduser().absolute()
    try:
        existing = next(part for part in (path, *path.parents) if part.exists())
    except PermissionError as err:
        raise SdtuneError(f"{output_name} '{output}': a folder on the way cannot be read ({err.strerror}); choose another {output_name}") from None
    folder = existing.parent if existing == path and not path.is_dir() else existing
    if not folder.is_dir():
        raise SdtuneError(f"{output_name} '{output}': {folder} is a file, not a folder, so nothing can be written under it; "
                          f"choose another {output_name}")  # fmt: skip
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".sdtune-write-check-", dir=folder))
    except OSError as err:
        raise SdtuneError(f"{output_name} '{output}': cannot write in {folder} ({err.strerror or type(err).__name__}); "
                          f"choose another {output_name}") from None
