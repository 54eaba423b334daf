"""A checkpoint given with `--ckpt_path` is read, never obeyed: the config and the command line win over the settings
it recorded, a setting that fixes its weights must match (one line naming it and both values), and a damaged,
foreign or pickling file is one line naming it, with nothing in it run, whatever TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD
says. Also: `null` for a setting two keys below `model` is null."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sdtune.cli import main
from sdtune.errors import SdtuneError

MARKER = "pickle-ran"


class RunsCode:
    """Unpickling it creates the file `path`: proof that a load ran code from the file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def fit_args(tiny_model_dir, shapes_dir, run: Path, *extra) -> list[str]:
    """Two steps of the tiny LoRA recipe (4 batches an epoch), no samples, one checkpoint at the end."""
    return ["fit", "--config", "tiny/lora", "--model.pretrained", tiny_model_dir, "--data.root", shapes_dir,
            "--data.resolution", 32, "--data.batch_size", 2, "--trainer.max_steps", 2, "--samples.enabled", "false",
            "--trainer.enable_progress_bar", "false", "--checkpoint.every_n_train_steps", 30,
            "--trainer.default_root_dir", run, *extra]  # fmt: skip


def sdtune(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdtune.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)  # fmt: skip


def one_error(code: int, stderr: str) -> str:
    """The run failed with exit code 2 and exactly one `sdtune: error:` line, no traceback; that line."""
    errors = [line.removeprefix("sdtune: error: ") for line in stderr.splitlines() if line.startswith("sdtune: error: ")]
    assert code == 2 and "Traceback" not in stderr and len(errors) == 1, stderr[-3000:]
    return errors[0]


def fit_here(capsys, *args) -> str:
    """`sdtune fit ARGS` in this process, expected to fail: its one error line."""
    code = main([str(arg) for arg in args])
    return one_error(code, capsys.readouterr().err)


def edited(source: Path, target: Path, change) -> Path:
    """A copy of checkpoint `source` with `change(checkpoint)` applied, as someone editing it by hand would."""
    checkpoint = torch.load(source, weights_only=False)
    change(checkpoint)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, target)
    return target


@pytest.fixture
def no_weights(monkeypatch):
    """Loading a model fails the test: the checkpoint is judged before any weights load."""

    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded before the checkpoint was checked")

    monkeypatch.setattr("sdtune.finetune.base.load_model", refuse)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, shapes_dir, tmp_path_factory) -> Path:
    """The run every test resumes from: checkpoints/last.ckpt after step 2 of tiny/lora (rank 8, alpha 4, min-SNR 5)."""
    run = tmp_path_factory.mktemp("trained")
    result = sdtune(*fit_args(tiny_model_dir, shapes_dir, run))
    assert result.returncode == 0, result.stderr[-3000:]
    return run


# --- the config wins ------------------------------------------------------------------------------------------


def set_hparam(key: str, value):
    def change(checkpoint):
        *parents, leaf = key.split(".")
        settings = checkpoint["hyper_parameters"]
        for name in parents:
            settings = settings[name]
        settings[leaf] = value

    return change


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("lora.alpha", 999.0, "model.lora.alpha: {ckpt} was trained with 999.0, the config has 4.0;"),
        ("lora.type", "loha", "model.lora.type: {ckpt} was trained with loha, the config has lora;"),
        ("lora.target_modules", ["to_q"], 'model.lora.target_modules: {ckpt} was trained with ["to_q"], the config has ["to_q", "to_k", "to_v", "to_out.0"];'),
        ("text_encoder_lora", {"rank": 4, "alpha": 4.0, "target_modules": ["q_proj"]}, "model.text_encoder_lora: {ckpt} was trained with {{"),
        ("_class_path", "sdtune.finetune.full.FullFineTune", "model.class_path: {ckpt} was written by a FullFineTune run, the config trains LoRAFineTune;"),
    ],
    ids=["alpha", "adapter-type", "targets", "text-encoder-adapter", "method"],
)
def test_a_setting_that_fixes_the_weights_must_match(key, value, message, trained, tiny_model_dir, shapes_dir, tmp_path, capsys, no_weights):
    path = edited(trained / "checkpoints" / "last.ckpt", tmp_path / "edited.ckpt", set_hparam(key, value))
    error = fit_here(capsys, *fit_args(tiny_model_dir, shapes_dir, tmp_path / "run", "--model.lora.alpha", 4, "--ckpt_path", path))
    assert error.startswith(message.format(ckpt=f"--ckpt_path {path}")), error


def test_ckpt_path_last_is_checked_before_the_model_loads(trained, tiny_model_dir, shapes_dir, tmp_path, capsys, no_weights):
    run = tmp_path / "run"
    shutil.copytree(trained / "checkpoints", run / "checkpoints")
    edited(run / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt", set_hparam("lora.rank", 4))
    for other in (run / "checkpoints").glob("epoch=*.ckpt"):
        other.unlink()
    error = fit_here(capsys, *fit_args(tiny_model_dir, shapes_dir, run, "--ckpt_path", "last"))
    assert error.startswith(f"model.lora.rank: --ckpt_path {run / 'checkpoints' / 'last.ckpt'} was trained with 4, the config has 8;")
    assert error.endswith("set model.lora.rank to 4 to resume, or start fresh without --ckpt_path")


def test_settings_given_on_the_command_line_win_over_the_checkpoints(trained, tiny_model_dir, shapes_dir, tmp_path):
    """The checkpoint says min-SNR 7 (edited) and lr 1e-3; the flags say min-SNR off and lr 2e-3: the resumed run
    trains with the flags' values and records them."""
    path = edited(trained / "checkpoints" / "last.ckpt", tmp_path / "edited.ckpt", set_hparam("objective.min_snr_gamma", 7.0))
    run = tmp_path / "run"
    result = sdtune(*fit_args(tiny_model_dir, shapes_dir, run, "--trainer.max_steps", 3, "--ckpt_path", path,
                              "--model.objective.min_snr_gamma", "null", "--model.optimizer.init_args.lr", 0.002))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "differ from the checkpoint's: model.objective.min_snr_gamma 7.0 → null" in result.stderr
    assert "learning rate from the config, not the checkpoint: unet 0.001 → 0.002" in result.stderr
    resumed = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 3
    assert resumed["hyper_parameters"]["objective"]["min_snr_gamma"] is None  # the module was built with null
    group = resumed["optimizer_states"][0]["param_groups"][0]
    assert group["initial_lr"] == 0.002 and resumed["lr_schedulers"][0]["base_lrs"] == [0.002]
    assert group["lr"] == pytest.approx(0.002 * 3 / 5)  # step 3 of the recipe's 5 warmup steps
    assert resumed["sdtune"]["family"] == "sd1"
    config = yaml.safe_load((run / "config.yaml").read_text())["model"]["init_args"]
    assert config["objective"]["min_snr_gamma"] is None and config["optimizer"]["init_args"]["lr"] == 0.002
    assert load_file(run / "adapter" / "pytorch_lora_weights.safetensors")  # trained on and saved


def test_a_checkpoint_of_another_model_family_is_refused(trained, tiny_model_dir):
    from sdtune.adapters.lora import LoraSettings
    from sdtune.finetune import LoRAFineTune

    module = LoRAFineTune(str(tiny_model_dir), lora=LoraSettings(rank=8, alpha=4.0))
    checkpoint = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["sdtune"]["family"] = "sdxl"
    with pytest.raises(SdtuneError, match=r"the checkpoint was trained for SDXL, .* is SD1.x; resume with the model it was trained on"):
        module.on_load_checkpoint(checkpoint)


def test_recorded_and_configured_settings_are_compared_key_by_key():
    from sdtune.commands.resume import changed_settings

    saved = {"lora": {"rank": 8, "alpha": 4.0, "target_modules": ["to_q"]}, "text_encoder_lora": None, "old": 1}
    configured = {"lora": {"rank": 8, "alpha": 4, "target_modules": ("to_q",)}, "text_encoder_lora": {"rank": 4}, "new": 2}
    assert changed_settings(saved, configured, "model") == [("model.text_encoder_lora", None, {"rank": 4})]


# --- null below a class_path ----------------------------------------------------------------------------------


def test_null_two_keys_below_model_is_null(tiny_model_dir, shapes_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in fit_args(tiny_model_dir, shapes_dir, tmp_path / "run",
              "--model.objective.noise_offset", 0.05, "--model.objective.min_snr_gamma", "null",
              "--model.init_args.objective.max_timestep=null", "--model.objective.flow.shift", "~",
              "--model.optimizer.init_args.weight_decay", "null", "--model.lora.conv_alpha", "null", "--print_config")])  # fmt: skip
    assert exit_info.value.code == 0
    model = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    objective = model["objective"]
    assert objective["min_snr_gamma"] is None and objective["max_timestep"] is None and objective["flow"]["shift"] is None
    assert objective["noise_offset"] == 0.05 and objective["loss"] == "mse"  # the rest of the block is kept
    assert model["optimizer"]["init_args"]["weight_decay"] is None and model["optimizer"]["init_args"]["lr"] == 0.001
    assert model["lora"]["conv_alpha"] is None and model["lora"]["rank"] == 8


def test_nested_nulls_rewrites_only_nulls_below_a_class_path():
    from sdtune.commands.fit import nested_nulls

    assert nested_nulls(["--model.objective.min_snr_gamma", "null", "--model.lora.rank", "4"]) == [
        "--model.objective", '{"min_snr_gamma": null}', "--model.lora.rank", "4"]  # fmt: skip
    assert nested_nulls(["--print_config", "--model.objective.flow.shift=~"]) == ["--print_config", "--model.objective", '{"flow": {"shift": null}}']
    unchanged = ["--model.init_adapter", "null", "--trainer.max_steps", "null", "--model.lora.rank", "4"]
    assert nested_nulls(unchanged) == unchanged


# --- files that are not checkpoints sdtune resumes from ------------------------------------------------------


def truncated(tmp_path, trained):
    data = (trained / "checkpoints" / "last.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    return tmp_path / "cut.ckpt"


def plain_zip(tmp_path, trained):
    with zipfile.ZipFile(tmp_path / "photos.ckpt", "w") as archive:
        archive.writestr("photo.txt", "not a checkpoint")
    return tmp_path / "photos.ckpt"


def pickling(tmp_path, trained):
    def add_code(checkpoint):
        checkpoint["callbacks"]["extra"] = RunsCode(tmp_path / MARKER)

    return edited(trained / "checkpoints" / "last.ckpt", tmp_path / "pickling.ckpt", add_code)


def weights_only(tmp_path, trained):
    return edited(trained / "checkpoints" / "last.ckpt", tmp_path / "weights.ckpt", lambda c: c.pop("optimizer_states"))


@pytest.mark.parametrize(
    "make, message",
    [
        (truncated, ": not a complete checkpoint, truncated or never one (File is not a zip file); "),
        (plain_zip, " is a zip archive but not a checkpoint written by torch.save; "),
        (pickling, " contains pickled Python objects (io.open) that sdtune will not load, since unpickling them can run code; "),
        (weights_only, " holds weights but no optimizer state to resume from (written with checkpoint.save_weights_only?); "),
        (lambda tmp_path, trained: tmp_path / "absent.ckpt", ": the file does not exist; "),
    ],
    ids=["truncated", "plain-zip", "pickling", "weights-only", "absent"],
)
def test_an_unusable_checkpoint_is_one_line_and_runs_nothing(make, message, trained, tiny_model_dir, shapes_dir, tmp_path, capsys, monkeypatch, no_weights):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch's default would unpickle anything
    path = make(tmp_path, trained)
    error = fit_here(capsys, *fit_args(tiny_model_dir, shapes_dir, tmp_path / "run", "--ckpt_path", path))
    assert error == f"--ckpt_path {path}{message}resume from a checkpoint sdtune wrote, or start fresh without --ckpt_path"
    assert not (tmp_path / MARKER).exists()


def test_a_pickling_last_checkpoint_runs_nothing_even_when_torch_is_told_to_unpickle(trained, tiny_model_dir, shapes_dir, tmp_path):
    """Before, `--ckpt_path last` reached Lightning's torch.load without weights_only, which this variable turns into
    a full unpickle: the file's code ran and training went on."""
    run = tmp_path / "run"
    pickling(run / "checkpoints", trained).rename(run / "checkpoints" / "last.ckpt")
    result = sdtune(*fit_args(tiny_model_dir, shapes_dir, run, "--ckpt_path", "last"), env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    error = one_error(result.returncode, result.stderr)
    assert error.startswith(f"--ckpt_path {run / 'checkpoints' / 'last.ckpt'} contains pickled Python objects (io.open)")
    assert not (run / "checkpoints" / MARKER).exists()


def test_the_trainer_loads_checkpoints_weights_only_whatever_it_is_asked(trained, tmp_path, monkeypatch):
    from sdtune.finetune.checkpointing import AtomicCheckpointIO

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    io = AtomicCheckpointIO()
    assert io.load_checkpoint(trained / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    with pytest.raises(SdtuneError, match=r"contains pickled Python objects \(io.open\)"):
        io.load_checkpoint(pickling(tmp_path, trained), weights_only=False)
    assert not (tmp_path / MARKER).exists()


def test_export_of_a_pickling_checkpoint_is_one_line(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    path = pickling(tmp_path, trained)
    error = one_error(main(["export", str(path), "--out", str(tmp_path / "out")]), capsys.readouterr().err)
    assert error == f"{path} contains pickled Python objects (io.open) that sdtune will not load, since unpickling them can run code; export a checkpoint sdtune wrote"
    assert not (tmp_path / MARKER).exists()


@pytest.mark.parametrize("part, weights", [("unet", "diffusion_pytorch_model"), ("text_encoder", "model")], ids=["diffusers", "transformers"])
def test_model_weights_that_pickle_objects_are_one_line(part, weights, tiny_model_dir, shapes_dir, tmp_path):
    """A model folder whose part has .bin weights with an object in them: diffusers and transformers load .bin files
    weights-only (passed explicitly, so the variable changes nothing); sdtune names the part instead of a traceback."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    state = {**load_file(model / part / f"{weights}.safetensors"), "extra": RunsCode(tmp_path / MARKER)}
    torch.save(state, model / part / ("pytorch_model.bin" if part == "text_encoder" else f"{weights}.bin"))
    (model / part / f"{weights}.safetensors").unlink()
    result = sdtune(*fit_args(model, shapes_dir, tmp_path / "run"), env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    error = one_error(result.returncode, result.stderr)
    assert error == (f"model.pretrained '{model}': {part}/ has weights with pickled Python objects (io.open) that sdtune "
                     "will not load, since unpickling them can run code; use a copy of the model with .safetensors weights")  # fmt: skip
    assert not (tmp_path / MARKER).exists()
