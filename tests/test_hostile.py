"""No command's output replaces, sits inside or contains one of its inputs, however the path is spelled and whatever
--force or --overwrite say: the command exits 2 with one `sdtune: error:` line naming both, and every input file
keeps its bytes."""

import hashlib
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_cli import sdtune, sdtune_here

from sdtune.cli import main
from sdtune.models.pretrained import EMBEDDED


def snapshot(*paths: Path) -> dict[str, str]:
    """sha256 of every file under `paths` (or of the file itself), by path."""
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.fixture(scope="module")
def world(tiny_model_dir, shapes_dir, tmp_path_factory):
    """A base model, a dataset and a real LoRA run trained on them. The dataset sits inside the run directory:
    `fit` only adds its named entries there, so a run folder above its data is allowed."""
    root = tmp_path_factory.mktemp("apart")
    base = Path(shutil.copytree(tiny_model_dir, root / "models" / "base"))
    run = root / "run"
    data = Path(shutil.copytree(shapes_dir, run / "data"))
    sdtune_here("fit", "--config", "tiny/lora", "--model.pretrained", base, "--data.root", data,
                "--data.resolution", 32, "--data.batch_size", 2, "--trainer.max_steps", 1,
                "--samples.enabled", "false", "--trainer.default_root_dir", run)  # fmt: skip
    (root / "link").symlink_to(base, target_is_directory=True)
    toy = Path(shutil.copytree(EMBEDDED["sdtune:toy"], root / "toy"))  # stands in for the package's, which stays untouched
    return {"root": root, "base": base, "run": run, "data": data, "adapter": run / "adapter", "toy": toy}


def refused(capsys, args: list[str], world: dict, inputs: list[str], says: str) -> str:
    """Run `sdtune ARGS` in this process; check exit code 2, one error line containing `says`, inputs unchanged."""
    args = [str(a).format(**world) for a in args]
    before = snapshot(*(world[name] for name in inputs))
    code = main(args)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("sdtune: error: ") and says.format(**world) in lines[0], lines[0]
    assert snapshot(*(world[name] for name in inputs)) == before
    return lines[0]


CASES = {
    "kohya onto its own source adapter": (
        ["export", "{run}", "--format", "kohya", "--out", "{adapter}/pytorch_lora_weights.safetensors", "--force"],
        ["run"], "is inside SOURCE '{run}'"),
    "merge into the base by a symlink": (
        ["export", "{adapter}", "--model", "{base}", "--merge", "--out", "{root}/link", "--force"],
        ["base"], "is --model '{base}'"),
    "merge into the base through ..": (
        ["export", "{adapter}", "--model", "{base}", "--merge", "--out", "{base}/unet/..", "--force"],
        ["base"], "is --model '{base}'"),
    "merge into the base with a trailing slash": (
        ["export", "{adapter}", "--model", "{base}", "--merge", "--out", "{base}/", "--force"],
        ["base"], "is --model '{base}'"),
    "merge into a parent of the base": (
        ["export", "{adapter}", "--model", "{base}", "--merge", "--out", "{root}/models", "--force"],
        ["base"], "contains --model '{base}'"),
    "merge into the run's own base (no --model)": (
        ["export", "{run}", "--merge", "--out", "{base}", "--force"],
        ["base", "run"], "is the run's model.pretrained '{base}'"),
    "sample inside the model folder": (
        ["sample", "--model", "{base}", "--prompt", "x", "--steps", 1, "--out", "{base}/samples", "--overwrite"],
        ["base"], "is inside --model '{base}'"),
    "evaluate inside an adapter": (
        ["evaluate", "--model", "{base}", "--adapter", "{adapter}", "--prompt", "x", "--out", "{adapter}/eval"],
        ["run"], "is inside --adapter '{adapter}'"),
    "fit into its dataset": (
        ["fit", "--config", "tiny/lora", "--model.pretrained", "{base}", "--data.root", "{data}",
         "--trainer.default_root_dir", "{data}"],
        ["data", "base"], "trainer.default_root_dir '{data}' is data.root '{data}'"),
    "fit over the adapter it starts from": (
        ["fit", "--config", "tiny/lora", "--model.pretrained", "{base}", "--data.root", "{data}",
         "--model.init_adapter", "{adapter}", "--trainer.default_root_dir", "{run}"],
        ["run"], "the run's adapter '{adapter}' is model.init_adapter '{adapter}'"),
    "prep build inside its source": (
        ["prep", "build", "{data}", "--out", "{data}/clean", "--min-side", 8],
        ["data"], "is inside SRC '{data}'"),
    "prep check's report over metadata.jsonl": (
        ["prep", "check", "{data}", "--json", "{data}/metadata.jsonl"],
        ["data"], "is DST's metadata.jsonl"),
    "demo around its base model": (
        ["demo", "--model", "{base}", "--out", "{root}/models", "--steps", 1],
        ["base"], "contains the base model (--model) '{base}'"),
    "flow toy inside sdtune:toy, whose VAE it takes": (
        ["toy", "init", "--flow", "--out", "{toy}/unet"],
        ["toy"], "is inside sdtune:toy '{toy}'"),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_an_output_on_an_input_is_refused(case, world, capsys, monkeypatch):
    monkeypatch.setitem(EMBEDDED, "sdtune:toy", world["toy"])
    args, inputs, says = CASES[case]
    refused(capsys, args, world, inputs, says)


def test_merge_onto_the_base_from_the_shell_is_one_line_and_writes_nothing(world):
    """The probe's command, as a user types it: a diffusers folder holds only names --force takes for an export."""
    base, before = world["base"], snapshot(world["base"], world["run"])
    result = sdtune("export", world["adapter"], "--model", base, "--merge", "--out", base, "--force", check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith(f"sdtune: error: --out '{base}' is --model '{base}'")
    assert snapshot(world["base"], world["run"]) == before
    assert not list(base.parent.glob(".*partial*"))


def test_an_output_beside_its_inputs_is_written(world, capsys):
    out = world["root"] / "loras" / "run.safetensors"
    before = snapshot(world["base"], world["run"])
    assert main(["export", str(world["run"]), "--format", "kohya", "--out", str(out)]) == 0
    assert out.is_file() and snapshot(world["base"], world["run"]) == before
    # --force still replaces a previous export that is no input
    adapter_args = [str(world["adapter"]), "--model", str(world["base"]), "--format", "kohya", "--out", str(out)]
    assert main(["export", *adapter_args, "--force"]) == 0
    assert load_file(out) and snapshot(world["base"], world["run"]) == before
