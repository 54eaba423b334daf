"""What an adapter or model file is, from its key names, shapes and metadata alone: `sdtune inspect`.

The format follows from the key names (kohya `lora_unet_…`/`lora_te…` with `lora_down`/`lora_up`/`alpha`; LyCORIS
`hada_w1_a`/`lokr_w1`; diffusers `unet.…lora_A`; peft `base_model.model.…`; textual-inversion embeddings; the
original single-file layout `model.diffusion_model.…`), the model family from the layout and the cross-attention
width (attn2.to_k reads 768 wide in SD1, 1024 in SD2, 2048 in SDXL), rank from the first dimension of each down
(A) matrix, alpha from the `.alpha` scalars (kohya, LyCORIS) or the stored peft config (diffusers, peft). Which tools
read the file is what sdtune knows of them: its export formats (sdtune.export.formats) and their consumers.
Safetensors files are read through their header (sdtune.export.safetensors_header): no tensor data, no torch.
"""

from __future__ import annotations

import datetime
import json
import pickletools
import re
import zipfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sdtune.errors import SdtuneError
from sdtune.export.safetensors_header import Header, read_header

CONTEXT_WIDTHS = {768: "SD1", 1024: "SD2", 2048: "SDXL"}
FAMILY_OF_VERSION = {"sd_v1": "SD1", "sd_v2": "SD2", "sdxl_base_v1-0": "SDXL", "flux1": "Flux", "sd3": "SD3"}
FAMILY_OF_ARCHITECTURE = {"stable-diffusion-v1": "SD1", "stable-diffusion-v2": "SD2", "stable-diffusion-xl": "SDXL",
                          "stable-diffusion-3": "SD3", "flux": "Flux"}  # fmt: skip
FAMILY_OF_PIPELINE = {"StableDiffusionXLPipeline": "SDXL", "StableDiffusion3Pipeline": "SD3", "FluxPipeline": "Flux"}
KOHYA_COMPONENTS = {"lora_unet_": "UNet", "lora_te_": "text encoder", "lora_te1_": "text encoder 1",
                    "lora_te2_": "text encoder 2", "lora_te3_": "text encoder 3"}  # fmt: skip
DIFFUSERS_COMPONENTS = {"unet": "UNet", "transformer": "transformer", "text_encoder": "text encoder",
                        "text_encoder_2": "text encoder 2", "text_encoder_3": "text encoder 3"}  # fmt: skip
BLOCKS = (("down", ("down_blocks", "input_blocks")), ("mid", ("mid_block", "middle_block")),
          ("up", ("up_blocks", "output_blocks")), ("double/joint", ("double_blocks", "transformer_blocks", "joint_blocks")),
          ("single", ("single_blocks", "single_transformer_blocks")), ("layers", ("encoder_layers", "encoder.layers")))  # fmt: skip
# The key each layer has once, by format (its down/A matrix); the layer's name is what comes before it.
ANCHORS = {"kohya": (".lora_down.weight",), "diffusers": (".lora_A.weight", ".lora.down.weight"),
           "loha": (".hada_w1_b",), "lokr": (".lokr_w1", ".lokr_w1_a")}  # fmt: skip
# Key prefixes of the original (single-file) layout, by part; Flux transformers are shared without a prefix.
SINGLE_FILE_PARTS = {
    "UNet or transformer": ("model.diffusion_model.", "double_blocks.", "single_blocks."),
    "VAE": ("first_stage_model.", "vae."),
    "text encoder(s)": ("cond_stage_model.", "conditioner.embedders.", "text_encoders."),
}
LORA_MODEL_FILES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")
MAGIC = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image", b"RIFF": "a RIFF (WebP/WAV) file",
         b"%PDF": "a PDF document", b"PK\x03\x04": "a zip archive"}  # fmt: skip

COMFYUI_HALF = ("partly: the text-encoder keys load, the UNet keys are NOT loaded (a diffusers-format LoRA); "
                "`sdtune export FILE --model BASE --format kohya` writes the file ComfyUI reads whole")
NOT_A1111 = "no: A1111 does not read diffusers-format LoRAs; convert with `sdtune export FILE --model BASE --format kohya`"


@dataclass
class Layer:
    component: str  # "UNet", "text encoder 2", "transformer"
    module: str  # its name inside the component, as the file spells it
    block: str  # down / mid / up (UNet), double/joint / single (transformer), layers (text encoder), other
    rank: int | None  # None: a full (not low-rank) factor
    alpha: float | None  # None: not stored (readers take alpha = rank)
    conv: bool  # a convolution wider than 1×1 (LoCon)


@dataclass
class Report:
    path: str
    format: str
    family: str
    family_reason: str
    layers: list[Layer] = field(default_factory=list)
    dtypes: dict[str, int] = field(default_factory=dict)
    size_bytes: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    readers: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        data = asdict(self)
        data["adapted"] = adapted_summary(self.layers)
        return json.dumps(data, indent=2)


# --- reading -------------------------------------------------------------------------------------------------------


def inspect(path: str | Path) -> Report:
    """The report on `path`: a file or folder; anything unknown or damaged is one SdtuneError line."""
    path = Path(path).expanduser()
    if not path.exists():
        raise SdtuneError(f"{path} does not exist")
    if path.is_dir():
        return _inspect_folder(path)
    if path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
        return _inspect_pickle(path)
    _refuse_known_non_models(path)
    header = read_header(path)
    report = _inspect_safetensors(header)
    report.size_bytes = path.stat().st_size
    return report


def _refuse_known_non_models(path: Path) -> None:
    with path.open("rb") as file:
        start = file.read(8)
    for magic, what in MAGIC.items():
        if start.startswith(magic):
            raise SdtuneError(f"{path}: not a model file ({what})")


def _inspect_folder(path: Path) -> Report:
    if (path / "model_index.json").is_file():
        return _pipeline_folder(path)
    if (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file():
        return _peft_folder(path)
    config = path / "config.yaml"
    if config.is_file():
        return _run_directory(path)
    for name in LORA_MODEL_FILES:
        if (path / name).is_file():
            report = inspect(path / name)
            report.path = str(path)
            return report
    raise SdtuneError(f"{path}: a folder without model files (no model_index.json, adapter_config.json, "
                      f"{LORA_MODEL_FILES[0]} or sdtune run config.yaml)")  # fmt: skip


def _inspect_safetensors(header: Header) -> Report:
    keys = header.tensors
    if not keys:
        raise SdtuneError(f"{header.path}: a safetensors file with no tensors")
    kind = _format_of(keys)
    if kind is None:
        sample = ", ".join(list(keys)[:3])
        raise SdtuneError(f"{header.path}: not an adapter or model sdtune knows ({len(keys)} tensors, e.g. {sample})")
    report = Report(str(header.path), FORMAT_NAMES[kind], "unknown", "")
    report.dtypes = dict(Counter(info.dtype for info in keys.values()))
    if kind in ("kohya", "kohya_locon", "kohya_flux", "loha", "lokr", "diffusers", "peft"):
        report.layers = _layers(header, kind)
    report.family, report.family_reason = _family(keys, header.metadata, kind)
    report.metadata = _metadata(header.metadata)
    if kind == "single_file":
        report.metadata["parts"] = _parts(keys)
    report.readers = readers(kind, report.family, {layer.component for layer in report.layers})
    return report


def _format_of(keys: dict) -> str | None:
    names = list(keys)
    if any(".hada_w1_a" in k for k in names):
        return "loha"
    if any(".lokr_w1" in k for k in names):
        return "lokr"
    if any(k.endswith(".lora_down.weight") and k.startswith("lora_") for k in names):
        if any(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_")) for k in names):
            return "kohya_flux"
        convs = [keys[k].shape for k in names if k.endswith(".lora_down.weight") and len(keys[k].shape) == 4]
        return "kohya_locon" if any(shape[2:] != (1, 1) for shape in convs) else "kohya"
    if any(k.startswith("base_model.model.") and ".lora_A" in k for k in names):
        return "peft"
    if any(".lora_A.weight" in k or ".lora.down.weight" in k for k in names):
        return "diffusers"
    if any(k.startswith(tuple(p for prefixes in SINGLE_FILE_PARTS.values() for p in prefixes)) for k in names):
        return "single_file"
    if set(names) <= {"emb_params", "clip_l", "clip_g"} or all(k.startswith("string_to_param.") for k in names) or (len(names) == 1 and len(keys[names[0]].shape) <= 2):
        return "embedding"
    return None


FORMAT_NAMES = {
    "kohya": "kohya LoRA (lora_unet_/lora_te keys with lora_down, lora_up, alpha)",
    "kohya_locon": "kohya LoCon (kohya LoRA with convolution layers)",
    "kohya_flux": "kohya Flux LoRA (lora_unet_double_blocks_/single_blocks_ keys)",
    "loha": "LyCORIS LoHa (hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b)",
    "lokr": "LyCORIS LoKr (lokr_w1, lokr_w2 factors)",
    "diffusers": "diffusers LoRA (unet./text_encoder./transformer. keys with lora_A, lora_B)",
    "peft": "peft adapter (base_model.model. keys with lora_A, lora_B)",
    "single_file": "single-file checkpoint in the original layout (model.diffusion_model., first_stage_model., ...)",
    "embedding": "textual-inversion embedding",
}


def _layers(header: Header, kind: str) -> list[Layer]:
    keys = header.tensors
    base = {"kohya_locon": "kohya", "kohya_flux": "kohya", "peft": "diffusers"}.get(kind, kind)
    layers, seen = [], set()
    for key, info in keys.items():
        anchor = next((suffix for suffix in ANCHORS[base] if key.endswith(suffix)), None)
        if anchor is None:
            continue
        name = key[: -len(anchor)]
        alpha = header.scalar(f"{name}.alpha") if f"{name}.alpha" in keys else None
        rank = info.shape[0]
        if kind == "lokr":  # the rank is that of w2's (or else w1's) low-rank factors; None: both full
            rank = next((keys[f"{name}.{k}"].shape[0] for k in ("lokr_w2_b", "lokr_w1_b") if f"{name}.{k}" in keys), None)
        component, module = _component(name, kind)
        if kind == "peft":  # sdtune writes a CLIP text encoder's keys under transformers 4's and 5's names both
            module = module.removeprefix("text_model.")
            if module in seen:
                continue
            seen.add(module)
        conv = len(info.shape) == 4 and tuple(info.shape[2:]) != (1, 1)
        if kind in ("loha", "lokr"):  # LyCORIS flattens conv kernels into 2-D factors: the module name tells
            conv = f"{name}.hada_t1" in keys or bool(re.search(r"(conv\d?|conv_shortcut|conv_in|conv_out|samplers_0_conv)$", name))
        layers.append(Layer(component, module, _block(module), rank, alpha, conv))
    if base == "diffusers":
        _alphas_from_configs(layers, header.metadata)
    return layers


def _component(name: str, kind: str) -> tuple[str, str]:
    """(component, module path inside it) of a layer name."""
    if kind == "peft":
        return "model", name.removeprefix("base_model.model.")
    if "." in name and kind in ("diffusers",):
        prefix, module = name.split(".", 1)
        return DIFFUSERS_COMPONENTS.get(prefix, prefix), module
    for prefix, component in sorted(KOHYA_COMPONENTS.items(), key=lambda item: -len(item[0])):
        if name.startswith(prefix):
            return ("transformer" if kind == "kohya_flux" and component == "UNet" else component), name[len(prefix):]
    return "other", name


def _block(module: str) -> str:
    flat = module.replace(".", "_")
    for block, names in BLOCKS:
        if any(flat.startswith(n.replace(".", "_")) or f"_{n.replace('.', '_')}_" in f"_{flat}" for n in names):
            return block
    return "other"


def _alphas_from_configs(layers: list[Layer], metadata: dict[str, str]) -> None:
    """diffusers keeps each component's peft config (r, lora_alpha, rank/alpha patterns) in the file's metadata."""
    try:
        packed = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except json.JSONDecodeError:
        return
    for prefix, component in DIFFUSERS_COMPONENTS.items():
        config = {key.removeprefix(f"{prefix}."): value for key, value in packed.items() if key.startswith(f"{prefix}.")}
        if config:
            apply_peft_config([layer for layer in layers if layer.component == component], config)


def apply_peft_config(layers: list[Layer], config: dict) -> None:
    """Each layer's alpha from a peft LoraConfig's `lora_alpha` and `alpha_pattern` (keys match module-name ends)."""
    for layer in layers:
        alpha = config.get("lora_alpha")
        for pattern, value in (config.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", layer.module):
                alpha = value
        if alpha is not None:
            layer.alpha = float(alpha)


# --- family --------------------------------------------------------------------------------------------------------


def _context_width(keys: dict) -> int | None:
    """The text width the UNet's cross-attention reads: the input side of attn2.to_k (or to_v); None when unknown
    (no such layer, or key names without shapes, as in a pickle)."""
    for key, info in keys.items():
        flat = key.replace(".", "_")
        if re.search(r"attn2_to_[kv](_lora_down_weight|_lora_A_weight|_weight|_hada_w1_b)$", flat) and info is not None and len(info.shape) == 2:
            return info.shape[1]
    return None


def _family(keys: dict, metadata: dict[str, str], kind: str) -> tuple[str, str]:
    names = list(keys)
    stated = _family_in_metadata(metadata)
    if kind == "kohya_flux" or any("single_transformer_blocks" in k or "double_blocks" in k for k in names):
        return "Flux", "Flux's double/single block names"
    if any("joint_blocks" in k for k in names):
        return "SD3", "SD3's joint_blocks"
    if kind == "embedding":
        if {"clip_l", "clip_g"} <= set(names):
            return "SDXL", "one vector for each of SDXL's two text encoders (clip_l, clip_g)"
        width = next(iter(keys.values())).shape[-1]
        found = {768: "SD1", 1024: "SD2"}.get(width)
        if found:
            return found, f"embedding width {width}"
        return stated or ("unknown", f"embedding width {width}: neither SD1's 768 nor SD2's 1024")
    if any(k.startswith(("transformer.", "lora_transformer_")) for k in names):
        return stated or ("SD3 or Flux", "transformer blocks without Flux's single blocks, and no base model in the metadata")
    two = any(k.startswith(("lora_te2_", "text_encoder_2.", "conditioner.embedders.1.")) for k in names)
    width = _context_width(keys)
    if two:
        return "SDXL", "two text encoders" + (f", cross-attention width {width}" if width else "")
    if width in CONTEXT_WIDTHS:
        return CONTEXT_WIDTHS[width], f"cross-attention width {width} (attn2.to_k)"
    if kind == "single_file" and any(k.startswith("cond_stage_model.model.") for k in names):
        return "SD2", "an OpenCLIP text encoder (cond_stage_model.model.)"
    if kind == "single_file" and any(k.startswith("cond_stage_model.transformer.") for k in names):
        return "SD1", "a CLIP text encoder (cond_stage_model.transformer.)" + (f"; cross-attention width {width}" if width else "")
    if stated:
        return stated[0], f"{stated[1]}; cross-attention width {width}" if width else stated[1]
    if width is not None:
        return "unknown", f"cross-attention width {width} is none of SD1's 768, SD2's 1024, SDXL's 2048, and no base model in the metadata"
    return "unknown", "no cross-attention layer (attn2.to_k) adapted and no base model in the metadata"


def _family_in_metadata(metadata: dict[str, str]) -> tuple[str, str] | None:
    version = metadata.get("ss_base_model_version", "")
    for prefix, family in FAMILY_OF_VERSION.items():
        if version.startswith(prefix):
            return family, f"metadata ss_base_model_version = {version}"
    architecture = metadata.get("modelspec.architecture", "")
    for prefix, family in FAMILY_OF_ARCHITECTURE.items():
        if architecture.startswith(prefix):
            return family, f"metadata modelspec.architecture = {architecture}"
    return None


# --- metadata ------------------------------------------------------------------------------------------------------


def _metadata(meta: dict[str, str]) -> dict[str, str]:
    out = {}
    triggers = [meta["modelspec.trigger_phrase"]] if meta.get("modelspec.trigger_phrase") else []
    try:
        frequency = json.loads(meta.get("ss_tag_frequency", "{}"))
        tags = Counter()
        for folder in frequency.values():
            tags.update(folder)
        triggers += [tag for tag, _ in tags.most_common(5) if tag not in triggers]
    except (json.JSONDecodeError, TypeError, AttributeError):
        pass
    if triggers:
        out["trigger words"] = ", ".join(triggers)
    pick = {
        "title": ("modelspec.title", "ss_output_name"),
        "base model": ("ss_sd_model_name",),
        "base model version": ("ss_base_model_version", "modelspec.architecture"),
        "steps": ("ss_steps", "ss_max_train_steps"),
        "epochs": ("ss_epoch", "ss_num_epochs"),
        "resolution": ("modelspec.resolution", "ss_resolution"),
        "learning rate": ("ss_learning_rate", "ss_unet_lr"),
        "text-encoder learning rate": ("ss_text_encoder_lr",),
        "date": ("modelspec.date",),
        "token": ("token",),
    }
    for label, keys in pick.items():
        value = next((meta[k] for k in keys if meta.get(k) not in (None, "", "None")), None)
        if value is not None:
            out[label] = value
    for label, key in (("training started", "ss_training_started_at"), ("training finished", "ss_training_finished_at")):
        try:
            out[label] = datetime.datetime.fromtimestamp(float(meta[key]), datetime.timezone.utc).isoformat(timespec="seconds")
        except (KeyError, ValueError, OverflowError):
            pass
    if "lora_adapter_metadata" in meta:
        out["alpha stored"] = "yes (peft config in lora_adapter_metadata; diffusers ≥ 0.34 reads it)"
    return out


# --- readers -------------------------------------------------------------------------------------------------------


def readers(kind: str, family: str, components: set[str]) -> dict[str, str]:
    """Which tools read a file of this format and family, as sdtune knows them."""
    if kind in ("kohya", "kohya_locon"):
        return {"A1111 / Forge": "yes (models/Lora)", "ComfyUI": "yes (LoraLoader)", "kohya sd-scripts": "yes",
                "diffusers load_lora_weights": "yes (converted from kohya names; sdtune sample --adapter too)",
                "peft": "no (kohya names)"}  # fmt: skip
    if kind == "kohya_flux":
        return {"ComfyUI": "yes", "Forge": "yes", "diffusers load_lora_weights": "yes (FluxPipeline)",
                "A1111": "no (no Flux support)"}  # fmt: skip
    if kind in ("loha", "lokr"):
        return {"A1111 / Forge": "yes (built-in Lora extension)", "ComfyUI": "yes", "LyCORIS / kohya sd-scripts": "yes",
                "diffusers load_lora_weights": "no (refuses LoHa/LoKr keys for Stable Diffusion UNets)", "sdtune sample / export": "no (LoRA only)"}  # fmt: skip
    if kind == "diffusers":
        out = {"diffusers load_lora_weights": "yes (alpha ≠ rank needs diffusers ≥ 0.34)", "sdtune sample / export": "yes"}
        if "UNet" in components and family in ("SD1", "SD2", "unknown"):
            out |= {"A1111 / Forge": NOT_A1111, "ComfyUI": COMFYUI_HALF}
        elif family in ("SD3", "Flux", "SD3 or Flux"):
            out |= {"ComfyUI": "yes", "Forge": "yes"}
        else:
            out |= {"A1111 / Forge / ComfyUI": "not checked by sdtune; `sdtune export FILE --model BASE --format kohya` writes the file they read"}
        return out
    if kind == "peft":
        return {"peft PeftModel.from_pretrained": "yes, on the model it was trained on (the folder's denoiser; text encoders in "
                "their subfolders, with transformers 4 or 5 when the keys are under both module names, as sdtune writes them)",
                "diffusers load_lora_weights": "no: it takes the file without an error and attaches nothing (peft's "
                "base_model.model. keys); load it with peft, or export the run with --format diffusers",
                "A1111 / Forge / ComfyUI": "no"}  # fmt: skip
    if kind == "embedding":
        return {"A1111 / Forge": "yes (embeddings/; the file name is the prompt word)", "ComfyUI": "yes (embedding:NAME)",
                "diffusers load_textual_inversion": "yes" + (" (once per text encoder)" if family == "SDXL" else ""),
                "sdtune sample --embedding": "yes" if family in ("SD1", "SD2") else "no"}  # fmt: skip
    if kind == "single_file":
        sdtune = "yes (--model FILE --model-config DIR)" if family in ("SD1", "SD2") else "no (SD1/SD2 single files only)"
        return {"A1111 / Forge / ComfyUI": "yes (models/Stable-diffusion, checkpoints)",
                "diffusers from_single_file": "yes", "sdtune --model": sdtune}  # fmt: skip
    if kind == "pipeline":
        return {"diffusers from_pretrained": "yes", "sdtune --model": "yes", "A1111 / ComfyUI": "no (a diffusers folder, not one file)"}
    return {}


# --- folders and pickles -------------------------------------------------------------------------------------------


def _peft_folder(path: Path) -> Report:
    """peft's `save_pretrained` folder; sdtune's peft export keeps each text encoder's in a subfolder of its name."""
    report = _inspect_safetensors(read_header(path / "adapter_model.safetensors"))
    report.path, report.format = str(path), FORMAT_NAMES["peft"] + " folder (adapter_config.json + adapter_model.safetensors)"
    config = _read_json(path / "adapter_config.json")
    base = str(config.get("base_model_name_or_path") or "")
    report.metadata["base model"] = base
    for layer in report.layers:  # the base model's subfolder names the component (".../unet")
        layer.component = DIFFUSERS_COMPONENTS.get(base.rstrip("/").rsplit("/", 1)[-1], "denoiser")
    apply_peft_config(report.layers, config)
    for sub in sorted(p for p in path.iterdir() if (p / "adapter_config.json").is_file() and (p / "adapter_model.safetensors").is_file()):
        part = _inspect_safetensors(read_header(sub / "adapter_model.safetensors"))
        for layer in part.layers:
            layer.component = DIFFUSERS_COMPONENTS.get(sub.name, sub.name)
        apply_peft_config(part.layers, _read_json(sub / "adapter_config.json"))
        report.layers += part.layers
        report.dtypes = dict(Counter(report.dtypes) + Counter(part.dtypes))
    report.size_bytes = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    _family_from_base(report, Path(base).parent)
    return report


def _family_from_base(report: Report, base: Path) -> None:
    """When the file does not tell, the family of its base model, if that is a diffusers folder on this machine."""
    if report.family == "unknown" and (base / "model_index.json").is_file():
        found = _pipeline_folder(base)
        if found.family != "unknown":
            report.family, report.family_reason = found.family, f"its base model {base}: {found.family_reason}"


def _read_json(path: Path) -> dict:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SdtuneError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(loaded, dict):
        raise SdtuneError(f"{path}: expected a JSON object")
    return loaded


def _pipeline_folder(path: Path) -> Report:
    index = _read_json(path / "model_index.json")
    pipeline = str(index.get("_class_name", ""))
    family, reason = FAMILY_OF_PIPELINE.get(pipeline), f"model_index.json: {pipeline}"
    if family is None and (path / "unet" / "config.json").is_file():
        width = _read_json(path / "unet" / "config.json").get("cross_attention_dim")
        family = CONTEXT_WIDTHS.get(width, "unknown")
        reason += f", UNet cross-attention width {width}" + ("" if family != "unknown" else " (SD1 768, SD2 1024)")
    parts = sorted(name for name, value in index.items() if isinstance(value, list) and value[0] is not None)
    report = Report(str(path), "diffusers pipeline folder (model_index.json)", family or "unknown", reason)
    report.metadata["components"] = ", ".join(parts)
    report.size_bytes = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    report.readers = readers("pipeline", report.family, set())
    return report


def _run_directory(path: Path) -> Report:
    """An sdtune run: its final adapter (or full model) inspected, with the training settings of its config.yaml."""
    import yaml

    try:
        config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {}
    except (UnicodeDecodeError, yaml.YAMLError) as err:
        raise SdtuneError(f"{path}: config.yaml is not YAML ({type(err).__name__})") from err
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise SdtuneError(f"{path}: config.yaml is not an sdtune run config (no model section)")
    written = next((p for p in (path / "adapter" / LORA_MODEL_FILES[0], path / "model") if p.exists()), None)
    if written is not None:
        report = inspect(written)
        report.format = f"sdtune run directory; {written.relative_to(path)}: {report.format}"
    else:
        embeddings = sorted(p.name for p in (path / "adapter" / "embeddings").glob("*.safetensors"))
        what = f"new-token embeddings only ({', '.join(embeddings)} in adapter/embeddings/)" if embeddings else "no adapter/ or model/ written yet"
        report = Report(str(path), f"sdtune run directory: {what}", "unknown", "the family is the base model's")
    report.path = str(path)
    model = config["model"].get("init_args") or {}
    data = (config.get("data") or {}).get("init_args") or {}
    trainer = config.get("trainer") or {}
    prefixes = [s.get("prefix") for s in data.get("subsets") or [] if isinstance(s, dict) and s.get("prefix")]
    run = {"method": config["model"].get("class_path"), "base model": model.get("pretrained"),
           "steps": trainer.get("max_steps"), "resolution": data.get("resolution"),
           "learning rate": ((model.get("optimizer") or {}).get("init_args") or {}).get("lr"),
           "trigger words": ", ".join(prefixes) or None,
           "checkpoint": "checkpoints/last.ckpt" if (path / "checkpoints" / "last.ckpt").is_file() else None}  # fmt: skip
    report.metadata |= {key: str(value) for key, value in run.items() if value not in (None, "")}
    if isinstance(model.get("pretrained"), str):
        _family_from_base(report, Path(model["pretrained"]).expanduser())
    return report


def _inspect_pickle(path: Path) -> Report:
    """A .ckpt/.pt is a pickle: it is never unpickled here; the strings of its opcodes (key names, class paths) are
    read with `pickletools`, which only parses."""
    if path.stat().st_size == 0:
        raise SdtuneError(f"{path}: an empty file")
    if not zipfile.is_zipfile(path):
        raise SdtuneError(f"{path}: not a zip-format PyTorch checkpoint (a legacy pickle, damaged, or not a checkpoint)")
    try:
        with zipfile.ZipFile(path) as archive:
            data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
        strings = {arg for _, arg, _ in pickletools.genops(data) if isinstance(arg, str)}
    except (StopIteration, zipfile.BadZipFile, OSError, ValueError) as err:
        raise SdtuneError(f"{path}: a damaged or non-PyTorch zip archive ({type(err).__name__})") from err
    method = next((s.removeprefix("sdtune.finetune.") for s in sorted(strings) if s.startswith("sdtune.finetune.")), None)
    if "_class_path" in strings and method:
        report = Report(str(path), f"sdtune training checkpoint ({method})", "unknown",
                        "a checkpoint holds the trained weights only; the base model is in its run's config.yaml")  # fmt: skip
        report.readers = {"sdtune export CKPT": "yes (--model BASE outside its run)", "sdtune fit --ckpt_path": "yes (resume)",
                          "A1111 / ComfyUI / diffusers": "no: `sdtune export` writes their files"}  # fmt: skip
    elif any(s.startswith("model.diffusion_model.") for s in strings):
        keys = {s: None for s in strings}
        report = Report(str(path), FORMAT_NAMES["single_file"] + " (.ckpt pickle)", *_family(keys, {}, "single_file"))
        report.metadata["parts"] = _parts(keys)
        report.readers = readers("single_file", report.family, set())
    elif "string_to_param" in strings:
        report = Report(str(path), f"{FORMAT_NAMES['embedding']} (A1111 .pt: string_to_param)", "unknown",
                        "its width is in the tensor data, which a .pt keeps inside the pickle")  # fmt: skip
        report.readers = readers("embedding", report.family, set())
    else:
        raise SdtuneError(f"{path}: a PyTorch file that is neither an sdtune training checkpoint, a Stable Diffusion checkpoint nor an embedding")
    report.size_bytes = path.stat().st_size
    return report


def _parts(keys) -> str:
    return ", ".join(part for part, prefixes in SINGLE_FILE_PARTS.items() if any(k.startswith(prefixes) for k in keys)) or "none"


# --- text ----------------------------------------------------------------------------------------------------------


def adapted_summary(layers: list[Layer]) -> list[dict]:
    """Per component: layers by block, conv layers, and each (rank, alpha) with its scale alpha / rank."""
    out = []
    for component in dict.fromkeys(layer.component for layer in layers):
        mine = [layer for layer in layers if layer.component == component]
        pairs = Counter((layer.rank, layer.alpha) for layer in mine)
        out.append({
            "component": component, "layers": len(mine), "conv_layers": sum(layer.conv for layer in mine),
            "blocks": dict(Counter(layer.block for layer in mine)),
            "rank_alpha": [{"rank": r, "alpha": a, "scale": _scale(r, a), "layers": n} for (r, a), n in pairs.items()],
        })  # fmt: skip
    return out


def _scale(rank: int | None, alpha: float | None) -> float | None:
    if rank is None:
        return None if alpha is None else 1.0
    return (alpha if alpha is not None else rank) / rank


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def to_text(report: Report) -> str:
    lines = [report.path, f"  format:  {report.format}", f"  family:  {report.family} ({report.family_reason})" if report.family_reason else f"  family:  {report.family}"]
    for part in adapted_summary(report.layers):
        blocks = ", ".join(f"{block} {n}" for block, n in part["blocks"].items())
        pairs = "; ".join(
            f"rank {p['rank'] if p['rank'] is not None else 'full'} alpha {_number(p['alpha']) if p['alpha'] is not None else 'not stored (= rank)'}"
            f" → scale {_number(p['scale'])}" + (f" ({p['layers']} layers)" if len(part["rank_alpha"]) > 1 else "")
            for p in part["rank_alpha"]
        )  # fmt: skip
        conv = f", {part['conv_layers']} conv" if part["conv_layers"] else ""
        where = f" ({blocks}{conv})" if set(part["blocks"]) != {"layers"} or conv else ""  # not "20 layers (layers 20)"
        lines.append(f"  {part['component']}: {part['layers']} layers{where}; {pairs}")
    stored = ", ".join(f"{dtype} ×{n}" for dtype, n in report.dtypes.items())
    lines.append(f"  size:    {human_size(report.size_bytes)}" + (f"; tensors {stored}" if stored else ""))
    for key, value in report.metadata.items():
        lines.append(f"  {key}: {value}")
    if report.readers:
        lines.append("  read by:")
        width = max(map(len, report.readers))
        lines += [f"    {tool:<{width}}  {verdict}" for tool, verdict in report.readers.items()]
    lines += [f"  note: {note}" for note in report.notes]
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "?" if value is None else f"{value:g}"
