"""Sampling on the tiny model: seeds, adapters and their scales, image-to-image, inpainting, every scheduler,
clip-skip, prompts beyond 75 tokens, and the pipeline loader's errors. 32 px, a few steps, CPU."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from training import trained_adapter

from sdtune.adapters.lora import LoraSettings, TextEncoderLora
from sdtune.errors import SdtuneError
from sdtune.inference.sampling import (
    FLOW_SCHEDULERS,
    SCHEDULERS,
    Adapter,
    check_strength,
    decode_fp32,
    denoise,
    encode_prompt_pair,
    generate,
    load_adapters,
    make_scheduler,
    prepare_condition,
)
from sdtune.models.pretrained import load_pipeline
from sdtune.models.text import text_token_ids

SIZE = 32
PROMPT = "a red circle"


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32)


def mean_abs(a, b, where=None) -> float:
    diff = np.abs(pixels(a) - pixels(b)).mean(-1)
    return float(diff[where].mean() if where is not None else diff.mean())


def fresh_pipe(model_dir, scheduler="ddim"):
    pipe = load_pipeline(str(model_dir))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    return pipe


def init_image() -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), (200, 40, 40))
    ImageDraw.Draw(image).ellipse((4, 4, 20, 20), fill=(20, 200, 30))
    return image


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    """The tiny model with SD's convention restored: the random VAE's latents have std ≈ 0.04 at SD's scaling factor,
    so the smallest noise level (t = 1) would already bury them; SD picks its factor so latents have unit variance,
    and so does this fixture (measured on the init image), which makes "close to the init image" testable."""
    pipe = fresh_pipe(tiny_model_dir)
    latents = prepare_condition(pipe, init_image(), SIZE, SIZE, 1.0).latents
    pipe.vae.register_to_config(scaling_factor=pipe.vae.config.scaling_factor / latents.std().item())
    return pipe


def sample(pipe, prompt=PROMPT, seeds=(0,), steps=3, **kwargs):
    return [row for row in generate(pipe, [prompt], list(seeds), steps=steps, height=SIZE, width=SIZE, **kwargs)[0]]


def test_same_seed_same_pixels_different_seed_different(pipe):
    first = sample(pipe, seeds=(0, 1))
    again = sample(pipe, seeds=(0,))
    assert first[0].size == (SIZE, SIZE)
    assert np.array_equal(pixels(first[0]), pixels(again[0]))
    assert mean_abs(first[0], first[1]) > 5


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A 'trained' adapter (UNet and text encoder): every LoRA B made non-zero, as in test_adapter_export."""
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    lora, text_lora = LoraSettings(rank=4, alpha=4.0), TextEncoderLora(rank=2, alpha=2.0)
    return trained_adapter(tiny_model_dir, out, lora=lora, text_encoder_lora=text_lora)


def test_adapter_at_scale_zero_is_exactly_the_base_image_and_scale_one_is_not(tiny_model_dir, adapter_dir):
    pipe = fresh_pipe(tiny_model_dir)
    base = sample(pipe, seeds=(0,))[0]
    names = load_adapters(pipe, [Adapter(adapter_dir, 0.0)])
    assert names == ["a0"]
    assert np.array_equal(pixels(sample(pipe)[0]), pixels(base))
    pipe.set_adapters(names, [1.0])
    assert mean_abs(sample(pipe)[0], base) > 1


def test_adapter_given_as_its_safetensors_file_and_two_adapters_mix(tiny_model_dir, adapter_dir):
    pipe = fresh_pipe(tiny_model_dir)
    base = sample(pipe)[0]
    weights = Adapter(adapter_dir).weights_file
    assert weights.name == "pytorch_lora_weights.safetensors"
    names = load_adapters(pipe, [Adapter(weights, 1.0), Adapter(adapter_dir, -1.0)])
    assert names == ["a0", "a1"]
    # The same adapter at +1 and −1 cancels out: only the scales differ, so both were loaded and weighted.
    assert mean_abs(sample(pipe)[0], base) < 0.5
    pipe.set_adapters(names, [1.0, 0.0])
    assert mean_abs(sample(pipe)[0], base) > 1


def test_missing_or_truncated_adapter_is_one_line(tiny_model_dir, adapter_dir, tmp_path):
    pipe = fresh_pipe(tiny_model_dir)
    (tmp_path / "empty").mkdir()
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(Adapter(adapter_dir).weights_file.read_bytes()[:500])
    for path in (tmp_path / "nope", tmp_path / "empty", truncated):
        with pytest.raises(SdtuneError) as err:
            load_adapters(pipe, [Adapter(path)])
        assert "\n" not in str(err.value) and str(path) in str(err.value)
    assert "truncated or corrupt" in str(err.value)


def test_image_to_image_at_small_strength_stays_at_the_init_image(pipe):
    """diffusers runs int(steps × strength) steps starting that far from the end: 20 × 0.05 = 1 step (t = 1).
    The random VAE does not reproduce the init image, so the reference is the init image through the VAE."""
    image = init_image()
    condition = prepare_condition(pipe, image, SIZE, SIZE, 0.05)
    reconstruction = decode_fp32(pipe, condition.latents)
    text_to_image = sample(pipe, steps=4)[0]
    near = sample(pipe, steps=20, condition=condition)[0]
    condition.strength = 0.6
    far = sample(pipe, steps=10, condition=condition)[0]
    assert mean_abs(near, reconstruction) < 0.2 * mean_abs(text_to_image, reconstruction)
    assert mean_abs(near, reconstruction) < 0.5 * mean_abs(far, reconstruction)


def test_strength_outside_range_or_running_no_step_is_one_line():
    check_strength(0.05, 20)
    check_strength(1.0, 1)
    for strength, steps, message in ((0.0, 20, "(0, 1]"), (1.5, 20, "(0, 1]"), (0.05, 10, "--steps 20")):
        with pytest.raises(SdtuneError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            check_strength(strength, steps)


def test_inpainting_keeps_the_unmasked_region_and_repaints_the_masked_one(pipe):
    image = init_image()
    mask = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, SIZE // 2 - 1, SIZE - 1), fill=255)  # left half: repaint
    condition = prepare_condition(pipe, image, SIZE, SIZE, 1.0, mask)

    # The loop itself: the unmasked latent cells end exactly at the init latents, the masked ones move.
    prompt_embeds, negative_embeds = encode_prompt_pair(pipe, PROMPT, None)
    latents = denoise(pipe, prompt_embeds, negative_embeds, 0, 3, 7.5, SIZE, SIZE, condition)
    half = latents.shape[-1] // 2
    torch.testing.assert_close(latents[..., half:], condition.latents[..., half:])
    assert (latents[..., :half] - condition.latents[..., :half]).abs().mean() > 0.5

    # The image: the init pixels outside the mask (feathered by half a latent cell), new pixels inside.
    out = sample(pipe, condition=condition)[0]
    masked = np.asarray(mask) > 127
    unmasked_error, masked_change = mean_abs(out, image, ~masked), mean_abs(out, image, masked)
    assert masked_change > 20 and unmasked_error < 0.1 * masked_change
    assert np.array_equal(pixels(out)[:, SIZE // 2 + 4 :], pixels(image)[:, SIZE // 2 + 4 :])
    # Another seed repaints the masked half differently and leaves the rest alone.
    other = sample(pipe, seeds=(1,), condition=condition)[0]
    assert mean_abs(out, other, masked) > 5 and mean_abs(out, other, ~masked) < 0.1 * mean_abs(out, other, masked)


@pytest.mark.parametrize("name", sorted(set(SCHEDULERS) - set(FLOW_SCHEDULERS)))  # flow_euler: test_sd3_flux
def test_every_scheduler_runs_all_three_modes(pipe, name):
    scheduler = make_scheduler(name, pipe.scheduler.config)  # lms needs scipy, a dependency of sdtune
    original, pipe.scheduler = pipe.scheduler, scheduler
    try:
        prompt_embeds, negative_embeds = encode_prompt_pair(pipe, PROMPT, None)
        image = init_image()
        mask = Image.new("L", (SIZE, SIZE), 0)
        ImageDraw.Draw(mask).rectangle((8, 8, 23, 23), fill=255)
        text = denoise(pipe, prompt_embeds, negative_embeds, 0, 4, 7.5, SIZE, SIZE)
        img2img = prepare_condition(pipe, image, SIZE, SIZE, 0.3)
        moved = denoise(pipe, prompt_embeds, negative_embeds, 0, 10, 7.5, SIZE, SIZE, img2img)
        inpaint = denoise(pipe, prompt_embeds, negative_embeds, 0, 4, 7.5, SIZE, SIZE, prepare_condition(pipe, image, SIZE, SIZE, 1.0, mask))
        for latents in (text, moved, inpaint):
            assert latents.shape == (1, 4, SIZE // 2, SIZE // 2) and torch.isfinite(latents).all()
        # Image-to-image at 0.3 ends much nearer its init latents than a text-to-image sample does (PNDM's
        # Runge-Kutta warm-up, which cannot start mid-schedule, ended 50× further away than text-to-image).
        assert (moved - img2img.latents).abs().mean() < 0.5 * (text - img2img.latents).abs().mean()
    finally:
        pipe.scheduler = original


def test_clip_skip_two_changes_the_image(pipe):
    last, second = (encode_prompt_pair(pipe, PROMPT, None, clip_skip=k)[0].hidden for k in (1, 2))
    assert last.shape == second.shape and (last - second).abs().max() > 1e-3
    assert mean_abs(sample(pipe, clip_skip=2)[0], sample(pipe, clip_skip=1)[0]) > 1


def test_prompts_longer_than_75_tokens_use_two_windows(pipe):
    words = "a red circle and a blue square on a green triangle".split()
    long_prompt = " ".join(words * 6)
    ids = text_token_ids(pipe.tokenizer, [long_prompt])[0]
    assert 75 < len(ids) <= 150
    prompt_embeds, negative_embeds = encode_prompt_pair(pipe, long_prompt, "blurry")
    assert prompt_embeds.hidden.shape == negative_embeds.hidden.shape == (1, 2 * 77, 32)
    first_window = pipe.tokenizer.decode(ids[:75])
    full, truncated = sample(pipe, prompt=long_prompt)[0], sample(pipe, prompt=first_window)[0]
    assert mean_abs(full, truncated) > 0.5  # the words after the 75th token reach the UNet


def test_load_pipeline_reads_the_tiny_model(tiny_model_dir):
    pipe = load_pipeline(str(tiny_model_dir), dtype=torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.safety_checker is None
    assert pipe.vae_scale_factor == 2


def test_load_pipeline_offline_uncached_hub_id_and_missing_directory_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(SdtuneError) as err:
        load_pipeline("org/uncached-model")
    message = str(err.value)
    assert "\n" not in message and "org/uncached-model" in message and "HF_HUB_OFFLINE" in message
    with pytest.raises(SdtuneError, match="does not exist"):
        load_pipeline(str(tmp_path / "no" / "model"))
