"""A Stable Diffusion 1.x, 2.x or XL model as one checkpoint file in the original (LDM/CompVis, SGM for SDXL) key
layout: what AUTOMATIC1111, Forge and ComfyUI load as a checkpoint and Civitai hosts.

| part            | SD1.x                                   | SD2.x                     | SDXL                                         |
| UNet            | model.diffusion_model.*                 | same                      | same, with label_emb (the added conditioning) |
| VAE             | first_stage_model.*                     | same                      | same                                         |
| text encoder(s) | cond_stage_model.transformer.text_model.* (CLIP) | cond_stage_model.model.* (OpenCLIP) | conditioner.embedders.0.transformer.text_model.* (CLIP-L), conditioner.embedders.1.model.* (OpenCLIP bigG) |

This is the reverse of diffusers' `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
`convert_ldm_clip_checkpoint` and `convert_open_clip_checkpoint` (diffusers/loaders/single_file_utils.py), written
independently, so reading a file back with `from_single_file` checks diffusers' conversion against this one. Block
indices come from the model's own config (layers per block, which up blocks have attention); a transformer's inner
names, however deep, are the same in both layouts.

SD2's text encoder: OpenCLIP ViT-H has 24 layers and SD2 conditions on the penultimate one, so diffusers ships only
the first 23 (the 24th's output is never used). The file therefore has no `resblocks.23` and no `text_projection`;
A1111 (ldm's FrozenOpenCLIPEmbedder, layer "penultimate", weights loaded non-strictly) and ComfyUI (SD2ClipModel, layer
"penultimate", its hidden state 23 of 24) never use that layer's output, and diffusers ignores those keys when present.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from sdtune.errors import SdtuneError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# Each family's text encoders in pipeline order: (key prefix, "clip" = transformers' CLIP names or "open_clip").
TEXT_ENCODERS = {
    "sd1": (("cond_stage_model.transformer.text_model.", "clip"),),
    "sd2": (("cond_stage_model.model.", "open_clip"),),
    "sdxl": (("conditioner.embedders.0.transformer.text_model.", "clip"), ("conditioner.embedders.1.model.", "open_clip")),
}

# diffusers ResnetBlock2D → LDM ResBlock (in_layers = [norm, SiLU, conv], out_layers = [norm, SiLU, dropout, conv]).
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}  # fmt: skip
# SDXL's added conditioning (pooled text + size/crop numbers) is the LDM UNet's label embedding.
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}  # fmt: skip
# diffusers VAE mid-block Attention → LDM AttnBlock, whose q/k/v/proj_out are 1×1 convolutions.
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
VAE_TOP = {"conv_norm_out": "norm_out"}
# transformers' CLIP encoder layer → OpenCLIP residual attention block (q, k, v are one in_proj there).
OPEN_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}  # fmt: skip
OPEN_CLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                 "embeddings.position_embedding.weight": "positional_embedding",
                 "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}  # fmt: skip


def _rename_first(rest: str, table: Mapping[str, str]) -> str:
    """Replace the leading module name of `rest` (e.g. "norm1.weight") using `table`."""
    for old, new in table.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


# --- UNet ------------------------------------------------------------------------------------------------------------


def unet_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """UNet2DConditionModel keys → `model.diffusion_model.*` keys of the LDM UNetModel, numbered from `config`."""
    layers_per_block = config["layers_per_block"]
    if not isinstance(layers_per_block, int):
        raise SdtuneError(f"the original layout has one layers_per_block for every UNet block; this UNet has {list(layers_per_block)}")
    up_with_attention = {i for i, kind in enumerate(config["up_block_types"]) if "CrossAttn" in kind}
    out = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        out[f"{UNET_PREFIX}{_ldm_unet_module(module, layers_per_block, up_with_attention)}.{param}"] = value
    return out


def _ldm_unet_module(module: str, layers_per_block: int, up_with_attention: set[int]) -> str:
    step = layers_per_block + 1  # LDM numbers each block's resnets plus its down/upsampler consecutively
    if module in UNET_TOP:
        return UNET_TOP[module]
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", module):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"input_blocks.{1 + block * step + layer}.{_layer(kind, rest)}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
        return f"input_blocks.{1 + int(m[1]) * step + layers_per_block}.0.op"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", module):
        kind, layer, rest = m[1], int(m[2]), m[3]
        # The middle block is one sequence (resnet, transformer, resnet) without sub-module indices.
        if kind == "resnets":
            return f"middle_block.{2 * layer}.{_rename_first(rest, UNET_RESNET)}"
        return f"middle_block.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", module):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"output_blocks.{block * step + layer}.{_layer(kind, rest)}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
        block = int(m[1])
        position = 2 if block in up_with_attention else 1  # [resnet, (transformer,) upsample]
        return f"output_blocks.{block * step + layers_per_block}.{position}.conv"
    raise SdtuneError(f"the UNet module {module} has no name in the original layout")


def _layer(kind: str, rest: str) -> str:
    """A resnet is sub-module 0 of its LDM block, a transformer (same inner names in both layouts) sub-module 1."""
    return f"0.{_rename_first(rest, UNET_RESNET)}" if kind == "resnets" else f"1.{rest}"


# --- VAE -------------------------------------------------------------------------------------------------------------


def vae_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """AutoencoderKL keys → `first_stage_model.*` keys; attention projections become 1×1 convolution weights."""
    levels = len(config["up_block_types"])
    out = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        name = _ldm_vae_module(module, levels)
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)$", name) and param == "weight":
            value = value[:, :, None, None]  # Linear (out, in) → Conv2d (out, in, 1, 1)
        out[f"{VAE_PREFIX}{name}.{param}"] = value
    return out


def _ldm_vae_module(module: str, levels: int) -> str:
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", module):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", module):
        return f"{m[1]}.mid.attn_1.{_rename_first(m[2], VAE_ATTENTION)}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", module):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
        return f"encoder.down.{m[1]}.downsample.conv"
    # The LDM decoder numbers its up levels from the lowest resolution, diffusers from the first one run.
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", module):
        return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv"
    if m := re.match(r"(encoder|decoder)\.(.+)", module):
        return f"{m[1]}.{_rename_first(m[2], VAE_TOP)}"
    if module in ("quant_conv", "post_quant_conv"):
        return module
    raise SdtuneError(f"the VAE module {module} has no name in the original layout")


# --- text encoders ---------------------------------------------------------------------------------------------------


def _text_model_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIPTextModel(WithProjection) state dict without the `text_model.` level (transformers 5 flattened
    CLIPTextModel but not the projection model)."""
    return {key.removeprefix("text_model."): value for key, value in state.items()}


def clip_to_ldm(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """CLIPTextModel keys under `prefix` (transformers 4's names, `text_model.` included in the prefix), plus the
    position_ids buffer the original files carry."""
    state = _text_model_keys(state)
    out = {prefix + key: value for key, value in state.items() if key != "text_projection.weight"}
    positions = state["embeddings.position_embedding.weight"].shape[0]
    out[prefix + "embeddings.position_ids"] = torch.arange(positions).unsqueeze(0)
    return out


def open_clip_to_ldm(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """CLIPTextModel(WithProjection) keys → OpenCLIP's text tower under `prefix`: q, k, v concatenated into one
    `in_proj`, and the projection stored (width × projection) as OpenCLIP multiplies by it."""
    state = _text_model_keys(state)
    out = {}
    for key, value in state.items():
        if key in OPEN_CLIP_TOP:
            out[prefix + OPEN_CLIP_TOP[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", key):
            layer, param = m[1], m[2]
            parts = [state[f"encoder.layers.{layer}.self_attn.{p}_proj.{param}"] for p in "qkv"]
            out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat(parts)
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key):
            if not re.fullmatch(r"self_attn\.[kv]_proj\..+", m[2]):  # in in_proj with q
                out[f"{prefix}transformer.resblocks.{m[1]}.{_rename_first(m[2], OPEN_CLIP_LAYER)}"] = value
        else:
            raise SdtuneError(f"the text encoder tensor {key} has no name in OpenCLIP's layout")
    return out


TEXT_WRITERS = {"clip": clip_to_ldm, "open_clip": open_clip_to_ldm}


# --- the whole model -------------------------------------------------------------------------------------------------


def check_family(family) -> None:
    if family.name not in TEXT_ENCODERS:
        known = ", ".join(name.upper() for name in TEXT_ENCODERS)
        raise SdtuneError(f"{family.label} has no original single-file layout ({known} have one); export it with --merge as a diffusers folder")


def ldm_state_dict(family, components: Mapping[str, torch.nn.Module], scheduler_config: Mapping) -> dict[str, torch.Tensor]:
    """The UNet, VAE and text encoders of a model (`components` by pipeline name) as one state dict in the original
    layout. SD1.x/2.x files also carry the training schedule's `alphas_cumprod` as the LDM model's buffer; an SDXL
    v-prediction model gets the `v_pred` marker ComfyUI reads (SGM files record nothing else about it)."""
    from diffusers import DDPMScheduler

    check_family(family)
    unet, vae = components["unet"], components["vae"]
    state = {**unet_to_ldm(unet.state_dict(), unet.config), **vae_to_ldm(vae.state_dict(), vae.config)}
    for name, (prefix, kind) in zip(family.text_encoders, TEXT_ENCODERS[family.name], strict=True):
        state.update(TEXT_WRITERS[kind](components[name].state_dict(), prefix))
    v_prediction = scheduler_config.get("prediction_type") == "v_prediction"
    if family.name == "sdxl":
        if v_prediction:
            state["v_pred"] = torch.tensor([])
    else:
        state["alphas_cumprod"] = DDPMScheduler.from_config(scheduler_config).alphas_cumprod.clone()
    return {key: value.detach().contiguous() for key, value in state.items()}


def save_single_file(pipe, family, out: Path, dtype: torch.dtype) -> None:
    """Write `pipe`'s model (a pipeline or `ModelParts`) to `out` as one .safetensors in the original layout,
    floating-point weights in `dtype`."""
    from safetensors.torch import save_file

    components = {name: getattr(pipe, name) for name in ("unet", "vae", *family.text_encoders)}
    scheduler = getattr(pipe, "scheduler", None) or pipe.noise_scheduler
    state = ldm_state_dict(family, components, scheduler.config)
    state = {key: value.to("cpu", dtype) if value.is_floating_point() else value.cpu() for key, value in state.items()}
    save_file(state, str(out), metadata={"format": "pt"})
