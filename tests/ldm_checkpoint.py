"""Write a diffusers Stable Diffusion directory as one single-file checkpoint in the original LDM (CompVis) key layout,
as AUTOMATIC1111 users have them: `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE) and
`cond_stage_model.transformer.text_model.*` (CLIP text encoder), in one .safetensors or .ckpt file.

This is the reverse of diffusers' `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint` and
`convert_ldm_clip_checkpoint` (diffusers/loaders/single_file_utils.py), written independently so that loading the
file back through `from_single_file` tests diffusers' conversion against ours rather than against itself. The block
indices come from the model's own config and keys (layers per block, number of blocks, which blocks have attention),
never from SD1.5's numbers.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# transformers 5 flattened CLIPTextModel (no `text_model.` level); LDM files keep the CLIPTextModel of transformers 4
# under `cond_stage_model.transformer.`, so the text_model level is written back here.
CLIP_PREFIX = "cond_stage_model.transformer.text_model."

# diffusers ResnetBlock2D → LDM ResBlock (in_layers = [norm, SiLU, conv], out_layers = [norm, SiLU, dropout, conv]).
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}  # fmt: skip
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}  # fmt: skip
# diffusers VAE mid-block Attention → LDM AttnBlock, whose q/k/v/proj_out are 1×1 convolutions.
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
VAE_TOP = {"conv_norm_out": "norm_out"}


def _rename_first(rest: str, table: dict[str, str]) -> str:
    """Replace the leading module name of `rest` (e.g. "norm1.weight") using `table`."""
    for old, new in table.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def unet_to_ldm(state: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    """UNet2DConditionModel keys → `model.diffusion_model.*` keys of the LDM UNetModel."""
    if not isinstance(layers_per_block, int):
        raise ValueError(f"LDM checkpoints have one layers_per_block for every block, got {layers_per_block}")
    step = layers_per_block + 1  # LDM numbers each block's resnets plus its down/upsampler consecutively
    up_with_attention = {int(m.group(1)) for key in state if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", key))}
    out = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        name = _ldm_unet_module(module, step, layers_per_block, up_with_attention)
        out[f"{UNET_PREFIX}{name}.{param}"] = value
    return out


def _ldm_unet_module(module: str, step: int, layers_per_block: int, up_with_attention: set[int]) -> str:
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
        position = 2 if block in up_with_attention else 1  # [resnet, (attention,) upsample]
        return f"output_blocks.{block * step + layers_per_block}.{position}.conv"
    raise ValueError(f"no LDM name for UNet module {module}")


def _layer(kind: str, rest: str) -> str:
    """A resnet is sub-module 0 of its LDM block, a transformer (same inner names in both layouts) sub-module 1."""
    return f"0.{_rename_first(rest, UNET_RESNET)}" if kind == "resnets" else f"1.{rest}"


def vae_to_ldm(state: dict[str, torch.Tensor], num_up_blocks: int) -> dict[str, torch.Tensor]:
    """AutoencoderKL keys → `first_stage_model.*` keys; attention projections become 1×1 convolution weights."""
    out = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        name = _ldm_vae_module(module, num_up_blocks)
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)$", name) and param == "weight":
            value = value[:, :, None, None]  # Linear (out, in) → Conv2d (out, in, 1, 1)
        out[f"{VAE_PREFIX}{name}.{param}"] = value
    return out


def _ldm_vae_module(module: str, num_up_blocks: int) -> str:
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
        level = num_up_blocks - 1 - int(m[1])
        return f"decoder.up.{level}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
        return f"decoder.up.{num_up_blocks - 1 - int(m[1])}.upsample.conv"
    if m := re.match(r"(encoder|decoder)\.(.+)", module):
        return f"{m[1]}.{_rename_first(m[2], VAE_TOP)}"
    if module in ("quant_conv", "post_quant_conv"):
        return module
    raise ValueError(f"no LDM name for VAE module {module}")


def clip_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModel keys → `cond_stage_model.transformer.text_model.*`, plus the position_ids buffer SD1.x files carry."""
    out = {CLIP_PREFIX + key.removeprefix("text_model."): value for key, value in state.items()}
    positions = state.get("embeddings.position_embedding.weight", state.get("text_model.embeddings.position_embedding.weight"))
    out[CLIP_PREFIX + "embeddings.position_ids"] = torch.arange(positions.shape[0]).unsqueeze(0)
    return out


def ldm_state_dict(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """The UNet, VAE and text encoder of a diffusers SD directory as one LDM-layout state dict (with the
    `alphas_cumprod` buffer LDM files also carry, which loaders must ignore)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder")
    scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    state = {
        **unet_to_ldm(unet.state_dict(), unet.config.layers_per_block),
        **vae_to_ldm(vae.state_dict(), len(vae.config.up_block_types)),
        **clip_to_ldm(text_encoder.state_dict()),
        "alphas_cumprod": scheduler.alphas_cumprod.clone(),
    }
    return {key: value.detach().contiguous() for key, value in state.items()}


def write_ldm_checkpoint(model_dir: str | Path, out: str | Path) -> Path:
    """Save `ldm_state_dict(model_dir)` to `out`: safetensors for .safetensors, else a torch pickle wrapped in
    {"state_dict": ..., "global_step": ...} like CompVis/A1111 .ckpt files."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = ldm_state_dict(model_dir)
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(out))
    else:
        torch.save({"state_dict": state, "global_step": 0}, out)
    return out
