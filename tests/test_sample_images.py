"""SampleImages: when it samples, what it writes (PNGs, grid, TensorBoard), and that training never notices."""

import io
import random
from functools import partial
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from training import fit, make_data, trainable

from sdtune.adapters.lora import LoraSettings
from sdtune.callbacks import SampleImages
from sdtune.callbacks.sample_images import untouched
from sdtune.cli import main
from sdtune.commands.recipes import find_recipe
from sdtune.data import CaptionDataModule
from sdtune.errors import SdtuneError
from sdtune.finetune import LoRAFineTune, LRSchedule
from sdtune.inference.grid import GridLayout

PROMPTS = ["a red circle", "a blue square"]
FAST = dict(prompts=PROMPTS, seeds=[0, 1], steps=2, guidance_scale=4.0)


def make_model(tiny_model_dir, dropout=0.0):
    return LoRAFineTune(str(tiny_model_dir), lora=LoraSettings(rank=4, alpha=8.0, dropout=dropout),
                        optimizer=partial(torch.optim.AdamW, lr=1e-2), lr_schedule=LRSchedule(name="constant"))  # fmt: skip


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


class RecordLosses(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach().clone())


def test_samples_at_start_and_checkpoints_reach_disk_and_tensorboard(tiny_model_dir, shapes_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sampler = SampleImages(**FAST)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=2, save_last=True)
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="logs", version="")
    fit(make_model(tiny_model_dir), make_data(shapes_dir, tiny_model_dir), 4, tmp_path, logger=logger,
        enable_checkpointing=True, callbacks=[sampler, checkpoint])  # fmt: skip

    # step 0 before training, then each checkpoint; step 4 writes step=…ckpt and last.ckpt but samples once
    assert sampler.sampled_steps == [0, 2, 4] and len(sampler.seconds) == 3
    layout = GridLayout(2, 2, 32, 32)  # data resolution 32 → 32 px samples
    names = {"0_s0.png", "0_s1.png", "1_s0.png", "1_s1.png", "grid.png"}
    for step in (0, 2, 4):
        folder = tmp_path / "samples" / f"step_{step:06d}"
        assert {p.name for p in folder.iterdir()} == names
        assert Image.open(folder / "0_s1.png").size == (32, 32)
        grid = pixels(folder / "grid.png")
        assert grid.shape == (layout.size[1], layout.size[0], 3)
        x, y = layout.cell_origin(1, 0)  # prompt 1, seed 0
        assert np.array_equal(grid[y : y + 32, x : x + 32], pixels(folder / "1_s0.png"))
    first, last = (pixels(tmp_path / "samples" / f"step_{s:06d}" / "0_s0.png") for s in (0, 4))
    assert not np.array_equal(first, last)  # training moved the model

    events = EventAccumulator(str(tmp_path / "logs"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    images = events.Images("samples")
    assert [event.step for event in images] == [0, 2, 4]
    for event in images:
        logged = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
        assert np.array_equal(logged, pixels(tmp_path / "samples" / f"step_{event.step:06d}" / "grid.png"))
    assert [event.step for event in events.Scalars("samples/seconds")] == [0, 2, 4]


def test_every_n_steps_samples_once_per_optimizer_step(tiny_model_dir, shapes_dir, tmp_path):
    sampler = SampleImages(**{**FAST, "prompts": PROMPTS[:1], "seeds": [3]}, every_n_train_steps=1,
                           before_training=False, at_checkpoints=False)  # fmt: skip
    fit(make_model(tiny_model_dir), make_data(shapes_dir, tiny_model_dir), 2, tmp_path, accumulate_grad_batches=2,
        callbacks=[sampler])  # fmt: skip
    assert sampler.sampled_steps == [1, 2]  # 4 micro-batches, 2 optimizer steps
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_000001", "step_000002"]
    assert (tmp_path / "samples" / "step_000002" / "0_s3.png").is_file()


def test_same_seed_same_image_and_resolution_defaults(tiny_model_dir):
    model = make_model(tiny_model_dir)
    sampler = SampleImages(**FAST)
    first, again = sampler.generate(model, 32, 32), sampler.generate(model, 32, 32)
    for row_a, row_b in zip(first, again):
        for a, b in zip(row_a, row_b):
            assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(first[0][0]), np.asarray(first[0][1]))  # seeds differ
    # no data module: the UNet's native size (sample_size 32 × VAE factor 2); the data's resolution wins; then args
    assert sampler.resolution(None, model) == (64, 64)
    trainer = SimpleNamespace(datamodule=SimpleNamespace(resolution=48))
    assert sampler.resolution(trainer, model) == (48, 48)
    assert SampleImages(width=64, height=40).resolution(trainer, model) == (64, 40)


def test_sampling_on_or_off_gives_identical_training(tiny_model_dir, shapes_dir, tmp_path):
    def run(samplers, folder):
        L.seed_everything(0)
        model = make_model(tiny_model_dir, dropout=0.1)  # LoRA dropout draws from the global torch RNG
        data = CaptionDataModule(str(shapes_dir), resolution=32, batch_size=2, center_crop=True, random_flip=True,
                                 caption_dropout=0.5, pretrained=str(tiny_model_dir))  # fmt: skip
        recorder = RecordLosses()
        fit(model, data, 6, folder, callbacks=[*samplers, recorder])  # 6 steps of 4 batches: two epochs
        return recorder.losses, trainable(model)

    plain_losses, plain_weights = run([], tmp_path / "plain")
    sampler = SampleImages(**{**FAST, "seeds": [0]}, scheduler="euler_a", every_n_train_steps=1)
    sampled_losses, sampled_weights = run([sampler], tmp_path / "sampled")
    assert sampler.sampled_steps == [0, 1, 2, 3, 4, 5, 6]
    assert len(plain_losses) == 6
    assert all(torch.equal(a, b) for a, b in zip(plain_losses, sampled_losses)), (plain_losses, sampled_losses)
    assert plain_weights.keys() == sampled_weights.keys()
    assert all(torch.equal(plain_weights[k], sampled_weights[k]) for k in plain_weights)


def test_untouched_restores_randomness_modes_and_flags(tiny_model_dir):
    model = make_model(tiny_model_dir)
    model.train()
    model.unet.conv_in.eval()  # an odd mix, restored as found
    model.unet.conv_in.weight.requires_grad_(True)  # a frozen base weight switched on
    modes = {name: m.training for name, m in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    assert any(modes.values()) and not all(modes.values()) and any(flags.values()) and not all(flags.values())
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy(), model._rng().get_state())
    with untouched(model):
        torch.rand(3), random.random(), np.random.rand(3), torch.rand(3, generator=model._rng())
        model.eval()
        model.requires_grad_(True)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2]) and torch.equal(model._rng().get_state(), states[3])

    sampler = SampleImages(**FAST)
    sampler.generate(model, 32, 32)  # the real thing leaves them alone too
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags


def test_only_rank_zero_samples_and_every_rank_waits(tmp_path):
    calls = []

    class Counting(SampleImages):
        def sample(self, trainer, pl_module):
            calls.append((trainer.global_rank, trainer.global_step))

    for rank in (0, 1):
        sampler = Counting(**FAST)
        barriers = []
        strategy = SimpleNamespace(barrier=barriers.append, reduce_boolean_decision=lambda decision, all: decision)
        trainer = SimpleNamespace(global_step=0, global_rank=rank, is_global_zero=rank == 0, default_root_dir=str(tmp_path),
                                  received_sigterm=False, strategy=strategy)  # fmt: skip
        module = torch.nn.Linear(1, 1)  # unsharded: rank 0 alone samples (a sharded module is test_fsdp's)
        sampler.on_train_start(trainer, module)
        sampler._sample_once(trainer, module)  # the same step again (e.g. last.ckpt after the top-k file): no-op
        trainer.global_step = 5
        sampler._sample_once(trainer, module)
        assert sampler.sampled_steps == [0, 5] and barriers == ["SampleImages", "SampleImages"]
    assert calls == [(0, 0), (0, 5)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"scheduler": "nope"}, "samples.scheduler: unknown scheduler 'nope'; choose one of ddim, pndm"),
        ({"prompts": []}, "samples.prompts is empty"),
        ({"width": 30}, "samples.width must be a positive multiple of 8, got 30"),
        ({"every_n_train_steps": -1}, "samples.every_n_train_steps must be ≥ 0"),
    ],
)
def test_bad_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(SdtuneError) as error:
        SampleImages(**kwargs)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_bad_scheduler_through_the_cli_is_one_line(tiny_model_dir, shapes_dir, tmp_path, capsys):
    code = main(["fit", "--config", "tiny/lora", "--model.pretrained", str(tiny_model_dir), "--data.root", str(shapes_dir),
                 "--trainer.max_steps", "1", "--trainer.default_root_dir", str(tmp_path), "--samples.scheduler", "nope"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("sdtune: error: samples.scheduler: unknown scheduler 'nope'")
    assert not (tmp_path / "samples").exists()


def test_cli_turns_samples_on_only_where_the_config_says(tmp_path, capsys):
    def printed(*config):
        with pytest.raises(SystemExit):
            main(["fit", *config, "--model.pretrained", "m", "--data.root", "d", "--print_config"])
        return yaml.safe_load(capsys.readouterr().out)["samples"]

    tiny = printed("--config", "tiny/lora")
    assert tiny["enabled"] is True and tiny["prompts"] == ["a red circle", "a blue square"] and tiny["seeds"] == [0, 1]
    sd15 = printed("--config", "sd15/lora")
    assert sd15["enabled"] is True and (sd15["width"], sd15["scheduler"], sd15["seeds"]) == (512, "dpmpp_2m", [0, 1, 2])
    own = yaml.safe_load(find_recipe("tiny/lora").read_text())
    del own["samples"]
    (tmp_path / "own.yaml").write_text(yaml.safe_dump(own))
    assert printed("--config", str(tmp_path / "own.yaml"))["enabled"] is False  # a config without `samples:`
    assert printed("--config", str(tmp_path / "own.yaml"), "--samples.enabled", "true")["enabled"] is True


def test_cli_run_writes_sample_grids(tiny_model_dir, shapes_dir, tmp_path):
    run = tmp_path / "run"
    code = main(["fit", "--config", "tiny/lora", "--model.pretrained", str(tiny_model_dir), "--data.root", str(shapes_dir),
                 "--trainer.default_root_dir", str(run), "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false",
                 "--checkpoint.every_n_train_steps", "2", "--data.resolution", "32", "--samples.steps", "2",
                 "--samples.width", "32", "--samples.height", "32"])  # fmt: skip
    assert code == 0
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_000000", "step_000002"]
    grid = Image.open(run / "samples" / "step_000002" / "grid.png")
    assert grid.size == GridLayout(2, 2, 32, 32).size
    assert list((run / "logs").glob("events.out.tfevents.*"))
