"""LoHa and LoKr adapters (peft's `LoHaConfig` / `LoKrConfig`) written and read in LyCORIS naming, the format
AUTOMATIC1111, Forge and ComfyUI read (and the `lycoris-lora` package's `create_network_from_weights`).

One entry group per adapted layer, named as kohya names LoRA layers (`lora_unet_<diffusers module path, dots → _>`;
text encoders `lora_te_text_model_…`, SDXL's `lora_te1_…`/`lora_te2_…`):

| type | keys                                               | update ΔW                                    |
| LoHa | `.hada_w1_a` (out×r) `.hada_w1_b` (r×in)           | (w1_a·w1_b) ⊙ (w2_a·w2_b) · alpha / r        |
|      | `.hada_w2_a` (out×r) `.hada_w2_b` (r×in) `.alpha`  | r = hada_w1_b.shape[0]                       |
| LoKr | `.lokr_w1` (a×c) or `.lokr_w1_a`/`.lokr_w1_b`      | w1 ⊗ w2 · alpha / r, r = the inner size of   |
|      | `.lokr_w2` (b×d) or `.lokr_w2_a` (b×r)/`.lokr_w2_b` | a factored pair; scale 1 when both w1 and w2 |
|      | (r×d), `.alpha`; out = a·b, in = c·d               | are full (alpha is then ignored)             |

peft stores the same matrices under the same names and shapes (`hada_w1_a["default"]`, …) and the same
factorisation of out/in (`factorization(dim, decompose_factor)`), so the conversion is a renaming, except where the
two scale rules differ: peft always scales by alpha / r, LyCORIS (and ComfyUI) ignore alpha for a LoKr layer whose
w1 and w2 are both full. Such a layer is written with peft's scale folded into lokr_w2 and alpha = r, and read back
with alpha = r (scale 1). Reading sets each layer's rank and alpha from the file (peft's `rank_pattern` /
`alpha_pattern`), so alphas that differ between layers survive. Tucker (`hada_t1`, `lokr_t2`), DoRA (`dora_scale`)
and convolution layers are not written; a file holding Tucker or DoRA tensors is refused on reading.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoHaConfig, LoKrConfig
from peft.tuners.loha import LoHaLayer
from peft.tuners.lokr import LoKrLayer
from peft.tuners.lokr.layer import factorization

from sdtune.adapters.lora import text_encoder_module_prefix
from sdtune.errors import SdtuneError

LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
UNSUPPORTED_KEYS = ("hada_t1", "hada_t2", "lokr_t2", "dora_scale")


def lycoris_layers(model: torch.nn.Module, adapter: str = "default") -> dict[str, LoHaLayer | LoKrLayer]:
    """Module path → peft LoHa or LoKr layer carrying `adapter`."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (LoHaLayer, LoKrLayer)) and adapter in m.r}  # fmt: skip


def is_lycoris(keys) -> bool:
    """Whether a file's keys hold LoHa or LoKr layers."""
    return any(key.rsplit(".", 1)[-1] in LOHA_KEYS + LOKR_KEYS for key in keys)


def _layer_tensors(layer: LoHaLayer | LoKrLayer, adapter: str) -> dict[str, torch.Tensor]:
    """The layer's matrices under their LyCORIS names, and alpha, scaled as LyCORIS reads them."""
    names = LOHA_KEYS if isinstance(layer, LoHaLayer) else LOKR_KEYS
    out = {name: getattr(layer, name)[adapter].detach().float() for name in names if adapter in getattr(layer, name)}
    rank, alpha = layer.r[adapter], layer.alpha[adapter]
    if isinstance(layer, LoKrLayer) and "lokr_w1" in out and "lokr_w2" in out:
        out["lokr_w2"] = out["lokr_w2"] * layer.scaling[adapter]  # LyCORIS applies scale 1 here
        alpha = rank
    out["alpha"] = torch.tensor(float(alpha))
    return out


def lycoris_tensors(
    model: torch.nn.Module, prefix: str, dtype: torch.dtype, adapter: str = "default"
) -> dict[str, torch.Tensor]:
    """The LoHa/LoKr adapter of `model` as LyCORIS tensors, `prefix` before each module's name (`lora_unet_`)."""
    out = {}
    for name, layer in lycoris_layers(model, adapter).items():
        key = prefix + name.replace(".", "_")
        for suffix, tensor in _layer_tensors(layer, adapter).items():
            out[f"{key}.{suffix}"] = tensor.to("cpu", dtype).contiguous()
    return out


def save_lycoris(
    family, denoiser: torch.nn.Module, file: str | Path, text_encoders: Sequence[torch.nn.Module | None] = (),
    dtype: torch.dtype = torch.float32,
) -> Path:  # fmt: skip
    """Write the LoHa/LoKr adapters of the denoiser and of the text encoders given (the family's, in order; None or
    left out: not adapted) to `file` in LyCORIS naming, with kohya's metadata keys for the network
    (`ss_network_module`, `ss_network_args`) so A1111's and ComfyUI's viewers name the algorithm."""
    import json

    from safetensors.torch import save_file

    layers = lycoris_layers(denoiser)
    if not layers:
        raise SdtuneError("the model carries no LoHa or LoKr adapter to write")
    prefixes = _prefixes(family, "written")
    tensors = lycoris_tensors(denoiser, prefixes[family.denoiser], dtype)
    for name, encoder in zip(family.text_encoders, text_encoders):
        if encoder is not None:
            tensors |= lycoris_tensors(encoder, prefixes[name] + text_encoder_module_prefix(encoder).replace(".", "_"), dtype)
    first = next(iter(layers.values()))
    metadata = {
        "ss_network_module": "lycoris.kohya",
        "ss_network_dim": str(first.r["default"]),
        "ss_network_alpha": str(first.alpha["default"]),
        "ss_network_args": json.dumps({"algo": "loha" if isinstance(first, LoHaLayer) else "lokr"}),
    }
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(file), metadata=metadata)
    return file


def _prefixes(family, done: str) -> dict[str, str]:
    """Component → key prefix (`unet` → `lora_unet_`, `text_encoder` → `lora_te_`); one line for other families."""
    if family.kohya_layout != "diffusers" or family.denoiser not in family.kohya_prefixes:
        raise SdtuneError(f"LoHa/LoKr files are {done} for UNet models (SD1, SD2, SDXL), not {family.label}")
    return dict(family.kohya_prefixes)


# --- reading ------------------------------------------------------------------------------------------------------


def _rank_alpha(tensors: dict[str, torch.Tensor]) -> tuple[str, int, float]:
    """(type, peft rank, peft alpha) of one layer's tensors, under LyCORIS's scale rules."""
    alpha = float(tensors["alpha"].item()) if "alpha" in tensors else None
    if "hada_w1_b" in tensors:
        rank = tensors["hada_w1_b"].shape[0]
        return "loha", rank, alpha if alpha else float(rank)
    if "lokr_w1_b" in tensors or "lokr_w2_b" in tensors:
        rank = tensors.get("lokr_w1_b", tensors.get("lokr_w2_b")).shape[0]
        return "lokr", rank, alpha if alpha else float(rank)
    # Both full: scale 1. The rank only has to be large enough for peft to keep w2 full.
    rank = max(tensors["lokr_w2"].shape)
    return "lokr", rank, float(rank)


def _lokr_factor(tensors: dict[str, torch.Tensor], out_dim: int, in_dim: int) -> int:
    """The decompose_factor under which peft splits the layer as the file does."""
    w1 = tensors.get("lokr_w1")
    sides = tuple(w1.shape) if w1 is not None else (tensors["lokr_w1_a"].shape[0], tensors["lokr_w1_b"].shape[1])
    for factor in (-1, *sides):
        if (factorization(out_dim, factor)[0], factorization(in_dim, factor)[0]) == sides:
            return factor
    return -1


def load_lycoris(pipe, file: Path, adapter: str) -> None:
    """Attach the LoHa/LoKr file's layers to the pipeline's denoiser and text encoders as peft adapter `adapter`,
    with the file's values; one line for what cannot be read."""
    from safetensors.torch import load_file

    from sdtune.models.families import family_of_pipeline

    family = family_of_pipeline(pipe)
    raw = load_file(str(file))
    unsupported = sorted({k.rsplit(".", 1)[-1] for k in raw} & set(UNSUPPORTED_KEYS))
    if unsupported:
        raise SdtuneError(f"{file}: LyCORIS layers with {', '.join(unsupported)} (Tucker or DoRA) are not read here")
    prefixes = _prefixes(family, "read")
    parts = [(name, prefix, getattr(pipe, name)) for name, prefix in prefixes.items() if getattr(pipe, name, None) is not None]
    stray = sorted({k.split(".")[0] for k in raw if not any(k.startswith(prefix) for _, prefix, _ in parts)})
    if stray:
        raise SdtuneError(f"{file}: {stray[0]} is no layer of this model's UNet or text encoders")
    for name, prefix, model in parts:
        module_prefix = "" if name == family.denoiser else text_encoder_module_prefix(model)
        modules = {(module_prefix + path).replace(".", "_"): path for path, _ in model.named_modules()}
        layers: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in raw.items():
            stem, _, suffix = key.rpartition(".")
            if stem.startswith(prefix):
                module = modules.get(stem[len(prefix):])
                if module is None:
                    raise SdtuneError(f"{file}: {stem} names no module of this model (made for another architecture?)")
                layers.setdefault(module, {})[suffix] = tensor
        if layers:
            _attach(model, layers, adapter, file)


def _attach(model: torch.nn.Module, layers: dict[str, dict[str, torch.Tensor]], adapter: str, file: Path) -> None:
    """Add adapter `adapter` to `model` with each layer's rank and alpha from the file, then its values."""
    shapes = {name: _rank_alpha(tensors) for name, tensors in layers.items()}
    kinds = {kind for kind, _, _ in shapes.values()}
    if len(kinds) != 1:
        raise SdtuneError(f"{file}: mixes {' and '.join(sorted(kinds))} layers; one adapter type a file is read here")
    kind = kinds.pop()
    rank = Counter(r for _, r, _ in shapes.values()).most_common(1)[0][0]
    common = dict(
        r=rank, alpha=rank, target_modules=sorted(layers),
        rank_pattern={re.escape(name): r for name, (_, r, _) in shapes.items()},
        alpha_pattern={re.escape(name): a for name, (_, _, a) in shapes.items()},
    )  # fmt: skip
    if kind == "loha":
        config = LoHaConfig(**common)
    else:
        name, tensors = next(iter(layers.items()))
        weight = model.get_submodule(name).weight
        config = LoKrConfig(**common, decompose_factor=_lokr_factor(tensors, weight.shape[0], weight.shape[1]),
                            decompose_both=any("lokr_w1_a" in t for t in layers.values()))  # fmt: skip
    model.add_adapter(config, adapter_name=adapter)
    targets = lycoris_layers(model, adapter)
    for name, tensors in layers.items():
        layer = targets[name]
        wanted = {key for key in LOHA_KEYS + LOKR_KEYS if adapter in getattr(layer, key, {})}
        given = {key for key in tensors if key != "alpha"}
        if wanted != given:
            raise SdtuneError(f"{file}: {name} holds {', '.join(sorted(given))}; peft lays it out as {', '.join(sorted(wanted))}")
        for key in wanted:
            param = getattr(layer, key)[adapter]
            if param.shape != tensors[key].shape:
                raise SdtuneError(f"{file}: {name}.{key} is {tuple(tensors[key].shape)}, the model's is {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(tensors[key])
