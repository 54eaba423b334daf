"""Two processes on CPU (DDP over gloo) through the real CLI: they split each epoch's batches, sample and save the
adapter once, write each checkpoint once, and a resumed DDP run (LoRA dropout on, so every rank's global torch
generator matters as much as its noise generator) ends bit-identical to an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from test_cli import sdtune


def ddp_fit(tiny_model_dir, shapes_dir, run: Path, *extra):
    return sdtune(
        "fit", "--config", "tiny/lora", "--model.pretrained", tiny_model_dir, "--data.root", shapes_dir,
        "--data.resolution", 32, "--data.batch_size", 1, "--trainer.devices", 2, "--trainer.strategy", "ddp",
        "--trainer.max_steps", 4, "--checkpoint.every_n_train_steps", 2, "--trainer.enable_progress_bar", "false",
        "--samples.enabled", "true", "--samples.prompts", "[a red circle]", "--samples.seeds", "[0]",
        "--samples.steps", 2, "--samples.before_training", "false", "--model.lora.dropout", 0.1,
        "--trainer.default_root_dir", run, *extra,
    )  # fmt: skip


def test_two_processes_train_sample_and_save_once(tiny_model_dir, shapes_dir, tmp_path):
    run = tmp_path / "run"
    result = ddp_fit(tiny_model_dir, shapes_dir, run)
    assert "GLOBAL_RANK: 1" in result.stderr  # two processes really ran
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_000002", "step_000004"]
    assert all((run / "samples" / step / "grid.png").is_file() for step in ("step_000002", "step_000004"))
    assert result.stderr.count("saved ") == 1 and "adapter/pytorch_lora_weights.safetensors (step 4)" in result.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch=0-step=4.ckpt", "last.ckpt"]
    first = load_file(run / "adapter" / "pytorch_lora_weights.safetensors")

    resumed = ddp_fit(tiny_model_dir, shapes_dir, run, "--trainer.max_steps", 6, "--ckpt_path", "last")
    assert "resuming after optimizer step 4 (epoch 0)" in resumed.stderr  # saved at the end of epoch 0
    assert "data: epoch 1 starts from its first batch" in resumed.stderr
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6
    second = load_file(run / "adapter" / "pytorch_lora_weights.safetensors")
    assert any(not torch.equal(first[k], second[k]) for k in first)

    ddp_fit(tiny_model_dir, shapes_dir, tmp_path / "whole", "--trainer.max_steps", 6)
    whole = load_file(tmp_path / "whole" / "adapter" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(whole[k], second[k]) for k in whole)
