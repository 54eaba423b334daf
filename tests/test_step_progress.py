"""`sdtune fit`'s progress line: optimizer steps against the run's total, speed, time left, loss and lr."""

import io
import math
import re
from types import SimpleNamespace

import pytest
import torch

from sdtune.callbacks import step_progress
from sdtune.callbacks.step_progress import StepProgress, format_duration, format_rate, progress_line
from sdtune.cli import main

LINE = re.compile(r"^step (\d+)/(\d+) \| [\d.]+ (?:it/s|s/it) \| ETA [\d:]+ \| loss [\d.]+ \| lr [\d.e+-]+$")


def test_rate_switches_to_seconds_per_step_below_one_a_second_and_eta_follows_it():
    assert format_rate(10, 4.0) == "2.50 it/s"
    assert format_rate(5, 16.0) == "3.20 s/it"
    assert format_rate(0, 0.0) == "? it/s"
    assert format_duration(75) == "1:15" and format_duration(4015) == "1:06:55"
    # 5 steps took 16 s since this fit started at step 35: 60 steps left at 3.2 s each.
    line = progress_line(40, 100, 5, 16.0, loss=0.123456, lr=1e-4)
    assert line == f"step 40/100 | 3.20 s/it | ETA {format_duration(60 * 3.2)} | loss 0.1235 | lr 1.0e-04"
    assert progress_line(3, math.inf, 3, 1.0) == "step 3 | 3.00 it/s"  # an endless run has no total, no ETA


def test_a_log_gets_the_first_and_last_step_and_a_line_at_most_every_interval(monkeypatch, capsys):
    now = [0.0]
    monkeypatch.setattr(step_progress, "time", SimpleNamespace(monotonic=lambda: now[0]))
    trainer = SimpleNamespace(global_step=0, estimated_stepping_batches=100, progress_bar_metrics={}, optimizers=[])
    progress = StepProgress(interval_seconds=30)
    progress.on_train_start(trainer, None)
    progress.on_train_batch_start()
    for batch in range(1, 201):  # 2 batches an optimizer step, 1 s each
        now[0], trainer.global_step = float(batch), batch // 2
        progress.on_train_batch_end(trainer, None)
    lines = capsys.readouterr().err.splitlines()  # not a terminal
    assert [int(line.split()[1].split("/")[0]) for line in lines] == [1, 16, 31, 46, 61, 76, 91, 100]
    assert lines[1] == f"step 16/100 | 2.00 s/it | ETA {format_duration(84 * 2)}"


def fit(tiny_model_dir, shapes_dir, run, *flags):
    code = main([
        "fit", "--config", "tiny/lora", "--model.pretrained", str(tiny_model_dir), "--data.root", str(shapes_dir),
        "--trainer.default_root_dir", str(run), "--data.resolution", "32", "--data.batch_size", "2",
        "--trainer.accumulate_grad_batches", "2", "--samples.enabled", "false", *flags,
    ])  # fmt: skip
    assert code == 0
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]


@pytest.mark.parametrize("budget", ["max_steps", "max_epochs"])
def test_fit_counts_optimizer_steps_against_the_runs_total(budget, tiny_model_dir, shapes_dir, tmp_path, capsys):
    batches_per_epoch = math.ceil(len(list(shapes_dir.glob("*.png"))) / 2)
    if budget == "max_steps":
        total, flags = 3, ["--trainer.max_steps", "3"]
    else:  # no max_steps: epochs × optimizer steps an epoch (a last short accumulation still steps)
        total, flags = 2 * math.ceil(batches_per_epoch / 2), ["--trainer.max_steps", "-1", "--trainer.max_epochs", "2"]
    steps = fit(tiny_model_dir, shapes_dir, tmp_path / "run", *flags)
    assert steps == total
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("step ")]
    # Not a terminal: the first and the last step, each one line (the 30 s interval is not reached).
    assert [LINE.match(line).groups() for line in lines] == [("1", str(total)), (str(total), str(total))], lines
    assert "Epoch" not in err and "/-" not in err  # no batch-per-epoch bar of Lightning's


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_passes_before_training_show_bars_too(tiny_model_dir, shapes_dir, tmp_path, monkeypatch):
    """Reading the image headers, hashing them for the cache and filling it each show a bar; then the step line."""
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    steps = fit(tiny_model_dir, shapes_dir, tmp_path / "run", "--trainer.max_steps", "1",
                "--data.cache", "true", "--data.cache_dir", str(tmp_path / "cache"))  # fmt: skip
    shown = terminal.getvalue()
    assert steps == 1
    images = len(list(shapes_dir.glob("*.png")))
    totals = {bar: re.findall(rf"{bar}:\s+\d+%\|[^|]*\| \d+/(\d+) ", shown) for bar in
              ("reading image headers", "hashing images for the cache", "caching latents and text")}  # fmt: skip
    assert totals["reading image headers"][0] == totals["hashing images for the cache"][0] == str(images), totals
    assert int(totals["caching latents and text"][0]) > images, totals  # latents (and flips) and captions
    assert re.search(r"\rstep 1/1 \| ", shown)
