"""Validation loss: fixed noise and timesteps per sample, so it compares like with like and can pick checkpoints."""

from functools import partial

import lightning as L
import pytest
import torch

from sdtune.adapters.lora import LoraSettings
from sdtune.cli import main
from sdtune.data import CaptionDataModule
from sdtune.data.dataset import derive_seed
from sdtune.finetune import LoRAFineTune, LRSchedule


def make_model(tiny_model_dir):
    return LoRAFineTune(str(tiny_model_dir), lora=LoraSettings(rank=4, alpha=8.0),
                        optimizer=partial(torch.optim.AdamW, lr=1e-3), lr_schedule=LRSchedule(name="constant"))  # fmt: skip


def test_validation_loss_is_fixed_per_sample_and_unlike_a_training_draw(tiny_model_dir, shapes_dir):
    model = make_model(tiny_model_dir)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)

    def validate(batch_size: int) -> tuple[float, CaptionDataModule]:
        data = CaptionDataModule(str(shapes_dir), resolution=32, batch_size=batch_size, val_fraction=0.25,
                                 pretrained=str(tiny_model_dir), seed=0)  # fmt: skip
        return trainer.validate(model, data, verbose=False)[0]["val/loss"], data

    first, data = validate(1)
    torch.manual_seed(1234)  # global randomness and the module's own training generator move on …
    torch.rand(10, generator=model._rng())
    assert validate(1)[0] == first  # … and validation does not notice: same weights, same number
    # Each sample has its own draws, so the batch size does not change the number either.
    assert validate(2)[0] == pytest.approx(first, rel=1e-6)

    batches = list(data.val_dataloader())
    assert len(batches) == 2  # 2 of 8 images held out, one per batch
    with torch.no_grad():
        fixed = [
            model.diffusion_loss(batch, [torch.Generator().manual_seed(derive_seed("validation", i)) for _, i in batch["sample_key"]])
            for batch in batches
        ]  # fmt: skip
        model.train()
        drawn = [model.diffusion_loss(batch, model.step_generator(batch)) for batch in batches]  # a training step's
    assert torch.stack(fixed).mean().item() == pytest.approx(first, rel=1e-6)
    assert abs(torch.stack(drawn).mean().item() - first) > 1e-4


def test_checkpoints_keep_the_two_best_by_validation_loss(tiny_model_dir, shapes_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    # The recipe saves every N steps; Lightning would save *before* that step's validation and score the file with
    # the previous one. With a monitor the CLI saves after each validation instead, so each score is its own.
    code = main([
        "fit", "--config", "tiny/lora", "--model.pretrained", str(tiny_model_dir), "--data.root", str(shapes_dir),
        "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar", "false", "--trainer.max_steps", "8",
        "--data.resolution", "32", "--data.batch_size", "2", "--data.val_fraction", "0.25",
        "--trainer.val_check_interval", "2", "--trainer.check_val_every_n_epoch", "null",
        "--checkpoint.monitor", "val/loss", "--checkpoint.save_top_k", "2", "--checkpoint.every_n_train_steps", "2",
        "--samples.steps", "2", "--samples.width", "32", "--samples.height", "32",
    ])  # fmt: skip
    assert code == 0

    events = EventAccumulator(str(run / "logs"), size_guidance={"scalars": 0})
    events.Reload()
    val = [event.value for event in events.Scalars("val/loss")]
    assert len(val) == 4  # after steps 2, 4, 6, 8 (6 training images, 3 batches an epoch: validation crosses epochs)
    by_step = dict(zip((2, 4, 6, 8), val))
    best_two = sorted(by_step, key=by_step.get)[:2]

    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    checkpoint = next(v for k, v in state["callbacks"].items() if k.startswith("ModelCheckpoint"))
    kept = {path.rsplit("step=", 1)[1].removesuffix(".ckpt"): float(score) for path, score in checkpoint["best_k_models"].items()}
    assert sorted(map(int, kept)) == sorted(best_two)
    for step, score in kept.items():
        assert score == pytest.approx(by_step[int(step)], rel=1e-6)  # scored by its own step's validation
    assert checkpoint["best_model_path"].endswith(f"step={best_two[0]}.ckpt")
    files = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert files == sorted([f"epoch={(s - 1) // 3}-step={s}.ckpt" for s in best_two] + ["last.ckpt"])
    # the recipe's samples follow the checkpoints, which here are saved inside validation (inference mode)
    for step in best_two:
        assert (run / "samples" / f"step_{step:06d}" / "grid.png").is_file()
