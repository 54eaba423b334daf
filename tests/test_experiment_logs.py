"""What a run logs and how it is read: TensorBoard, W&B (offline) and MLflow (a file store) at once, each with the
scalars and the sample grids; a logger whose extra is missing; and `sdtune report`'s page in a real headless browser."""

import base64
import io
import json
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdtune.cli import main

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
NEEDS_BROWSER = pytest.mark.skipif(BROWSER is None, reason="no headless browser: install Debian's `chromium` package")


def pixels(data):
    return np.asarray(Image.open(io.BytesIO(data) if isinstance(data, bytes) else data).convert("RGB"))


@pytest.fixture(scope="module")
def logged_run(tiny_model_dir, shapes_dir, tmp_path_factory):
    """A 4-step run logging to TensorBoard, W&B (offline) and MLflow (a file store), with sample grids at steps 0, 2
    and 4 and a validation loss every 2 steps."""
    root = tmp_path_factory.mktemp("logged")
    run, tracking = root / "run", f"file:{root / 'mlruns'}"
    with pytest.MonkeyPatch.context() as env:
        # Nothing leaves the machine: W&B offline without error reports, MLflow on files (which MLflow 3 takes only
        # when allowed) without telemetry; and W&B's service process gets a bounded time to start.
        for name, value in {"WANDB_MODE": "offline", "WANDB_ERROR_REPORTING": "false", "WANDB_SILENT": "true",
                            "WANDB_INIT_TIMEOUT": "60", "WANDB_DIR": str(root), "MLFLOW_DISABLE_TELEMETRY": "true",
                            "MLFLOW_ALLOW_FILE_STORE": "true", "DO_NOT_TRACK": "1"}.items():  # fmt: skip
            env.setenv(name, value)
        code = main([
            "fit", "--config", "tiny/lora", "--model.pretrained", str(tiny_model_dir), "--data.root", str(shapes_dir),
            "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar", "false", "--trainer.max_steps", "4",
            "--trainer.log_every_n_steps", "1", "--data.resolution", "32", "--data.batch_size", "2",
            "--data.val_fraction", "0.25", "--trainer.val_check_interval", "2", "--trainer.check_val_every_n_epoch", "null",
            "--checkpoint.every_n_train_steps", "2", "--samples.steps", "2", "--samples.width", "32", "--samples.height", "32",
            "--trainer.logger+=WandbLogger", "--trainer.logger.project", "sdtune-test", "--trainer.logger.save_dir", str(root),
            "--trainer.logger.offline", "true",
            "--trainer.logger+=MLFlowLogger", "--trainer.logger.tracking_uri", tracking,
            "--trainer.logger.experiment_name", "sdtune-test",
        ])  # fmt: skip
    assert code == 0
    return run, root, tracking


def tensorboard_scalars(run):
    from sdtune.report.run import read_scalars

    return read_scalars(run / "logs")


def grid_png(run, step):
    return pixels(run / "samples" / f"step_{step:06d}" / "grid.png")


def wandb_records(file):
    """The records of a W&B transaction log (`run-*.wandb`): LevelDB's log format after a 7-byte `:W&B` header, in
    32 KiB blocks of chunks (crc32, length, type: 1 full, 2 first, 3 middle, 4 last), each record a protobuf."""
    data, block, records, pending = file.read_bytes(), 32768, [], b""
    assert data[:4] == b":W&B"
    position = 7
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a chunk header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0:  # zeros: the unwritten end
            break
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            records.append(pending)
            pending = b""
    return records


def wandb_history(run_folder):
    """The rows an offline W&B run logged, from its transaction log parsed with wandb's own protobuf classes."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for data in wandb_records(next(run_folder.glob("*.wandb"))):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return rows


def test_scalars_and_sample_grids_reach_wandb_and_mlflow_too(logged_run):
    from mlflow.tracking import MlflowClient

    run, root, tracking = logged_run
    scalars = tensorboard_scalars(run)
    loss = scalars["train/loss"]
    assert len(loss) == 4 and len(scalars["val/loss"]) == 2 and [step for step, _ in scalars["samples/seconds"]] == [0, 2, 4]

    # W&B: one offline run whose history holds every loss value and the grid of each sampled step.
    (run_folder,) = (root / "wandb").glob("offline-run-*")
    history = wandb_history(run_folder)
    logged = [row["train/loss"] for row in history if "train/loss" in row]
    assert logged == pytest.approx([value for _, value in loss], rel=1e-6)
    images = {row["trainer/global_step"]: row for row in history if "samples/filenames" in row}  # log_image's list
    assert sorted(images) == [0, 2, 4]
    for step, image in images.items():
        assert image["samples/_type"] == "images/separated" and len(image["samples/filenames"]) == 1
        assert np.array_equal(pixels(run_folder / "files" / image["samples/filenames"][0]), grid_png(run, step))

    # MLflow: the same scalars as metric histories, the grids as an image series by step.
    client = MlflowClient(tracking)
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("sdtune-test").experiment_id])
    history = client.get_metric_history(mlflow_run.info.run_id, "train/loss")
    assert [metric.value for metric in history] == pytest.approx([value for _, value in loss], rel=1e-6)
    assert len(client.get_metric_history(mlflow_run.info.run_id, "val/loss")) == 2
    assert mlflow_run.info.status == "FINISHED"
    grids = mlflow_images(client, mlflow_run.info.run_id, root / "mlflow-images")
    assert sorted(grids) == [0, 2, 4]
    for step, file in grids.items():
        assert np.array_equal(pixels(file), grid_png(run, step))


def mlflow_images(client, run_id, into):
    """{step: PNG file} of the run's `samples` image series, downloaded from its artifacts."""
    found = {}
    for artifact in client.list_artifacts(run_id, "images"):
        name = Path(artifact.path).name
        match = re.match(r"samples[+%]step[+%](\d+)[+%]timestamp[+%]\d+[+%][0-9a-f-]+\.png$", name)  # older MLflow: %
        if match:
            found[int(match.group(1))] = Path(client.download_artifacts(run_id, artifact.path, str(into)))
    return found


def test_a_logger_without_its_extra_is_one_line_before_training(tiny_model_dir, shapes_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sdtune.commands.preflight.find_spec", lambda name: None if name == "wandb" else object())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    code = main(["fit", "--config", "tiny/lora", "--model.pretrained", str(tiny_model_dir), "--data.root", str(shapes_dir),
                 "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.logger+=WandbLogger",
                 "--trainer.logger+=MLFlowLogger"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == ["sdtune: error: trainer.logger: WandbLogger needs the wandb package: pip install 'sdtune[wandb]'"]
    assert not (tmp_path / "run").exists()


def test_mlflow_on_a_folder_it_refuses_is_one_line_before_training(tiny_model_dir, shapes_dir, tmp_path, capsys, monkeypatch):
    """MLflow 3 refuses a local folder store (Lightning's default ./mlruns) without MLFLOW_ALLOW_FILE_STORE; a server
    URI is taken."""
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", "tiny/lora", "--model.pretrained", str(tiny_model_dir), "--data.root", str(shapes_dir),
            "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.logger+=MLFlowLogger", "--print_config"]
    code = main(args[:-1])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == ["sdtune: error: trainer.logger: MLflow refuses the local folder file:./mlruns as its store unless "
                   "MLFLOW_ALLOW_FILE_STORE=true is set; set it, or give --trainer.logger.tracking_uri "
                   "http://your-mlflow-server"]
    assert not (tmp_path / "run").exists() and not (tmp_path / "mlruns").exists()
    from sdtune.commands.preflight import _mlflow_store_problems

    assert _mlflow_store_problems({"tracking_uri": "http://localhost:5000"}) == []
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert _mlflow_store_problems({}) == []


# --- sdtune report ----------------------------------------------------------------------------------------------------


def headless(page: Path, *flags: str) -> subprocess.CompletedProcess:
    """Chromium on `page` with no network: stdout is what `flags` ask for, stderr its log with the console's messages."""
    command = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
               "--host-resolver-rules=MAP * ~NOTFOUND", "--enable-logging=stderr", "--v=0",
               "--virtual-time-budget=5000", *flags, page.as_uri()]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": str(page.parent)})


def console_messages(log: str) -> list[str]:
    return [line for line in log.splitlines() if re.search(r":CONSOLE[(:]", line)]


@NEEDS_BROWSER
def test_console_messages_are_seen(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<!doctype html><body><script>undefined_function()</script></body>")
    messages = console_messages(headless(page, "--dump-dom").stderr)
    assert any("undefined_function" in message for message in messages), messages


@NEEDS_BROWSER
def test_report_page_shows_every_grid_in_a_browser(logged_run, tmp_path, capsys):
    run, _, _ = logged_run
    out = tmp_path / "report.html"
    assert main(["report", str(run), "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out} (3 sample grids,")
    text = out.read_text()
    assert not re.search(r"""(src|href)=['"]?(https?:)?//""", text)  # nothing fetched

    dom = headless(out, "--dump-dom")
    assert dom.returncode == 0 and not console_messages(dom.stderr), console_messages(dom.stderr)
    body = re.search(r"<body([^>]*)>", dom.stdout).group(1)
    assert 'data-grids="3"' in body and 'data-grids-decoded="3"' in body
    screenshot = tmp_path / "report.png"
    shot = headless(out, f"--screenshot={screenshot}", "--window-size=1200,1600", "--hide-scrollbars")
    assert shot.returncode == 0 and Image.open(screenshot).size == (1200, 1600)
    print(f"screenshot: {screenshot}")

    # The page's grids are the run's, byte for byte; its curves have the logged number of points.
    inline = re.findall(r"src='data:image/png;base64,([^']+)'", text)
    assert [pixels(base64.b64decode(data)).tobytes() for data in inline] == [grid_png(run, s).tobytes() for s in (0, 2, 4)]
    loss = re.search(r"<figcaption>train/loss</figcaption>.*?points='([^']*)'", text).group(1)
    assert len(loss.split()) == len(tensorboard_scalars(run)["train/loss"]) == 4
    assert "Lowest:" in text and "adapter/pytorch_lora_weights.safetensors" in text and "kohya" in text


def test_report_of_a_run_without_logs_or_samples_and_of_other_folders(tmp_path, capsys):
    run = tmp_path / "starting"
    run.mkdir()
    (run / "config.yaml").write_text("model:\n  class_path: sdtune.finetune.LoRAFineTune\n")
    assert main(["report", str(run)]) == 0
    text = (run / "report.html").read_text()
    assert "No logs yet" in text and "No sample grids yet" in text and "No validation loss" in text
    assert "No adapter/ or model/ written yet" in text
    capsys.readouterr()
    # Lightning's `epoch` alone (a run shorter than its logging interval) is no curve, in the page and in the count.
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(run / "logs") as writer:
        writer.add_scalar("epoch", 0.0, 1)
    assert main(["report", str(run)]) == 0
    assert "(0 sample grids, 0 curves, 0 files)" in capsys.readouterr().out
    assert "No curves yet: logs/ holds only epoch" in (run / "report.html").read_text()

    assert main(["report", str(tmp_path / "missing")]) == 2
    assert main(["report", str(tmp_path)]) == 2
    assert main(["report", str(run), "--out", str(run / "config.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"sdtune: error: {tmp_path / 'missing'} is not a folder; give the run directory of `sdtune fit` (its trainer.default_root_dir)",
        f"sdtune: error: {tmp_path} is not an sdtune run directory (no config.yaml with a model section)",
        f"sdtune: error: --out {run / 'config.yaml'}: the page is written to a .html file; give a name ending in .html",
    ]
    assert (run / "config.yaml").read_text().startswith("model:")  # the run's files are never written over
