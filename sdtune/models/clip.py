"""Prompt token ids → CLIP embeddings the UNet attends to, with A1111-style chunks and clip-skip (SD1/2: one
encoder; SDXL: two, plus a pooled embedding)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def encode_text(text_encoder: torch.nn.Module, input_ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
    """Token ids (B×L, or B×chunks×L for prompts longer than one window) → B×(chunks·L)×width.

    Each chunk is encoded on its own and the results are concatenated along the sequence, as AUTOMATIC1111 does;
    the UNet's cross-attention takes any sequence length. `clip_skip` = k takes the k-th hidden state from the end
    and applies the final layer norm (k = 1 is the usual last layer; NovelAI-style anime models use 2). This is the
    A1111/kohya numbering; diffusers' pipelines count from 0, so their `clip_skip` is k − 1.
    """
    if input_ids.ndim == 2:
        input_ids = input_ids[:, None]
    batch, chunks, length = input_ids.shape
    flat = input_ids.reshape(batch * chunks, length).to(text_encoder.device)
    if clip_skip == 1:
        hidden = text_encoder(flat)[0]
    else:
        states = text_encoder(flat, output_hidden_states=True).hidden_states
        # transformers < 5 nests the layers under `text_model`; 5 puts them on the model itself.
        final_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
        hidden = final_norm(states[-clip_skip])
    return hidden.reshape(batch, chunks * length, hidden.shape[-1])


@dataclass
class TextConditioning:
    """What the UNet is conditioned on by the prompt: `hidden` (B×tokens×width) through cross-attention, and for
    SDXL `pooled` (B×projection), added to the timestep embedding with the size and crop numbers."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None


def encode_text_sdxl(
    text_encoder: torch.nn.Module, text_encoder_2: torch.nn.Module, input_ids: torch.Tensor, input_ids_2: torch.Tensor,
    clip_skip: int = 1,
) -> TextConditioning:  # fmt: skip
    """SDXL's prompt encoding, as StableDiffusionXLPipeline does it: each encoder's penultimate hidden state (no final
    layer norm; `clip_skip` k takes the (k+1)-th from the end), concatenated along the width, and the pooled,
    projected output of the second encoder. Each encoder reads its own tokenizer's ids (B×L or B×chunks×L); the
    pooled embedding of a chunked prompt is its first chunk's, as kohya takes it."""
    states = []
    for encoder, ids in ((text_encoder, input_ids), (text_encoder_2, input_ids_2)):
        if ids.ndim == 2:
            ids = ids[:, None]
        batch, chunks, length = ids.shape
        output = encoder(ids.reshape(batch * chunks, length).to(encoder.device), output_hidden_states=True)
        hidden = output.hidden_states[-(clip_skip + 1)]
        states.append(hidden.reshape(batch, chunks * length, hidden.shape[-1]))
    pooled = output.text_embeds.reshape(batch, chunks, -1)[:, 0]
    return TextConditioning(torch.cat(states, dim=-1), pooled)


def max_clip_skip(text_encoders: list[torch.nn.Module]) -> int:
    """The largest clip_skip the encoders allow: their depth (SDXL starts one layer from the end already)."""
    layers = min(encoder.config.num_hidden_layers for encoder in text_encoders)
    return layers - (len(text_encoders) - 1)


def encode_ids(text_encoders: list[torch.nn.Module], ids: list[torch.Tensor], clip_skip: int = 1) -> TextConditioning:
    """Token ids (one tensor per text encoder) → the UNet's text conditioning: SD1/2's one encoder, SDXL's two."""
    if len(text_encoders) == 1:
        return TextConditioning(encode_text(text_encoders[0], ids[0], clip_skip))
    return encode_text_sdxl(*text_encoders, *ids, clip_skip=clip_skip)
