"""Crash-safe checkpoints and exact resume: a run SIGKILLed mid-epoch and restarted with `--ckpt_path last` ends
bit-identical to one never interrupted; a checkpoint is written whole or not at all; a damaged last checkpoint is
skipped on resume."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdtune.errors import SdtuneError
from sdtune.finetune.checkpointing import AtomicCheckpointIO, checkpoint_problem, pick_resume_checkpoint

TESTS = Path(__file__).parent


def save(path: Path, value: float = 1.0) -> Path:
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.full((64, 64), value)}, "global_step": 3}, path)
    return path


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# --- the checkpoint file --------------------------------------------------------------------------------------


def test_a_complete_checkpoint_passes_and_damaged_ones_say_why(tmp_path):
    good = save(tmp_path / "good.ckpt")
    assert checkpoint_problem(good) is None
    assert torch.load(good, weights_only=True)["global_step"] == 3
    cut = save(tmp_path / "cut.ckpt")
    truncate(cut)
    assert "not a complete checkpoint" in checkpoint_problem(cut)
    flipped = save(tmp_path / "flipped.ckpt")
    data = bytearray(flipped.read_bytes())
    data[len(data) // 3] ^= 0xFF  # one flipped byte inside the tensor data
    flipped.write_bytes(bytes(data))
    assert checkpoint_problem(flipped) is not None
    (tmp_path / "empty.ckpt").write_bytes(b"")
    assert checkpoint_problem(tmp_path / "empty.ckpt") == "the file is empty"
    assert checkpoint_problem(tmp_path / "absent.ckpt") == "the file does not exist"


def test_a_write_that_fails_leaves_the_previous_checkpoint_and_no_partial_file(tmp_path, monkeypatch):
    path = save(tmp_path / "last.ckpt", 1.0)
    before = path.read_bytes()

    def dies_half_way(obj, handle):
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="No space left"):
        save(path, 2.0)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_a_written_file_that_fails_its_check_is_not_renamed(tmp_path, monkeypatch):
    path = save(tmp_path / "last.ckpt", 1.0)
    before = path.read_bytes()
    monkeypatch.setattr("sdtune.finetune.checkpointing.checkpoint_problem", lambda p: "a checksum does not match (data/0)")
    with pytest.raises(SdtuneError, match="failed its check after writing"):
        save(path, 2.0)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_resume_takes_the_newest_complete_checkpoint(tmp_path):
    older = save(tmp_path / "epoch=0-step=2.ckpt")
    newest = save(tmp_path / "last.ckpt")
    os.utime(older, (1_000_000, 1_000_000))
    assert pick_resume_checkpoint(tmp_path) == newest
    truncate(newest)
    with pytest.warns(UserWarning, match=r"last.ckpt is damaged \(not a complete checkpoint.*resuming from epoch=0-step=2.ckpt"):
        assert pick_resume_checkpoint(tmp_path) == older
    truncate(older)
    with pytest.raises(SdtuneError, match="no usable checkpoint"):
        pick_resume_checkpoint(tmp_path)
    assert pick_resume_checkpoint(tmp_path / "nothing-here") is None


# --- through the CLI ------------------------------------------------------------------------------------------


def fit_args(tiny_model_dir, shapes_dir, run: Path, *extra) -> list[str]:
    """`sdtune fit` for 7 steps of 2 images (4 batches an epoch), random crops and flips, a checkpoint every 3 steps
    (mid-epoch: after 3 of epoch 0's 4 batches); every step's loss and batch recorded in run/steps.jsonl."""
    args = ["fit", "--config", "tiny/lora", "--model.pretrained", tiny_model_dir, "--data.root", shapes_dir,
            "--data.resolution", 32, "--data.batch_size", 2, "--data.center_crop", "false", "--data.random_flip", "true",
            "--trainer.max_steps", 7, "--checkpoint.every_n_train_steps", 3, "--trainer.default_root_dir", run,
            "--trainer.enable_progress_bar", "false", "--trainer.callbacks+", "step_hooks.StepHooks",
            "--trainer.callbacks.record", run / "steps.jsonl", *extra]  # fmt: skip
    return [str(arg) for arg in args]


def fit(tiny_model_dir, shapes_dir, run: Path, *extra, check: bool = True, max_file_bytes: int = 0) -> subprocess.CompletedProcess:
    """`fit_args`'s run in its own process: for the tests of what signals, kills and a full disk do to a process."""
    args = fit_args(tiny_model_dir, shapes_dir, run, *extra)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    # A file-size limit makes larger writes fail as a full disk would (EFBIG; Python ignores SIGXFSZ).
    limit = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))) if max_file_bytes else None
    result = subprocess.run([sys.executable, "-m", "sdtune.cli", *args], capture_output=True, text=True,
                            env=env, timeout=600, preexec_fn=limit)  # fmt: skip
    if check and result.returncode != 0:
        raise AssertionError(f"fit exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def steps(run: Path) -> dict[int, dict]:
    """The last record of each step (a resumed run records the steps after its checkpoint again)."""
    return {row["step"]: row for row in map(json.loads, (run / "steps.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def whole(tiny_model_dir, shapes_dir, tmp_path_factory) -> Path:
    """The uninterrupted run the interrupted ones are compared with."""
    run = tmp_path_factory.mktemp("whole")
    fit(tiny_model_dir, shapes_dir, run)
    return run


def test_a_sigkilled_run_resumed_from_last_ends_bit_identical(tiny_model_dir, shapes_dir, tmp_path, whole):
    killed = fit(tiny_model_dir, shapes_dir, tmp_path / "killed", "--trainer.callbacks.kill_after", 5, check=False)
    assert killed.returncode == -signal.SIGKILL
    assert sorted(steps(tmp_path / "killed")) == [1, 2, 3, 4, 5]
    resumed = fit(tiny_model_dir, shapes_dir, tmp_path / "killed", "--ckpt_path", "last")
    assert "resuming after optimizer step 3 (epoch 0)" in resumed.stderr, resumed.stderr[-2000:]
    assert "data: epoch 0 continues after its first 3 batches" in resumed.stderr

    expected, again = steps(whole), steps(tmp_path / "killed")
    assert sorted(again) == list(range(1, 8))
    assert [again[s]["paths"] for s in again] == [expected[s]["paths"] for s in expected]  # the same batches, in order
    assert [again[s]["loss"] for s in again] == [expected[s]["loss"] for s in expected]  # bit-identical losses
    adapters = [load_file(run / "adapter" / "pytorch_lora_weights.safetensors") for run in (whole, tmp_path / "killed")]
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_sigterm_and_ctrl_c_save_a_checkpoint_and_exit_cleanly(name, tiny_model_dir, shapes_dir, tmp_path, whole):
    run = tmp_path / "stopped"
    stopped = fit(tiny_model_dir, shapes_dir, run, "--trainer.callbacks.signal_after", 5,
                  "--trainer.callbacks.signal_name", name, check=False)  # fmt: skip
    number = getattr(signal, name)
    assert stopped.returncode == 128 + number, stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr
    assert f"{name}: stopped after optimizer step 5 and saved" in stopped.stderr
    assert sorted(steps(run)) == [1, 2, 3, 4, 5]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 5
    resumed = fit(tiny_model_dir, shapes_dir, run, "--ckpt_path", "last")
    assert "resuming after optimizer step 5 (epoch 1)" in resumed.stderr
    assert "data: epoch 1 continues after its first 1 batches" in resumed.stderr
    expected, again = steps(whole), steps(run)
    assert [again[s]["loss"] for s in sorted(again)] == [expected[s]["loss"] for s in sorted(expected)]
    adapters = [load_file(r / "adapter" / "pytorch_lora_weights.safetensors") for r in (whole, run)]
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])


@pytest.mark.parametrize(
    "first, stop",
    [(4, "max_steps"), (4, "SIGINT")],
    ids=["ended-at-an-epoch-end", "ctrl-c-on-an-epochs-last-batch"],
)
def test_a_run_saved_only_when_it_stopped_continues_bit_identical(first, stop, tiny_model_dir, shapes_dir, tmp_path, whole):
    """No step checkpoint before the stop (every 30 steps), so last.ckpt is the one written when the epoch loop or
    the run had ended: extending the run (a raised max_steps) or resuming after Ctrl+C on an epoch's last batch
    trains steps 5-7 on the batches and noise of an unbroken run, in the same epochs."""
    run, rare = tmp_path / "run", ("--checkpoint.every_n_train_steps", 30)
    if stop == "max_steps":
        fit(tiny_model_dir, shapes_dir, run, "--trainer.max_steps", first, *rare)
    else:
        stopped = fit(tiny_model_dir, shapes_dir, run, *rare, "--trainer.callbacks.signal_after", first,
                      "--trainer.callbacks.signal_name", stop, check=False)  # fmt: skip
        assert stopped.returncode == 128 + signal.SIGINT, stopped.stderr[-2000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == first
    fit(tiny_model_dir, shapes_dir, run, "--ckpt_path", "last", *rare)
    expected, again = steps(whole), steps(run)
    assert [again[s]["paths"] for s in sorted(again)] == [expected[s]["paths"] for s in sorted(expected)]
    assert [again[s]["loss"] for s in sorted(again)] == [expected[s]["loss"] for s in sorted(expected)]
    adapters = [load_file(r / "adapter" / "pytorch_lora_weights.safetensors") for r in (whole, run)]
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
    saved = [torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)]
    assert saved[0]["global_step"] == 7  # the end of the extended run is saved too


def test_resume_skips_a_damaged_last_checkpoint(tiny_model_dir, shapes_dir, tmp_path):
    run = tmp_path / "run"
    fit(tiny_model_dir, shapes_dir, run, "--trainer.max_steps", 4)
    last = run / "checkpoints" / "last.ckpt"
    others = [p for p in (run / "checkpoints").glob("*.ckpt") if p != last]
    assert len(others) == 1 and checkpoint_problem(last) is None
    truncate(last, 0.3)
    resumed = fit(tiny_model_dir, shapes_dir, run, "--trainer.max_steps", 6, "--ckpt_path", "last")
    assert "last.ckpt is damaged" in resumed.stderr and f"resuming from {others[0].name} instead" in resumed.stderr
    assert "exists and is not empty" not in resumed.stderr  # Lightning's warning for fresh runs, not resumes
    assert "resuming after optimizer step 3" in resumed.stderr
    assert checkpoint_problem(last) is None  # rewritten whole by the resumed run
    assert torch.load(last, weights_only=False)["global_step"] == 6


def test_random_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    from sdtune.finetune.rng_state import gather_states, restore_states

    generator = torch.Generator().manual_seed(1)
    torch.randn(3, generator=generator)
    path = save(tmp_path / "rng.ckpt")
    AtomicCheckpointIO().save_checkpoint({"rng": gather_states(generator)}, path)
    expected = (torch.randn(4, generator=generator), torch.rand(4), np.random.rand(4), random.random())
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    saved = torch.load(path, weights_only=True)["rng"]  # plain tensors and numbers only
    state = restore_states(saved, rank=0, world_size=1)
    again = torch.Generator().set_state(state)
    assert torch.equal(torch.randn(4, generator=again), expected[0]) and torch.equal(torch.rand(4), expected[1])
    assert np.array_equal(np.random.rand(4), expected[2]) and random.random() == expected[3]
    with pytest.warns(UserWarning, match="written by 1 process"):
        assert restore_states(saved, rank=0, world_size=2) is None


def test_older_checkpoints_are_pruned_only_after_the_new_one_passed(tiny_model_dir, shapes_dir, tmp_path, monkeypatch):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from test_optimization import make_model
    from training import make_data

    folder = tmp_path / "checkpoints"
    checks = []

    def fails_at_step_two(path):
        checks.append(path)
        return "a checksum does not match (data/7)" if len(checks) == 3 else None  # step 1: top-k + last; step 2

    monkeypatch.setattr("sdtune.finetune.checkpointing.checkpoint_problem", fails_at_step_two)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, plugins=[AtomicCheckpointIO()],
                        callbacks=[ModelCheckpoint(dirpath=folder, every_n_train_steps=1, save_top_k=1, save_last=True)])  # fmt: skip
    with pytest.raises(SdtuneError, match="failed its check after writing"):
        trainer.fit(make_model(tiny_model_dir), make_data(shapes_dir, tiny_model_dir))
    # step 2's top-k file failed: step 1's files are still there and complete, and nothing half-written is left
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=0-step=1.ckpt", "last.ckpt"]
    assert torch.load(folder / "last.ckpt", weights_only=False)["global_step"] == 1


def test_a_stop_signal_checkpoints_first_and_samples_nothing(tiny_model_dir, shapes_dir, tmp_path):
    """SIGTERM after step 3, the step where a checkpoint is due and samples are due (every 3 steps and at every
    checkpoint): the checkpoint is written, no grid is rendered, the run exits with 128 + SIGTERM."""
    run = tmp_path / "run"
    stopped = fit(tiny_model_dir, shapes_dir, run, "--samples.enabled", "true", "--samples.before_training", "false",
                  "--samples.every_n_train_steps", 3, "--samples.steps", 2, "--trainer.callbacks.signal_after", 3,
                  check=False)  # fmt: skip
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    assert stopped.stderr.count("samples: none at step 3, the run is stopping on a signal") == 1
    assert not (run / "samples").exists()
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


def test_a_disk_that_refuses_a_checkpoint_is_one_line_and_the_next_start_cleans_up(tiny_model_dir, shapes_dir, tmp_path):
    """A resumed run whose next checkpoint cannot be written (a file-size limit below its size: EFBIG, as a full disk
    gives ENOSPC) stops with one line naming the file, the newest checkpoint and how to continue; it stays intact
    and nothing half-written is left. A `.partial` file a killed save left behind is removed when a run starts."""
    run = tmp_path / "run"
    fit(tiny_model_dir, shapes_dir, run, "--trainer.max_steps", 3)
    last = run / "checkpoints" / "last.ckpt"
    before, size = last.read_bytes(), last.stat().st_size
    (run / "checkpoints" / ".last.ckpt.partial").write_bytes(before[: size // 2])  # as a SIGKILL mid-save leaves it
    full = fit(tiny_model_dir, shapes_dir, run, "--ckpt_path", "last", check=False, max_file_bytes=size // 2)
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr[-3000:]
    assert f"removed 1 unfinished checkpoint files left by an earlier run in {run / 'checkpoints'}" in full.stderr
    (error,) = [line for line in full.stderr.splitlines() if line.startswith("sdtune: error")]
    assert "could not write checkpoint" in error and "File too large" in error, error
    assert f"the newest checkpoint is {last} (step 3)" in error and "--ckpt_path last to continue" in error
    assert last.read_bytes() == before and not list(run.glob("checkpoints/.*.partial"))
