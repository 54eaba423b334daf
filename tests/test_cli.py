"""`sdtune` as a user types it: ls, cp, --help, fit through LightningCLI, resume, validate."""

import subprocess
import sys

import pytest
import torch
import yaml

from sdtune.cli import main


def sdtune_here(*args) -> None:
    """`sdtune ARGS` in this process, without an interpreter's start-up: for sample and export after a real `fit`."""
    code = main([str(arg) for arg in args])
    assert code == 0, f"sdtune {' '.join(map(str, args))} exited {code}"


def sdtune(*args, check=True, timeout=600):
    result = subprocess.run([sys.executable, "-m", "sdtune.cli", *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"sdtune {' '.join(map(str, args))} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def test_ls_lists_packaged_recipes_with_their_purpose(capsys):
    assert main(["ls"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines]
    assert "sd15/lora" in names and "tiny/lora" in names
    assert all(len(line.split(maxsplit=1)) == 2 for line in lines)  # every recipe says what it is for


def test_cp_copies_a_recipe_and_refuses_to_overwrite(tmp_path, capsys):
    dest = tmp_path / "mine" / "my_lora.yaml"
    assert main(["cp", "sd15/lora", str(dest)]) == 0
    assert yaml.safe_load(dest.read_text())["model"]["init_args"]["lora"]["rank"] == 16
    dest.write_text("edited")
    assert main(["cp", "sd15/lora", str(dest)]) == 2
    assert "already exists" in capsys.readouterr().err and dest.read_text() == "edited"
    assert main(["cp", "no/such", str(tmp_path / "x.yaml")]) == 2


@pytest.mark.parametrize("command", ["ls", "cp", "fit", "validate", "demo", "sample", "evaluate", "export", "inspect", "report", "env"])
def test_every_command_help_shows_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out and f"sdtune {command}" in out or (command in ("fit", "validate") and "sdtune fit" in out)


@pytest.mark.parametrize("tool", ["build", "check", "caption", "cache", "shapes"])
def test_every_prep_tool_help_shows_an_example(tool, capsys):
    assert main(["prep", "--help"]) == 0
    assert f"  {tool} " in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["prep", tool, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"sdtune prep {tool} " in out
    assert main(["prep", "nosuchtool"]) == 2


def test_top_level_help_and_unknown_command(capsys):
    assert main([]) == 0
    assert "sdtune fit --config sd15/lora" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2


def test_keys_work_as_written_and_configs_stack(tmp_path, capsys):
    override = tmp_path / "override.yaml"
    override.write_text("model:\n  init_args:\n    lora:\n      dropout: 0.1\n")
    with pytest.raises(SystemExit):
        main(["fit", "--config", "sd15/lora", "--config", str(override), "--model.pretrained", "some/model",
              "--model.lora.rank", "4", "--model.lora.alpha", "2", "--data.root", "data", "--data.resolution", "256",
              "--data.batch_size", "3", "--trainer.max_steps", "7", "--trainer.precision", "32-true",
              "--trainer.accelerator", "cpu", "--trainer.default_root_dir", "runs/x", "--seed_everything", "5",
              "--checkpoint.every_n_train_steps", "3", "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    assert model["pretrained"] == "some/model" and "pretrained" not in data  # linked from the model, not set twice
    lora = {k: model["lora"][k] for k in ("rank", "alpha", "dropout", "target_modules", "conv_rank")}
    assert lora == {"rank": 4, "alpha": 2.0, "dropout": 0.1, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"], "conv_rank": 0}
    assert (data["root"], data["resolution"], data["batch_size"]) == ("data", 256, 3)
    assert config["trainer"]["max_steps"] == 7 and config["trainer"]["precision"] == "32-true"
    assert config["seed_everything"] == 5 and config["checkpoint"]["every_n_train_steps"] == 3
    assert config["checkpoint"]["save_last"] is True


def test_fit_writes_the_run_directory_then_resumes_and_validates(tiny_model_dir, shapes_dir, tmp_path):
    run = tmp_path / "run"
    common = ["--config", "tiny/lora", "--model.pretrained", tiny_model_dir, "--data.root", shapes_dir,
              "--trainer.default_root_dir", run, "--checkpoint.every_n_train_steps", 2]
    sdtune("fit", *common, "--trainer.max_steps", 4)
    assert (run / "config.yaml").is_file()
    assert list((run / "logs").glob("events.out.tfevents.*"))
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["init_args"]["pretrained"] == str(tiny_model_dir)

    first = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert first["global_step"] == 4
    # Same command again with --ckpt_path last: config.yaml exists already, the run continues to step 6.
    resumed = sdtune("fit", *common, "--trainer.max_steps", 6, "--ckpt_path", "last")
    assert "Restoring states from the checkpoint path at" in resumed.stderr + resumed.stdout
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6

    validated = sdtune("validate", *common, "--data.val_fraction", 0.25, "--ckpt_path", run / "checkpoints" / "last.ckpt")
    assert "val/loss" in validated.stdout


def test_missing_data_root_is_one_line(tiny_model_dir, tmp_path):
    result = sdtune("fit", "--config", "tiny/lora", "--model.pretrained", tiny_model_dir, "--data.root",
                    tmp_path / "nowhere", "--trainer.default_root_dir", tmp_path / "run", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"sdtune: error: data.root '{tmp_path / 'nowhere'}' does not exist"


def test_corrupt_image_in_a_worker_is_replaced_with_one_warning(tiny_model_dir, shapes_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for image in sorted(shapes_dir.glob("*.png"))[:2]:
        (data / image.name).write_bytes(image.read_bytes())
        (data / image.with_suffix(".txt").name).write_text("a shape")
    broken = image.read_bytes()[: len(image.read_bytes()) // 2]  # its header reads; its pixels end half-way
    (data / "broken.png").write_bytes(broken)
    result = sdtune("fit", "--config", "tiny/lora", "--model.pretrained", tiny_model_dir, "--data.root", data,
                    "--data.num_workers", 1, "--data.batch_size", 3, "--trainer.max_steps", 1,
                    "--trainer.default_root_dir", tmp_path / "run", check=False)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    warned = [line for line in result.stderr.splitlines() if "trained on the next image of its size instead" in line]
    assert len(warned) == 1 and "broken.png' could not be read" in warned[0]
    assert "1 image(s) could not be read and were replaced 1 time(s) in all" in result.stderr
    assert (data / "broken.png").read_bytes() == broken  # user data untouched


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--model.lora.rank", "abc"], "sdtune: error: model.lora.rank: Expected a <class 'int'>. Got value: abc"),
        (["--model.lora.rnk", "3"], "sdtune: error: model: unrecognized arguments: --lora.rnk=3"),
        (["--data.batch_size", "1.5"], "sdtune: error: data.batch_size: Expected a <class 'int'>. Got value: 1.5"),
    ],
)
def test_wrong_config_values_are_one_line(flags, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "tiny/lora", "--model.pretrained", "m", "--data.root", "d", *flags, "--print_config"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(expected)


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--model.lora.init", "pissa"], "model.lora.init=pissa rewrites the base weights"),
        (["--model.objective.max_timestep", "2000"], "model.objective: need 0 ≤ min_timestep < max_timestep ≤ 1000"),
        (["--data.max_token_length", "100"], "data.max_token_length must be a multiple of 75"),
        (["--data.root", "null", "--data.subsets", '[{"root": ".", "repeats": 0}]'], "data.subsets[0].repeats must be ≥ 1"),
    ],
)
def test_bad_training_options_are_one_line(flags, expected, tiny_model_dir, shapes_dir, tmp_path, capsys):
    code = main(["fit", "--config", "tiny/lora", "--model.pretrained", str(tiny_model_dir), "--data.root", str(shapes_dir),
                 "--trainer.max_steps", "1", "--trainer.default_root_dir", str(tmp_path), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(f"sdtune: error: {expected}")


def test_model_help_documents_every_setting(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "sdtune.finetune.LoRAFineTune"])
    out = capsys.readouterr().out
    for documented in ("Rank of adapters on", "offset·N(0, 1)", "pseudo-Huber", "k-th hidden state from the end"):
        assert documented in " ".join(out.split()), documented
