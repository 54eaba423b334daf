"""Throughput: perf/* speed and memory logs, counted right under gradient accumulation, invisible to training."""

import logging
import statistics
from functools import partial
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from lightning.fabric.utilities.throughput import measure_flops
from lightning.pytorch.loggers import Logger
from test_cli import sdtune
from torch.nn.attention import SDPBackend, sdpa_kernel
from training import fit, make_data, trainable

from sdtune.adapters.lora import LoraSettings
from sdtune.callbacks import Throughput
from sdtune.callbacks import throughput as throughput_module
from sdtune.callbacks.throughput import batch_size, peak_rss_bytes, unet_flops_per_sample, unet_input_shape
from sdtune.cli import main
from sdtune.data import CaptionDataModule
from sdtune.errors import SdtuneError
from sdtune.finetune import LoRAFineTune, LRSchedule

KEYS = {"perf/step_time_ms", "perf/samples_per_sec", "perf/peak_memory_gb"}


class Recorder(Logger):
    """In-memory logger: every log_metrics call as (step, metrics)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    name, version = "recorder", 0

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.calls.append((step, dict(metrics)))

    def perf(self):
        return {step: metrics for step, metrics in self.calls if any(key.startswith("perf/") for key in metrics)}


class RecordLosses(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach().clone())


def make_model(tiny_model_dir, dropout=0.0):
    return LoRAFineTune(str(tiny_model_dir), lora=LoraSettings(rank=4, alpha=8.0, dropout=dropout),
                        optimizer=partial(torch.optim.AdamW, lr=1e-2), lr_schedule=LRSchedule(name="constant"))  # fmt: skip


def test_logs_speed_and_memory_and_training_never_notices(tiny_model_dir, shapes_dir, tmp_path, monkeypatch, caplog):
    # A GPU's peak FLOPs on this CPU, so perf/mfu is computed too.
    monkeypatch.setattr(throughput_module, "get_available_flops", lambda device, dtype: 10**12)

    def run(callback, folder):
        L.seed_everything(0)
        model = make_model(tiny_model_dir, dropout=0.1)  # LoRA dropout draws from the global torch RNG
        data = CaptionDataModule(str(shapes_dir), resolution=32, batch_size=2, center_crop=True, random_flip=True,
                                 caption_dropout=0.5, pretrained=str(tiny_model_dir))  # fmt: skip
        losses, logger = RecordLosses(), Recorder()
        fit(model, data, 6, folder, callbacks=[callback, losses], logger=logger, log_every_n_steps=2)
        return losses.losses, trainable(model), model._rng().get_state(), logger

    off = Throughput(enabled=False)
    off_losses, off_weights, off_rng, off_logger = run(off, tmp_path / "off")
    on = Throughput(warmup_steps=1, flops=True)
    with caplog.at_level(logging.INFO):
        on_losses, on_weights, on_rng, on_logger = run(on, tmp_path / "on")

    # Counting FLOPs and timing change nothing: losses, weights and the module's generator are bit-identical.
    assert len(off_losses) == 6 and all(torch.equal(a, b) for a, b in zip(off_losses, on_losses))
    assert all(torch.equal(off_weights[k], on_weights[k]) for k in off_weights)
    assert torch.equal(off_rng, on_rng)

    assert off_logger.perf() == {} and off.steps == [] and off.summary == {}  # disabled: nothing at all
    assert any("train/loss" in metrics for _, metrics in off_logger.calls)  # …while the run itself logged

    # Step 1 is warm-up; every step after it is measured, with its 2 samples, and logged every 2 steps.
    assert [(step, samples) for step, _, samples, _ in on.steps] == [(s, 2) for s in range(2, 7)]
    logged = on_logger.perf()
    assert sorted(logged) == [2, 4, 6]
    windows = {2: on.steps[0:1], 4: on.steps[1:3], 6: on.steps[3:5]}
    rss = peak_rss_bytes() / 2**30
    for step, metrics in logged.items():
        assert set(metrics) == KEYS | {"perf/tflops", "perf/mfu"}
        seconds = [s for _, s, _, _ in windows[step]]
        assert metrics["perf/step_time_ms"] == pytest.approx(1000 * statistics.median(seconds))
        assert metrics["perf/step_time_ms"] > 0
        # samples/s is the median of each step's rate (of two steps, the mean of their rates, not 2 / mean time)
        assert metrics["perf/samples_per_sec"] == pytest.approx(statistics.median(2 / s for s in seconds))
        assert 0.05 < metrics["perf/peak_memory_gb"] <= rss < 24  # this process's peak RSS in GiB
        assert metrics["perf/mfu"] == pytest.approx(metrics["perf/tflops"] * 1e12 / 10**12)

    # FLOPs were counted once, for the one input shape (32 px → 16×16 latents, one 77-token window).
    ((shape, per_sample),) = on.flops_per_sample.items()
    assert shape == ((4, 16, 16), (77, 32)) and per_sample > 0
    assert all(flops == 2 * per_sample for _, _, _, flops in on.steps)
    tflops = statistics.median(2 * per_sample / s for _, s, _, _ in windows[4]) / 1e12
    assert logged[4]["perf/tflops"] == pytest.approx(tflops)

    assert on.summary["steps"] == 5 and on.summary["step_time_ms"] > 0 and 0.05 < on.summary["peak_memory_gb"] < 24
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("throughput:")]
    assert len(summary) == 1 and "samples/s" in summary[0] and "GiB (process RSS)" in summary[0], summary


def test_flops_are_counted_on_meta_tensors_without_touching_the_model(tiny_model_dir):
    model = make_model(tiny_model_dir)
    unet = model.unet
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    states = torch.get_rng_state(), model._rng().get_state()
    counted = unet_flops_per_sample(model, (4, 16, 16), (77, 32))
    assert torch.equal(states[0], torch.get_rng_state()) and torch.equal(states[1], model._rng().get_state())
    assert all(p.grad is None and torch.equal(p, before[name]) for name, p in model.named_parameters())

    # The same count as a real forward + backward with the plain-math attention (CPU's fused attention kernel has
    # no FLOP formula, so a real CPU pass would leave attention out); twice that for two samples.
    for batch in (1, 2):
        latents, text = torch.randn(batch, 4, 16, 16), torch.randn(batch, 77, 32)
        timesteps = torch.full((batch,), 500)
        with sdpa_kernel(SDPBackend.MATH):
            real = measure_flops(unet, lambda: unet(latents, timesteps, text).sample, lambda out: out.sum())
        assert real == batch * counted

    # Model FLOPs, as MFU counts them: gradient checkpointing's recomputation is not counted, and stays switched on.
    checkpointed = LoRAFineTune(str(tiny_model_dir), lora=LoraSettings(rank=4, alpha=8.0), gradient_checkpointing=True)
    checkpointed.train()
    assert unet_flops_per_sample(checkpointed, (4, 16, 16), (77, 32)) == counted
    assert checkpointed.unet.is_gradient_checkpointing


def test_gradient_accumulation_counts_every_micro_batch(tiny_model_dir, shapes_dir, tmp_path):
    # 8 images in batches of 3, 3 and 2 (in shuffled order): each epoch is two batches (one optimizer step) and
    # the epoch's last batch (a step alone).
    callback, logger = Throughput(warmup_steps=0, log_every_n_steps=2, flops=True), Recorder()
    model, sizes = make_model(tiny_model_dir), []
    model.on_train_batch_start = lambda batch, idx: sizes.append(len(batch["path"]))
    fit(model, make_data(shapes_dir, tiny_model_dir, batch_size=3), 4, tmp_path,
        callbacks=[callback], logger=logger, accumulate_grad_batches=2, log_every_n_steps=1)  # fmt: skip
    assert len(sizes) == 6 and sorted(sizes[:3]) == sorted(sizes[3:]) == [2, 3, 3]
    expected = [(1, sizes[0] + sizes[1]), (2, sizes[2]), (3, sizes[3] + sizes[4]), (4, sizes[5])]
    assert [(step, samples) for step, _, samples, _ in callback.steps] == expected
    logged = logger.perf()
    assert sorted(logged) == [2, 4]  # the callback's every 2 steps, not the trainer's every step
    for step, window in ((2, callback.steps[0:2]), (4, callback.steps[2:4])):
        rates = [samples / seconds for _, seconds, samples, _ in window]
        assert logged[step]["perf/samples_per_sec"] == pytest.approx(statistics.median(rates))
        assert set(logged[step]) == KEYS | {"perf/tflops"}  # CPU: Lightning knows no peak FLOPs, so no perf/mfu
    assert callback.available_flops is None


def test_batch_shapes_and_a_unet_that_cannot_be_counted(monkeypatch):
    unet = SimpleNamespace(config=SimpleNamespace(in_channels=4, cross_attention_dim=32))
    module = SimpleNamespace(unet=unet, vae=SimpleNamespace(config=SimpleNamespace(block_out_channels=[8, 16, 16])))
    pixels = {"pixel_values": torch.zeros(3, 3, 64, 48), "input_ids": torch.zeros(3, 2, 77, dtype=torch.long)}
    cached = {"latent_mean": torch.zeros(5, 4, 8, 6), "text_embeds": torch.zeros(5, 77, 32)}
    assert (batch_size(pixels), unet_input_shape(module, pixels)) == (3, ((4, 16, 12), (154, 32)))  # two chunks
    assert (batch_size(cached), unet_input_shape(module, cached)) == (5, ((4, 8, 6), (77, 32)))
    assert unet_input_shape(module, {"pixel_values": torch.zeros(2, 3, 8, 8)}) is None  # no text: not counted

    def fails(*args):
        raise RuntimeError("no meta kernel for some_op\nmore detail")

    monkeypatch.setattr(throughput_module, "unet_flops_per_sample", fails)
    callback = Throughput(flops=True)
    with pytest.warns(UserWarning, match=r"could not count the UNet's FLOPs \(no meta kernel for some_op\)"):
        callback._count_flops(module, pixels)
    assert callback.flops_per_sample == {((4, 16, 12), (154, 32)): None}  # training goes on, without perf/tflops


def test_settings_are_checked():
    with pytest.raises(SdtuneError, match="warmup_steps must be ≥ 0"):
        Throughput(warmup_steps=-1)
    with pytest.raises(SdtuneError, match="log_every_n_steps must be ≥ 1"):
        Throughput(log_every_n_steps=0)


def test_cli_defaults_and_perf_in_tensorboard(tiny_model_dir, shapes_dir, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with pytest.raises(SystemExit):
        main(["fit", "--config", "tiny/lora", "--model.pretrained", "m", "--data.root", "d", "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["throughput"] == {"log_every_n_steps": None, "warmup_steps": 3, "flops": False, "enabled": True}

    run = tmp_path / "run"
    result = sdtune("fit", "--config", "tiny/lora", "--model.pretrained", tiny_model_dir, "--data.root", shapes_dir,
                    "--trainer.default_root_dir", run, "--trainer.max_steps", 4, "--trainer.log_every_n_steps", 2,
                    "--samples.enabled", "false", "--throughput.warmup_steps", 1)  # fmt: skip
    assert "throughput: median step" in result.stdout + result.stderr
    events = EventAccumulator(str(run / "logs"), size_guidance={"scalars": 0})
    events.Reload()
    assert [event.step for event in events.Scalars("perf/samples_per_sec")] == [2, 4]
    assert all(event.value > 0 for event in events.Scalars("perf/step_time_ms"))
    assert "perf/tflops" not in events.Tags()["scalars"]  # flops: false by default
