"""`sdtune fit` checks its config before loading any weights: every problem is one line naming the key to change,
all of them reported at once, exit code 2, no traceback."""

from __future__ import annotations

import shutil
from collections import namedtuple

import pytest

from sdtune.cli import main


@pytest.fixture(autouse=True)
def no_weights(monkeypatch):
    """Loading a model during these runs fails the test: the checks must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded before the config was checked")

    monkeypatch.setattr("sdtune.finetune.base.load_model", refuse)


def fit_errors(capsys, tiny_model_dir, shapes_dir, tmp_path, *args) -> list[str]:
    base = ["fit", "--config", "tiny/lora", "--model.pretrained", str(tiny_model_dir), "--data.root", str(shapes_dir),
            "--data.resolution", "32", "--data.batch_size", "2", "--trainer.default_root_dir", str(tmp_path / "run")]  # fmt: skip
    code = main([*base, *map(str, args)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    return [line.removeprefix("sdtune: error: ") for line in err.splitlines() if line.startswith("sdtune: error: ")]


def test_every_problem_is_reported_at_once(capsys, tiny_model_dir, shapes_dir, tmp_path):
    errors = fit_errors(
        capsys, tiny_model_dir, shapes_dir, tmp_path,
        "--data.val_fraction", 1.5, "--data.resolution", 33, "--model.lora.rank", 0, "--trainer.devices", 0,
    )  # fmt: skip
    assert errors == [
        "trainer.devices 0: `Trainer(devices='0')` value is not a valid input using cpu accelerator. (takes a positive "
        "integer, -1 (all), 'auto' or a list of device indices)",
        "model.lora.rank must be ≥ 1, got 0",
        "data.val_fraction must be in [0, 1), got 1.5",
        "data.resolution 33 is not a multiple of 2, the VAE's downscaling; use e.g. 32",
    ]


def _broken_model(tmp_path, tiny_model_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    shutil.rmtree(model / "unet")
    return model


def _empty(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


Case = namedtuple("Case", "args expected")
CASES = {
    "unknown target module": Case(lambda t, m: ["--model.lora.target_modules", "[to_q, to_zz]"],
                                  "model.lora.target_modules: no module named to_zz in the UNet"),
    "unknown text-encoder target": Case(lambda t, m: ["--model.text_encoder_lora", "{rank: 2, target_modules: [q_proj, zz_proj]}"],
                                        "model.text_encoder_lora.target_modules: no module named zz_proj in the text encoder"),
    "missing model folder": Case(lambda t, m: ["--model.pretrained", t / "no-model"], "model.pretrained '"),
    "model folder without unet/": Case(lambda t, m: ["--model.pretrained", _broken_model(t, m)], "missing unet/"),
    "single file without configs": Case(lambda t, m: ["--model.pretrained", _touch(t / "model.safetensors")],
                                        "model.pretrained is a single-file checkpoint: set model.pretrained_config"),
    "missing data folder": Case(lambda t, m: ["--data.root", t / "no-data"], "data.root '"),
    "empty data folder": Case(lambda t, m: ["--data.root", _empty(t)], "has no images"),
    "more devices than batches": Case(lambda t, m: ["--data.batch_size", 8, "--trainer.devices", 2],
                                      "8 samples make 1 batch of data.batch_size 8, fewer than the 2 devices"),
    "accumulation longer than an epoch": Case(lambda t, m: ["--trainer.accumulate_grad_batches", 5],
                                              "4 per device, fewer than trainer.accumulate_grad_batches 5"),
    "bucket step": Case(lambda t, m: ["--data.buckets", "true", "--data.bucket_step", 12],
                        "data.bucket_step must be a positive multiple of 8"),
    "cache with random crops": Case(lambda t, m: ["--data.cache", "true", "--data.center_crop", "false"],
                                    "data.cache needs data.center_crop: true"),
    "missing subset folder": Case(lambda t, m: ["--data.root", "null", "--data.subsets", f"[{{root: {t / 'gone'}, repeats: 2}}]"],
                                  "data.subsets[0].root '"),
    "zero rank": Case(lambda t, m: ["--model.lora.rank", 0], "model.lora.rank must be ≥ 1"),
}


def _touch(path):
    path.write_bytes(b"")
    return path


@pytest.mark.parametrize("name", CASES)
def test_a_bad_setting_is_one_line_naming_its_key(name, capsys, tiny_model_dir, shapes_dir, tmp_path):
    case = CASES[name]
    errors = fit_errors(capsys, tiny_model_dir, shapes_dir, tmp_path, *case.args(tmp_path, tiny_model_dir))
    assert len(errors) == 1 and case.expected in errors[0], errors


def test_too_little_disk_for_the_checkpoints(capsys, tiny_model_dir, shapes_dir, tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr("sdtune.commands.preflight.shutil.disk_usage", lambda path: usage._replace(free=10 * 1024**2))
    errors = fit_errors(capsys, tiny_model_dir, shapes_dir, tmp_path)
    assert len(errors) == 1 and "has 0.0 GB free, but this run's checkpoints need about" in errors[0], errors
    assert "lower checkpoint.save_top_k" in errors[0]
