"""Stable Diffusion XL on a tiny SDXL built in code: both text encoders, the size and crop conditioning, caption
dropout, cache and buckets, and LoRA on both text encoders."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from sdtune.data import CaptionDataModule
from sdtune.data.dataset import CaptionDataset
from sdtune.data.records import discover_records
from sdtune.errors import SdtuneError
from sdtune.finetune import LoRAFineTune
from sdtune.lora import LoraSettings, TextEncoderLora
from sdtune.models.pretrained import load_pipeline, load_stable_diffusion, load_tokenizers
from sdtune.sampling import encode_prompt_pair
from sdtune.text import caption_ids
from training import perturbed

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
    parts = load_stable_diffusion(str(tiny_sdxl_dir))
    assert type(parts.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert parts.force_zeros_for_empty_prompt
    assert [t.pad_token for t in load_tokenizers(str(tiny_sdxl_dir))] == ["<|endoftext|>", "!"]
    assert parts.vae.config.scaling_factor == 0.13025
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sdxl_dir, broken)
    shutil.rmtree(broken / "tokenizer_2")
    with pytest.raises(SdtuneError, match=r"missing tokenizer_2/"):
        load_stable_diffusion(str(broken))


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
    dataset = CaptionDataset(records, tokenizer, 32, random_flip=True, tokenizer_2=tokenizer_2)
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
    dataset = CaptionDataset(records[:2], tokenizer, 32, tokenizer_2=tokenizer_2)
    from sdtune.data.dataset import collate

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
    empty, empty_2 = caption_ids(dm.tokenizer, 75, ""), caption_ids(dm.tokenizer_2, 75, "")
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


def _ids(module):
    return [caption_ids(tokenizer, 75, PROMPT) for tokenizer in (module.tokenizer, module.tokenizer_2)]
