"""The LoRA LightningModule on a tiny model: what trains, what is frozen, what a checkpoint holds, that it learns."""

import json
import shutil
from functools import partial

import lightning as L
import pytest
import torch
from training import fit
from training import make_data as small_data

from sdtune.adapters.lora import LoraSettings, add_lora
from sdtune.errors import SdtuneError
from sdtune.finetune import LoRAFineTune, LRSchedule


def make_data(root, tiny_model_dir, batch_size=2):
    return small_data(root, tiny_model_dir, batch_size, resolution=64)


def make_model(tiny_model_dir, lr=1e-3, **lora):
    settings = LoraSettings(**{"rank": 4, "alpha": 8.0, **lora})
    return LoRAFineTune(str(tiny_model_dir), lora=settings, optimizer=partial(torch.optim.AdamW, lr=lr))


def test_only_lora_trains_and_frozen_weights_do_not_change(tiny_model_dir, shapes_dir, tmp_path):
    model = make_model(tiny_model_dir)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit(model, make_data(shapes_dir, tiny_model_dir), 3, tmp_path)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= trainable
    assert any(".lora_B." in k for k in changed)  # B starts at zero; it moved
    assert not model.vae.training and not model.text_encoder.training


def test_checkpoint_holds_only_the_adapter(tiny_model_dir, shapes_dir, tmp_path):
    model = make_model(tiny_model_dir)
    trainer = fit(model, make_data(shapes_dir, tiny_model_dir), 2, tmp_path)
    path = tmp_path / "only.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)  # plain tensors and types only
    keys = set(checkpoint["state_dict"])
    assert keys == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(k.startswith(("vae.", "text_encoder.")) for k in keys)
    assert "sdtune" in checkpoint and "generator" in checkpoint["sdtune"]["rng"][0]  # one entry per rank
    adapter_numel = sum(v.numel() for v in checkpoint["state_dict"].values())
    assert adapter_numel < 0.1 * sum(p.numel() for p in model.parameters())


def test_resume_restores_adapter_and_rejects_a_different_rank(tiny_model_dir, shapes_dir, tmp_path):
    model = make_model(tiny_model_dir)
    trainer = fit(model, make_data(shapes_dir, tiny_model_dir), 2, tmp_path)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    resumed = make_model(tiny_model_dir)
    fit(resumed, make_data(shapes_dir, tiny_model_dir), 2, tmp_path, ckpt_path=str(tmp_path / "a.ckpt"))
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(dict(resumed.named_parameters())[name], param)
    other = make_model(tiny_model_dir, rank=2)
    with pytest.raises(SdtuneError, match="model.lora.rank"):
        fit(other, make_data(shapes_dir, tiny_model_dir), 3, tmp_path, ckpt_path=str(tmp_path / "a.ckpt"))


def test_same_seed_same_losses(tiny_model_dir, shapes_dir, tmp_path):
    def losses():
        L.seed_everything(7)
        model = make_model(tiny_model_dir)
        recorded = []
        model.on_train_batch_end = lambda outputs, batch, idx: recorded.append(outputs["loss"].item())
        fit(model, make_data(shapes_dir, tiny_model_dir), 3, tmp_path)
        return recorded

    first, second = losses(), losses()
    assert len(first) == 3 and first == second


def test_memorizes_one_image(tiny_model_dir, shapes_dir, tmp_path):
    """One image, 50 steps: the loss at fixed noise and timesteps falls clearly."""
    one = tmp_path / "one"
    one.mkdir()
    first = json.loads((shapes_dir / "metadata.jsonl").read_text().splitlines()[0])
    shutil.copyfile(shapes_dir / first["file_name"], one / "image.png")
    (one / "image.txt").write_text(first["text"])
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2", "conv1", "conv2", "conv_out"]
    model = make_model(tiny_model_dir, lr=5e-3, rank=8, alpha=8.0, target_modules=targets)
    data = make_data(one, tiny_model_dir, batch_size=1)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))

    def probe():
        model.eval()
        with torch.no_grad():
            return sum(model.diffusion_loss(batch, torch.Generator().manual_seed(s)).item() for s in range(16)) / 16

    before = probe()
    fit(model, data, 50, tmp_path)
    after = probe()
    assert after < 0.5 * before, (before, after)


def test_lora_params_are_fp32_on_a_half_precision_unet(tiny_model_dir):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet", torch_dtype=torch.bfloat16)
    add_lora(unet, LoraSettings(rank=2, alpha=2))
    dtypes = {p.dtype for p in unet.parameters() if p.requires_grad}
    assert dtypes == {torch.float32}
    assert {p.dtype for p in unet.parameters() if not p.requires_grad} == {torch.bfloat16}


def test_bad_settings_are_one_line_errors(tiny_model_dir):
    with pytest.raises(SdtuneError, match="model.lora.rank"):
        LoraSettings(rank=0)
    with pytest.raises(SdtuneError, match="warmup_steps"):
        LRSchedule(warmup_steps=-1)
    with pytest.raises(SdtuneError, match="no module named nonexistent in UNet2DConditionModel"):
        make_model(tiny_model_dir, target_modules=["to_q", "nonexistent"])


def test_cosine_schedule_needs_a_run_length(tiny_model_dir, shapes_dir, tmp_path):
    model = LoRAFineTune(str(tiny_model_dir), lr_schedule=LRSchedule(name="cosine"))
    with pytest.raises(SdtuneError, match="trainer.max_steps"):
        fit(model, make_data(shapes_dir, tiny_model_dir), -1, tmp_path, max_epochs=-1)


def test_warmup_then_constant_learning_rate(tiny_model_dir, shapes_dir, tmp_path):
    model = make_model(tiny_model_dir, lr=1e-3)
    model.lr_schedule = LRSchedule(name="constant_with_warmup", warmup_steps=4)
    lrs = []
    model.on_train_batch_start = lambda batch, idx: lrs.append(model.optimizers().param_groups[0]["lr"])
    fit(model, make_data(shapes_dir, tiny_model_dir), 6, tmp_path)
    assert lrs == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])


def test_bf16_mixed_trains_with_fp32_adapter_weights(tiny_model_dir, shapes_dir, tmp_path):
    model = make_model(tiny_model_dir)
    losses = []
    model.on_train_batch_end = lambda outputs, batch, idx: losses.append(outputs["loss"])
    fit(model, make_data(shapes_dir, tiny_model_dir), 2, tmp_path, precision="bf16-mixed")
    assert len(losses) == 2 and all(torch.isfinite(loss) and loss.dtype == torch.float32 for loss in losses)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
