"""Settings and sizes are checked before anything slow happens: a bad `fit` setting fails before the weights load,
a bad `sample` size, image or output folder before the model loads, an adapter made for another model before any
image is made. Each is one `sdtune: error:` line naming the setting and the value, exit code 2, no traceback, nothing
written to --out and no input changed."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
import time
import zlib

import pytest
from PIL import Image
from training import trained_adapter

from sdtune.adapters.lora import LoraSettings
from sdtune.cli import main

# What stderr may hold besides the error: LightningCLI's seeding notice, transformers' weight-loading progress bar.
HARMLESS = ("Seed set to ", "Loading weights:")


def error_lines(err: str) -> list[str]:
    """The error lines of a failed command, after checking stderr holds nothing else but known notices."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(HARMLESS)]
    assert all(line.startswith("sdtune: error: ") for line in lines), err
    return [line.removeprefix("sdtune: error: ") for line in lines]


def digest(*paths) -> dict:
    """The bytes of every file under `paths`, to show a failed command changed none of its inputs."""
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


# --- fit: every setting with a domain, before the weights load ----------------------------------------------------


@pytest.fixture
def no_weights(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded before the settings were checked")

    monkeypatch.setattr("sdtune.finetune.base.load_model", refuse)


def fit_args(tiny_model_dir, shapes_dir, run_dir) -> list[str]:
    return ["fit", "--config", "tiny/lora", "--model.pretrained", str(tiny_model_dir), "--data.root", str(shapes_dir),
            "--data.resolution", "32", "--data.batch_size", "2", "--trainer.default_root_dir", str(run_dir)]  # fmt: skip


FIT_SETTINGS = {
    "max_steps below -1": (["--trainer.max_steps", "-5"], "trainer.max_steps must be an integer ≥ -1 (-1: no limit), got -5"),
    "max_epochs below -1": (["--trainer.max_epochs", "-2"], "trainer.max_epochs must be an integer ≥ -1 (-1: no limit) or null, got -2"),
    "negative lr": (["--model.optimizer.init_args.lr", "-1"], "model.optimizer.lr must be a number ≥ 0, got -1"),
    "beta of 1.5": (["--model.optimizer.init_args.betas", "[0.9, 1.5]"], "model.optimizer.init_args.betas [0.9, 1.5]: Invalid beta parameter"),
    "negative text-encoder lr": (["--model.text_encoder_lora", "{rank: 2, lr: -0.5}"], "model.text_encoder_lora.lr -0.5: Invalid learning rate"),
    "no accumulation": (["--trainer.accumulate_grad_batches", "0"], "trainer.accumulate_grad_batches must be an integer ≥ 1, got 0"),
    "no devices": (["--trainer.devices", "0"], "trainer.devices 0: `Trainer(devices='0')` value is not a valid input"),
    "no nodes": (["--trainer.num_nodes", "0"], "trainer.num_nodes 0: `num_nodes` must be a positive integer"),
    "unknown accelerator": (["--trainer.accelerator", "tpux"], "trainer.accelerator tpux: You selected an invalid accelerator name"),
    "unknown strategy": (["--trainer.strategy", "nope"], "trainer.strategy nope: You selected an invalid strategy name"),
    "bad max_time": (["--trainer.max_time", "soon"], "trainer.max_time soon: `Timer(duration='soon')` is not a valid duration"),
    "negative checkpoint interval": (["--checkpoint.every_n_train_steps", "-1"],
                                     "checkpoint.every_n_train_steps -1: Invalid value for every_n_train_steps=-1. Must be >= 0"),
    "save_top_k below -1": (["--checkpoint.save_top_k", "-2"], "checkpoint.save_top_k -2: Invalid value for save_top_k=-2. Must be >= -1"),
    "val_check_interval above 1.0": (["--trainer.val_check_interval", "1.5"],
                                     "trainer.val_check_interval 1.5: You have passed invalid value 1.5 for val_check_interval, it has to be in [0.0, 1.0]"),
    "negative limit_val_batches": (["--trainer.limit_val_batches", "-1"], "trainer.limit_val_batches -1: You have passed invalid value -1"),
    "fractional limit_train_batches": (["--trainer.limit_train_batches", "2.5"], "trainer.limit_train_batches 2.5: You have passed invalid value 2.5"),
    "negative gradient clip": (["--trainer.gradient_clip_val", "-1"], "trainer.gradient_clip_val must be a number ≥ 0 (0 or null: no clipping), got -1"),
    "unknown clip algorithm": (["--trainer.gradient_clip_algorithm", "max"], "trainer.gradient_clip_algorithm max: `gradient_clip_algorithm` max is invalid"),
    "negative log interval": (["--trainer.log_every_n_steps", "-1"], "trainer.log_every_n_steps must be an integer ≥ 0 (0: no step logs), got -1"),
    "validation every 0 epochs": (["--trainer.check_val_every_n_epoch", "0"], "trainer.check_val_every_n_epoch must be an integer ≥ 1 or null, got 0"),
    "EMA decay of 2": (["--ema.decay", "2"], "ema.decay must be in [0, 1), got 2.0"),
    "throughput every 0 steps": (["--throughput.log_every_n_steps", "0"], "throughput.log_every_n_steps must be ≥ 1, got 0"),
    "negative best adapters": (["--best_adapters.keep", "-1"], "best_adapters.keep must be ≥ 0, got -1"),
    "no patience": (["--early_stopping.patience", "0"], "early_stopping.patience must be ≥ 1 or null (off), got 0"),
    "best adapters without validation": (["--best_adapters.keep", "2"],
                                         "best_adapters.keep 2 needs a validation loss: set data.val_fraction (e.g. 0.1) or data.val_root"),
    "early stopping without validation": (["--early_stopping.patience", "3"],
                                          "early_stopping.patience 3 needs a validation loss: set data.val_fraction"),
    "negative workers": (["--data.num_workers", "-1"], "data.num_workers must be 0 or more, got -1"),
    "zero batch size": (["--data.batch_size", "0"], "data.batch_size must be at least 1, got 0"),
    "resolution not a multiple": (["--data.resolution", "33"], "data.resolution 33 is not a multiple of 2"),
    "zero resolution": (["--data.resolution", "0"], "data.resolution must be positive, got 0"),
    "lr not a number": (["--model.optimizer.init_args.lr", "abc"], "model.optimizer.lr must be a number ≥ 0, got abc"),
    # Values of the wrong type are refused by the parser, also in one line naming every accepted value.
    "unknown precision": (["--trainer.precision", "8-mixed"], "trainer.precision: Expected one of 64, 32, 16, transformer-engine"),
}  # fmt: skip


@pytest.mark.parametrize("case", FIT_SETTINGS)
def test_a_bad_fit_setting_is_one_line_before_the_weights_load(case, tiny_model_dir, shapes_dir, tmp_path, capfd, no_weights):
    flags, expected = FIT_SETTINGS[case]
    try:
        code = main([*fit_args(tiny_model_dir, shapes_dir, tmp_path / "run"), *flags])
    except SystemExit as stop:  # the parser exits by itself
        code = stop.code
    errors = error_lines(capfd.readouterr().err)
    assert code == 2 and len(errors) == 1 and errors[0].startswith(expected), errors
    assert not (tmp_path / "run").exists()


def test_every_bad_setting_is_reported_at_once_by_the_real_command(tiny_model_dir, shapes_dir, tmp_path):
    """The user's session: three bad settings only the classes know the domains of, the command as typed; each its
    own line, seconds, no weights. (Plain numbers with a known domain fail before that: test_precheck.py.)"""
    flags = ["--model.optimizer.init_args.betas", "[0.9, 1.5]", "--trainer.devices", "0", "--checkpoint.every_n_train_steps", "-1"]
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "sdtune", *fit_args(tiny_model_dir, shapes_dir, tmp_path / "run"), *flags],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    errors = error_lines(result.stderr)
    assert result.returncode == 2 and [line.split(":")[0] for line in errors] == [
        "trainer.devices 0", "checkpoint.every_n_train_steps -1", "model.optimizer.init_args.betas [0.9, 1.5]",
    ], errors  # fmt: skip
    assert "Loading weights" not in result.stderr and not (tmp_path / "run").exists()
    print(f"failed in {time.perf_counter() - started:.1f} s")


# --- sample: sizes, init images and masks, the output folder, before the model loads ------------------------------


def bomb_png(path):
    """A 10-byte-image PNG whose header claims 30000 × 30000 pixels (900 MP): a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


@pytest.fixture
def inputs(tmp_path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(folder / "init.png")
    Image.new("L", (32, 32), 255).save(folder / "mask.png")
    bomb_png(folder / "bomb.png")
    (folder / "notes.png").write_text("not an image\n")
    Image.new("RGB", (8, 8)).save(folder / "photo.tga")  # a format sdtune does not read, whatever its name
    (folder / "a_file").write_text("a file, not a folder\n")
    return folder


SAMPLE_INPUTS = {
    "huge size": (["--width", "100000", "--height", "100000"],
                  "--width 100000 × --height 100000 is 10000.0 megapixels, above the 16.8 (4096×4096)"),
    "huge width alone": (["--width", "300000", "--height", "64"], "--width 300000 × --height 64 is 19.2 megapixels"),
    "width not a multiple of 8": (["--width", "36"], "--width 36 is not a multiple of 8"),
    "negative height": (["--height", "-64"], "--height must be positive, got -64"),
    "decompression bomb as init image": (["--init-image", "{in}/bomb.png"],
                                         "--init-image {in}/bomb.png is not a readable image: too large: 900 MP"),
    "decompression bomb as mask": (["--init-image", "{in}/init.png", "--mask", "{in}/bomb.png"],
                                   "--mask {in}/bomb.png is not a readable image: too large: 900 MP"),
    "text as init image": (["--init-image", "{in}/notes.png"], "--init-image {in}/notes.png is not a readable image: not an image format sdtune reads (a text file)"),
    "unlisted format as mask": (["--init-image", "{in}/init.png", "--mask", "{in}/photo.tga"],
                                "--mask {in}/photo.tga is not a readable image: not an image format sdtune reads"),
    "out under a file": (["--out", "{in}/a_file/samples"], "--out '{in}/a_file/samples': {in}/a_file is a file, not a folder"),
    "out in /proc": (["--out", "/proc/sdtune-samples"], "--out '/proc/sdtune-samples': cannot write in /proc"),
}  # fmt: skip


@pytest.mark.parametrize("case", SAMPLE_INPUTS)
def test_a_bad_sample_input_is_one_line_before_the_model_loads(case, tiny_model_dir, inputs, tmp_path, capfd, monkeypatch):
    monkeypatch.setattr("sdtune.models.pretrained.load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    flags, expected = SAMPLE_INPUTS[case]
    before = digest(inputs, tiny_model_dir)
    args = ["sample", "--model", str(tiny_model_dir), "--prompt", "a red circle", "--steps", "1", "--width", "32",
            "--height", "32", "--out", str(tmp_path / "out"), *[flag.format(**{"in": inputs}) for flag in flags]]  # fmt: skip
    code = main(args)
    errors = error_lines(capfd.readouterr().err)
    assert code == 2 and len(errors) == 1 and errors[0].startswith(expected.format(**{"in": inputs})), errors
    assert not (tmp_path / "out").exists() and digest(inputs, tiny_model_dir) == before


def test_a_huge_size_fails_at_once_in_the_real_command(tiny_model_dir, tmp_path):
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "sdtune", "sample", "--model", str(tiny_model_dir), "--prompt", "x",
                             "--width", "100000", "--height", "100000", "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    errors = error_lines(result.stderr)
    assert result.returncode == 2 and len(errors) == 1 and "--allow-large" in errors[0], result.stderr
    assert "Loading weights" not in result.stderr and not (tmp_path / "out").exists()
    print(f"failed in {time.perf_counter() - started:.1f} s")


# --- export: an output folder that cannot be written --------------------------------------------------------------


@pytest.fixture(scope="module")
def sd_adapter(tiny_model_dir, tmp_path_factory):
    return trained_adapter(tiny_model_dir, tmp_path_factory.mktemp("sd") / "adapter", lora=LoraSettings(rank=4, alpha=4.0))


@pytest.fixture(scope="module")
def sdxl_adapter(tiny_sdxl_dir, tmp_path_factory):
    return trained_adapter(tiny_sdxl_dir, tmp_path_factory.mktemp("sdxl") / "adapter", lora=LoraSettings(rank=4, alpha=4.0))


def _read_only(tmp_path):
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder / "export"


EXPORT_OUTS = {
    "under a file": (lambda t: _touch(t / "a_file") / "export", "is a file, not a folder"),
    "in /proc": (lambda t: "/proc/sdtune-export", "cannot write in /proc"),
    "in a read-only folder": (_read_only, "cannot write in"),
}


def _touch(path):
    path.write_text("mine\n")
    return path


@pytest.mark.parametrize("case", EXPORT_OUTS)
def test_an_export_out_that_cannot_be_written_is_one_line_before_loading(case, sd_adapter, tiny_model_dir, tmp_path, capfd, monkeypatch):
    if case == "in a read-only folder" and os.geteuid() == 0:
        pytest.skip("root writes in read-only folders")
    monkeypatch.setattr("sdtune.models.pretrained.load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    make_out, expected = EXPORT_OUTS[case]
    out = make_out(tmp_path)
    before = digest(sd_adapter, tiny_model_dir, tmp_path)
    code = main(["export", str(sd_adapter), "--model", str(tiny_model_dir), "--out", str(out)])
    errors = error_lines(capfd.readouterr().err)
    assert code == 2 and len(errors) == 1 and errors[0].startswith(f"--out '{out}': ") and expected in errors[0], errors
    assert digest(sd_adapter, tiny_model_dir, tmp_path) == before


# --- an adapter made for another architecture ---------------------------------------------------------------------

ANOTHER_MODEL = "made for another architecture or rank layout: 12 of its tensors do not fit model {model} (e.g. "


@pytest.mark.parametrize("command", ["sample", "evaluate", "export"])
def test_an_adapter_of_another_architecture_is_one_line(command, sdxl_adapter, tiny_model_dir, tmp_path, capfd):
    out = tmp_path / "out"
    before = digest(sdxl_adapter, tiny_model_dir)
    if command == "export":
        args, flag = ["export", str(sdxl_adapter), "--model", str(tiny_model_dir), "--out", str(out)], "SOURCE"
    else:
        args, flag = [command, "--model", str(tiny_model_dir), "--adapter", str(sdxl_adapter), "--prompt", "a red circle",
                      "--steps", "1", "--width", "32", "--height", "32", "--out", str(out)], "--adapter"  # fmt: skip
    code = main(args)
    err = capfd.readouterr().err
    errors = error_lines(err)
    assert code == 2 and len(errors) == 1, err
    shown = sdxl_adapter / "pytorch_lora_weights.safetensors" if command == "export" else sdxl_adapter
    assert errors[0].startswith(f"{flag} {shown}: " + ANOTHER_MODEL.format(model=tiny_model_dir)), errors
    assert "size mismatch" not in err and "[4, 80] in the file, [4, 32] in the model" in errors[0]
    assert not out.exists() or not any(out.iterdir())
    assert digest(sdxl_adapter, tiny_model_dir) == before
