"""Prompt token ids → a CLIP text encoder's hidden states, with A1111-style chunks and clip-skip (SD1.x and SD2.x
condition on these; SDXL's two encoders are combined in `sdtune.models.families.sdxl`)."""

from __future__ import annotations

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
