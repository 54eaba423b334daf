"""`data.cache: true`: training from cached VAE posteriors and text-encoder outputs gives the losses and weights of
training that encodes every step; later runs reuse the entries (also those `sdtune prep cache` wrote)."""

import pytest
import torch
from test_cli import sdtune
from training import fit, trainable

from sdtune.adapters.lora import LoraSettings, TextEncoderLora
from sdtune.data import CaptionDataModule
from sdtune.errors import SdtuneError
from sdtune.finetune import LoRAFineTune

SETTINGS = dict(resolution=32, batch_size=4, center_crop=True, random_flip=True, caption_dropout=0.5, seed=3)


def data(shapes_dir, tiny_model_dir, cache_dir=None, **overrides):
    settings = {**SETTINGS, **overrides}
    return CaptionDataModule(str(shapes_dir), pretrained=str(tiny_model_dir), cache=cache_dir is not None,
                             cache_dir=None if cache_dir is None else str(cache_dir), **settings)  # fmt: skip


def model(tiny_model_dir, **kwargs):
    torch.manual_seed(0)
    return LoRAFineTune(str(tiny_model_dir), lora=LoraSettings(rank=4), noise_seed=11, **kwargs)


def batches(dm):
    dm.prepare_data()
    dm.setup("fit")
    return list(dm.train_dataloader())


def test_cached_batches_give_the_losses_of_encoded_ones(tiny_model_dir, shapes_dir, tmp_path):
    module = model(tiny_model_dir).eval()
    plain = batches(data(shapes_dir, tiny_model_dir))
    cached = batches(data(shapes_dir, tiny_model_dir, tmp_path / "cache"))
    assert "pixel_values" not in cached[0] and cached[0]["latent_mean"].shape == (4, 4, 16, 16)
    captions = [c for batch in cached for c in batch["caption"]]
    assert captions == [c for batch in plain for c in batch["caption"]] and "" in captions  # the same dropout draws
    for p, c in zip(plain, cached, strict=True):
        losses = [module.diffusion_loss(batch, torch.Generator().manual_seed(5)) for batch in (p, c)]
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-7)
    other = batches(data(shapes_dir, tiny_model_dir, tmp_path / "cache", seed=4))  # other flip/dropout draws
    assert not torch.equal(other[0]["latent_mean"], cached[0]["latent_mean"])


@pytest.mark.parametrize("text_encoder", ["frozen", "lora"])
def test_training_with_the_cache_has_the_same_losses_and_weights(text_encoder, tiny_model_dir, shapes_dir, tmp_path):
    # A text encoder that trains encodes the cached samples' token ids each step: only its latents come from the cache.
    options = {"text_encoder_lora": TextEncoderLora(rank=2, lr=1e-3)} if text_encoder == "lora" else {}
    losses, weights = [], []
    for cache_dir in (None, tmp_path / "cache"):
        module, recorded = model(tiny_model_dir, **options), []
        step = module.training_step
        module.training_step = lambda batch, batch_idx: recorded.append(step(batch, batch_idx)) or recorded[-1]
        fit(module, data(shapes_dir, tiny_model_dir, cache_dir), 3, tmp_path / str(cache_dir is None))
        losses.append(torch.stack(recorded).detach())
        weights.append(trainable(module))
    assert any("text_encoder" in name for name in weights[0]) == (text_encoder == "lora")
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)
    # Adam divides by the gradients' scale, so float rounding in the VAE (the cache encodes in other batches) shows
    # up in the weights at ~1e-5 of their size; a wrong latent or text would change the losses above.
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=0, atol=5e-5, msg=name)


def test_a_second_run_reuses_every_entry(tiny_model_dir, shapes_dir, tmp_path, monkeypatch):
    first = data(shapes_dir, tiny_model_dir, tmp_path / "cache")
    first.prepare_data()
    entries = sorted(p.name for p in (tmp_path / "cache").rglob("*.safetensors"))
    assert len([e for e in entries]) == 8 * 2 + len({*first.cached.captions, ""})  # upright + mirrored, captions
    import sdtune.data.cache.training as cache_training

    monkeypatch.setattr(cache_training, "Encoders", None)  # loading the encoders again would fail the test
    again = data(shapes_dir, tiny_model_dir, tmp_path / "cache")
    again.prepare_data()
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*.safetensors")) == entries


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(center_crop=False), "data.center_crop: true"),
        (dict(shuffle_tags=True), "data.shuffle_tags: false"),
        (dict(alpha_mask=True), "loss masks are not cached"),
    ],
)
def test_settings_that_change_every_step_are_refused(overrides, message, tiny_model_dir, shapes_dir, tmp_path):
    with pytest.raises(SdtuneError, match=message):
        data(shapes_dir, tiny_model_dir, tmp_path, **overrides)


def test_fit_with_the_cache_through_the_cli(tiny_model_dir, shapes_dir, tmp_path):
    common = ["fit", "--config", "tiny/lora", "--model.pretrained", tiny_model_dir, "--data.root", shapes_dir,
              "--data.resolution", 32, "--data.batch_size", 2, "--trainer.max_steps", 2, "--samples.enabled", "false",
              "--data.cache", "true", "--data.cache_dir", tmp_path / "cache"]  # fmt: skip
    first = sdtune(*common, "--trainer.default_root_dir", tmp_path / "a")
    assert "computed 17, reused 0" in first.stderr  # 8 latents, 8 captions and the empty one
    second = sdtune(*common, "--trainer.default_root_dir", tmp_path / "b")
    assert "computed 0, reused 17" in second.stderr
    assert (tmp_path / "b" / "adapter" / "pytorch_lora_weights.safetensors").is_file()


def test_fit_reuses_what_prep_cache_computed(tiny_model_dir, shapes_dir, tmp_path, monkeypatch):
    import shutil

    from data_prep.cache import CacheSettings, build_cache

    dst = tmp_path / "shapes"
    shutil.copytree(shapes_dir, dst)
    build_cache(dst, str(tiny_model_dir), settings=CacheSettings(resolution=32))
    import sdtune.data.cache.training as cache_training

    monkeypatch.setattr(cache_training, "Encoders", None)  # nothing may be computed again
    dm = CaptionDataModule(str(dst), pretrained=str(tiny_model_dir), cache=True, **{**SETTINGS, "random_flip": False})
    dm.prepare_data()  # data.cache_dir null: DST/cache, where prep cache wrote
    assert next(iter(dm.train_dataloader()))["latent_mean"].shape == (4, 4, 16, 16)
