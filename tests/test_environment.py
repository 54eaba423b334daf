"""What is installed: `sdtune env`, the one-line refusal of a dependency outside sdtune's ranges, and the lock."""

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
import torch
from packaging.requirements import Requirement
from packaging.version import Version

from sdtune.environment import REPORTED, WHY, requirement_problems

ROOT = Path(__file__).resolve().parent.parent


def sdtune(*args, env=None):
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "sdtune.cli", *args], capture_output=True, text=True, env=env, timeout=300)


def fake_distribution(folder: Path, name: str, version: str) -> Path:
    """A dist-info on PYTHONPATH: importlib.metadata finds it before site-packages, as after `pip install name==version`."""
    info = folder / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return folder


def test_env_reports_the_installed_versions():
    result = sdtune("env")
    assert result.returncode == 0, result.stderr
    lines = dict(line[2:].split(": ", 1) for line in result.stdout.splitlines() if line.startswith("- "))
    for name in REPORTED:
        assert lines[name] == metadata.version(name), name
    assert lines["sdtune"] == metadata.version("sdtune")
    assert lines["torch"].startswith(f"{torch.__version__} (CUDA build: ")
    assert lines["CUDA available"] == str(torch.cuda.is_available())
    assert lines["Python"].startswith(f"{sys.version_info.major}.{sys.version_info.minor}.")
    assert lines["Requirements"] == "all in the declared ranges"


@pytest.mark.parametrize("name, version", [("transformers", "5.25.0"), ("peft", "0.19.1")])
def test_a_dependency_outside_its_range_is_one_line_naming_the_fix(tmp_path, name, version):
    fake = fake_distribution(tmp_path / "site", name, version)
    result = sdtune("sample", "--model", "nowhere", "--prompt", "x", "--out", str(tmp_path / "out"), env={"PYTHONPATH": str(fake)})
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"sdtune: error: {name} {version} is installed; sdtune needs {name}")
    assert f"({WHY[name]}): pip install '{name}" in line
    assert not (tmp_path / "out").exists()


def test_env_reports_a_dependency_outside_its_range_and_the_check_can_be_skipped(tmp_path):
    fake = fake_distribution(tmp_path, "transformers", "5.25.0")
    report = sdtune("env", env={"PYTHONPATH": str(fake)})
    assert report.returncode == 0 and "- transformers: 5.25.0" in report.stdout and "- Requirements: 1 outside" in report.stdout
    assert "<5.24" in report.stdout
    skipped = sdtune("export", str(tmp_path / "missing"), "--format", "kohya", "--out", str(tmp_path / "x.safetensors"),
                     env={"PYTHONPATH": str(fake), "SDTUNE_SKIP_VERSION_CHECK": "1"})
    assert skipped.returncode == 2 and "transformers" not in skipped.stderr and "missing" in skipped.stderr


def test_a_missing_dependency_is_named():
    (problem,) = requirement_problems([Requirement("no-such-package-sdtune>=1.0")])
    assert problem == "no-such-package-sdtune is not installed; sdtune needs no-such-package-sdtune>=1.0: pip install 'no-such-package-sdtune>=1.0'"
    assert requirement_problems([Requirement("torch>=2.4")]) == []


def test_installed_transformers_accepts_the_installed_peft():
    """The pair that broke text-encoder LoRA: transformers refuses a peft older than its MIN_PEFT_VERSION."""
    from transformers.integrations import peft as transformers_peft

    assert Version(metadata.version("peft")) >= Version(transformers_peft.MIN_PEFT_VERSION)


def test_the_lock_pins_every_requirement_inside_its_declared_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    lock = (ROOT / "requirements" / "lock.txt").read_text()
    pins = {m[1].lower().replace("_", "-"): m[2] for m in re.finditer(r"^([A-Za-z0-9_.\-]+)==(\S+)", lock, re.M)}
    for req in declared:
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not in requirements/lock.txt: run bash scripts/lock.sh"
        assert req.specifier.contains(Version(pins[name]), prereleases=True), f"{name}=={pins[name]} vs {req.specifier}"
    assert pins["torch"].endswith("+cpu")  # the CPU build: no CUDA libraries in the lock
    assert not any(name.startswith("nvidia-") for name in pins)
    # Every pin carries its hashes, so an install from the lock is the tested set, byte for byte.
    assert len(re.findall(r"^\S+==\S+ \\\n    --hash=sha256:", lock, re.M)) == len(pins)
