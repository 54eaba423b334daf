"""`--ema.*`: an exponential moving average of the trained weights (LoRA included) that follows the weights step by
step, resumes exactly, samples the run's images and is saved as adapter_ema/, which sample and export read."""

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image
from safetensors.torch import load_file
from test_cli import sdtune, sdtune_here
from training import fit, make_data, trainable

from sdtune.adapters.lora import LoraSettings
from sdtune.callbacks import EMA
from sdtune.errors import SdtuneError
from sdtune.finetune import LoRAFineTune


def test_decay_grows_with_warmup_up_to_its_cap():
    ema = EMA(decay=0.999, warmup_power=2 / 3)
    assert ema.decay_at(0) == 0.0  # the first update copies the weights
    assert ema.decay_at(1) == pytest.approx(1 - 2 ** (-2 / 3))
    assert ema.decay_at(10**6) == 0.999
    assert EMA(decay=0.9, warmup=False).decay_at(0) == 0.9
    for bad in (dict(decay=1.0), dict(warmup_power=0), dict(update_after_step=-1)):
        with pytest.raises(SdtuneError):
            EMA(**bad)


class Recorder(Callback):
    def __init__(self):
        self.weights = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.weights.append(trainable(pl_module))


def model(tiny_model_dir):
    torch.manual_seed(0)
    return LoRAFineTune(str(tiny_model_dir), lora=LoraSettings(rank=4), noise_seed=3,
                        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))  # fmt: skip


def test_the_shadow_is_the_average_of_the_weights_after_each_step(tiny_model_dir, shapes_dir, tmp_path):
    module, recorder, ema = model(tiny_model_dir), Recorder(), EMA(decay=0.7, warmup=False)
    start = trainable(module)
    fit(module, make_data(shapes_dir, tiny_model_dir), 4, tmp_path, callbacks=[ema, recorder])
    expected = start
    for weights in recorder.weights:
        expected = {name: 0.7 * expected[name] + 0.3 * weights[name] for name in expected}
    assert ema.updates == 4
    for name, value in expected.items():
        torch.testing.assert_close(ema.shadow[name], value, rtol=1e-6, atol=1e-7)
    assert any((ema.shadow[n] - recorder.weights[-1][n]).abs().max() > 1e-4 for n in expected)  # it lags the weights


def test_a_resumed_run_has_the_average_of_an_uninterrupted_one(tiny_model_dir, shapes_dir, tmp_path):
    settings = dict(decay=0.8, warmup_power=0.75)
    whole = EMA(**settings)
    fit(model(tiny_model_dir), make_data(shapes_dir, tiny_model_dir), 4, tmp_path / "whole", callbacks=[whole])
    first = EMA(**settings)
    trainer = fit(model(tiny_model_dir), make_data(shapes_dir, tiny_model_dir), 2, tmp_path / "first", callbacks=[first])
    trainer.save_checkpoint(tmp_path / "step2.ckpt")
    resumed = EMA(**settings)
    fit(model(tiny_model_dir), make_data(shapes_dir, tiny_model_dir), 4, tmp_path / "second", ckpt_path=str(tmp_path / "step2.ckpt"), callbacks=[resumed])  # fmt: skip
    assert resumed.updates == whole.updates == 4
    for name, value in whole.shadow.items():
        assert torch.equal(resumed.shadow[name], value), name


def test_an_average_holding_nan_is_refused_and_the_saved_one_kept(tiny_model_dir, shapes_dir, tmp_path):
    module, ema = model(tiny_model_dir), EMA(decay=0.8)
    trainer = fit(module, make_data(shapes_dir, tiny_model_dir), 2, tmp_path, callbacks=[ema])
    written = tmp_path / "adapter_ema" / "pytorch_lora_weights.safetensors"
    before, weights = load_file(str(written)), trainable(module)
    name = next(iter(ema.shadow))
    ema.shadow[name] = torch.full_like(ema.shadow[name], float("nan"))
    with pytest.raises(SdtuneError, match=r"^not saving .*adapter_ema: trained weights hold NaN or infinity"):
        ema.on_train_end(trainer, module)
    after = load_file(str(written))
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(torch.equal(p, weights[n]) for n, p in trainable(module).items())  # the trained weights are back


def _png(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


def test_ema_through_the_cli_samples_saves_and_exports_the_average(tiny_model_dir, shapes_dir, tmp_path):
    run = tmp_path / "run"
    sdtune("fit", "--config", "tiny/lora", "--model.pretrained", tiny_model_dir, "--data.root", shapes_dir,
           "--trainer.max_steps", 6, "--trainer.default_root_dir", run, "--checkpoint.every_n_train_steps", 6,
           "--model.optimizer.init_args.lr", 2e-2, "--ema.enabled", "true", "--ema.decay", 0.8,
           "--samples.prompts", "[a red circle]", "--samples.seeds", "[0]")  # fmt: skip
    assert (run / "adapter_ema" / "pytorch_lora_weights.safetensors").is_file()
    common = ["--model", tiny_model_dir, "--prompt", "a red circle", "--seed", 0, "--steps", 4, "--guidance", 4.0,
              "--scheduler", "dpmpp_2m", "--width", 64, "--height", 64]  # fmt: skip
    sdtune_here("sample", *common, "--adapter", run / "adapter_ema", "--out", tmp_path / "ema")
    averaged = _png(next((tmp_path / "ema").glob("*.png")))
    assert np.abs(_png(run / "samples" / "step_000006" / "0_s0.png") - averaged).max() <= 1  # the run sampled the average
    trained, average = (load_file(str(run / name / "pytorch_lora_weights.safetensors")) for name in ("adapter", "adapter_ema"))
    assert trained.keys() == average.keys()
    assert max((trained[k] - average[k]).abs().max().item() for k in trained) > 1e-3  # the average is not the weights
    sdtune_here("export", run / "adapter_ema", "--format", "kohya", "--out", tmp_path / "ema.safetensors")  # checked on write
    # the run wrote the same average for A1111/ComfyUI itself, under a name of its own beside adapter/run.safetensors
    own, exported = load_file(str(run / "adapter_ema" / "run-ema.safetensors")), load_file(str(tmp_path / "ema.safetensors"))
    assert own.keys() == exported.keys() and all(torch.equal(own[k], exported[k]) for k in own)
    assert (run / "adapter" / "run.safetensors").is_file()
