"""Objective options, clip-skip and prompt chunks, LoRA init, full fine-tuning: each shown by its effect."""

from functools import partial

import pytest
import torch
from diffusers import StableDiffusionPipeline

from sdtune.adapters.lora import LoraSettings, TextEncoderLora
from sdtune.errors import SdtuneError
from sdtune.finetune import FullFineTune, LoRAFineTune, Objective, losses
from sdtune.models.clip import encode_text


def draws(objective, seed=0, shape=(3, 4, 8, 8)):
    return objective.draw(torch.zeros(shape), 1000, torch.Generator().manual_seed(seed))


def test_noise_offset_adds_a_constant_per_sample_and_channel():
    base_noise, _, base_t = draws(Objective())
    noise, input_noise, timesteps = draws(Objective(noise_offset=0.1))
    assert torch.equal(timesteps, base_t)  # the base draws do not move
    shift = noise - base_noise
    assert shift.abs().max() > 1e-3
    torch.testing.assert_close(shift, shift[..., :1, :1].expand_as(shift))  # constant over the image
    assert torch.equal(input_noise, noise)


def test_input_perturbation_changes_the_input_noise_not_the_target():
    base_noise, _, _ = draws(Objective())
    noise, input_noise, _ = draws(Objective(input_perturbation=0.1))
    assert torch.equal(noise, base_noise)
    difference = input_noise - noise
    assert 0.05 < difference.std() < 0.15  # ≈ 0.1 · N(0, 1)


def test_per_sample_generators_draw_the_same_for_a_sample_in_any_batch():
    objective = Objective(noise_offset=0.1, input_perturbation=0.1)
    seeds = [3, 4, 5]
    together = objective.draw(torch.zeros(3, 4, 8, 8), 1000, [torch.Generator().manual_seed(s) for s in seeds])
    alone = objective.draw(torch.zeros(1, 4, 8, 8), 1000, [torch.Generator().manual_seed(seeds[2])])
    for batch_draw, single_draw in zip(together, alone):
        assert torch.equal(batch_draw[2:], single_draw)  # noise, input noise and timestep of the third sample
    assert not torch.equal(together[0][0], together[0][1])  # and each sample has its own
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        objective.draw(torch.zeros(3, 4, 8, 8), 1000, [torch.Generator(), torch.Generator()])


def test_timestep_range_is_respected_and_checked():
    _, _, timesteps = draws(Objective(min_timestep=200, max_timestep=210), shape=(512, 1, 1, 1))
    assert timesteps.min() >= 200 and timesteps.max() <= 209 and len(set(timesteps.tolist())) == 10
    with pytest.raises(SdtuneError, match="min_timestep < max_timestep"):
        Objective(min_timestep=500, max_timestep=400).timestep_range(1000)
    with pytest.raises(SdtuneError, match="≤ 1000"):
        Objective(max_timestep=1001).timestep_range(1000)


def test_huber_is_quadratic_near_zero_and_linear_for_outliers():
    zeros = torch.zeros(1, 1, 1, 2)
    target = torch.tensor([[[[0.001, 10.0]]]])
    mse = losses.elementwise_loss(zeros, target, "mse")
    huber = losses.elementwise_loss(zeros, target, "huber", huber_c=0.1)
    smooth = losses.elementwise_loss(zeros, target, "smooth_l1", huber_c=0.1)
    assert huber[..., 0].item() == pytest.approx(mse[..., 0].item(), rel=1e-3)
    assert huber[..., 1].item() == pytest.approx(2 * 0.1 * (10.0 - 0.1), rel=1e-3)  # 2c(|r| − c): linear
    assert smooth[..., 1].item() == pytest.approx(huber[..., 1].item() / 0.1, rel=1e-6)


def test_masked_loss_ignores_the_masked_out_region():
    prediction = torch.zeros(2, 4, 4, 4)
    target = torch.zeros(2, 4, 4, 4)
    target[:, :, :, 2:] = 5.0  # error only in the right half
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, :, :2] = 1.0  # weight only the left half
    assert losses.diffusion_loss(prediction, target, mask=mask).item() == 0.0
    assert losses.diffusion_loss(prediction, target, mask=1 - mask).item() == pytest.approx(25.0)
    ones = torch.ones(2, 1, 4, 4)
    assert losses.diffusion_loss(prediction, target, mask=ones).item() == pytest.approx(
        losses.diffusion_loss(prediction, target).item()
    )


def batch(tiny_model_dir, model, size=32):
    generator = torch.Generator().manual_seed(3)
    ids = model.tokenizer(["a red circle", "a blue square"], padding="max_length", max_length=77, return_tensors="pt")
    return {"pixel_values": torch.rand(2, 3, size, size, generator=generator) * 2 - 1, "input_ids": ids.input_ids}


def test_module_mask_of_ones_equals_no_mask_and_a_zero_mask_gives_zero(tiny_model_dir):
    model = LoRAFineTune(str(tiny_model_dir))
    plain = batch(tiny_model_dir, model)
    masked = {**plain, "mask": torch.ones(2, 1, 32, 32)}
    loss = model.diffusion_loss(plain, torch.Generator().manual_seed(0))
    torch.testing.assert_close(model.diffusion_loss(masked, torch.Generator().manual_seed(0)), loss)
    zero = {**plain, "mask": torch.zeros(2, 1, 32, 32)}
    assert model.diffusion_loss(zero, torch.Generator().manual_seed(0)).item() == 0.0


def test_v_prediction_override_changes_the_target(tiny_model_dir, tmp_path):
    eps = LoRAFineTune(str(tiny_model_dir))
    v = LoRAFineTune(str(tiny_model_dir), objective=Objective(prediction_type="v_prediction"))
    assert eps.prediction_type == "epsilon" and v.prediction_type == "v_prediction"
    data = batch(tiny_model_dir, eps)
    # Same weights (B = 0), same draws: only the target differs.
    assert eps.diffusion_loss(data, torch.Generator().manual_seed(0)) != v.diffusion_loss(data, torch.Generator().manual_seed(0))
    full = FullFineTune(str(tiny_model_dir), objective=Objective(prediction_type="v_prediction"))
    full.save_weights(tmp_path / "model")
    assert StableDiffusionPipeline.from_pretrained(tmp_path / "model").scheduler.config.prediction_type == "v_prediction"


def test_clip_skip_takes_an_earlier_layer_through_the_final_norm(tiny_model_dir):
    model = LoRAFineTune(str(tiny_model_dir))
    encoder = model.text_encoder
    ids = batch(tiny_model_dir, model)["input_ids"]
    with torch.no_grad():
        states = encoder(ids, output_hidden_states=True).hidden_states
        last, skip2 = encode_text(encoder, ids, 1), encode_text(encoder, ids, 2)
        torch.testing.assert_close(skip2, encoder.final_layer_norm(states[-2]))
    torch.testing.assert_close(last, encoder(ids)[0])
    assert (last - skip2).abs().max() > 1e-3


def test_prompt_chunks_are_encoded_separately_and_concatenated(tiny_model_dir):
    model = LoRAFineTune(str(tiny_model_dir))
    ids = batch(tiny_model_dir, model)["input_ids"]
    chunked = torch.stack([ids, ids.flip(0)], dim=1)  # B × 2 chunks × 77
    with torch.no_grad():
        out = encode_text(model.text_encoder, chunked)
        assert out.shape == (2, 154, model.text_encoder.config.hidden_size)
        torch.testing.assert_close(out[:, :77], encode_text(model.text_encoder, ids))
        torch.testing.assert_close(out[:, 77:], encode_text(model.text_encoder, ids.flip(0)))
        # A 3-D batch with one chunk is the same as the 2-D batch.
        torch.testing.assert_close(encode_text(model.text_encoder, ids[:, None]), encode_text(model.text_encoder, ids))


def test_lora_inits_leave_the_base_untouched_and_base_rewriting_ones_are_refused(tiny_model_dir):
    for init in ("gaussian", "kaiming"):
        model = LoRAFineTune(str(tiny_model_dir), lora=LoraSettings(rank=2, init=init))
        params = dict(model.unet.named_parameters())
        assert all(p.abs().max() == 0 for n, p in params.items() if ".lora_B." in n)
        assert all(p.abs().max() > 0 for n, p in params.items() if ".lora_A." in n)
    for init in ("pissa", "olora"):
        with pytest.raises(SdtuneError, match=f"init={init} rewrites the base weights"):
            LoraSettings(init=init)
    with pytest.raises(SdtuneError, match="model.text_encoder_lora.rank"):
        TextEncoderLora(rank=0)
    with pytest.raises(SdtuneError, match="model.text_encoder_lora.use_dora: diffusers .* drops text-encoder DoRA"):
        TextEncoderLora(use_dora=True)


def test_text_encoder_lora_trains_only_with_gradients_through_the_encoder(tiny_model_dir):
    model = LoRAFineTune(str(tiny_model_dir), text_encoder_lora=TextEncoderLora(rank=2, alpha=2.0))
    model.train()
    assert model.text_encoder.training and not model.vae.training
    loss = model.diffusion_loss(batch(tiny_model_dir, model), torch.Generator().manual_seed(0))
    loss.backward()
    te_grads = [p.grad for n, p in model.text_encoder.named_parameters() if p.requires_grad]
    # B = 0 at init, so A gets no gradient yet but B does.
    assert te_grads and any(g is not None and g.abs().max() > 0 for g in te_grads)
    frozen = LoRAFineTune(str(tiny_model_dir)).train()
    assert not frozen.text_encoder.training and not frozen.text_encoder_trains


def test_clip_skip_beyond_the_text_encoder_is_a_one_line_error(tiny_model_dir):
    with pytest.raises(SdtuneError, match="model.clip_skip 9 is more than this model's text encoders allow"):
        LoRAFineTune(str(tiny_model_dir), clip_skip=9)


def test_full_fine_tune_trains_every_unet_weight_in_fp32(tiny_model_dir):
    model = FullFineTune(str(tiny_model_dir), weight_dtype="bfloat16")
    unet = list(model.unet.parameters())
    assert all(p.requires_grad and p.dtype == torch.float32 for p in unet)
    assert not any(p.requires_grad for p in model.vae.parameters())
    assert {p.dtype for p in model.text_encoder.parameters()} == {torch.bfloat16}
    assert model.output_dirname == "model"


def test_full_fine_tune_can_train_the_text_encoder_and_saves_it(tiny_model_dir, shapes_dir, tmp_path):
    from diffusers import StableDiffusionPipeline as Pipeline
    from training import fit, make_data

    model = FullFineTune(str(tiny_model_dir), weight_dtype="bfloat16", train_text_encoder=True, text_encoder_lr=1e-2,
                         optimizer=partial(torch.optim.AdamW, lr=1e-3))  # fmt: skip
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.text_encoder.parameters())
    before = {n: p.detach().clone() for n, p in model.text_encoder.named_parameters()}
    trainer = fit(model, make_data(shapes_dir, tiny_model_dir), 2, tmp_path)
    assert [group.get("lr") for group in trainer.optimizers[0].param_groups][1] == pytest.approx(1e-2)
    after = dict(model.text_encoder.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)  # it trained …
    model.save_weights(tmp_path / "model")
    saved = Pipeline.from_pretrained(tmp_path / "model").text_encoder
    assert all(torch.equal(p, after[n]) for n, p in saved.named_parameters())  # … and was saved
    with pytest.raises(SdtuneError, match="model.text_encoder_lr is set but model.train_text_encoder is false"):
        FullFineTune(str(tiny_model_dir), text_encoder_lr=1e-3)
