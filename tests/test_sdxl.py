"""Stable Diffusion XL on a tiny SDXL built in code: both text encoders, the size and crop conditioning, caption
dropout, cache and buckets, LoRA on both text encoders, and the `sdxl/lora` recipe through the real CLI, whose every
file loads in diffusers' `StableDiffusionXLPipeline` and changes its images as sdtune's own sampler showed."""

import shutil

import numpy as np
import pytest
import torch
from a1111_names import check_a1111_layers, original_module_names
from PIL import Image
from safetensors.torch import load_file
from test_cli import sdtune, sdtune_here
from training import perturbed

from sdtune.adapters.kohya import TrainingInfo, save_kohya
from sdtune.adapters.lora import LoraSettings, TextEncoderLora
from sdtune.data import CaptionDataModule
from sdtune.data.dataset import CaptionDataset
from sdtune.data.records import discover_records
from sdtune.errors import SdtuneError
from sdtune.finetune import LoRAFineTune
from sdtune.inference.sampling import encode_prompt_pair
from sdtune.models.pretrained import load_model, load_pipeline, load_tokenizers
from sdtune.models.text import caption_ids

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    """Six 96×64 and two 64×96 images with captions: random crops and buckets have room to move."""
    root = tmp_path_factory.mktemp("wide")
    generator = np.random.default_rng(0)
    for i in range(8):
        size = (96, 64) if i < 6 else (64, 96)
        Image.fromarray(generator.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"a {['red', 'blue'][i % 2]} picture {i}")
    return root


def test_tiny_sdxl_loads_with_both_text_encoders_and_tokenizers(tiny_sdxl_dir, tmp_path):
    parts = load_model(str(tiny_sdxl_dir))
    assert type(parts.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert parts.family.name == "sdxl" and parts.options["force_zeros_for_empty_prompt"]
    assert [t.pad_token for t in load_tokenizers(str(tiny_sdxl_dir))] == ["<|endoftext|>", "!"]
    assert parts.vae.config.scaling_factor == 0.13025
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sdxl_dir, broken)
    shutil.rmtree(broken / "tokenizer_2")
    with pytest.raises(SdtuneError, match=r"missing tokenizer_2/"):
        load_model(str(broken))


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_prompt_encoding_is_the_sdxl_pipelines(tiny_sdxl_dir, clip_skip):
    pipe = load_pipeline(str(tiny_sdxl_dir))
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    skip = clip_skip - 1 or None  # diffusers counts from 0
    for negative in (None, "blurry"):
        ours, our_negative = encode_prompt_pair(pipe, PROMPT, negative, clip_skip)
        embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            PROMPT, do_classifier_free_guidance=True, negative_prompt=negative, clip_skip=skip
        )
        assert ours.hidden.shape == (1, 77, 32 + 48) and ours.pooled.shape == (1, 40)
        torch.testing.assert_close(ours.hidden, embeds)
        torch.testing.assert_close(ours.pooled, pooled)
        if clip_skip == 1 or negative is None:  # diffusers encodes a negative prompt without clip skip; sdtune with
            torch.testing.assert_close(our_negative.hidden, negative_embeds)
            torch.testing.assert_close(our_negative.pooled, negative_pooled)
        # No negative prompt: zeros (SDXL's force_zeros_for_empty_prompt); a negative prompt is encoded.
        assert bool(our_negative.hidden.any()) == (negative is not None)


def test_each_sample_records_its_original_size_and_crop(tiny_sdxl_dir, wide_dir):
    tokenizer, tokenizer_2 = load_tokenizers(str(tiny_sdxl_dir))
    records = sorted(discover_records(wide_dir), key=lambda r: r.path)
    dataset = CaptionDataset(records, [tokenizer, tokenizer_2], 32, random_flip=True)
    crops, flips = set(), set()
    for epoch in range(6):
        sample = dataset[(epoch, 0)]  # a 96×64 image: resized to 48×32, a random 32×32 window
        assert sample["original_size"].tolist() == [64, 96]
        top, left = sample["crop_top_left"].tolist()
        resized = Image.open(records[0].path).convert("RGB").resize((48, 32), Image.Resampling.LANCZOS)
        flipped = not torch.equal(sample["pixel_values"], _pixels(resized.crop((left, top, left + 32, top + 32))))
        if flipped:  # the offset is in the mirrored image, which the model sees
            mirrored = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            assert torch.equal(sample["pixel_values"], _pixels(mirrored.crop((left, top, left + 32, top + 32))))
        crops.add((top, left))
        flips.add(flipped)
    assert len(crops) > 2 and flips == {True, False}
    tall = dataset[(0, 7)]
    assert tall["original_size"].tolist() == [96, 64] and tall["crop_top_left"][1] == 0


def _pixels(image):
    from sdtune.data.transforms import to_tensor

    return to_tensor(image)


def test_the_crop_and_sizes_reach_the_unet_as_time_ids(tiny_sdxl_dir, wide_dir):
    tokenizer, tokenizer_2 = load_tokenizers(str(tiny_sdxl_dir))
    records = sorted(discover_records(wide_dir), key=lambda r: r.path)
    dataset = CaptionDataset(records[:2], [tokenizer, tokenizer_2], 32)
    from sdtune.data.batch import collate

    batch = collate([dataset[0], dataset[1]])
    module = LoRAFineTune(str(tiny_sdxl_dir), lora=LoraSettings(rank=4), noise_seed=0).eval()
    seen = []
    module.unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["added_cond_kwargs"]), with_kwargs=True)
    loss = module.diffusion_loss(batch, torch.Generator().manual_seed(0))
    top, left = batch["crop_top_left"][0].tolist()
    assert seen[0]["time_ids"][0].tolist() == [64, 96, top, left, 32, 32]
    assert seen[0]["text_embeds"].shape == (2, 40)
    moved = {**batch, "crop_top_left": batch["crop_top_left"] + torch.tensor([0, 5])}
    other = module.diffusion_loss(moved, torch.Generator().manual_seed(0))
    assert seen[1]["time_ids"][0].tolist() == [64, 96, top, left + 5, 32, 32]
    assert abs(other.item() - loss.item()) > 1e-6


def test_caption_dropout_empties_the_caption_of_both_encoders(tiny_sdxl_dir, shapes_dir):
    dm = CaptionDataModule(str(shapes_dir), resolution=32, batch_size=8, center_crop=True, caption_dropout=0.5,
                           pretrained=str(tiny_sdxl_dir), seed=1)  # fmt: skip
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    empty, empty_2 = caption_ids(dm.tokenizer, 75, ""), caption_ids(dm.tokenizers[1], 75, "")
    assert not torch.equal(empty, empty_2)  # "!" pads the second
    dropped = [caption == "" for caption in batch["caption"]]
    assert any(dropped) and not all(dropped)
    for i, was_dropped in enumerate(dropped):
        assert torch.equal(batch["input_ids"][i], empty) == was_dropped
        assert torch.equal(batch["input_ids_2"][i], empty_2) == was_dropped


def test_cached_bucketed_batches_give_the_losses_of_encoded_ones(tiny_sdxl_dir, wide_dir, tmp_path):
    settings = dict(resolution=32, batch_size=2, buckets=True, bucket_step=8, center_crop=True, random_flip=True,
                    caption_dropout=0.5, seed=2, pretrained=str(tiny_sdxl_dir))  # fmt: skip
    loaded = []
    for cache in (False, True):
        dm = CaptionDataModule(str(wide_dir), cache=cache, cache_dir=str(tmp_path / "cache"), **settings)
        dm.prepare_data()
        dm.setup("fit")
        loaded.append(list(dm.train_dataloader()))
    plain, cached = loaded
    assert {tuple(b["latent_mean"].shape[-2:]) for b in cached} == {(12, 20), (20, 12)}  # 40×24 and 24×40 buckets
    module = LoRAFineTune(str(tiny_sdxl_dir), lora=LoraSettings(rank=4), noise_seed=0).eval()
    for p, c in zip(plain, cached, strict=True):
        assert c["pooled_text_embeds"].shape == (2, 40)
        for key in ("caption", "original_size", "crop_top_left"):
            assert p[key] == c[key] if key == "caption" else torch.equal(p[key], c[key])
        losses = [module.diffusion_loss(batch, torch.Generator().manual_seed(5)) for batch in (p, c)]
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-7)


def test_text_encoder_lora_adapts_both_encoders_and_diffusers_loads_both(tiny_sdxl_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    module = LoRAFineTune(str(tiny_sdxl_dir), lora=LoraSettings(rank=4), text_encoder_lora=TextEncoderLora(rank=2, lr=1e-4))
    assert [g["name"] for g in module.parameter_groups()] == ["unet", "text_encoder", "text_encoder_2"]
    perturbed(module, std=0.5)
    module.save_weights(tmp_path / "adapter")
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_dir))
    base = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)
    pipe.load_lora_weights(str(tmp_path / "adapter"))
    assert set(pipe.get_list_adapters()) == {"unet", "text_encoder", "text_encoder_2"}
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)
    ours = module.encode_prompts({k: v[None] for k, v in zip(("input_ids", "input_ids_2"), _ids(module))})
    torch.testing.assert_close(embeds, ours.hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, ours.pooled, rtol=1e-5, atol=1e-5)
    assert (pooled - base[2]).abs().max() > 1e-3  # the second encoder's adapter changed it


def test_kohya_layers_are_the_ones_a1111_patches_in_an_sdxl_checkpoint(tiny_sdxl_dir, tmp_path):
    """A1111 names SDXL's embedders 0 (OpenAI CLIP, `lora_te1_`) and 1 (OpenCLIP, `lora_te2_`: q, k, v in one
    MultiheadAttention); the UNet's are the original layout's, two transformer layers deep in the second block."""
    module = perturbed(LoRAFineTune(str(tiny_sdxl_dir), lora=LoraSettings(rank=4, target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"]),
                                    text_encoder_lora=TextEncoderLora(rank=2, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1"])))  # fmt: skip
    out = tmp_path / "sdxl.safetensors"
    save_kohya(out, module.family, module.unet, [module.text_encoder, module.text_encoder_2], TrainingInfo("tiny-sdxl", "sdxl"))
    layers = check_a1111_layers(load_file(out), original_module_names(tiny_sdxl_dir, "sdxl"), "sdxl")
    assert {layer.split("_")[1] for layer in layers} == {"unet", "te1", "te2"}
    assert any("transformer_blocks_1_attn2" in layer for layer in layers)


def _ids(module):
    return [caption_ids(tokenizer, 75, PROMPT) for tokenizer in (module.tokenizer, module.tokenizer_2)]


def _png(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


def _diffusers_image(model, lora, **options):
    """What a diffusers user gets: the SDXL pipeline from the folder, the LoRA file loaded, the sampler's settings."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(model))
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    generator = torch.Generator().manual_seed(0)
    image = pipe(PROMPT, num_inference_steps=4, guidance_scale=6.0, height=64, width=64, generator=generator, **options)
    return np.asarray(image.images[0], dtype=np.float64)


def test_sdxl_recipe_trains_through_the_cli_and_every_file_loads_in_diffusers(tiny_sdxl_dir, shapes_dir, tmp_path):
    run = tmp_path / "run"
    sdtune(
        "fit", "--config", "sdxl/lora", "--model.pretrained", tiny_sdxl_dir, "--data.root", shapes_dir,
        "--data.resolution", 64, "--data.batch_size", 4, "--data.num_workers", 0, "--trainer.max_steps", 8,
        "--trainer.default_root_dir", run, "--checkpoint.every_n_train_steps", 4, "--adapter.every_n_train_steps", 4,
        "--model.lr_schedule.warmup_steps", 0, "--model.optimizer.init_args.lr", 3e-2,
        "--model.text_encoder_lora", "{rank: 4, alpha: 4, lr: 1.0e-2}", "--samples.prompts", f"[{PROMPT}]",
        "--samples.seeds", "[0]", "--samples.steps", 4, "--samples.width", 64, "--samples.height", 64,
    )  # fmt: skip
    samples = {step: _png(run / "samples" / f"step_{step:06d}" / "0_s0.png") for step in (0, 4, 8)}
    base = _diffusers_image(tiny_sdxl_dir, None)
    # The run samples under bf16 autocast as it trains; diffusers runs float32: they agree to a fraction of the effect.
    for step, adapter in ((4, run / "adapter" / "step_000004"), (8, run / "adapter")):
        effect = np.abs(samples[step] - samples[0]).mean()
        loaded = _diffusers_image(tiny_sdxl_dir, adapter / "pytorch_lora_weights.safetensors")
        assert effect > 3, f"step {step}: the adapter changes the sample by only {effect:.2f} levels"
        assert np.abs(loaded - base).mean() == pytest.approx(effect, rel=0.2)
        assert np.abs(loaded - samples[step]).mean() < 0.2 * effect
    assert np.abs(base - samples[0]).mean() < 0.5

    # sdtune sample (float32) and the exported files: each loads in plain diffusers and gives sdtune's image.
    sample_options = ["--model", tiny_sdxl_dir, "--prompt", PROMPT, "--seed", 0, "--steps", 4, "--guidance", 6.0,
                      "--scheduler", "dpmpp_2m", "--width", 64, "--height", 64]  # fmt: skip
    sdtune_here("sample", *sample_options, "--adapter", run / "adapter", "--out", tmp_path / "ours")
    ours = _png(next((tmp_path / "ours").glob("*.png")))
    kohya, folder = tmp_path / "lora_kohya.safetensors", tmp_path / "lora_diffusers"
    sdtune_here("export", run, "--format", "kohya", "--out", kohya)
    sdtune_here("export", run, "--format", "diffusers", "--out", folder)
    from safetensors import safe_open

    with safe_open(str(kohya), "pt") as file:
        prefixes = {key.split("_")[1] for key in file.keys()}
        assert file.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    assert prefixes == {"unet", "te1", "te2"}
    own = run / "adapter" / "run.safetensors"  # the run's own kohya file, beside one per saved step
    assert (run / "adapter" / "step_000004" / "run-step000004.safetensors").is_file()
    check_a1111_layers(load_file(own), original_module_names(tiny_sdxl_dir, "sdxl"), "sdxl")
    for exported in (kohya, folder / "pytorch_lora_weights.safetensors", own):
        image = _diffusers_image(tiny_sdxl_dir, exported)
        assert np.abs(image - ours).max() <= 1, exported
    assert np.abs(ours - base).mean() > 3


def test_a_full_fine_tune_saves_an_sdxl_pipeline_with_both_text_encoders(tiny_sdxl_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from sdtune.finetune import FullFineTune

    module = FullFineTune(str(tiny_sdxl_dir), train_text_encoder=True)
    assert [g["name"] for g in module.parameter_groups()] == ["unet", "text_encoder", "text_encoder_2"]
    with torch.no_grad():
        module.text_encoder_2.text_projection.weight.add_(0.1)
    module.save_weights(tmp_path / "model")
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "model"))
    assert pipe.tokenizer_2.pad_token == "!" and pipe.config.force_zeros_for_empty_prompt
    torch.testing.assert_close(pipe.text_encoder_2.text_projection.weight, module.text_encoder_2.text_projection.weight)


def test_unet_flops_are_counted_with_the_added_conditioning(tiny_sdxl_dir, recwarn):
    from sdtune.callbacks.throughput import unet_flops_per_sample

    module = LoRAFineTune(str(tiny_sdxl_dir), lora=LoraSettings(rank=4))
    small, large = (unet_flops_per_sample(module, (4, side, side), (77, 80)) for side in (8, 16))
    assert 0 < small < large


def test_long_captions_are_encoded_in_windows_with_the_first_windows_pooled_embedding(tiny_sdxl_dir):
    module = LoRAFineTune(str(tiny_sdxl_dir), lora=LoraSettings(rank=4))
    caption = " ".join(["a red circle on a blue square"] * 12)
    one = {key: caption_ids(t, 75, caption)[None] for key, t in zip(("input_ids", "input_ids_2"), (module.tokenizer, module.tokenizer_2))}
    two = {key: caption_ids(t, 150, caption)[None] for key, t in zip(("input_ids", "input_ids_2"), (module.tokenizer, module.tokenizer_2))}
    short, long = module.encode_prompts(one), module.encode_prompts(two)
    assert long.hidden.shape == (1, 154, 80)
    torch.testing.assert_close(long.hidden[:, :77], short.hidden)
    assert (long.hidden[:, 77:] - short.hidden).abs().max() > 1e-3  # the second window is other text
    torch.testing.assert_close(long.pooled, short.pooled)


def test_image_to_image_and_inpainting_run_the_sdxl_pipelines(tiny_sdxl_dir):
    from sdtune.inference.sampling import denoise, generate, pipeline_for, prepare_condition

    pipe = load_pipeline(str(tiny_sdxl_dir))
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    condition = prepare_condition(pipe, image, 64, 64, 0.05)
    assert type(pipeline_for(pipe, condition)).__name__ == "StableDiffusionXLImg2ImgPipeline"
    text = encode_prompt_pair(pipe, PROMPT, None)
    moved = {}
    for strength in (0.05, 0.6):  # the random UNet cannot denoise, so compare latents: they move with the strength
        condition.strength = strength
        moved[strength] = (denoise(pipe, *text, 0, 20, 6.0, 64, 64, condition) - condition.latents).abs().mean()
    assert moved[0.05] < 0.1 * moved[0.6]
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    inpaint = prepare_condition(pipe, image, 64, 64, 1.0, mask)
    assert type(pipeline_for(pipe, inpaint)).__name__ == "StableDiffusionXLInpaintPipeline"
    out = np.asarray(generate(pipe, [PROMPT], [0], steps=4, height=64, width=64, condition=inpaint)[0][0], dtype=np.float64)
    original = np.asarray(image, dtype=np.float64)
    assert np.abs(out[:8] - original[:8]).max() <= 1  # outside the (feathered) mask: the init image's own pixels
    assert np.abs(out[24:40, 24:40] - original[24:40, 24:40]).mean() > 10
