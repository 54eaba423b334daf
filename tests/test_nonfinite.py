"""NonFiniteGuard: a step with NaN/inf gradients is skipped (weights and optimizer moments unchanged) with a warning
naming the batch's files; a run that keeps producing them stops with a one-line error and its checkpoint intact."""

from __future__ import annotations

import pytest
import torch
from test_checkpointing import fit_args
from test_optimization import make_model
from training import fit, make_data, trainable

from sdtune.callbacks import NonFiniteGuard
from sdtune.callbacks.nonfinite import gradients_finite
from sdtune.cli import main
from sdtune.errors import SdtuneError


def test_gradients_finite():
    assert gradients_finite([torch.ones(3), torch.zeros(2, 2)]) and gradients_finite([])
    assert not gradients_finite([torch.ones(3), torch.tensor([1.0, float("nan")])])
    assert not gradients_finite([torch.tensor([float("inf")])])
    assert not gradients_finite([torch.full((4,), 3e38)])  # finite elements whose norm overflows: diverged too


def poisoned(model, bad_steps):
    """The loss is multiplied by NaN at the given (1-based) steps, so their gradients are NaN; weights are
    recorded after every step."""
    step, after = model.training_step, []

    def training_step(batch, batch_idx):
        loss = step(batch, batch_idx)
        return loss * float("nan") if model.trainer.global_step + 1 in bad_steps else loss

    model.training_step = training_step
    model.on_train_batch_end = lambda *args: after.append(trainable(model))
    return after


def test_a_nan_step_is_skipped_and_training_goes_on(tiny_model_dir, shapes_dir, tmp_path):
    model, guard = make_model(tiny_model_dir), NonFiniteGuard()
    after = poisoned(model, {3})
    with pytest.warns(UserWarning, match=r"step 3: NaN or infinite gradients, step skipped \(batch: .*\.png"):
        fit(model, make_data(shapes_dir, tiny_model_dir), 5, tmp_path, callbacks=[guard])
    names = list(after[0])
    assert all(torch.equal(after[2][n], after[1][n]) for n in names)  # step 3 changed nothing
    assert not any(torch.equal(after[3][n], after[2][n]) for n in names if ".lora_B." in n)  # step 4 trained again
    assert all(torch.isfinite(after[4][n]).all() for n in names)
    assert (guard.skipped, guard.in_a_row) == (1, 0)
    moments = model.trainer.optimizers[0].state
    assert all(torch.isfinite(state["exp_avg"]).all() for state in moments.values())


def test_nan_steps_in_a_row_stop_the_run(tiny_model_dir, shapes_dir, tmp_path):
    model = make_model(tiny_model_dir)
    after = poisoned(model, {3, 4, 5, 6})
    stops = r"3 optimizer steps in a row had NaN or infinite gradients \(the last, step 5"
    with pytest.warns(UserWarning, match="step 3"), pytest.raises(SdtuneError, match=stops):
        fit(model, make_data(shapes_dir, tiny_model_dir), 8, tmp_path, callbacks=[NonFiniteGuard(max_in_a_row=3)])
    assert len(after) == 4 and all(torch.equal(after[3][n], after[1][n]) for n in after[1])


def one_error(capsys, *args) -> str:
    """`sdtune fit ARGS` in this process (no interpreter start-up), expected to fail with exit code 2 and exactly one
    `sdtune: error` line and no traceback: that line."""
    code, stderr = main(fit_args(*args)), capsys.readouterr().err
    assert code == 2 and "Traceback" not in stderr, stderr[-2000:]
    errors = [line for line in stderr.splitlines() if line.startswith("sdtune: error")]
    assert len(errors) == 1, stderr[-2000:]
    return errors[0]


@pytest.mark.parametrize("hook", ["nan_at", "explode_at"])
def test_broken_weights_stop_the_run_before_anything_saves_them(hook, tiny_model_dir, shapes_dir, tmp_path, capsys):
    """A NaN weight (its step's gradients are NaN too, so the step is skipped, but the weight stays NaN) or a finite
    weight of 1e6 at step 4 stops the run at that step's end: checkpoints are written every 3 steps, so last.ckpt
    keeps step 3, finite, the error names it, and no adapter is written."""
    run = tmp_path / "run"
    error = one_error(capsys, tiny_model_dir, shapes_dir, run, f"--trainer.callbacks.{hook}", 4)
    found = "NaN or infinite" if hook == "nan_at" else "as large as 1e+06"
    assert f"after step 4 trained weights are {found}" in error
    last = run / "checkpoints" / "last.ckpt"
    assert f"stopped without saving them, the newest checkpoint is {last} (step 3)" in error
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 3 and all(torch.isfinite(t).all() for t in saved["state_dict"].values())
    assert not (run / "adapter").exists()


def test_a_huge_learning_rate_stops_at_its_first_exploded_step(tiny_model_dir, shapes_dir, tmp_path, capsys):
    """lr 1e10: gradients stay finite, but the first step with a non-zero learning rate (warm-up starts at 0) moves
    the weights by about 1e9: the run stops there, nothing is saved."""
    run = tmp_path / "run"
    error = one_error(capsys, tiny_model_dir, shapes_dir, run, "--model.optimizer.init_args.lr", "1e10")
    assert "after step 2 trained weights are as large as" in error and "no checkpoint was written yet" in error
    assert float(error.split("as large as ")[1].split()[0]) > 1e4
    assert not list(run.glob("checkpoints/*.ckpt")) and not (run / "adapter").exists()


def test_no_checkpoint_or_adapter_is_written_with_nan_weights(tmp_path):
    from sdtune.finetune.checkpointing import AtomicCheckpointIO

    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}}, path)
    before = path.read_bytes()
    with pytest.raises(SdtuneError, match=r"not writing .*last.ckpt: 1 weight tensors hold NaN or infinity \(b\)"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2), "b": torch.tensor([float("inf")])}}, path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
