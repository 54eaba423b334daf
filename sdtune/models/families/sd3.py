"""Stable Diffusion 3 / 3.5: a transformer (MMDiT) that attends jointly to image tokens and text, trained with
rectified flow.

The text: two CLIP encoders with projections (CLIP-L and CLIP-G) give their penultimate hidden states,
concatenated along the width and zero-padded to the T5's width, followed along the sequence by a T5-XXL's output;
their pooled, projected embeddings, concatenated, condition the transformer beside the timestep. The VAE has 16
channels and a shift as well as a scale. T5 is never trained.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from sdtune.models.families.base import Layout, ModelFamily, TextConditioning


class SD3(ModelFamily):
    name = "sd3"
    label = "SD3"
    objective = "flow"
    denoiser = "transformer"
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    tokenizers = ("tokenizer", "tokenizer_2", "tokenizer_3")
    trainable_encoders = ("text_encoder", "text_encoder_2")  # the CLIPs; T5 stays frozen
    t5_tokens = 256  # StableDiffusion3Pipeline's max_sequence_length
    classes = {
        "vae": "AutoencoderKL", "transformer": "SD3Transformer2DModel", "text_encoder": "CLIPTextModelWithProjection",
        "text_encoder_2": "CLIPTextModelWithProjection", "text_encoder_3": "T5EncoderModel",
        "tokenizer": "CLIPTokenizer", "tokenizer_2": "CLIPTokenizer", "tokenizer_3": "T5TokenizerFast",
        "scheduler": "FlowMatchEulerDiscreteScheduler",
    }  # fmt: skip
    pipelines = {
        "text2image": "StableDiffusion3Pipeline",
        "image2image": "StableDiffusion3Img2ImgPipeline",
        "inpaint": "StableDiffusion3InpaintPipeline",
    }
    text_cache_dtype = "float16"  # T5 sequences: 77 + 256 tokens × 4096 per caption
    single_file = False
    new_tokens = False
    init_adapter = False
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

    @classmethod
    def matches(cls, layout: Layout) -> bool:
        """A transformer and a third text encoder (the T5)."""
        return "transformer" in layout.folders and "text_encoder_3" in layout.folders

    def tokenize(self, tokenizers: Sequence[Any], caption: str, max_tokens: int) -> list[torch.Tensor]:
        return [*super().tokenize(tokenizers[:2], caption, max_tokens), t5_ids(tokenizers[2], caption, self.t5_tokens)]

    def encode_prompt(self, text_encoders: Sequence[torch.nn.Module], ids: Sequence[torch.Tensor], clip_skip: int = 1) -> TextConditioning:
        """As StableDiffusion3Pipeline encodes: each CLIP's (k+1)-th hidden state from the end (k = clip_skip, the
        penultimate by default) and projected pooled output, the CLIPs' states side by side padded to T5's width,
        then T5's states after them along the sequence."""
        clip_states, pooled = [], []
        for encoder, input_ids in zip(text_encoders[:2], ids[:2], strict=True):
            if input_ids.ndim == 2:
                input_ids = input_ids[:, None]
            batch, chunks, length = input_ids.shape
            output = encoder(input_ids.reshape(batch * chunks, length).to(encoder.device), output_hidden_states=True)
            hidden = output.hidden_states[-(clip_skip + 1)]
            clip_states.append(hidden.reshape(batch, chunks * length, hidden.shape[-1]))
            pooled.append(output.text_embeds.reshape(batch, chunks, -1)[:, 0])
        t5 = text_encoders[2](ids[2].to(text_encoders[2].device))[0]
        clip = torch.cat(clip_states, dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return TextConditioning(torch.cat([clip.to(t5.dtype), t5], dim=-2), torch.cat(pooled, dim=-1))

    def max_clip_skip(self, text_encoders: Sequence[torch.nn.Module]) -> int:
        return super().max_clip_skip(text_encoders[:2]) - 1  # the penultimate layer is already the first choice

    def predict(
        self, denoiser: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor, text: TextConditioning,
        sizes: Mapping[str, Any] | None = None, pixel_size: tuple[int, int] | None = None, guidance: float | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """`timesteps` are σ·num_train_timesteps, as the pipeline passes them."""
        dtype = self.compute_dtype(denoiser)
        return denoiser(
            hidden_states=latents.to(dtype), timestep=timesteps, encoder_hidden_states=text.hidden.to(dtype),
            pooled_projections=text.pooled.to(dtype),
        ).sample  # fmt: skip

    def prompt_kwargs(self, positive: TextConditioning, negative: TextConditioning) -> dict[str, torch.Tensor]:
        return super().prompt_kwargs(positive, negative) | {
            "pooled_prompt_embeds": positive.pooled, "negative_pooled_prompt_embeds": negative.pooled,
        }  # fmt: skip


def t5_ids(tokenizer: Any, caption: str, length: int) -> torch.Tensor:
    """A caption's T5 ids as the pipelines make them: </s> at the end, padded (or truncated) to `length`, or to the
    tokenizer's own model_max_length when that is shorter (T5-XXL's is 512; a small model may say fewer)."""
    length = min(length, tokenizer.model_max_length)
    return tokenizer(caption, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids[0]
