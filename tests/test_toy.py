"""The toy world's architecture: whole-word tokens and the latent size its recipes assume."""

import torch
from transformers import CLIPTokenizer

from sdtune.models import load_stable_diffusion
from sdtune.models.toy import TOY_WORDS, build_toy_stable_diffusion


def test_toy_words_are_single_tokens_and_other_text_still_tokenizes(tmp_path):
    build_toy_stable_diffusion(tmp_path / "toy")
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "toy" / "tokenizer")
    for word in TOY_WORDS:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    ids = [tokenizer(f"a {color} circle").input_ids for color in ("red", "green", "purple")]
    assert len({tuple(i) for i in ids}) == 3 and all(len(i) == 5 for i in ids)  # start, a, colour, circle, end
    assert tokenizer.decode(tokenizer("a zebra-striped hexagon").input_ids, skip_special_tokens=True) == "a zebra - striped hexagon"
    assert len(tokenizer) == load_stable_diffusion(str(tmp_path / "toy")).text_encoder.config.vocab_size


def test_toy_model_encodes_32_pixels_to_8x8_latents(tmp_path):
    parts = load_stable_diffusion(str(build_toy_stable_diffusion(tmp_path / "toy")))
    with torch.no_grad():
        latents = parts.vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8) and parts.unet.config.sample_size == 8
    assert parts.unet.config.cross_attention_dim == parts.text_encoder.config.hidden_size
