"""With validation on: the adapters of the best validations kept beside `adapter/`, and early stopping, both with
their state carried over by `--ckpt_path last`."""


import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sdtune.cli import main

# Added to the real validation loss at steps 1, 2, …: best at step 2, then no improvement.
OFFSETS = [0.3, 0.1, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8]
KEEP, PATIENCE = 2, 2


def fit(tiny_model_dir, shapes_dir, run, max_steps, *flags):
    return main([
        "fit", "--config", "tiny/lora", "--model.class_path", "scripted_validation.ScriptedValidationLoss",
        "--model.init_args.val_offsets", str(OFFSETS), "--model.pretrained", str(tiny_model_dir),
        "--data.root", str(shapes_dir), "--trainer.default_root_dir", str(run), "--trainer.max_steps", str(max_steps),
        "--data.resolution", "32", "--data.batch_size", "2", "--data.val_fraction", "0.25",
        "--samples.enabled", "false",
        "--trainer.val_check_interval", "1", "--trainer.check_val_every_n_epoch", "null",
        "--trainer.enable_progress_bar", "false", "--best_adapters.keep", str(KEEP),
        "--early_stopping.patience", str(PATIENCE), *flags,
    ])  # fmt: skip


def validation_losses(run) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "logs"), size_guidance={"scalars": 0})
    events.Reload()
    return [event.value for event in events.Scalars("val/loss")]


def predicted_stop(losses: list[float]) -> int:
    """The 1-based validation at which PATIENCE validations in a row have not beaten the best before them."""
    best, waited = float("inf"), 0
    for i, loss in enumerate(losses, 1):
        best, waited = (loss, 0) if loss < best else (best, waited + 1)
        if waited >= PATIENCE:
            return i
    raise AssertionError(f"no early stop in {losses}")


def best_folders(run) -> list[str]:
    return sorted(p.name for p in (run / "adapter").iterdir() if p.is_dir())


def test_keeps_the_best_adapters_and_stops_when_validation_stops_improving(
    tiny_model_dir, shapes_dir, tmp_path, caplog
):
    run = tmp_path / "run"
    (run / "adapter" / "best_step000001_loss9.0000").mkdir(parents=True)  # not written by this run: left alone
    assert fit(tiny_model_dir, shapes_dir, run, len(OFFSETS)) == 0

    losses = validation_losses(run)  # one a step, each after its optimizer step
    stop = predicted_stop(losses)
    assert stop < len(OFFSETS) and len(losses) == stop
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == stop
    stopped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("early stopping:")]
    assert stopped == [
        f"early stopping: val/loss has not gone below its best, {min(losses[:stop]):.4f}, by more than 0 "
        f"in {PATIENCE} validations; the run ends after optimizer step {stop}"
    ]

    best = sorted(range(1, stop + 1), key=lambda step: losses[step - 1])[:KEEP]
    kept = [f"best_step{step:06d}_loss{losses[step - 1]:.4f}" for step in best]
    assert best_folders(run) == sorted([*kept, "best_step000001_loss9.0000"])
    for name in kept:  # each a whole adapter: the diffusers file and the kohya file, named by step and loss
        assert load_file(run / "adapter" / name / "pytorch_lora_weights.safetensors")
        assert load_file(run / "adapter" / name / f"run-{name}.safetensors")
    assert (run / "adapter" / "pytorch_lora_weights.safetensors").is_file()  # the last adapter, as always
    out = tmp_path / "best.safetensors"  # exported, a kept adapter says its own step
    assert main(["export", str(run / "adapter" / kept[0]), "--format", "kohya", "--out", str(out)]) == 0
    with safe_open(out, "pt") as exported:
        assert exported.metadata()["ss_steps"] == str(best[0])
    # Written: each validation that was among the best so far; removed: those pushed out again.
    written = [s for s in range(1, stop + 1) if sum(loss < losses[s - 1] for loss in losses[: s - 1]) < KEEP]
    removed = [r.getMessage().split()[1] for r in caplog.records if r.getMessage().startswith("removed ")]
    folder = run.resolve() / "adapter"
    assert removed == [str(folder / f"best_step{s:06d}_loss{losses[s - 1]:.4f}") for s in written if s not in best]

    # Stopped one validation before the end and resumed: the same folders, the same early stop.
    resumed = tmp_path / "resumed"
    assert fit(tiny_model_dir, shapes_dir, resumed, stop - 1) == 0
    caplog.clear()
    assert fit(tiny_model_dir, shapes_dir, resumed, len(OFFSETS), "--ckpt_path", "last") == 0
    assert validation_losses(resumed) == losses
    assert best_folders(resumed) == sorted(kept)
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("early stopping:")] == stopped
