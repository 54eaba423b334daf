import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from sdtune.finetune import losses


@pytest.fixture
def scheduler():
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


@pytest.fixture
def draw():
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(6, 4, 8, 8, generator=g)
    noise = torch.randn(6, 4, 8, 8, generator=g)
    timesteps = torch.tensor([0, 1, 250, 500, 998, 999])
    return latents, noise, timesteps


def test_add_noise_matches_diffusers(scheduler, draw):
    latents, noise, t = draw
    ours = losses.add_noise(scheduler.alphas_cumprod, latents, noise, t)
    torch.testing.assert_close(ours, scheduler.add_noise(latents, noise, t))


def test_velocity_target_matches_get_velocity(scheduler, draw):
    latents, noise, t = draw
    ours = losses.training_target("v_prediction", scheduler.alphas_cumprod, latents, noise, t)
    torch.testing.assert_close(ours, scheduler.get_velocity(latents, noise, t))
    assert not torch.allclose(ours, noise)


def test_epsilon_target_is_the_noise(scheduler, draw):
    latents, noise, t = draw
    assert losses.training_target("epsilon", scheduler.alphas_cumprod, latents, noise, t) is noise


def test_unknown_prediction_type_is_rejected(scheduler, draw):
    with pytest.raises(ValueError, match="prediction_type"):
        losses.training_target("sample", scheduler.alphas_cumprod, *draw)


def test_snr_matches_diffusers_compute_snr(scheduler, draw):
    t = draw[2]
    torch.testing.assert_close(losses.snr(scheduler.alphas_cumprod, t), compute_snr(scheduler, t))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_the_diffusers_training_script(scheduler, draw, prediction_type):
    t, gamma = draw[2], 5.0
    snr = compute_snr(scheduler, t)
    # The formula of diffusers' train_text_to_image_lora.py.
    mse_weights = torch.stack([snr, gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
    expected = mse_weights / snr if prediction_type == "epsilon" else mse_weights / (snr + 1)
    ours = losses.min_snr_weights(snr, gamma, prediction_type)
    torch.testing.assert_close(ours, expected)
    assert ours[-1] == pytest.approx(1.0 if prediction_type == "epsilon" else snr[-1] / (snr[-1] + 1))  # low SNR: unweighted
    assert ours[0] < 0.01  # nearly clean samples are down-weighted


def test_min_snr_weight_at_zero_snr_is_finite():
    w = losses.min_snr_weights(torch.tensor([0.0, 1.0]), 5.0, "epsilon")
    assert torch.isfinite(w).all() and w[0] == 1.0


def test_diffusion_loss_is_per_sample_weighted_mse():
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.stack([torch.ones(1, 2, 2), 2 * torch.ones(1, 2, 2)])
    assert losses.diffusion_loss(pred, target).item() == pytest.approx((1 + 4) / 2)
    assert losses.diffusion_loss(pred, target, torch.tensor([1.0, 0.5])).item() == pytest.approx((1 + 2) / 2)
    half = losses.diffusion_loss(pred.half(), target.half())
    assert half.dtype == torch.float32
