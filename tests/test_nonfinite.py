"""NonFiniteGuard: a step with NaN/inf gradients is skipped (weights and optimizer moments unchanged) with a warning
naming the batch's files; a run that keeps producing them stops with a one-line error and its checkpoint intact."""

from __future__ import annotations

import pytest
import torch
from test_checkpointing import fit as fit_cli
from test_optimization import make_model
from training import fit, make_data, trainable

from sdtune.callbacks import NonFiniteGuard
from sdtune.callbacks.nonfinite import gradients_finite
from sdtune.errors import SdtuneError
from sdtune.finetune.checkpointing import checkpoint_problem


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


def test_a_diverged_run_stops_through_the_cli_with_its_checkpoint_intact(tiny_model_dir, shapes_dir, tmp_path):
    run = tmp_path / "run"
    result = fit_cli(tiny_model_dir, shapes_dir, run, "--trainer.callbacks.nan_at", 4, "--nonfinite.max_in_a_row", 2, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("sdtune: error")]
    assert len(errors) == 1 and "2 optimizer steps in a row had NaN or infinite gradients (the last, step 5" in errors[0]
    assert "Traceback" not in result.stderr
    last = run / "checkpoints" / "last.ckpt"
    assert checkpoint_problem(last) is None
    saved = torch.load(last, weights_only=False)
    assert saved["global_step"] == 3 and all(torch.isfinite(t).all() for t in saved["state_dict"].values())
