"""Flux.1 (dev and schnell): a transformer of double (joint text-image) and single blocks, trained with rectified
flow, over latents packed 2×2 into tokens with rotary position ids.

The text: a CLIP-L's pooled output conditions the transformer beside the timestep, and a T5-XXL's sequence is what
the image attends to. Flux.1 dev is guidance-distilled: it embeds a guidance value instead of running two passes
(classifier-free guidance), so training tells it a value too; schnell embeds none. The scheduler shifts σ by the
image's token count. T5 is never trained.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from sdtune.models.families.base import Layout, ModelFamily, TextConditioning
from sdtune.models.families.sd3 import t5_ids


class Flux(ModelFamily):
    name = "flux"
    label = "Flux"
    objective = "flow"
    denoiser = "transformer"
    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    trainable_encoders = ("text_encoder",)  # the CLIP; T5 stays frozen
    t5_tokens = 512  # FluxPipeline's max_sequence_length
    classes = {
        "vae": "AutoencoderKL", "transformer": "FluxTransformer2DModel", "text_encoder": "CLIPTextModel",
        "text_encoder_2": "T5EncoderModel", "tokenizer": "CLIPTokenizer", "tokenizer_2": "T5TokenizerFast",
        "scheduler": "FlowMatchEulerDiscreteScheduler",
    }  # fmt: skip
    pipelines = {"text2image": "FluxPipeline", "image2image": "FluxImg2ImgPipeline", "inpaint": "FluxInpaintPipeline"}
    text_cache_dtype = "float16"  # T5 sequences: 512 tokens × 4096 per caption
    single_file = False
    new_tokens = False
    init_adapter = False
    # The attention projections of the double blocks (image and text streams) and of the single blocks.
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    # kohya sd-scripts' Flux naming (Black Forest Labs' module names), which ComfyUI, Forge and diffusers read.
    kohya_prefixes = {"transformer": "lora_unet_", "text_encoder": "lora_te1_"}
    kohya_layout = "flux"
    kohya_base_version = "flux1"
    modelspec_architecture = "flux-1-dev"

    @classmethod
    def matches(cls, layout: Layout) -> bool:
        """A transformer and two text encoders, the second a T5."""
        return "transformer" in layout.folders and "text_encoder_2" in layout.folders and "text_encoder_3" not in layout.folders

    def tokenize(self, tokenizers: Sequence[Any], caption: str, max_tokens: int) -> list[torch.Tensor]:
        return [*super().tokenize(tokenizers[:1], caption, max_tokens), t5_ids(tokenizers[1], caption, self.t5_tokens)]

    def encode_prompt(self, text_encoders: Sequence[torch.nn.Module], ids: Sequence[torch.Tensor], clip_skip: int = 1) -> TextConditioning:
        """As FluxPipeline encodes: T5's hidden states, and the CLIP's pooled output (of the first window)."""
        clip, t5 = text_encoders
        clip_ids = ids[0][:, None] if ids[0].ndim == 2 else ids[0]
        pooled = clip(clip_ids[:, 0].to(clip.device)).pooler_output
        hidden = t5(ids[1].to(t5.device))[0]
        return TextConditioning(hidden, pooled.to(hidden.dtype))

    def max_clip_skip(self, text_encoders: Sequence[torch.nn.Module]) -> int:
        return 1  # Flux reads the CLIP's pooled output only

    def image_tokens(self, latent_size: tuple[int, int]) -> int:
        return (latent_size[0] // 2) * (latent_size[1] // 2)

    def size_multiple(self, denoiser_config: Mapping[str, Any], vae_factor: int) -> int:
        return 2 * vae_factor  # latents are packed 2×2

    def default_size(self, denoiser_config: Mapping[str, Any], vae_factor: int) -> tuple[int, int]:
        return 128 * vae_factor, 128 * vae_factor  # FluxPipeline's default (1024 px with Flux.1's VAE)

    def predict(
        self, denoiser: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor, text: TextConditioning,
        sizes: Mapping[str, Any] | None = None, pixel_size: tuple[int, int] | None = None, guidance: float | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """`timesteps` are σ·num_train_timesteps, as FluxPipeline holds them (it hands the transformer σ)."""
        dtype = self.compute_dtype(denoiser)
        batch, channels, height, width = latents.shape
        packed = pack(latents.to(dtype))
        image_ids = position_ids(height // 2, width // 2, latents.device, dtype)
        text_ids = torch.zeros(text.hidden.shape[1], 3, device=latents.device, dtype=dtype)
        embedded = None
        if denoiser.config.guidance_embeds:
            embedded = torch.full((batch,), 3.5 if guidance is None else guidance, device=latents.device, dtype=torch.float32)
        out = denoiser(
            hidden_states=packed, timestep=timesteps.to(dtype) / 1000, guidance=embedded,
            pooled_projections=text.pooled.to(dtype), encoder_hidden_states=text.hidden.to(dtype), txt_ids=text_ids,
            img_ids=image_ids,
        ).sample  # fmt: skip
        return unpack(out, height, width)

    def prompt_kwargs(self, positive: TextConditioning, negative: TextConditioning) -> dict[str, torch.Tensor]:
        """Flux dev's guidance is embedded, not classifier-free: no negative prompt (guidance_scale is the value)."""
        return {"prompt_embeds": positive.hidden, "pooled_prompt_embeds": positive.pooled}

    def pipeline_latents(self, latents: torch.Tensor, pixel_size: tuple[int, int], vae_factor: int) -> torch.Tensor:
        return unpack(latents, pixel_size[0] // vae_factor, pixel_size[1] // vae_factor)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """B×C×h×w latents → B×(h/2·w/2)×(4C) tokens, each a 2×2 patch (FluxPipeline._pack_latents)."""
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack`, for latents of h×w (FluxPipeline._unpack_latents)."""
    batch, _, features = tokens.shape
    patches = tokens.view(batch, height // 2, width // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, features // 4, height, width)


def position_ids(rows: int, columns: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Each image token's (0, row, column), the rotary embedding's positions (FluxPipeline._prepare_latent_image_ids)."""
    ids = torch.zeros(rows, columns, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(columns)[None, :]
    return ids.reshape(rows * columns, 3).to(device=device, dtype=dtype)
