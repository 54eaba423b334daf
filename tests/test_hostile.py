"""Every entry point against hostile inputs and settings, as a careless user, a hostile file or a failing machine
would give them: each case exits 2 with exactly one `sdtune: error:` line on stderr that names what is wrong, no
traceback, and no file anywhere in the test's world (base model, dataset, run, adapter, toy) added, changed or removed.

No command's output replaces, sits inside or contains one of its inputs, however the path is spelled and whatever
--force or --overwrite say. Hostile datasets (rows leading outside data.root, formats sdtune does not read,
decompression bombs) are refused when nothing usable is left, or skipped with their reason when something is.
Resumes at every boundary are checked bit-identical in test_checkpointing.py."""

import json
import os
import resource
import shutil
import socket
import zipfile
from pathlib import Path

import pytest
from hostile_files import EPS, png_header_only, snapshot
from safetensors.torch import load_file
from test_cli import sdtune, sdtune_here

from sdtune.cli import main
from sdtune.models.pretrained import EMBEDDED


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
    hostile = hostile_files(root / "hostile", data)
    locked = root / "locked"  # a run directory another live sdtune process of this host writes
    locked.mkdir()
    (locked / ".sdtune.lock").write_text(json.dumps({"pid": os.getpid(), "hostname": socket.gethostname(), "started": "now"}))
    return {"root": root, "base": base, "run": run, "data": data, "adapter": run / "adapter", "toy": toy,
            "locked": locked, **hostile}  # fmt: skip


def hostile_files(root: Path, data: Path) -> dict[str, Path]:
    """Rows leading outside their dataset, formats sdtune does not read, a decompression bomb, broken checkpoints."""
    outside = root / "outside"
    outside.mkdir(parents=True)
    (outside / "metadata.jsonl").write_text("".join(json.dumps({"file_name": name, "text": "x"}) + "\n" for name in
                                               ["../../run/data/00000.png", str(data / "00001.png"), "../../../../etc/passwd"]))  # fmt: skip
    odd = root / "odd"
    odd.mkdir()
    (odd / "a.png").write_bytes(EPS)
    (odd / "b.png").write_bytes(b"not an image at all")
    (odd / "c.png").write_bytes(png_header_only(40000, 40000))
    (root / "bomb.png").write_bytes(png_header_only(40000, 40000))
    (root / "text.png").write_text("hello")
    (root / "empty.ckpt").write_bytes(b"")
    with zipfile.ZipFile(root / "plain.zip", "w") as archive:
        archive.writestr("readme.txt", "not a checkpoint")
    (root / "prompts.txt").write_text("")
    (root / "existing.safetensors").write_bytes(b"an earlier export")
    return {"outside": outside, "odd": odd, "bomb": root / "bomb.png", "text": root / "text.png",
            "empty_ckpt": root / "empty.ckpt", "plain_zip": root / "plain.zip", "no_prompts": root / "prompts.txt",
            "existing": root / "existing.safetensors"}  # fmt: skip


def refused(capfd, args: list[str], world: dict, says: str) -> str:
    """Run `sdtune ARGS` in this process; check exit code 2, one error line containing `says`, no file of the world
    changed or removed, and nothing new outside the command's own new output (--out or the run directory)."""
    args = [str(a).format(**world) for a in args]
    outputs = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("--out", "--trainer.default_root_dir")]
    before = snapshot(world["root"])
    try:
        code = main(args)
    except SystemExit as exit:
        code = exit.code
    err = capfd.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("sdtune: error: ") and says.format(**world) in lines[0], lines[0]
    after = snapshot(world["root"])
    assert {path: after.get(path) for path in before} == before
    new_outputs = [out for out in outputs if not any(path.startswith(out) for path in before)]
    assert [path for path in after if path not in before and not path.startswith(tuple(new_outputs) or "\0")] == []
    return lines[0]


FIT = ["fit", "--config", "tiny/lora", "--model.pretrained", "{base}", "--data.root", "{data}"]
SAMPLE = ["sample", "--model", "{base}", "--prompt", "x", "--steps", 1]


CASES = {
    "kohya onto its own source adapter": (
        ["export", "{run}", "--format", "kohya", "--out", "{adapter}/pytorch_lora_weights.safetensors", "--force"],
        "is inside SOURCE '{run}'"),
    "merge into the base by a symlink": (
        ["export", "{adapter}", "--model", "{base}", "--merge", "--out", "{root}/link", "--force"],
        "is --model '{base}'"),
    "merge into the base through ..": (
        ["export", "{adapter}", "--model", "{base}", "--merge", "--out", "{base}/unet/..", "--force"],
        "is --model '{base}'"),
    "merge into the base with a trailing slash": (
        ["export", "{adapter}", "--model", "{base}", "--merge", "--out", "{base}/", "--force"],
        "is --model '{base}'"),
    "merge into a parent of the base": (
        ["export", "{adapter}", "--model", "{base}", "--merge", "--out", "{root}/models", "--force"],
        "contains --model '{base}'"),
    "merge into the run's own base (no --model)": (
        ["export", "{run}", "--merge", "--out", "{base}", "--force"],
        "is the run's model.pretrained '{base}'"),
    "sample inside the model folder": (
        ["sample", "--model", "{base}", "--prompt", "x", "--steps", 1, "--out", "{base}/samples", "--overwrite"],
        "is inside --model '{base}'"),
    "evaluate inside an adapter": (
        ["evaluate", "--model", "{base}", "--adapter", "{adapter}", "--prompt", "x", "--out", "{adapter}/eval"],
        "is inside --adapter '{adapter}'"),
    "fit into its dataset": (
        ["fit", "--config", "tiny/lora", "--model.pretrained", "{base}", "--data.root", "{data}",
         "--trainer.default_root_dir", "{data}"],
        "trainer.default_root_dir '{data}' is data.root '{data}'"),
    "fit over the adapter it starts from": (
        ["fit", "--config", "tiny/lora", "--model.pretrained", "{base}", "--data.root", "{data}",
         "--model.init_adapter", "{adapter}", "--trainer.default_root_dir", "{run}"],
        "the run's adapter '{adapter}' is model.init_adapter '{adapter}'"),
    "prep build inside its source": (
        ["prep", "build", "{data}", "--out", "{data}/clean", "--min-side", 8],
        "is inside SRC '{data}'"),
    "prep check's report over metadata.jsonl": (
        ["prep", "check", "{data}", "--json", "{data}/metadata.jsonl"],
        "is DST's metadata.jsonl"),
    "demo around its base model": (
        ["demo", "--model", "{base}", "--out", "{root}/models", "--steps", 1],
        "contains the base model (--model) '{base}'"),
    # --- fit: hostile datasets, missing or locked paths, a model that cannot be fetched
    "fit on rows that all lead outside the dataset": (
        [*FIT[:-1], "{outside}", "--trainer.default_root_dir", "{root}/r1"], "no usable image"),
    "fit on files sdtune does not read (EPS, text, a bomb)": (
        [*FIT[:-1], "{odd}", "--trainer.default_root_dir", "{root}/r2"], "data.root has no readable images: all 3 skipped"),
    "fit on a dataset that does not exist": (
        [*FIT[:-1], "{root}/nowhere", "--trainer.default_root_dir", "{root}/r3"], "{root}/nowhere"),
    "fit on a model folder that does not exist": (
        ["fit", "--config", "tiny/lora", "--model.pretrained", "{root}/no-model", "--data.root", "{data}",
         "--trainer.default_root_dir", "{root}/r4"], "{root}/no-model"),
    "fit on a Hub model with no cache, offline": (
        ["fit", "--config", "tiny/lora", "--model.pretrained", "nobody/no-such-model", "--data.root", "{data}",
         "--trainer.default_root_dir", "{root}/r5"], "nobody/no-such-model"),
    "fit into a run directory another process writes": (
        [*FIT, "--trainer.default_root_dir", "{locked}"], "is in use by another sdtune process"),
    "fit resuming from an empty file": (
        [*FIT, "--trainer.default_root_dir", "{root}/r6", "--ckpt_path", "{empty_ckpt}"], "{empty_ckpt}"),
    "fit resuming from a zip that is no checkpoint": (
        [*FIT, "--trainer.default_root_dir", "{root}/r7", "--ckpt_path", "{plain_zip}"], "{plain_zip}"),
    "fit with a resolution the VAE cannot divide": (
        [*FIT, "--trainer.default_root_dir", "{root}/r8", "--data.resolution", 31], "data.resolution"),
    "fit with an unknown setting": (
        [*FIT, "--trainer.default_root_dir", "{root}/r9", "--model.lora.rnak", 4], "rnak"),
    # --- sample and evaluate
    "sample with no steps": (
        [*SAMPLE[:-1], 0, "--out", "{root}/s1"], "steps"),
    "sample from a model that does not exist": (
        ["sample", "--model", "{root}/no-model", "--prompt", "x", "--out", "{root}/s2"], "{root}/no-model"),
    "sample with an adapter that does not exist": (
        [*SAMPLE, "--adapter", "{root}/no-adapter", "--out", "{root}/s3"], "{root}/no-adapter"),
    "sample from a text file named .png": (
        [*SAMPLE, "--init-image", "{text}", "--out", "{root}/s4"], "{text}"),
    "sample from a decompression bomb": (
        [*SAMPLE, "--init-image", "{bomb}", "--out", "{root}/s5"], "{bomb}"),
    "evaluate with an empty prompts file": (
        ["evaluate", "--model", "{base}", "--prompts", "{no_prompts}", "--out", "{root}/e1"], "{no_prompts}"),
    # --- export
    "export a source that does not exist": (
        ["export", "{root}/no-run", "--out", "{root}/x1"], "{root}/no-run"),
    "export to a format that does not exist": (
        ["export", "{run}", "--format", "nope", "--out", "{root}/x2.safetensors"], "nope"),
    "export an empty checkpoint file": (
        ["export", "{empty_ckpt}", "--format", "kohya", "--out", "{root}/x3.safetensors"], "{empty_ckpt}"),
    "export onto an existing file without --force": (
        ["export", "{run}", "--format", "kohya", "--out", "{existing}"], "--force"),
    # --- prep
    "prep build from a folder that does not exist": (
        ["prep", "build", "{root}/nowhere", "--out", "{root}/p1"], "{root}/nowhere"),
    "prep build into its own source": (
        ["prep", "build", "{data}", "--out", "{data}"], "SRC"),
    "prep caption with a captioner that does not exist": (
        ["prep", "caption", "{data}", "--model", "{root}/no-captioner"], "{root}/no-captioner"),
    "prep cache of a folder that does not exist": (
        ["prep", "cache", "{root}/nowhere", "--model", "{base}"], "{root}/nowhere"),
    # --- recipes, toy
    "cp of a recipe that does not exist": (
        ["cp", "sd15/no-such-recipe", "{root}/c1.yaml"], "no-such-recipe"),
    "cp over an existing file": (
        ["cp", "tiny/lora", "{no_prompts}"], "{no_prompts}"),
    "an unknown command": (
        ["fitt"], "unknown command 'fitt'"),
    "flow toy inside sdtune:toy, whose VAE it takes": (
        ["toy", "init", "--flow", "--out", "{toy}/unet"],
        "is inside sdtune:toy '{toy}'"),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_a_hostile_input_is_one_line_and_changes_nothing(case, world, capfd, monkeypatch):
    monkeypatch.setitem(EMBEDDED, "sdtune:toy", world["toy"])
    args, says = CASES[case]
    refused(capfd, args, world, says)


def test_the_ema_folder_keeps_its_name_when_the_adapter_is_renamed(world, capfd):
    """`--adapter.dirname` moves the adapter, not the EMA's `adapter_ema/`: an init adapter there is still refused."""
    run = world["root"] / "ema_run"
    shutil.copytree(world["adapter"], run / "adapter_ema")
    try:
        refused(capfd, [*FIT, "--model.init_adapter", run / "adapter_ema", "--adapter.dirname", "mine",
                        "--trainer.default_root_dir", run], world, f"the run's adapter_ema '{run / 'adapter_ema'}' is")
    finally:
        shutil.rmtree(run)


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


def test_a_write_the_machine_refuses_is_one_line(world, capfd):
    """A file-size limit refuses writes past 64 KiB as a full disk would (EFBIG; Python ignores SIGXFSZ)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        line = refused(capfd, ["toy", "init", "--out", "{root}/t1"], world, "could not write")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert "File too large; free space or fix permissions, then run the command again" in line
