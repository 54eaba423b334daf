"""Optimizers, parameter groups, LR schedules, gradient clipping and accumulation on the tiny model.

Every test checks an effect of the feature (state dtypes, lr values, step sizes, weights), not only that it runs.
Images are 32 px (16×16 latents) and torch runs single-threaded: on 2 shared cores OpenMP spin-waits make the
2-thread default 10–50× slower.
"""

import math
from functools import partial

import lightning as L
import pytest
import torch
from training import fit, make_data, trainable

from sdtune.adapters.lora import LoraSettings, TextEncoderLora
from sdtune.errors import SdtuneError
from sdtune.finetune import LoRAFineTune, LRSchedule

LR = 1e-3


def make_model(tiny_model_dir, optimizer=None, **kwargs):
    kwargs.setdefault("lora", LoraSettings(rank=4, alpha=8.0))
    optimizer = optimizer or partial(torch.optim.AdamW, lr=LR)
    return LoRAFineTune(str(tiny_model_dir), optimizer=optimizer, **kwargs)








def changed(before, after):
    return {name for name in before if not torch.equal(before[name], after[name])}


def record_lrs(model):
    """lr of every param group at the start of each optimizer step (as the existing warmup test does)."""
    lrs = []
    model.on_train_batch_start = lambda batch, idx: lrs.append([g["lr"] for g in model.optimizers().param_groups])
    return lrs


class SaveAtStep(L.Callback):
    """trainer.save_checkpoint at the end of optimizer step `step`, where ModelCheckpoint would save."""

    def __init__(self, step, path):
        self.step, self.path, self.saved = step, path, False

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step and not self.saved:
            trainer.save_checkpoint(self.path)
            self.saved = True


# --- 1. bitsandbytes AdamW8bit ---------------------------------------------------------------------------------


def _quant_state(state):
    """bitsandbytes ≥ 0.48 nests the quantization tensors of a saved state under one key (FSDP compatibility)."""
    return state.get("__bnb_optimizer_quant_state__", state)


def test_adamw8bit_uses_8bit_state_checkpoints_it_and_resumes_exactly(tiny_model_dir, shapes_dir, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    optimizer = partial(bnb.optim.AdamW8bit, lr=LR, min_8bit_size=0)  # default 4096 keeps tiny LoRA tensors fp32

    def build():
        L.seed_everything(3)
        return make_model(tiny_model_dir, optimizer, noise_seed=11)

    # batch 4 of 8 images: 2 steps per epoch, so the checkpoint at step 2 lies on an epoch boundary (see
    # test_resume_mid_epoch_matches_an_uninterrupted_run for mid-epoch checkpoints).
    path = tmp_path / "step2.ckpt"
    full = build()
    initial = trainable(full)
    trainer = fit(full, make_data(shapes_dir, tiny_model_dir, batch_size=4), 4, tmp_path, callbacks=[SaveAtStep(2, path)])
    final = trainable(full)
    assert changed(initial, final) == set(initial)

    params = [p for p in full.parameters() if p.requires_grad]
    opt = trainer.optimizers[0]
    for p in params:
        assert opt.state[p]["state1"].dtype == torch.uint8 and opt.state[p]["state2"].dtype == torch.uint8
        assert opt.state[p]["state1"].shape == p.shape

    checkpoint = torch.load(path, weights_only=True)
    saved = checkpoint["optimizer_states"][0]["state"]
    assert len(saved) == len(params)
    for state in saved.values():
        quant = _quant_state(state)
        assert quant["state1"].dtype == torch.uint8 and quant["state2"].dtype == torch.uint8
        assert {"absmax1", "absmax2", "qmap1", "qmap2"} <= set(quant)

    resumed = build()
    resumed_trainer = fit(resumed, make_data(shapes_dir, tiny_model_dir, batch_size=4), 4, tmp_path, ckpt_path=str(path))
    assert resumed_trainer.global_step == 4
    resumed_opt = resumed_trainer.optimizers[0]
    assert all(resumed_opt.state[p]["state1"].dtype == torch.uint8 for p in resumed.parameters() if p.requires_grad)
    after = trainable(resumed)
    for name in final:
        assert torch.equal(after[name], final[name]), name


def test_adamw8bit_default_min_size_keeps_tiny_tensors_32bit():
    """Why the test above forces min_8bit_size=0: below 4096 elements bitsandbytes keeps 32-bit state."""
    bnb = pytest.importorskip("bitsandbytes")
    small, large = torch.nn.Parameter(torch.randn(4, 64)), torch.nn.Parameter(torch.randn(64, 64))
    opt = bnb.optim.AdamW8bit([small, large], lr=LR)
    small.grad, large.grad = torch.randn_like(small), torch.randn_like(large)
    opt.step()
    assert opt.state[small]["state1"].dtype == torch.float32 and opt.state[small]["state2"].dtype == torch.float32
    assert opt.state[large]["state1"].dtype == torch.uint8


def test_resume_mid_epoch_matches_an_uninterrupted_run(tiny_model_dir, shapes_dir, tmp_path):
    """A checkpoint written mid-epoch continues with the epoch's remaining batches, not its first ones again.

    A plain DataLoader has no state, so Lightning would restart the epoch's iterator while counting on from batch 2
    (batches 0–1 seen twice, 2–3 never); the DataModule saves the batch sampler's position instead.
    """
    def build():
        L.seed_everything(3)
        return make_model(tiny_model_dir, noise_seed=11)

    def pixels(model):
        seen = []
        model.on_train_batch_start = lambda batch, idx: seen.append(batch["pixel_values"].clone())
        return seen

    path = tmp_path / "mid.ckpt"
    full = build()
    full_batches = pixels(full)
    fit(full, make_data(shapes_dir, tiny_model_dir), 4, tmp_path, callbacks=[SaveAtStep(2, path)])  # 4 steps/epoch
    resumed = build()
    resumed_batches = pixels(resumed)
    fit(resumed, make_data(shapes_dir, tiny_model_dir), 4, tmp_path, ckpt_path=str(path))
    assert len(resumed_batches) == 2
    same_data = [torch.equal(a, b) for a, b in zip(resumed_batches, full_batches[2:])]
    assert all(same_data), (
        "resuming from a mid-epoch checkpoint replays the epoch's first batches instead of batches 2–3 "
        "(CaptionDataModule.state_dict/load_state_dict restore the BucketBatchSampler's position)"
    )
    final, after = trainable(full), trainable(resumed)
    assert all(torch.equal(after[name], final[name]) for name in final)


# --- 2. Prodigy --------------------------------------------------------------------------------------------------


def test_prodigy_grows_its_step_size_estimate(tiny_model_dir, shapes_dir, tmp_path):
    prodigyopt = pytest.importorskip("prodigyopt")
    model = make_model(tiny_model_dir, partial(prodigyopt.Prodigy, lr=1.0))
    # Same noise and timesteps every step: with fresh draws the tiny model's gradients are too noisy for d to
    # move within a few steps, which would make the test depend on the seed.
    model.step_generator = lambda batch: torch.Generator().manual_seed(0)
    before = trainable(model)
    ds = []
    model.on_train_batch_end = lambda *args: ds.append(model.optimizers().param_groups[0]["d"])
    trainer = fit(model, make_data(shapes_dir, tiny_model_dir), 6, tmp_path)
    group = trainer.optimizers[0].param_groups[0]
    assert group["lr"] == 1.0 and ds[0] == group["d0"]
    assert all(b > a for a, b in zip(ds, ds[1:])), ds  # the estimate rises every step
    assert ds[-1] > 10 * group["d0"], ds
    assert changed(before, trainable(model)) == set(before)


# --- 3. Adafactor ------------------------------------------------------------------------------------------------


def _first_2d_lora(model):
    return next((n, p) for n, p in model.named_parameters() if p.requires_grad and p.dim() == 2)


def test_transformers_adafactor_factors_second_moments(tiny_model_dir, shapes_dir, tmp_path):
    pytest.importorskip("transformers")
    from transformers.optimization import Adafactor

    optimizer = partial(Adafactor, lr=LR, relative_step=False, scale_parameter=False, warmup_init=False)
    model = make_model(tiny_model_dir, optimizer)
    before = trainable(model)
    trainer = fit(model, make_data(shapes_dir, tiny_model_dir), 2, tmp_path)
    assert changed(before, trainable(model)) == set(before)
    name, param = _first_2d_lora(model)
    state = trainer.optimizers[0].state[param]
    assert "exp_avg_sq_row" in state and "exp_avg_sq_col" in state and "exp_avg_sq" not in state, name
    assert state["exp_avg_sq_row"].shape == param.shape[:1] and state["exp_avg_sq_col"].shape == param.shape[1:]


def test_torch_adafactor_factors_second_moments(tiny_model_dir, shapes_dir, tmp_path):
    model = make_model(tiny_model_dir, partial(torch.optim.Adafactor, lr=1e-2))
    before = trainable(model)
    trainer = fit(model, make_data(shapes_dir, tiny_model_dir), 2, tmp_path)
    assert changed(before, trainable(model)) == set(before)
    name, param = _first_2d_lora(model)
    state = trainer.optimizers[0].state[param]
    assert state["row_var"].numel() == param.shape[0] and state["col_var"].numel() == param.shape[1], name


# --- 4. parameter groups -----------------------------------------------------------------------------------------


def test_text_encoder_group_has_its_own_lr_and_follows_the_schedule(tiny_model_dir, shapes_dir, tmp_path):
    model = make_model(
        tiny_model_dir,
        text_encoder_lora=TextEncoderLora(rank=2, lr=1e-5),
        lr_schedule=LRSchedule(name="constant_with_warmup", warmup_steps=4),
    )
    before = trainable(model)
    lrs = record_lrs(model)
    trainer = fit(model, make_data(shapes_dir, tiny_model_dir), 6, tmp_path)

    groups = trainer.optimizers[0].param_groups
    assert [g["name"] for g in groups] == ["unet", "text_encoder"]
    assert [g["initial_lr"] for g in groups] == pytest.approx([LR, 1e-5])
    unet_ids = {id(p) for p in model.unet.parameters() if p.requires_grad}
    text_ids = {id(p) for p in model.text_encoder.parameters() if p.requires_grad}
    assert {id(p) for p in groups[0]["params"]} == unet_ids
    assert {id(p) for p in groups[1]["params"]} == text_ids and text_ids

    factors = [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert [unet for unet, _ in lrs] == pytest.approx([LR * f for f in factors], abs=1e-12)
    assert [text for _, text in lrs] == pytest.approx([1e-5 * f for f in factors], abs=1e-14)

    moved = changed(before, trainable(model))
    assert any(n.startswith("text_encoder.") for n in moved) and any(n.startswith("unet.") for n in moved)


# --- 5. LR schedules ---------------------------------------------------------------------------------------------

STEPS = 8


def _cosine(step, warmup):
    if step < warmup:
        return step / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (STEPS - warmup)))


def _restarts(step, cycles):
    progress = step / STEPS
    return 0.0 if progress >= 1 else 0.5 * (1 + math.cos(math.pi * ((cycles * progress) % 1.0)))


def _linear(step, warmup):
    if step < warmup:
        return step / warmup
    return max(0.0, (STEPS - step) / (STEPS - warmup))


@pytest.mark.parametrize(
    "schedule, expected",
    [
        (LRSchedule(name="cosine", warmup_steps=2), [_cosine(s, 2) for s in range(STEPS + 1)]),
        (LRSchedule(name="cosine_with_restarts", num_cycles=2), [_restarts(s, 2) for s in range(STEPS + 1)]),
        (LRSchedule(name="linear", warmup_steps=2), [_linear(s, 2) for s in range(STEPS + 1)]),
        (LRSchedule(name="constant"), [1.0] * (STEPS + 1)),
    ],
    ids=["cosine", "cosine_with_restarts", "linear", "constant"],
)
def test_lr_schedule_follows_its_formula(tiny_model_dir, shapes_dir, tmp_path, schedule, expected):
    model = make_model(tiny_model_dir, lr_schedule=schedule)
    lrs = record_lrs(model)
    trainer = fit(model, make_data(shapes_dir, tiny_model_dir, batch_size=1), STEPS, tmp_path)
    seen = [group_lrs[0] for group_lrs in lrs] + [trainer.optimizers[0].param_groups[0]["lr"]]  # + after last step
    assert seen == pytest.approx([LR * f for f in expected], abs=1e-12)

    if schedule.name == "cosine":
        assert seen[2] == pytest.approx(LR) and all(b < a for a, b in zip(seen[2:], seen[3:]))
        assert seen[-1] == pytest.approx(0.0, abs=1e-12)
    elif schedule.name == "cosine_with_restarts":
        assert seen[0] == seen[4] == pytest.approx(LR) and seen[3] < 0.2 * LR  # back to the peak mid-run
    elif schedule.name == "linear":
        decay = [a - b for a, b in zip(seen[2:], seen[3:])]
        assert decay == pytest.approx([LR / 6] * 6) and seen[-1] == pytest.approx(0.0, abs=1e-12)
    else:
        assert len(set(seen)) == 1


def test_constant_schedule_honours_warmup_steps(tiny_model_dir, shapes_dir, tmp_path):
    """LRSchedule documents `name` as the shape *after* warmup and warmup_steps as a linear warmup from 0.

    Known failure: diffusers' get_scheduler("constant") takes no warmup, so warmup_steps is silently dropped.
    """
    model = make_model(tiny_model_dir, lr_schedule=LRSchedule(name="constant", warmup_steps=2))
    lrs = record_lrs(model)
    fit(model, make_data(shapes_dir, tiny_model_dir, batch_size=1), 3, tmp_path)
    seen = [group_lrs[0] for group_lrs in lrs]
    assert seen == pytest.approx([0.0, LR / 2, LR], abs=1e-12), (
        f"lr_schedule name=constant, warmup_steps=2 gave lrs {seen}: warmup_steps ignored "
        "(sdtune/finetune/base.py configure_optimizers: use constant_with_warmup when warmup_steps > 0)"
    )


# --- 6. gradient clipping ----------------------------------------------------------------------------------------


def test_gradient_clipping_bounds_the_update_norm(tiny_model_dir, shapes_dir, tmp_path):
    clip = 1e-3

    def update_norm(**trainer):
        L.seed_everything(1)
        model = make_model(tiny_model_dir, partial(torch.optim.SGD, lr=1.0), noise_seed=5)
        before = trainable(model)
        fit(model, make_data(shapes_dir, tiny_model_dir), 1, tmp_path, **trainer)
        after = trainable(model)
        return math.sqrt(sum(((after[n].double() - before[n].double()) ** 2).sum().item() for n in before))

    clipped = update_norm(gradient_clip_val=clip, gradient_clip_algorithm="norm")
    unclipped = update_norm()
    assert 0.99 * clip <= clipped <= clip * (1 + 1e-4), clipped  # SGD lr=1: the update is the clipped gradient
    assert unclipped > 10 * clip, unclipped  # so clipping did act


# --- 7. gradient accumulation ------------------------------------------------------------------------------------


def test_gradient_accumulation_steps_once_per_two_batches_like_a_manual_step(tiny_model_dir, shapes_dir, tmp_path):
    seed, noise_seed, lr = 5, 123, 0.5

    def build():
        L.seed_everything(seed)
        return make_model(tiny_model_dir, partial(torch.optim.SGD, lr=lr), noise_seed=noise_seed,
                          lr_schedule=LRSchedule(name="constant"))

    model = build()
    initial = trainable(model)
    calls, batches, after_first_step = [], [], {}
    original_step = model.training_step

    def counting_step(batch, batch_idx):
        calls.append((batch_idx, model.trainer.global_step))
        return original_step(batch, batch_idx)

    def on_start(batch, batch_idx):
        batches.append({k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()})
        if batch_idx == 2:
            after_first_step.update(trainable(model))

    model.training_step = counting_step
    model.on_train_batch_start = on_start
    trainer = fit(model, make_data(shapes_dir, tiny_model_dir), 2, tmp_path, accumulate_grad_batches=2)

    assert calls == [(0, 0), (1, 0), (2, 1), (3, 1)]  # 4 micro-batches, the optimizer stepped after 2 and 4
    assert trainer.global_step == 2
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 2  # stepped per optimizer step, not per batch

    # By hand: same initial adapter, same per-sample draws, (loss_i / 2).backward() over two micro-batches, one step.
    manual = build()
    assert all(torch.equal(v, initial[n]) for n, v in trainable(manual).items())
    manual.train()
    params = [p for p in manual.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr)
    optimizer.zero_grad()
    for batch in batches[:2]:
        (manual.diffusion_loss(batch, manual.step_generator(batch)) / 2).backward()
    optimizer.step()
    expected = trainable(manual)
    assert changed(initial, expected)
    for name in expected:
        torch.testing.assert_close(after_first_step[name], expected[name], rtol=1e-5, atol=1e-7)
    # and not what a single micro-batch would have given
    single = build()
    single.train()
    single_opt = torch.optim.SGD([p for p in single.parameters() if p.requires_grad], lr=lr)
    single.diffusion_loss(batches[0], single.step_generator(batches[0])).backward()
    single_opt.step()
    assert any(not torch.allclose(v, after_first_step[n], rtol=1e-4, atol=1e-6) for n, v in trainable(single).items())


def test_optimizer_without_an_lr_is_a_one_line_error(tiny_model_dir, shapes_dir, tmp_path):
    from transformers.optimization import Adafactor

    model = make_model(tiny_model_dir, optimizer=partial(Adafactor, lr=None, relative_step=True))
    with pytest.raises(SdtuneError, match="relative_step: false"):
        fit(model, make_data(shapes_dir, tiny_model_dir), 1, tmp_path)
