"""Sharded training (FSDP2) in two CPU processes over gloo, through the real CLI: the processes train like DDP's,
every process takes part in sampling, the adapter is gathered and written once, checkpoints are sharded folders
that `--ckpt_path last` finds, and a resumed run ends bit-identical to an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import Namespace
from safetensors.torch import load_file
from test_cli import sdtune
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from sdtune.cli import main
from sdtune.finetune.checkpointing import checkpoint_problem, pick_resume_checkpoint
from sdtune.finetune.sharding import FSDP, resolve_strategy

STRATEGY = "fsdp"  # as on a GPU machine: sdtune's FSDP runs on CPU processes (gloo) too


def fit(tiny_model_dir, shapes_dir, run: Path, strategy: str, *extra):
    return sdtune(
        "fit", "--config", "tiny/lora", "--model.pretrained", tiny_model_dir, "--data.root", shapes_dir,
        "--data.resolution", 32, "--data.batch_size", 1, "--trainer.devices", 2, "--trainer.strategy", strategy,
        "--trainer.max_steps", 4, "--checkpoint.every_n_train_steps", 2, "--trainer.enable_progress_bar", "false",
        "--samples.enabled", "true", "--samples.prompts", "[a red circle]", "--samples.seeds", "[0]",
        "--samples.steps", 2, "--samples.before_training", "false", "--model.lora.dropout", 0.1,
        "--trainer.default_root_dir", run, *extra,
    )  # fmt: skip


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in b if b[k].norm() > 0)


@pytest.mark.slow
def test_fsdp_lora_trains_like_ddp_samples_on_every_rank_saves_once_and_resumes_exactly(
    tiny_model_dir, shapes_dir, tmp_path
):
    run = tmp_path / "run"
    result = fit(tiny_model_dir, shapes_dir, run, STRATEGY)
    assert "fsdp: unet sharded over 2 processes" in result.stderr
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["strategy"]["class_path"] == "sdtune.finetune.sharding.FSDP"
    # Rank 1 ran the denoiser for every sampling (its shards are needed by rank 0's); rank 0 alone wrote the images.
    assert "[rank: 1] samples: step 2's images denoised with this shard" in result.stderr
    assert "[rank: 1] samples: step 4's images denoised with this shard" in result.stderr
    assert all((run / "samples" / step / "grid.png").is_file() for step in ("step_000002", "step_000004"))
    saved = [line for line in result.stderr.splitlines() if line.startswith("saved ")]
    assert len(saved) == 2 and "adapter/pytorch_lora_weights.safetensors (step 4)" in saved[0]

    # Checkpoints are sharded folders (a shard per process and meta.pt), complete, and found by --ckpt_path last.
    folder = run / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=0-step=4.ckpt", "last.ckpt"]
    assert all((folder / name).is_dir() and checkpoint_problem(folder / name) is None for name in ("last.ckpt",))
    assert pick_resume_checkpoint(folder).is_dir()

    # The gathered adapter holds exactly the weights the shards hold, read back in one process without torch.distributed.
    first = load_file(run / "adapter" / "pytorch_lora_weights.safetensors")
    dcp_to_torch_save(folder / "last.ckpt", tmp_path / "whole.pt")
    shards = torch.load(tmp_path / "whole.pt", weights_only=True)["state_dict"]
    from_shards = {name.replace(".default", ""): tensor for name, tensor in shards.items()}
    assert len(first) == len(from_shards) > 0
    assert all(torch.equal(first[name], from_shards[name]) for name in first)

    # Sharding changes where the weights live, not what trains: DDP gives the same adapter up to float rounding.
    fit(tiny_model_dir, shapes_dir, tmp_path / "ddp", "ddp", "--samples.enabled", "false")
    assert relative_difference(first, load_file(tmp_path / "ddp" / "adapter" / "pytorch_lora_weights.safetensors")) < 1e-4

    resumed = fit(tiny_model_dir, shapes_dir, run, STRATEGY, "--trainer.max_steps", 6, "--ckpt_path", "last")
    assert "resuming after optimizer step 4 (epoch 0)" in resumed.stderr
    second = load_file(run / "adapter" / "pytorch_lora_weights.safetensors")
    assert any(not torch.equal(first[k], second[k]) for k in first)
    fit(tiny_model_dir, shapes_dir, tmp_path / "whole", STRATEGY, "--trainer.max_steps", 6, "--samples.enabled", "false")
    whole = load_file(tmp_path / "whole" / "adapter" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(whole[k], second[k]) for k in whole)


def test_strategy_fsdp_means_sdtunes_fsdp_on_any_machine():
    config = Namespace({"trainer.strategy": "fsdp"})
    resolve_strategy(config)
    assert config["trainer.strategy"].class_path == f"{FSDP.__module__}.{FSDP.__qualname__}"
    config = Namespace({"trainer.strategy": "ddp"})
    resolve_strategy(config)
    assert config["trainer.strategy"] == "ddp"


def test_a_folder_is_a_checkpoint_only_with_its_shards_index_and_meta(tmp_path):
    folder = tmp_path / "checkpoints" / "last.ckpt"
    folder.mkdir(parents=True)
    assert "without .metadata" in checkpoint_problem(folder)
    (folder / ".metadata").write_bytes(b"")
    assert "does not exist" in checkpoint_problem(folder)
    assert pick_resume_checkpoint(tmp_path / "checkpoints") is None  # no meta.pt: not a candidate


@pytest.mark.parametrize("recipe", ["sdxl/full", "flux/full"])
def test_sharded_recipes_name_fsdp_and_deepspeed_parses(recipe, capsys):
    """The full-model recipes train sharded; DeepSpeed ZeRO-2, which their headers describe, is a value the CLI takes
    (deepspeed itself is not installed here, so it is not run)."""
    args = ["fit", "--config", recipe, "--data.root", "data", "--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    assert yaml.safe_load(capsys.readouterr().out)["trainer"]["strategy"]["class_path"] == "sdtune.finetune.sharding.FSDP"
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--trainer.strategy", "deepspeed_stage_2"])
    assert exit_info.value.code == 0
    assert yaml.safe_load(capsys.readouterr().out)["trainer"]["strategy"] == "deepspeed_stage_2"


@pytest.mark.slow
def test_fsdp_full_fine_tune_writes_the_gathered_pipeline_once_like_ddp(tiny_model_dir, shapes_dir, tmp_path):
    """Every UNet weight trains sharded; the pipeline written at the end is gathered from the shards, and its weight
    changes are DDP's up to float rounding."""
    from diffusers import UNet2DConditionModel

    def full(strategy):
        return sdtune(
            "fit", "--config", "tiny/full", "--model.pretrained", tiny_model_dir, "--data.root", shapes_dir,
            "--data.resolution", 32, "--data.batch_size", 1, "--trainer.devices", 2, "--trainer.strategy", strategy,
            "--trainer.max_steps", 2, "--trainer.enable_progress_bar", "false", "--samples.enabled", "false",
            "--model.optimizer.init_args.lr", 1e-3, "--trainer.default_root_dir", tmp_path / strategy,
        )  # fmt: skip

    sharded = full("fsdp")
    assert "fsdp: unet sharded over 2 processes" in sharded.stderr
    assert [line for line in sharded.stderr.splitlines() if line.startswith("saved ")] == [
        f"saved {tmp_path / 'fsdp' / 'model'} (step 2)"
    ]
    full("ddp")
    base = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet").state_dict()
    change = {
        strategy: {k: v - base[k] for k, v in UNet2DConditionModel.from_pretrained(tmp_path / strategy / "model" / "unet").state_dict().items()}
        for strategy in ("fsdp", "ddp")
    }
    assert max(v.abs().max().item() for v in change["ddp"].values()) > 1e-4  # the run changed the weights
    # Over all weights at once: a bias that a GroupNorm right after it cancels gets a gradient of rounding noise
    # alone, which AdamW scales up to changes of a few 1e-5 that differ between any two summation orders.
    sharded_change, ddp_change = (torch.cat([v.flatten() for v in change[s].values()]) for s in ("fsdp", "ddp"))
    assert ((sharded_change - ddp_change).norm() / ddp_change.norm()).item() < 2e-3  # measured: 5e-4
