"""Flux LoRAs in the naming kohya sd-scripts writes, which ComfyUI, Forge and diffusers read.

kohya names a Flux layer after Black Forest Labs' original module (`lora_unet_double_blocks_0_img_attn_qkv`), where
diffusers splits some of them: the image and text streams' query, key and value are one `qkv` layer there, and a
single block's query, key, value and MLP input are one `linear1`. A diffusers LoRA on the split layers is written as
one LoRA on the fused layer with the same update: `lora_down` stacks each part's A, `lora_up` places each part's B on
the diagonal (zeros for a part without an adapter), and alpha is multiplied by the number of parts, so that
alpha / rank, and with it every part's update, stays the same. diffusers' own reader
(`_convert_kohya_flux_lora_to_diffusers`) splits such a diagonal back into the parts exactly.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

# diffusers module inside `transformer_blocks.N.` → (kohya name after `double_blocks_N_`, part, parts)
DOUBLE = {
    "attn.to_q": ("img_attn_qkv", 0, 3), "attn.to_k": ("img_attn_qkv", 1, 3), "attn.to_v": ("img_attn_qkv", 2, 3),
    "attn.to_out.0": ("img_attn_proj", 0, 1), "ff.net.0.proj": ("img_mlp_0", 0, 1), "ff.net.2": ("img_mlp_2", 0, 1),
    "norm1.linear": ("img_mod_lin", 0, 1),
    "attn.add_q_proj": ("txt_attn_qkv", 0, 3), "attn.add_k_proj": ("txt_attn_qkv", 1, 3),
    "attn.add_v_proj": ("txt_attn_qkv", 2, 3), "attn.to_add_out": ("txt_attn_proj", 0, 1),
    "ff_context.net.0.proj": ("txt_mlp_0", 0, 1), "ff_context.net.2": ("txt_mlp_2", 0, 1),
    "norm1_context.linear": ("txt_mod_lin", 0, 1),
}  # fmt: skip
# … inside `single_transformer_blocks.N.` → (name after `single_blocks_N_`, part, parts)
SINGLE = {
    "attn.to_q": ("linear1", 0, 4), "attn.to_k": ("linear1", 1, 4), "attn.to_v": ("linear1", 2, 4),
    "proj_mlp": ("linear1", 3, 4), "proj_out": ("linear2", 0, 1), "norm.linear": ("modulation_lin", 0, 1),
}  # fmt: skip
# Modules outside the blocks.
OTHER = {
    "x_embedder": "img_in", "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in_in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in_out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in_in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in_out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in_in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in_out_layer",
    "proj_out": "final_layer_linear",
}  # fmt: skip
# The layout diffusers' reader of these files assumes: Flux.1's widths and block counts.
FLUX1 = {"inner": 3072, "mlp": 12288, "double": 19, "single": 38}
BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")


def check_widths(config) -> None:
    """Refuse a transformer whose fused layers diffusers' reader would split wrongly: it takes a single block's
    `linear1` as 3 × 3072 + 12288 rows and reads at most 19 double and 38 single blocks (Flux.1's sizes)."""
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    found = {"inner": inner, "mlp": int(inner * config.get("mlp_ratio", 4.0)), "double": config["num_layers"],
             "single": config["num_single_layers"]}  # fmt: skip
    if found["inner"] != FLUX1["inner"] or found["mlp"] != FLUX1["mlp"] or found["double"] > FLUX1["double"] or found["single"] > FLUX1["single"]:
        from sdtune.errors import SdtuneError

        raise SdtuneError(
            f"--format kohya: diffusers' reader of kohya Flux files (and so the check on write) assumes Flux.1's widths "
            f"({FLUX1['inner']} attention, {FLUX1['mlp']} MLP, up to 19 + 38 blocks); this transformer has "
            f"{found['inner']}, {found['mlp']}, {found['double']} + {found['single']}: export --format diffusers, which "
            "ComfyUI and Forge read too"
        )


def kohya_name(module: str) -> tuple[str, int, int]:
    """(kohya layer name without prefix, this module's part in it, the parts it has) of a diffusers Flux module."""
    found = BLOCK.match(module)
    if found:
        kind, index, rest = found.groups()
        table, prefix = (DOUBLE, "double_blocks") if kind == "transformer_blocks" else (SINGLE, "single_blocks")
        if rest in table:
            name, part, parts = table[rest]
            return f"{prefix}_{index}_{name}", part, parts
    elif module in OTHER:
        return OTHER[module], 0, 1
    raise ValueError(f"the Flux module {module} has no name in kohya's Flux LoRA format")


def fuse(layers: Iterable[tuple[str, torch.Tensor, torch.Tensor, float]], out_features: dict[str, int]) -> dict[str, torch.Tensor]:
    """kohya tensors ("{name}.lora_down.weight", ".lora_up.weight", ".alpha") of diffusers-module LoRAs given as
    (module, A, B, alpha); `out_features[module]` is each part's output width, for the zero blocks of parts without
    an adapter (every part of a fused layer must be named there)."""
    groups: dict[str, dict[int, tuple[str, torch.Tensor, torch.Tensor, float]]] = {}
    sizes: dict[str, int] = {}
    for module, down, up, alpha in layers:
        name, part, parts = kohya_name(module)
        groups.setdefault(name, {})[part] = (module, down, up, alpha)
        sizes[name] = parts
    out: dict[str, torch.Tensor] = {}
    for name, present in groups.items():
        parts = sizes[name]
        rank = next(iter(present.values()))[1].shape[0]
        alpha = next(iter(present.values()))[3]
        if parts == 1:
            _, down, up, _ = present[0]
            out |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(float(alpha))}
            continue
        modules = _part_modules(name, parts)
        downs, ups = [], []
        for part in range(parts):
            if part in present:
                _, down, up, part_alpha = present[part]
                if down.shape[0] != rank:
                    raise ValueError(f"{name}: its parts have different ranks; kohya's format needs one")
                downs.append(down)
                ups.append(up * (part_alpha / alpha))  # the fused layer has one alpha: rescale B to keep the update
            else:
                downs.append(torch.zeros_like(next(iter(present.values()))[1]))
                ups.append(torch.zeros(out_features[modules[part]], rank, dtype=next(iter(present.values()))[2].dtype))
        out[f"{name}.lora_down.weight"] = torch.cat(downs)
        out[f"{name}.lora_up.weight"] = torch.block_diag(*ups)
        out[f"{name}.alpha"] = torch.tensor(float(alpha * parts))
    return out


def _part_modules(name: str, parts: int) -> list[str]:
    """The diffusers modules (inside the block) making up a fused kohya layer, in part order."""
    kind, index, rest = re.match(r"^(double_blocks|single_blocks)_(\d+)_(.+)$", name).groups()
    table, block = (DOUBLE, "transformer_blocks") if kind == "double_blocks" else (SINGLE, "single_transformer_blocks")
    found = sorted((part, module) for module, (n, part, count) in table.items() if n == rest and count == parts)
    return [f"{block}.{index}.{module}" for _, module in found]
