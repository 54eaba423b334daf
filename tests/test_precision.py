"""Mixed precision and frozen-weight dtypes on the tiny model (CPU).

fp16 with a GradScaler is tested through Lightning's own MixedPrecision plugin: the Trainer accepts
`plugins=[MixedPrecision("16-mixed", "cpu", scaler=GradScaler("cpu"))]` (the string flag "16-mixed" would become
bf16 on CPU), so the scaler logic runs exactly as on a GPU, only with CPU float16 autocast.
"""

from functools import partial

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from training import fit, make_data, trainable

from sdtune.adapters.lora import LoraSettings
from sdtune.finetune import FullFineTune, LoRAFineTune, LRSchedule

INIT_SCALE = 2.0**10


def make_model(tiny_model_dir, **kwargs):
    kwargs.setdefault("lora", LoraSettings(rank=4, alpha=8.0))
    kwargs.setdefault("optimizer", partial(torch.optim.AdamW, lr=1e-3))
    kwargs.setdefault("lr_schedule", LRSchedule(name="constant"))
    return LoRAFineTune(str(tiny_model_dir), **kwargs)








def fp16_plugin(init_scale=INIT_SCALE):
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))


# --- 8. fp16 mixed precision with a GradScaler -------------------------------------------------------------------


def test_fp16_gradscaler_skips_inf_steps_and_checkpoints_its_state(tiny_model_dir, shapes_dir, tmp_path):
    model = make_model(tiny_model_dir)
    plugin = fp16_plugin()
    inf_step = 1
    snapshots, scales, losses, unet_out, grads = [], [], [], [], {}

    model.unet.register_forward_hook(lambda module, args, out: unet_out.append(out.sample.dtype))
    model.on_train_batch_start = lambda batch, idx: snapshots.append(trainable(model))

    def on_after_backward():  # grads are still scaled here; unscale_ comes after the closure
        if model.trainer.global_step == inf_step:
            next(p for p in model.parameters() if p.requires_grad).grad.view(-1)[0] = float("inf")

    def on_before_optimizer_step(optimizer):  # after unscale_
        grads[model.trainer.global_step] = [p.grad.clone() for p in model.parameters() if p.requires_grad]

    def on_train_batch_end(outputs, batch, idx):
        losses.append(outputs["loss"].detach())
        scales.append(plugin.scaler.get_scale())

    model.on_after_backward = on_after_backward
    model.on_before_optimizer_step = on_before_optimizer_step
    model.on_train_batch_end = on_train_batch_end
    trainer = fit(model, make_data(shapes_dir, tiny_model_dir), 3, tmp_path, plugins=[plugin])
    snapshots.append(trainable(model))

    assert trainer.precision_plugin is plugin and trainer.precision == "16-mixed"
    assert set(unet_out) == {torch.float16}  # autocast really ran the UNet in float16
    assert all(loss.dtype == torch.float32 and torch.isfinite(loss) for loss in losses)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    for step in (0, 2):
        assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads[step])
        assert any(g.abs().sum() > 0 for g in grads[step])
    assert not torch.isfinite(grads[inf_step][0]).all()

    def moved(a, b):
        return any(not torch.equal(snapshots[a][n], snapshots[b][n]) for n in snapshots[a])

    assert moved(0, 1) and moved(2, 3)  # finite steps update the adapter
    assert not moved(1, 2)  # the inf step was skipped
    assert scales == [INIT_SCALE, INIT_SCALE / 2, INIT_SCALE / 2]  # backoff 0.5 on inf, growth only after 2000

    path = tmp_path / "fp16.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    saved = checkpoint["MixedPrecision"]  # Lightning stores the plugin's state under its class name
    assert saved["scale"] == INIT_SCALE / 2 and saved["_growth_tracker"] == 1  # one good step since the skip

    resumed = make_model(tiny_model_dir)
    resumed_plugin = fp16_plugin(init_scale=2.0**16)
    restored = []
    resumed.on_train_start = lambda: restored.append(
        {k: resumed_plugin.scaler.state_dict()[k] for k in ("scale", "_growth_tracker")}
    )
    fit(resumed, make_data(shapes_dir, tiny_model_dir), 4, tmp_path, ckpt_path=str(path), plugins=[resumed_plugin])
    assert restored == [{"scale": INIT_SCALE / 2, "_growth_tracker": 1}]  # not the new init 2**16
    assert resumed_plugin.scaler.get_scale() == INIT_SCALE / 2  # one more finite step: no growth, no backoff


def test_string_16_mixed_is_bf16_without_scaler_on_cpu(tmp_path):
    """Documents why the test above builds the plugin itself."""
    trainer = L.Trainer(accelerator="cpu", precision="16-mixed", logger=False, default_root_dir=str(tmp_path))
    assert trainer.precision == "bf16-mixed" and getattr(trainer.precision_plugin, "scaler", None) is None


# --- 9. weight_dtype of the frozen modules -----------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_bf16_frozen_weights_with_fp32_lora(tiny_model_dir, shapes_dir, tmp_path, precision):
    model = make_model(tiny_model_dir, weight_dtype="bfloat16")
    assert {p.dtype for p in model.vae.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.text_encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.unet.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in model.unet.parameters() if p.requires_grad} == {torch.float32}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = trainable(model)
    losses = []
    model.on_train_batch_end = lambda outputs, batch, idx: losses.append(outputs["loss"].detach())
    fit(model, make_data(shapes_dir, tiny_model_dir), 2, tmp_path, precision=precision)

    assert len(losses) == 2 and all(torch.isfinite(loss) and loss.dtype == torch.float32 for loss in losses)
    after = trainable(model)
    assert {n for n in before if not torch.equal(before[n], after[n])} == set(before)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    params = dict(model.named_parameters())
    assert all(params[n].dtype == torch.bfloat16 and torch.equal(params[n], v) for n, v in frozen.items())


def test_full_finetune_keeps_the_unet_fp32_with_bf16_weight_dtype(tiny_model_dir, shapes_dir, tmp_path):
    model = FullFineTune(str(tiny_model_dir), weight_dtype="bfloat16", optimizer=partial(torch.optim.AdamW, lr=1e-3),
                         lr_schedule=LRSchedule(name="constant"))
    unet = list(model.unet.parameters())
    assert {p.dtype for p in unet} == {torch.float32} and all(p.requires_grad for p in unet)
    assert {p.dtype for p in model.vae.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.text_encoder.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in model.vae.parameters())
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    before = {n: p.detach().clone() for n, p in model.unet.named_parameters()}
    losses = []
    model.on_train_batch_end = lambda outputs, batch, idx: losses.append(outputs["loss"].detach())
    fit(model, make_data(shapes_dir, tiny_model_dir), 1, tmp_path)
    assert len(losses) == 1 and torch.isfinite(losses[0])
    assert {p.dtype for p in model.unet.parameters()} == {torch.float32}
    assert any(not torch.equal(before[n], p) for n, p in model.unet.named_parameters())
