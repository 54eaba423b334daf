"""The kohya (sd-scripts) LoRA format that AUTOMATIC1111, Forge and ComfyUI read: what every adapter save of a
training run writes beside the diffusers file, and what `sdtune export --format kohya` writes.

One entry per adapted layer, named after its diffusers module path with dots turned into underscores:
`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight` (A),
`….lora_up.weight` (B) and `….alpha` (a scalar: the update is alpha / rank · up · down). Text-encoder layers are
`lora_te_text_model_encoder_layers_0_self_attn_q_proj…`; each model family names its prefixes (SDXL's two text
encoders are `lora_te1_…` and `lora_te2_…`) and the base model in the metadata (`ss_*`, `modelspec.*`), which
describe the training.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import save, save_file

from sdtune.adapters.lora import text_encoder_module_prefix
from sdtune.errors import SdtuneError
from sdtune.models.families import ModelFamily
from sdtune.paths import HUB_ID


def lora_layers(model: torch.nn.Module, adapter: str = "default") -> dict[str, LoraLayer]:
    """Module path → peft LoRA layer carrying `adapter`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}


def kohya_tensors(
    model: torch.nn.Module, prefix: str, dtype: torch.dtype, adapter: str = "default", module_prefix: str = ""
) -> dict[str, torch.Tensor]:
    """The adapter of `model` as kohya tensors. DoRA and rsLoRA cannot be written: the kohya format has no place for
    their magnitudes or scaling rule that every reader applies the same way."""
    out = {}
    for name, layer in lora_layers(model, adapter).items():
        if adapter in layer.lora_magnitude_vector:
            raise SdtuneError(
                "the kohya format cannot hold a DoRA adapter (A1111, ComfyUI and diffusers disagree on how to apply its "
                "magnitudes); export it with --format diffusers or peft, or --merge it"
            )
        rank, alpha = layer.r[adapter], layer.lora_alpha[adapter]
        if abs(layer.scaling[adapter] - alpha / rank) > 1e-6 * max(1.0, alpha / rank):
            raise SdtuneError(
                f"the kohya format needs scale alpha/rank; {name} uses another rule (rsLoRA?): export it with "
                "--format diffusers or peft, or --merge it"
            )
        key = prefix + (module_prefix + name).replace(".", "_")
        out[f"{key}.lora_down.weight"] = layer.lora_A[adapter].weight.detach().to("cpu", dtype).contiguous()
        out[f"{key}.lora_up.weight"] = layer.lora_B[adapter].weight.detach().to("cpu", dtype).contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return out


def fused_flux_tensors(transformer: torch.nn.Module, prefix: str, dtype: torch.dtype, adapter: str = "default") -> dict[str, torch.Tensor]:
    """A Flux transformer's adapter in kohya's Flux naming, split layers fused (`sdtune.adapters.kohya_flux`)."""
    from sdtune.adapters.kohya_flux import check_widths, fuse

    check_widths(transformer.config)
    tensors = kohya_tensors(transformer, "", dtype, adapter)
    modules = {name.replace(".", "_"): name for name, _ in transformer.named_modules()}
    layers = [(modules[key.removesuffix(".lora_down.weight")], tensors[key], tensors[key.replace("lora_down", "lora_up")],
               tensors[key.replace("lora_down.weight", "alpha")].item())
              for key in tensors if key.endswith(".lora_down.weight")]  # fmt: skip
    widths = {name: module.out_features for name, module in transformer.named_modules() if hasattr(module, "out_features")}
    try:
        fused = fuse(layers, widths)
    except ValueError as err:
        raise SdtuneError(f"--format kohya: {err}") from err
    return {prefix + key: value.to(dtype).contiguous() for key, value in fused.items()}


def adapter_tensors(
    family: ModelFamily, denoiser: torch.nn.Module, text_encoders: Sequence[torch.nn.Module | None], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """`text_encoders`: each of the model's text encoders (one for SD1/2, two for SDXL), None where it has no adapter."""
    prefixes = family.kohya_prefixes
    if not prefixes:
        raise SdtuneError(f"--format kohya: {family.label} LoRAs are shared in the diffusers format, which ComfyUI and Forge read; use --format diffusers")
    if family.kohya_layout == "flux":
        tensors = fused_flux_tensors(denoiser, prefixes[family.denoiser], dtype)
    else:
        tensors = kohya_tensors(denoiser, prefixes[family.denoiser], dtype)
    for name, encoder in zip(family.text_encoders, text_encoders, strict=True):
        if encoder is not None:
            tensors |= kohya_tensors(encoder, prefixes[name], dtype, module_prefix=text_encoder_module_prefix(encoder))
    return tensors


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the file's tensor bytes after the header, which is what A1111 shows as the LoRA's hash
    (`sshs_model_hash`); metadata does not change it."""
    blob = save(tensors)
    header = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + header :]).hexdigest()


@dataclass
class TrainingInfo:
    """What the metadata says about how the adapter was made; unknown values are left out of the file."""

    base_model: str
    title: str
    prediction_type: str = "epsilon"
    zero_terminal_snr: bool = False
    resolution: tuple[int, int] | None = None
    steps: int | None = None
    trigger_words: list[str] = field(default_factory=list)
    clip_skip: int | None = None
    learning_rate: float | None = None
    text_encoder_lr: float | None = None
    optimizer: str | None = None
    config_sha256: str | None = None
    date: str | None = None  # ISO 8601


def training_info(
    config: dict, config_path: Path | None, pretrained: str, title: str, steps: int | None, prediction_type: str
) -> TrainingInfo:  # fmt: skip
    """What a run's saved config (`config.yaml`, read as `config`; {} without one) says about its training."""

    def get(*keys):
        value = config
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    resolution = get("data", "init_args", "resolution")
    subsets = get("data", "init_args", "subsets") or []
    triggers = [s["prefix"] for s in subsets if isinstance(s, dict) and s.get("prefix")]
    te_lora = get("model", "init_args", "text_encoder_lora") or {}
    optimizer = get("model", "init_args", "optimizer") or {}
    config_sha = hashlib.sha256(config_path.read_bytes()).hexdigest() if config_path else None
    when = config_path.stat().st_mtime if config_path else None
    return TrainingInfo(
        base_model=pretrained if HUB_ID.match(pretrained) and not Path(pretrained).exists() else Path(pretrained).name,
        title=title,
        zero_terminal_snr=bool((get("model", "init_args", "objective") or {}).get("zero_terminal_snr")),
        prediction_type=prediction_type,
        resolution=(resolution, resolution) if isinstance(resolution, int) else None,
        steps=steps,
        trigger_words=triggers,
        clip_skip=get("model", "init_args", "clip_skip"),
        learning_rate=optimizer.get("init_args", {}).get("lr") if isinstance(optimizer, dict) else None,
        text_encoder_lr=te_lora.get("lr") if isinstance(te_lora, dict) else None,
        optimizer=optimizer.get("class_path") if isinstance(optimizer, dict) else None,
        config_sha256=config_sha,
        date=datetime.datetime.fromtimestamp(when, datetime.timezone.utc).isoformat(timespec="seconds") if when else None,
    )


def metadata(
    info: TrainingInfo, family: ModelFamily, denoiser: torch.nn.Module, text_encoder_trained: bool, model_hash: str
) -> dict[str, str]:  # fmt: skip
    """kohya `ss_*` keys (shown by A1111's metadata viewer and the Civitai uploader) and the Stability AI model spec."""
    layers = lora_layers(denoiser)
    conv = {n: m for n, m in layers.items() if isinstance(m.lora_A["default"], torch.nn.Conv2d) and m.lora_A["default"].kernel_size != (1, 1)}
    linear = [m for n, m in layers.items() if n not in conv]
    first = (linear or list(layers.values()))[0]
    network_args = {}
    if conv:
        any_conv = next(iter(conv.values()))
        network_args = {"conv_dim": str(any_conv.r["default"]), "conv_alpha": str(any_conv.lora_alpha["default"])}
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(first.r["default"]),
        "ss_network_alpha": str(first.lora_alpha["default"]),
        "ss_network_args": json.dumps(network_args),
        "ss_base_model_version": family.kohya_base_version,
        "ss_v2": str(family.name == "sd2"),
        "ss_v_parameterization": str(info.prediction_type == "v_prediction"),
        "ss_zero_terminal_snr": str(info.zero_terminal_snr),
        "ss_sd_model_name": info.base_model,
        "ss_output_name": info.title,
        "ss_network_train_unet_only": str(not text_encoder_trained),
        "sshs_model_hash": model_hash,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{family.modelspec_architecture}/lora",
        "modelspec.implementation": "https://github.com/huggingface/diffusers",
        "modelspec.title": info.title,
        "modelspec.prediction_type": {"v_prediction": "v", "flow": "flow"}.get(info.prediction_type, "epsilon"),
        "modelspec.hash_sha256": f"0x{model_hash}",
    }
    optional = {
        "ss_resolution": f"({info.resolution[0]}, {info.resolution[1]})" if info.resolution else None,
        "modelspec.resolution": f"{info.resolution[0]}x{info.resolution[1]}" if info.resolution else None,
        "ss_max_train_steps": info.steps,
        "ss_steps": info.steps,
        "ss_clip_skip": info.clip_skip,
        "ss_learning_rate": info.learning_rate,
        "ss_unet_lr": info.learning_rate,
        "ss_text_encoder_lr": info.text_encoder_lr if text_encoder_trained else None,
        "ss_optimizer": info.optimizer,
        "modelspec.trigger_phrase": ", ".join(info.trigger_words) or None,
        "modelspec.date": info.date,
        "sdtune_config_sha256": info.config_sha256,
    }
    meta |= {key: str(value) for key, value in optional.items() if value is not None}
    return meta


def save_kohya(
    path, family: ModelFamily, denoiser: torch.nn.Module, text_encoders: Sequence[torch.nn.Module | None],
    info: TrainingInfo, dtype: torch.dtype = torch.float32,
) -> int:  # fmt: skip
    """Write the adapter(s) as one kohya .safetensors file; returns the number of adapted layers. `text_encoders`
    as `adapter_tensors` takes them."""
    tensors = adapter_tensors(family, denoiser, text_encoders, dtype)
    trained = any(encoder is not None for encoder in text_encoders)
    save_file(tensors, str(path), metadata=metadata(info, family, denoiser, trained, tensors_sha256(tensors)))
    return sum(key.endswith(".alpha") for key in tensors)
