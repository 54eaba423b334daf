"""The wheel holds sdtune, data_prep and the recipes, and its `sdtune` command works in a fresh venv."""

import subprocess
import sys
import venv
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    (path,) = out.glob("sdtune-*.whl")
    return path


def test_wheel_contents_and_requirements(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = Parser().parsestr(archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode())
        entry_points = archive.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert {"sdtune/cli.py", "data_prep/shapes.py", "sdtune/recipes/sd15/lora.yaml", "sdtune/recipes/tiny/lora.yaml",
            "sdtune/models/tiny_tokenizer/vocab.json", "sdtune/models/tiny_tokenizer/merges.txt",
            "sdtune/recipes/toy/lora.yaml", "sdtune/toy/base/unet/diffusion_pytorch_model.safetensors"} <= names
    assert "sdtune = sdtune.cli:main" in entry_points
    requirements = {Requirement(r).name: Requirement(r) for r in metadata.get_all("Requires-Dist") if "extra ==" not in r}
    assert "torchvision" not in requirements
    assert requirements["torch"].specifier.contains("2.13.0")
    assert metadata["Requires-Python"] == ">=3.10"


def test_installed_wheel_runs_sdtune_ls_in_a_fresh_venv(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    # `sdtune ls` imports nothing heavy, so the wheel alone (no dependencies) must be enough.
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True, timeout=300)
    result = subprocess.run([str(env_dir / "bin" / "sdtune"), "ls"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "sd15/lora" in result.stdout and "tiny/lora" in result.stdout
