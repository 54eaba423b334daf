"""VAE training: what trains, the loss it minimises, the scaling factor it measures, and the pipeline it writes."""

import pytest
import torch
from diffusers import StableDiffusionPipeline
from test_cli import sdtune
from training import fit, make_data, trainable

from sdtune.data import CaptionDataModule
from sdtune.errors import SdtuneError
from sdtune.finetune import VAEFineTune


def changed(before, after):
    return {name for name in before if not torch.equal(before[name], after[name])}


def test_vae_trains_and_the_rest_stays_frozen(tiny_model_dir, shapes_dir, tmp_path):
    model = VAEFineTune(str(tiny_model_dir), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    before = trainable(model)
    assert before and all(name.startswith("vae.") for name in before)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("unet.", "text_encoder."))}
    fit(model, make_data(shapes_dir, tiny_model_dir, batch_size=4), 3, tmp_path)
    assert changed(before, trainable(model)) == set(before)  # every VAE tensor moved
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())


def test_decoder_only_keeps_the_latent_space(tiny_model_dir, shapes_dir, tmp_path):
    model = VAEFineTune(str(tiny_model_dir), decoder_only=True, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    before = {k: v.clone() for k, v in model.vae.state_dict().items()}
    fit(model, make_data(shapes_dir, tiny_model_dir, batch_size=4), 3, tmp_path)
    after = model.vae.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith(("decoder.", "post_quant_conv.")) for k in moved)
    assert not any(k.startswith(("encoder.", "quant_conv.")) for k in moved)


def test_loss_is_reconstruction_plus_weighted_kl_per_element(tiny_model_dir):
    model = VAEFineTune(str(tiny_model_dir), loss="mse", kl_weight=0.5)
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    parts = model.reconstruction_loss({"pixel_values": pixels}, torch.Generator().manual_seed(0))
    posterior = model.vae.encode(pixels).latent_dist
    latents = posterior.sample(generator=torch.Generator().manual_seed(0))
    mse = (model.vae.decode(latents).sample - pixels).square().mean()
    kl = 0.5 * (posterior.mean.square() + posterior.var - 1 - posterior.logvar).mean()
    torch.testing.assert_close(parts["reconstruction"], mse.detach())
    torch.testing.assert_close(parts["kl"], kl.detach())
    torch.testing.assert_close(parts["loss"].detach(), (mse + 0.5 * kl).detach())
    decoder_only = VAEFineTune(str(tiny_model_dir), decoder_only=True, kl_weight=0.5)
    alone = decoder_only.reconstruction_loss({"pixel_values": pixels}, torch.Generator().manual_seed(0))
    torch.testing.assert_close(alone["loss"], alone["reconstruction"])  # no KL: the posterior does not train


def test_auto_scaling_factor_is_one_over_the_latent_std(tiny_model_dir, shapes_dir, tmp_path):
    # With a zero learning rate the VAE does not change, so the measured factor must match the latents' own std.
    model = VAEFineTune(str(tiny_model_dir), scaling_factor="auto", optimizer=lambda p: torch.optim.SGD(p, lr=0.0))
    assert model.measured_scaling_factor() is None
    data = make_data(shapes_dir, tiny_model_dir, batch_size=8)
    fit(model, data, 4, tmp_path)
    pixels = next(iter(data.train_dataloader()))["pixel_values"]
    with torch.no_grad():
        latents = model.vae.encode(pixels).latent_dist.sample(generator=torch.Generator().manual_seed(1))
    expected = 1 / latents.std().item()
    assert model.measured_scaling_factor() == pytest.approx(expected, rel=0.05)
    assert abs(expected - model.vae.config.scaling_factor) / expected > 0.1  # the tiny model's own factor is not it
    pipe = StableDiffusionPipeline.from_pretrained(model.save_weights(tmp_path / "model"))
    assert pipe.vae.config.scaling_factor == pytest.approx(model.measured_scaling_factor())
    for name, tensor in pipe.vae.state_dict().items():
        assert torch.equal(tensor, model.vae.state_dict()[name]), name
    kept = VAEFineTune(str(tiny_model_dir))  # null keeps the model's
    factor = kept.vae.config.scaling_factor
    assert StableDiffusionPipeline.from_pretrained(kept.save_weights(tmp_path / "kept")).vae.config.scaling_factor == factor


def test_bad_settings_are_one_line_errors(tiny_model_dir, shapes_dir, tmp_path):
    with pytest.raises(SdtuneError, match="model.kl_weight must be ≥ 0"):
        VAEFineTune(str(tiny_model_dir), kl_weight=-1.0)
    with pytest.raises(SdtuneError, match="model.scaling_factor must be > 0"):
        VAEFineTune(str(tiny_model_dir), scaling_factor=0.0)
    with pytest.raises(SdtuneError, match="with decoder_only the latent space stays the model's"):
        VAEFineTune(str(tiny_model_dir), decoder_only=True, scaling_factor="auto")
    data = CaptionDataModule(str(shapes_dir), resolution=32, batch_size=2, center_crop=True, cache=True,
                             cache_dir=str(tmp_path / "cache"), pretrained=str(tiny_model_dir))
    with pytest.raises(SdtuneError, match="data.cache stores VAE latents, but the VAE trains"):
        fit(VAEFineTune(str(tiny_model_dir)), data, 1, tmp_path)


def test_decoder_recipe_trains_through_the_cli_and_writes_a_pipeline(tiny_model_dir, shapes_dir, tmp_path):
    sdtune("fit", "--config", "sd15/vae_decoder", "--model.pretrained", tiny_model_dir, "--data.root", shapes_dir,
           "--data.resolution", 32, "--data.batch_size", 2, "--data.num_workers", 0, "--trainer.max_steps", 2,
           "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--model.weight_dtype", "float32",
           "--model.optimizer.init_args.lr", 1e-3, "--trainer.default_root_dir", tmp_path / "run")  # fmt: skip
    saved = StableDiffusionPipeline.from_pretrained(tmp_path / "run" / "model").vae.state_dict()
    base = StableDiffusionPipeline.from_pretrained(tiny_model_dir).vae.state_dict()
    moved = {k for k in base if not torch.equal(base[k], saved[k])}
    assert moved and all(k.startswith(("decoder.", "post_quant_conv.")) for k in moved)
