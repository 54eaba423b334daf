"""The toy world's architecture: a small Stable Diffusion for 32-pixel shape images, built with random weights.

`sdtune toy build` trains it (VAE, then UNet and text encoder) into the base model sdtune ships. Same families as
SD1.x (AutoencoderKL, CLIPTextModel, UNet2DConditionModel with cross-attention, CLIP BPE tokenizer) at a size that
trains on a CPU in minutes. The VAE downsamples by 4, so 32-pixel images are 8×8×4 latents.

The tokenizer is the tiny CLIP tokenizer (`tiny_tokenizer/`) plus one BPE merge chain per toy-world word, so that
"red", "purple" or "triangle" is one token each: a character-level encoding of "red" and "green" shares most of its
tokens, and a small text encoder then tells such prompts apart poorly. Other words still tokenize, character by
character.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from sdtune.models.tiny import TOKENIZER_FILES, clip_text_encoder, save_pipeline, tokenizer_config
from sdtune.toy.shapes import JUDGE_COLORS, SHAPES

# Every word of "a {color} {shape}" the toy world and its demos use, and common colour names beside them.
TOY_WORDS = ("a", "an", *JUDGE_COLORS, "white", "grey", "gray", "brown", "pink", "violet", *SHAPES)
END = "</w>"
TOY_FLOW_TOKENS = 8  # the flow toy's tokenizers: "a {colour} {shape}" with start and end tokens fits


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one lower-case word: merge the best-ranked adjacent pair until none is known."""
    parts = [*word[:-1], word[-1] + END]
    while len(parts) > 1:
        pairs = [(ranks.get(pair, len(ranks) + 1), i) for i, pair in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank > len(ranks):
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def toy_vocabulary(words: Iterable[str] = TOY_WORDS) -> tuple[dict[str, int], list[str]]:
    """(vocab, merges): the tiny tokenizer's, plus merges that make each of `words` a single token.

    A word gets merges appended (ranked after every earlier one, so an earlier word stays one token) until BPE
    turns it into one token."""
    vocab = json.loads((TOKENIZER_FILES / "vocab.json").read_text(encoding="utf-8"))
    lines = (TOKENIZER_FILES / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [line for line in lines if line and not line.startswith("#")]
    ranks = {tuple(line.split()): i for i, line in enumerate(merges)}
    special = {token: vocab.pop(token) for token in ("<|startoftext|>", "<|endoftext|>")}
    for word in words:
        while len(parts := _bpe(word, ranks)) > 1:
            first, second = parts[0], parts[1]
            ranks[first, second] = len(merges)
            merges.append(f"{first} {second}")
            vocab.setdefault(first + second, len(vocab))
    vocab.update({token: len(vocab) + i for i, token in enumerate(special)})
    return vocab, merges


def write_toy_tokenizer(out: Path, words: Iterable[str] = TOY_WORDS, max_length: int | None = None) -> int:
    """Write the toy tokenizer's vocab.json, merges.txt and tokenizer_config.json; returns the vocabulary size.
    `max_length` sets its model_max_length (default: CLIP's 77)."""
    vocab, merges = toy_vocabulary(words)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = tokenizer_config() | ({"model_max_length": max_length} if max_length else {})
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return len(vocab)


def build_toy_stable_diffusion(out: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """Write the toy architecture with random weights as a diffusers pipeline directory; returns `out`."""
    if image_size % 4:
        raise ValueError(f"image_size must be a multiple of 4 (the VAE's factor), got {image_size}")
    out = Path(out)
    torch.manual_seed(seed)
    vocab_size = write_toy_tokenizer(out / "tokenizer")
    vae = AutoencoderKL(
        block_out_channels=(32, 64, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        sample_size=image_size,
        norm_num_groups=32,
    )
    unet = UNet2DConditionModel(
        block_out_channels=(64, 128),
        layers_per_block=1,
        sample_size=image_size // 4,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    text_encoder = clip_text_encoder(vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    save_pipeline(out, vae, unet, text_encoder)
    return out


def build_toy_sd3(out: str | Path, vae_from: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """The toy world's flow-matching model, an SD3 (MMDiT) with random weights, as a diffusers pipeline directory:
    the trained toy VAE from `vae_from` (a toy pipeline folder), a 4-layer transformer 128 wide over its 8×8 latents
    (one token each), two toy CLIP encoders that train with it and a random T5 that stays frozen (its output still
    tells the words apart), and the flow-matching scheduler without a shift (the latents are tiny).

    Every tokenizer reads 8 tokens ("a {colour} {shape}" with its start and end tokens fits): the transformer attends
    to the text tokens beside the 64 image tokens, and CLIP's 77 would make that sequence more than twice as long."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from sdtune.models.tiny_sd3 import clip_with_projection
    from sdtune.models.tiny_t5 import t5_encoder, t5_tokenizer

    out = Path(out)
    torch.manual_seed(seed)
    vocab_size = write_toy_tokenizer(out / "tokenizer", max_length=TOY_FLOW_TOKENS)
    write_toy_tokenizer(out / "tokenizer_2", max_length=TOY_FLOW_TOKENS)
    tokenizer_3 = t5_tokenizer(model_max_length=TOY_FLOW_TOKENS)
    tokenizer_3.save_pretrained(out / "tokenizer_3")
    vae = AutoencoderKL.from_pretrained(Path(vae_from) / "vae", torch_dtype=torch.float32)
    vae.register_to_config(shift_factor=0.0)  # SD3's pipelines add the shift when they decode
    latent = image_size // 2 ** (len(vae.config.block_out_channels) - 1)
    modules = {
        "vae": vae,
        "transformer": SD3Transformer2DModel(
            sample_size=latent, patch_size=1, in_channels=vae.config.latent_channels,
            out_channels=vae.config.latent_channels, num_layers=4, attention_head_dim=16, num_attention_heads=8,
            joint_attention_dim=64, caption_projection_dim=128, pooled_projection_dim=64, pos_embed_max_size=latent,
        ),
        "text_encoder": clip_with_projection(vocab_size, 32, layers=2, projection_dim=32),
        "text_encoder_2": clip_with_projection(vocab_size, 32, layers=2, projection_dim=32),
        "text_encoder_3": t5_encoder(len(tokenizer_3), 64),
    }  # fmt: skip
    for name, module in modules.items():
        module.save_pretrained(out / name)
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).save_pretrained(out / "scheduler")
    from sdtune.models.tiny_sd3 import model_index

    (out / "model_index.json").write_text(json.dumps(model_index(), indent=2))
    return out
