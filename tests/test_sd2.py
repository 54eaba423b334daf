"""Stable Diffusion 2.x v-prediction and zero terminal SNR, on a tiny SD2-style model built in code: the loss target
is diffusers' velocity, the rescaled schedule reaches pure noise, sampling and saved schedulers follow it, and the
`sd2/lora` recipe trains through the CLI into files diffusers loads and that change its images as sdtune's own
samples showed."""

import numpy as np
import pytest
import torch
from a1111_names import check_a1111_layers, original_module_names
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, PNDMScheduler
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from test_cli import sdtune, sdtune_here
from training import perturbed

from sdtune.adapters.kohya import TrainingInfo, save_kohya
from sdtune.adapters.lora import LoraSettings, TextEncoderLora
from sdtune.errors import SdtuneError
from sdtune.finetune import LoRAFineTune, losses
from sdtune.finetune.objective import Objective
from sdtune.inference.sampling import make_scheduler

PROMPT = "a red circle"


def _batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.rand(2, 3, 64, 64, generator=generator) * 2 - 1,
            "input_ids": torch.randint(0, 600, (2, 1, 77), generator=generator)}  # fmt: skip


def _recorded_targets(module, monkeypatch, batch, generator):
    seen = []
    original = losses.training_target

    def record(prediction_type, alphas_cumprod, latents, noise, timesteps):
        target = original(prediction_type, alphas_cumprod, latents, noise, timesteps)
        seen.append((prediction_type, latents, noise, timesteps, target))
        return target

    monkeypatch.setattr(losses, "training_target", record)
    module.diffusion_loss(batch, generator)
    return seen[0]


def test_the_v_models_loss_target_is_diffusers_velocity(tiny_sd2_dir, monkeypatch):
    module = LoRAFineTune(str(tiny_sd2_dir), lora=LoraSettings(rank=4)).eval()
    assert module.prediction_type == "v_prediction"  # from the model's scheduler, no override
    kind, latents, noise, timesteps, target = _recorded_targets(module, monkeypatch, _batch(), torch.Generator().manual_seed(1))
    scheduler = DDPMScheduler.from_pretrained(str(tiny_sd2_dir), subfolder="scheduler")
    torch.testing.assert_close(target, scheduler.get_velocity(latents, noise, timesteps))
    assert not torch.allclose(target, noise)


def test_zero_terminal_snr_rescales_the_schedule_to_pure_noise(tiny_sd2_dir, tiny_model_dir, monkeypatch):
    module = LoRAFineTune(str(tiny_sd2_dir), lora=LoraSettings(rank=4), objective=Objective(zero_terminal_snr=True, min_snr_gamma=5.0))
    rescaled = DDPMScheduler.from_pretrained(str(tiny_sd2_dir), subfolder="scheduler", rescale_betas_zero_snr=True)
    torch.testing.assert_close(module.alphas_cumprod, rescaled.alphas_cumprod.float())
    assert module.alphas_cumprod[-1] == 0 and LoRAFineTune(str(tiny_sd2_dir)).alphas_cumprod[-1] > 1e-3
    module.objective.min_timestep = 999  # every sample at the last timestep: the UNet sees pure noise
    _, latents, noise, timesteps, target = _recorded_targets(module, monkeypatch, _batch(), torch.Generator().manual_seed(1))
    assert (timesteps == 999).all()
    torch.testing.assert_close(target, -latents)  # v at zero SNR is −x0
    loss = module.diffusion_loss(_batch(), torch.Generator().manual_seed(1))
    assert torch.isfinite(loss)
    with pytest.raises(SdtuneError, match="zero_terminal_snr needs v_prediction"):
        LoRAFineTune(str(tiny_model_dir), objective=Objective(zero_terminal_snr=True))


def test_samplers_and_saved_schedulers_follow_the_rescaled_schedule(tiny_sd2_dir):
    module = LoRAFineTune(str(tiny_sd2_dir), objective=Objective(zero_terminal_snr=True))
    ddim = make_scheduler("ddim", module.noise_scheduler.config)
    ddim.set_timesteps(10)
    assert ddim.timesteps[0] == 999 and ddim.config.rescale_betas_zero_snr  # trailing: sampling starts at pure noise
    with pytest.raises(SdtuneError, match="scheduler 'pndm' cannot sample a zero-terminal-SNR model; choose one of ddim"):
        make_scheduler("pndm", module.noise_scheduler.config)
    settings = Objective(zero_terminal_snr=True)
    pndm = PNDMScheduler.from_pretrained(str(tiny_sd2_dir), subfolder="scheduler")
    euler = EulerDiscreteScheduler.from_config(pndm.config)
    assert isinstance(settings.inference_scheduler(pndm), DDIMScheduler)  # PNDM cannot rescale: the paper's DDIM
    kept = settings.inference_scheduler(euler)
    assert isinstance(kept, EulerDiscreteScheduler) and kept.config.timestep_spacing == "trailing"
    assert Objective().inference_scheduler(euler) is euler


def test_kohya_layers_are_the_ones_a1111_patches_in_an_sd2_checkpoint(tiny_sd2_dir, tmp_path):
    """SD2's original text encoder is OpenCLIP: A1111 takes kohya's `lora_te_…_self_attn_q_proj` as the q rows of
    `model.transformer.resblocks.N.attn` (one MultiheadAttention, patched only with all of q, k, v, out) and
    `mlp_fc1` as `mlp.c_fc`; the UNet's names are those of the original layout computed from its config."""
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
    module = perturbed(LoRAFineTune(str(tiny_sd2_dir), lora=LoraSettings(rank=4, target_modules=targets),
                                    text_encoder_lora=TextEncoderLora(rank=4, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])))  # fmt: skip
    out = tmp_path / "sd2.safetensors"
    save_kohya(out, module.family, module.unet, [module.text_encoder], TrainingInfo("tiny-sd2", "sd2"))
    layers = check_a1111_layers(load_file(out), original_module_names(tiny_sd2_dir, "sd2"), "sd2")
    assert any("_mlp_fc1" in layer for layer in layers) and any("_ff_net_0_proj" in layer for layer in layers)
    assert {layer.split("_")[1] for layer in layers} == {"unet", "te"}
    with safe_open(str(out), "pt") as file:
        assert (file.metadata()["ss_v2"], file.metadata()["ss_base_model_version"]) == ("True", "sd_v2")


def _png(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


def test_sd2_recipe_trains_through_the_cli_and_its_files_load_in_diffusers(tiny_sd2_dir, shapes_dir, tmp_path):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    run = tmp_path / "run"
    sdtune(
        "fit", "--config", "sd2/lora", "--model.pretrained", tiny_sd2_dir, "--data.root", shapes_dir,
        "--data.resolution", 64, "--data.num_workers", 0, "--trainer.max_steps", 8, "--trainer.default_root_dir", run,
        "--model.objective.zero_terminal_snr", "true", "--model.lr_schedule.warmup_steps", 0,
        "--model.optimizer.init_args.lr", 3e-2, "--samples.prompts", f"[{PROMPT}]", "--samples.seeds", "[0]",
        "--samples.steps", 4, "--samples.width", 64, "--samples.height", 64,
    )  # fmt: skip
    samples = {step: _png(run / "samples" / f"step_{step:06d}" / "0_s0.png") for step in (0, 8)}

    def diffusers_image(lora):  # what a diffusers user writes for a zero-terminal-SNR adapter
        pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd2_dir), safety_checker=None)
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing")
        pipe.set_progress_bar_config(disable=True)
        if lora is not None:
            pipe.load_lora_weights(str(lora))
        generator = torch.Generator().manual_seed(0)
        out = pipe(PROMPT, num_inference_steps=4, guidance_scale=7.5, height=64, width=64, generator=generator)
        return np.asarray(out.images[0], dtype=np.float64)

    base, loaded = diffusers_image(None), diffusers_image(run / "adapter")
    effect = np.abs(samples[8] - samples[0]).mean()
    assert effect > 3
    assert np.abs(loaded - base).mean() == pytest.approx(effect, rel=0.2)
    assert np.abs(loaded - samples[8]).mean() < 0.2 * effect and np.abs(base - samples[0]).mean() < 0.2 * effect

    merged, kohya = tmp_path / "merged", tmp_path / "lora.safetensors"
    sdtune_here("export", run, "--merge", "--out", merged)
    sdtune_here("export", run, "--format", "kohya", "--out", kohya)
    pipe = StableDiffusionPipeline.from_pretrained(str(merged), safety_checker=None)
    config = pipe.scheduler.config
    assert (config.prediction_type, config.rescale_betas_zero_snr, config.timestep_spacing) == ("v_prediction", True, "trailing")
    own = run / "adapter" / "run.safetensors"  # the run's own kohya file: A1111's SD2 names, export's metadata
    check_a1111_layers(load_file(own), original_module_names(tiny_sd2_dir, "sd2"), "sd2")
    for file in (kohya, own):
        with safe_open(str(file), "pt") as opened:
            meta = opened.metadata()
        assert (meta["ss_v_parameterization"], meta["ss_zero_terminal_snr"], meta["modelspec.prediction_type"]) == ("True", "True", "v")
