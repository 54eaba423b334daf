"""The command as a user types it, seen from the console: a mistake on the command line fails before torch, Lightning,
diffusers or transformers are imported (a fraction of a second instead of the 10-30 s those imports take), and a run
imports bitsandbytes only when a setting needs it and keeps notices the user cannot act on off the console, in the
run's sdtune.log."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sdtune.commands.precheck import command_line_settings, needs_bitsandbytes
from sdtune.commands.recipes import find_recipe

HEAVY = {"torch", "lightning", "diffusers", "transformers", "peft", "bitsandbytes"}
# What third-party libraries print that a user can do nothing about; none of it may reach the console.
NOISE = ("bitsandbytes", "kernels-community", "litlogger", "litmodels", "💡", "torchvision")


def sdtune(*args, cwd=None) -> tuple[int, list[str], set[str]]:
    """`python -X importtime -m sdtune ARGS`: the exit code, the console's lines (stdout, then stderr without the
    import times) and the packages imported. A package counts when one of its modules is: a package hidden from the
    run (`sys.modules[name] = None`) shows up in the import times as a failed import of its name alone."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "sdtune", *map(str, args)], capture_output=True,
                            text=True, timeout=600, cwd=cwd)  # fmt: skip
    lines, packages = result.stdout.splitlines(), set()
    for line in result.stderr.splitlines():
        if line.startswith("import time:"):
            module = line.rsplit("|", 1)[1].strip()
            if "." in module:
                packages.add(module.split(".")[0])
        elif line.strip():
            lines.append(line)
    return result.returncode, lines, packages


def _bad_yaml(t):
    (t / "bad.yaml").write_text("trainer:\n  max_steps: [1\n")
    return t / "bad.yaml"


def _file(t):
    (t / "a_file").write_text("")
    return t / "a_file"


# Each: the command line (a function of tmp_path) and the start of each error line, in order.
MISTAKES = {
    "fit: a recipe's model not set, no data folder": (
        lambda t: ["fit", "--config", "tiny/lora", "--data.root", t / "nonexistent"],
        ["model.pretrained is not set: pass a diffusers directory, Hub id or single file",
         "data.root '{t}/nonexistent' does not exist"]),
    "fit: every path and plain number at once": (
        lambda t: ["fit", "--config", "tiny/lora", "--model.pretrained", t / "no_model", "--data.root", _file(t),
                   "--trainer.default_root_dir", t / "a_file", "--ckpt_path", t / "last.ckpt", "--trainer.max_steps", -5,
                   "--data.batch_size", 0, "--model.optimizer.lr", "abc"],
        ["model.pretrained '{t}/no_model' does not exist (not a local directory nor a Hub id 'org/name')",
         "data.root '{t}/a_file' is a file, not a folder",
         "trainer.default_root_dir '{t}/a_file' is a file; the run directory is a folder (or does not exist yet)",
         "--ckpt_path {t}/last.ckpt: the file does not exist; resume from a checkpoint sdtune wrote, or start fresh",
         "trainer.max_steps must be an integer ≥ -1 (-1: no limit), got -5",
         "data.batch_size must be at least 1, got 0",
         "model.optimizer.lr must be a number ≥ 0, got abc"]),
    "fit: keep the best and stop early without validation": (
        lambda t: ["fit", "--config", "tiny/lora", "--model.pretrained", "sdtune:toy", "--data.root", t,
                   "--best_adapters.keep", 2, "--early_stopping.patience", 3],
        ["best_adapters.keep 2 needs a validation loss: set data.val_fraction (e.g. 0.1) or data.val_root",
         "early_stopping.patience 3 needs a validation loss: set data.val_fraction (e.g. 0.1) or data.val_root"]),
    "fit: a misspelt recipe": (lambda t: ["fit", "--config", "tiny/lroa"], ["no recipe file or packaged recipe named 'tiny/lroa'"]),
    "fit: a config that is not YAML": (lambda t: ["fit", "--config", _bad_yaml(t)], ["--config {t}/bad.yaml is not valid YAML (line 3)"]),
    "validate: a missing packaged model": (
        lambda t: ["validate", "--config", "tiny/lora", "--model.pretrained", "sdtune:toys", "--data.root", t],
        ["model.pretrained 'sdtune:toys' is not a model sdtune ships (those are: sdtune:toy, sdtune:toy-flow)"]),
    "sample: no denoising step": (lambda t: ["sample", "--model", "sdtune:toy", "--prompt", "a", "--steps", 0, "--out", t / "o"],
                                  ["--steps must be at least 1, got 0"]),
    "sample: a missing adapter": (
        lambda t: ["sample", "--model", "sdtune:toy", "--adapter", t / "run/adapter:0.8", "--prompt", "a", "--out", t / "o"],
        ["--adapter '{t}/run/adapter:0.8': {t}/run/adapter does not exist"]),
    "sample: an unknown scheduler": (
        lambda t: ["sample", "--model", "sdtune:toy", "--prompt", "a", "--scheduler", "dpm++", "--out", t / "o"],
        ["argument --scheduler: invalid choice: 'dpm++'"]),
    "evaluate: a missing model file": (
        lambda t: ["evaluate", "--model", t / "model.safetensors", "--judge", "shapes", "--out", t / "o"],
        ["--model '{t}/model.safetensors' does not exist"]),
    "export: a missing run": (lambda t: ["export", t / "runs/my_lora", "--format", "kohya", "--out", t / "a.safetensors"],
                              ["{t}/runs/my_lora does not exist (pass a run directory, a checkpoint or an adapter)"]),
    "export: a folder format to a file": (lambda t: ["export", t, "--out", t / "a.safetensors"],
                                          ["--format diffusers writes a folder: --out {t}/a.safetensors names a .safetensors file"]),
}  # fmt: skip


@pytest.mark.parametrize("case", MISTAKES)
def test_a_mistake_fails_before_the_heavy_libraries_are_imported(case, tmp_path):
    command, expected = MISTAKES[case]
    code, lines, packages = sdtune(*command(tmp_path))
    assert code == 2 and len(lines) == len(expected), lines
    for line, start in zip(lines, expected):
        assert line.startswith("sdtune: error: " + start.format(t=tmp_path)), line
    assert not packages & HEAVY, packages & HEAVY


def test_the_command_line_reads_as_jsonargparse_merges_it(tmp_path):
    """Configs stack, flags win, `init_args` is left out of the keys, and a mapping flag sets its keys."""
    config = tmp_path / "a.yaml"
    config.write_text("model:\n  class_path: x.Y\n  init_args:\n    lora: {rank: 4, alpha: 2}\n    optimizer:\n"
                      "      class_path: torch.optim.AdamW\n      init_args: {lr: 1.0e-4}\n")  # fmt: skip
    settings = command_line_settings(["--config", str(config), "--model.lora.rank=8", "--model.optimizer.init_args.lr",
                                      "1e-3", "--data", '{"root": "d", "batch_size": 2}', "--print_config"])  # fmt: skip
    assert settings == {"model.class_path": "x.Y", "model.lora.rank": 8, "model.lora.alpha": 2,
                        "model.optimizer.class_path": "torch.optim.AdamW", "model.optimizer.lr": "1e-3",
                        "data.root": "d", "data.batch_size": 2}  # fmt: skip


def fit_args(tiny_model_dir, shapes_dir, run, *extra) -> list:
    return ["fit", "--config", "tiny/lora", "--model.pretrained", tiny_model_dir, "--data.root", shapes_dir,
            "--trainer.max_steps", 1, "--trainer.log_every_n_steps", 1, "--samples.enabled", "false",
            "--trainer.default_root_dir", run, *extra]  # fmt: skip


def test_a_plain_fit_imports_no_bitsandbytes_and_prints_no_library_notice(tiny_model_dir, shapes_dir, tmp_path):
    code, lines, packages = sdtune(*fit_args(tiny_model_dir, shapes_dir, tmp_path / "run"))
    assert code == 0, lines
    assert "bitsandbytes" not in packages and {"torch", "lightning", "peft"} <= packages
    assert not [line for line in lines if any(noise in line for noise in NOISE)], lines
    assert not [line for line in lines if "warning" in line.lower()], lines
    log = (tmp_path / "run" / "sdtune.log").read_text(encoding="utf-8")
    assert "litlogger" in log  # Lightning's advertisement: off the console, kept in the run's log
    assert "saved " in log and "adapter/pytorch_lora_weights.safetensors" in log  # and the run's own lines


def test_qlora_imports_bitsandbytes_and_trains(tiny_model_dir, shapes_dir, tmp_path):
    """A setting that needs bitsandbytes gets it (its notices about CPU kernels go to the log file, not the console)."""
    code, lines, packages = sdtune(*fit_args(tiny_model_dir, shapes_dir, tmp_path / "run", "--model.quantize", "nf4"))
    assert code == 0 and "bitsandbytes" in packages, lines
    assert (tmp_path / "run" / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    assert not [line for line in lines if any(noise in line for noise in NOISE)], lines


@pytest.mark.parametrize(
    "flags, needed",
    [
        ([], False),
        (["--model.quantize", "nf4"], True),
        (["--model.quantize", "null"], False),
        (["--model.optimizer", "bitsandbytes.optim.AdamW8bit"], True),
        (["--model.optimizer", "AdamW8bit"], True),  # a short name: resolved among whatever is imported by then
        (["--model.optimizer", "torch.optim.SGD"], False),
        (["--trainer.callbacks+", "step_hooks.StepHooks"], True),  # a user's module may import it
        (["--trainer.callbacks", '[{"class_path": "lightning.pytorch.callbacks.LearningRateMonitor"}]'], False),
    ],
)
def test_bitsandbytes_is_kept_for_the_settings_that_may_need_it(flags, needed):
    assert needs_bitsandbytes(["--config", str(find_recipe("tiny/lora")), *flags]) is needed
