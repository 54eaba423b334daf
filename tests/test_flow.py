"""Rectified-flow maths against diffusers: its σ sampling and loss weighting helpers, and the flow-matching
scheduler's own sigmas, shifts and `scale_noise`."""


import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from sdtune.errors import SdtuneError
from sdtune.finetune import Objective, flow
from sdtune.finetune.flow import FlowMatching


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "uniform"])
def test_sigma_draws_are_diffusers_density_per_sample(scheme):
    settings = FlowMatching(timestep_sampling=scheme, logit_mean=0.3, logit_std=0.8, mode_scale=1.1)
    ours = settings.draw_sigmas(5, torch.Generator().manual_seed(3))
    theirs = compute_density_for_timestep_sampling(scheme, 5, logit_mean=0.3, logit_std=0.8, mode_scale=1.1,
                                                   generator=torch.Generator().manual_seed(3))  # fmt: skip
    torch.testing.assert_close(ours, theirs.clamp(0, 1))
    assert ((ours >= 0) & (ours <= 1)).all()


def test_a_fixed_shift_is_the_schedulers_and_noising_is_its_scale_noise():
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    unshifted = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).sigmas[:-1]
    torch.testing.assert_close(flow.shift_fixed(unshifted, 3.0), scheduler.sigmas[:-1])
    settings = FlowMatching()  # shift null: the scheduler's
    torch.testing.assert_close(settings.shifted(unshifted, scheduler.config, 4096), scheduler.sigmas[:-1])
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    scheduler.set_timesteps(10)
    index = [2, 5, 9]
    timesteps = scheduler.timesteps[index]
    scheduler._step_index = None  # scale_noise looks each timestep up in the schedule
    expected = torch.cat([scheduler.scale_noise(latents[i : i + 1], timesteps[i : i + 1], noise[i : i + 1]) for i in range(3)])
    sigmas = scheduler.sigmas[index]
    torch.testing.assert_close(flow.noisy_latents(latents, noise, sigmas), expected)
    torch.testing.assert_close(flow.velocity(latents, noise), noise - latents)


def test_the_resolution_shift_is_the_schedulers_dynamic_shift():
    config = dict(num_train_timesteps=1000, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                  base_image_seq_len=256, max_image_seq_len=4096)  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    tokens = 1024  # a 1024 × 1024 Flux image packs into 64 × 64 = 4096 tokens; 512 × 512 into 1024
    mu = flow.resolution_mu(tokens, 256, 4096, 0.5, 1.15)
    sigmas = torch.linspace(1.0, 1 / 20, 20)
    scheduler.set_timesteps(sigmas=sigmas.numpy(), mu=mu)
    torch.testing.assert_close(FlowMatching().shifted(sigmas, scheduler.config, tokens), scheduler.sigmas[:-1])
    assert mu == pytest.approx(0.5 + (1.15 - 0.5) * (1024 - 256) / (4096 - 256))
    assert FlowMatching(shift=2.0).shifted(torch.tensor([0.5]), scheduler.config, tokens).item() == pytest.approx(2 / 3)


@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap"])
def test_loss_weights_are_diffusers_sd3_weighting(scheme):
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(FlowMatching(weighting=scheme).weights(sigmas), compute_loss_weighting_for_sd3(scheme, sigmas).float())


def test_per_sample_generators_draw_the_same_whatever_the_batch():
    settings, latents = FlowMatching(), torch.randn(3, 4, 8, 8)
    config = FlowMatchEulerDiscreteScheduler(shift=3.0).config
    together = settings.draw(latents, [torch.Generator().manual_seed(s) for s in (1, 2, 3)], config, 64)
    alone = settings.draw(latents[1:2], [torch.Generator().manual_seed(2)], config, 64)
    torch.testing.assert_close(together[0][1:2], alone[0])
    torch.testing.assert_close(together[1][1:2], alone[1])


def test_settings_of_the_other_objective_are_refused_in_one_line():
    with pytest.raises(SdtuneError, match=r"model.objective.min_snr_gamma is a setting of noise prediction .* see model.objective.flow"):
        Objective(min_snr_gamma=5.0).check_for("flow", "Flux")
    with pytest.raises(SdtuneError, match=r"model.objective.flow applies to flow-matching models \(SD3, Flux\), not to SD1.x"):
        Objective(flow={"weighting": "cosmap"}).check_for("diffusion", "SD1.x")
    Objective(loss="huber", prior_loss_weight=0.5).check_for("flow", "Flux")  # shared by both
    with pytest.raises(SdtuneError, match="model.objective.flow.timestep_sampling must be one of"):
        FlowMatching(timestep_sampling="cubic")
    with pytest.raises(SdtuneError, match="model.objective.flow.shift must be > 0"):
        FlowMatching(shift=0.0)
