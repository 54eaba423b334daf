"""What is installed: the check that sdtune's dependencies are in the ranges it declares (run before every command)
and the report users paste into bug reports (`sdtune env`).

Both read package metadata only (no imports of torch, diffusers or transformers), so the check costs milliseconds.
"""

from __future__ import annotations

import os
import platform
import sys
from contextlib import contextmanager
from importlib import import_module, metadata
from typing import Iterator

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

# Why a declared range has an upper bound or an exclusion: said beside the fix when an installed version breaks it.
WHY = {
    "transformers": "transformers 5.24 and newer load text-encoder adapters only with peft ≥ 0.22, which is not released",
    "peft": "transformers 5.20 and newer load text-encoder adapters only with peft ≥ 0.20",
}
# Set to 1 to run with versions outside the declared ranges (e.g. a peft built from source); at your own risk.
SKIP_ENV = "SDTUNE_SKIP_VERSION_CHECK"
# The packages `sdtune env` reports, after sdtune, Python and torch.
REPORTED = (
    "diffusers", "transformers", "peft", "lightning", "accelerate", "bitsandbytes", "datasets", "huggingface_hub",
    "safetensors", "tokenizers", "jsonargparse", "numpy", "pillow",
)  # fmt: skip


def declared_requirements() -> list[Requirement]:
    """sdtune's own runtime requirements, as installed (empty when sdtune runs from a source tree, uninstalled)."""
    try:
        lines = metadata.requires("sdtune") or []
    except metadata.PackageNotFoundError:
        return []
    requirements = [Requirement(line) for line in lines]
    return [r for r in requirements if r.marker is None or r.marker.evaluate({"extra": ""})]


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def requirement_problems(requirements: list[Requirement] | None = None) -> list[str]:
    """One line per installed dependency outside sdtune's declared range (or missing), naming the fix."""
    problems = []
    for req in declared_requirements() if requirements is None else requirements:
        wanted = f"{req.name}{req.specifier}"
        found = installed_version(req.name)
        if found is None:
            problems.append(f"{req.name} is not installed; sdtune needs {wanted}: pip install '{wanted}'")
            continue
        try:
            ok = req.specifier.contains(Version(found), prereleases=True)
        except InvalidVersion:
            ok = False
        if not ok:
            why = f" ({WHY[req.name]})" if req.name in WHY else ""
            problems.append(f"{req.name} {found} is installed; sdtune needs {wanted}{why}: pip install '{wanted}'")
    return problems


def check_requirements() -> list[str]:
    """The problems `requirement_problems` finds, or none when SDTUNE_SKIP_VERSION_CHECK=1."""
    return [] if os.environ.get(SKIP_ENV) == "1" else requirement_problems()


# Where libraries cache whether a package is installed: cleared when a hidden package shows again.
AVAILABILITY_CACHES = {"bitsandbytes": ("peft.import_utils", ("is_bnb_available", "is_bnb_4bit_available"))}


@contextmanager
def hidden(package: str) -> Iterator[None]:
    """Inside the block `package` looks not installed (`import` fails, `find_spec` answers None), unless it is
    imported already. For an optional library another one imports eagerly, though the command does not use it."""
    if package in sys.modules:
        yield
        return
    sys.modules[package] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if package in sys.modules and sys.modules[package] is None:
            del sys.modules[package]
        module, functions = AVAILABILITY_CACHES.get(package, ("", ()))
        if module in sys.modules:
            for name in functions:
                getattr(getattr(import_module(module), name, None), "cache_clear", lambda: None)()


def report() -> str:
    """The block for bug reports: versions of sdtune, Python, torch and its devices, the libraries, the platform."""
    import torch  # the only import: CUDA and MPS availability are not in the metadata

    lines = [
        f"- sdtune: {installed_version('sdtune') or 'not installed (source tree)'}",
        f"- Platform: {platform.platform()}",
        f"- Python: {platform.python_version()} ({sys.executable})",
        f"- torch: {torch.__version__} (CUDA build: {torch.version.cuda or 'none'})",
        f"- CUDA available: {torch.cuda.is_available()}",
    ]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            lines.append(f"- GPU {index}: {props.name}, {props.total_memory / 2**30:.1f} GiB")
    mps = getattr(torch.backends, "mps", None)
    lines.append(f"- MPS available: {bool(mps and mps.is_available())}")
    lines += [f"- {name}: {installed_version(name) or 'not installed'}" for name in REPORTED]
    problems = requirement_problems()
    lines.append(f"- Requirements: {'all in the declared ranges' if not problems else f'{len(problems)} outside'}")
    lines += [f"  - {problem}" for problem in problems]
    return "\n".join(lines)
