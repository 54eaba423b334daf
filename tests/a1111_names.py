"""AUTOMATIC1111's rules (extensions-builtin/Lora) from kohya LoRA key names to the modules it patches, and the module
names of the same model in the original layout A1111 loads (dots → underscores), computed from the diffusers model's
own configs and weights by the single-file writer (`sdtune.export.single_file`, which diffusers' `from_single_file`
reads back exactly), not from sdtune's kohya naming.

Original text encoders: SD1 and SDXL's first are OpenAI CLIP in transformers' layout (`transformer.text_model.…`);
SD2 and SDXL's second are OpenCLIP (`model.transformer.resblocks.N.attn` is one `nn.MultiheadAttention` holding q, k
and v as `in_proj_weight`, with `attn.out_proj`, `mlp.c_fc`, `mlp.c_proj`). A1111 names SDXL's embedders `0_…`, `1_…`.
"""

import re

from sdtune.export.single_file import clip_to_ldm, unet_to_ldm

UNET_RULES = [
    (r"lora_unet_conv_in(.*)", lambda m: f"input_blocks_0_0{m[0]}"),
    (r"lora_unet_conv_out(.*)", lambda m: f"out_2{m[0]}"),
    (r"lora_unet_time_embedding_linear_(\d+)(.*)", lambda m: f"time_embed_{int(m[0]) * 2 - 2}{m[1]}"),
    (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
     lambda m: f"input_blocks_{1 + int(m[0]) * 3 + int(m[2])}_{1 if m[1] == 'attentions' else 0}_{RESNET.get(m[3], m[3]) if m[1] == 'resnets' else m[3]}"),
    (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
     lambda m: f"middle_block_{1 if m[0] == 'attentions' else int(m[1]) * 2}_{RESNET.get(m[2], m[2]) if m[0] == 'resnets' else m[2]}"),
    (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
     lambda m: f"output_blocks_{int(m[0]) * 3 + int(m[2])}_{1 if m[1] == 'attentions' else 0}_{RESNET.get(m[3], m[3]) if m[1] == 'resnets' else m[3]}"),
    (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", lambda m: f"input_blocks_{3 + int(m[0]) * 3}_0_op"),
    # (SD1.5 layout: up block 0 has no attention, so its upsampler is the second module of its last output block)
    (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", lambda m: f"output_blocks_{2 + int(m[0]) * 3}_{2 if int(m[0]) > 0 else 1}_conv"),
]  # fmt: skip
RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}
# kohya names text-encoder layers as transformers does; A1111 renames them for OpenCLIP.
OPENCLIP = (("mlp_fc1", "mlp_c_fc"), ("mlp_fc2", "mlp_c_proj"), ("self_attn", "attn"))
# Text-encoder key prefix of each family → (A1111 module prefix, OpenCLIP?)
TEXT_ENCODERS = {
    "sd1": {"lora_te_": ("transformer_", False)},
    "sd2": {"lora_te_": ("", True)},
    "sdxl": {"lora_te1_": ("0_transformer_", False), "lora_te2_": ("1_", True)},
}


def a1111_name(key: str, family: str = "sd1") -> str | None:
    """The module A1111 patches with the kohya layer `key` (no `.lora_down…` part), or None if no rule takes it."""
    for pattern, convert in UNET_RULES:
        match = re.fullmatch(pattern, key)
        if match:
            return "diffusion_model_" + convert(match.groups())
    for prefix, (a1111_prefix, openclip) in TEXT_ENCODERS[family].items():
        match = re.fullmatch(re.escape(prefix) + r"text_model_encoder_layers_(\d+)_(.+)", key)
        if match and openclip:
            rest = match[2]
            for old, new in OPENCLIP:
                rest = rest.replace(old, new)
            return f"{a1111_prefix}model_transformer_resblocks_{match[1]}_{rest}"
        if match:
            return f"{a1111_prefix}text_model_encoder_layers_{match[1]}_{match[2]}"
    return None


def openclip_names(layers: int, prefix: str = "") -> set[str]:
    """The modules of an OpenCLIP text transformer with `layers` residual blocks."""
    parts = ("attn", "attn_out_proj", "ln_1", "ln_2", "mlp_c_fc", "mlp_c_proj")
    return {f"{prefix}model_transformer_resblocks_{i}_{part}" for i in range(layers) for part in parts}


def original_module_names(model_dir, family: str) -> set[str]:
    """Module names of the diffusers model in `model_dir` in the original layout, as A1111 names them."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    def modules(state, prefix, name):
        return {(name + key.rsplit(".", 1)[0][len(prefix):]).replace(".", "_") for key in state if key.startswith(prefix)}

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    names = modules(unet_to_ldm(unet.state_dict(), unet.config), "model.diffusion_model.", "diffusion_model.")
    encoders = ["text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    for (a1111_prefix, openclip), folder in zip(TEXT_ENCODERS[family].values(), encoders):
        if openclip:
            names |= openclip_names(CLIPTextConfig.from_pretrained(model_dir, subfolder=folder).num_hidden_layers, a1111_prefix)
        else:
            state = CLIPTextModel.from_pretrained(model_dir, subfolder=folder).state_dict()
            names |= modules(clip_to_ldm(state, "cond_stage_model.transformer.text_model."), "cond_stage_model.",
                             a1111_prefix.removesuffix("transformer_"))
    return names


def check_a1111_layers(keys, names: set[str], family: str = "sd1") -> set[str]:
    """Every layer of a kohya file (its tensor `keys`) has down, up and alpha and names a module A1111 patches in a
    model whose original-layout modules are `names`; an OpenCLIP attention (q, k, v in one module) is patched only when
    the file has all of its q, k, v and out parts. Returns the file's layer names."""
    keys = set(keys)
    layers = {key.split(".")[0] for key in keys}
    attentions = {}
    for layer in layers:
        assert {f"{layer}.lora_down.weight", f"{layer}.lora_up.weight", f"{layer}.alpha"} <= keys, layer
        name = a1111_name(layer, family)
        assert name is not None, f"no A1111 rule takes {layer}"
        split = re.fullmatch(r"(.*_resblocks_\d+_attn)_([qkv]_proj|out_proj)", name)
        if split:
            attentions.setdefault(split[1], set()).add(split[2])
            name = split[1] if split[2] != "out_proj" else name
        assert name in names, f"{layer} → {name}, not a module of the original model"
    for attention, parts in attentions.items():
        assert parts == {"q_proj", "k_proj", "v_proj", "out_proj"}, f"A1111 skips {attention} without all of q, k, v, out"
    return layers
