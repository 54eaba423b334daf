"""The export formats: how each is written, and how its consumer loads it back for the check.

| format    | written                                              | consumer that re-reads it                      |
| diffusers | pytorch_lora_weights.safetensors (+ README.md card)  | diffusers `load_lora_weights`                  |
| peft      | adapter_config.json + adapter_model.safetensors      | peft `PeftModel.from_pretrained`               |
|           | (text encoders in text_encoder/, text_encoder_2/;    |                                                |
|           | transformers 4 and 5 module names both)              |                                                |
| kohya     | one .safetensors, lora_unet_/lora_te(1,2)_ keys      | diffusers' kohya converter (as A1111 reads it) |
|           | (LoHa/LoKr: LyCORIS keys, `sdtune.adapters.lycoris`) | (LoHa/LoKr: sdtune's LyCORIS reader)           |
| merged    | a complete diffusers pipeline folder                 | `StableDiffusionPipeline.from_pretrained`      |
| single-   | one .safetensors in the original (LDM) layout, the   | `StableDiffusion(XL)Pipeline.from_single_file` |
| file      | adapter folded in (SD1.x, SD2.x, SDXL)               | with the base model's configs                  |
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from sdtune.adapters import kohya
from sdtune.adapters.files import adapter_file
from sdtune.adapters.lora import lora_state_dict, save_diffusers_adapter
from sdtune.adapters.lycoris import is_lycoris, load_lycoris, lycoris_layers, save_lycoris
from sdtune.errors import SdtuneError, first_line
from sdtune.export.model_card import write_model_card
from sdtune.export.single_file import save_single_file
from sdtune.export.source import ADAPTER, Adapted
from sdtune.inference.sampling import denoiser_of
from sdtune.models.families import family_of_pipeline
from sdtune.models.tokenizer_files import save_tokenizer

PEFT_WEIGHTS = "adapter_model.safetensors"


def write_diffusers(adapted: Adapted, out: Path, dtype: torch.dtype) -> None:
    if lycoris_layers(denoiser_of(adapted.pipe)):
        raise SdtuneError("--format diffusers: diffusers' load_lora_weights reads LoRA only, not LoHa/LoKr; use --format kohya (a LyCORIS file) or --merge")
    save_diffusers_adapter(adapted.family, denoiser_of(adapted.pipe), out, adapted.text_encoders, dtype=dtype)
    write_model_card(adapted, out)  # README.md, as diffusers' training scripts write for the Hub


def _write_peft_model(model: torch.nn.Module, out: Path, dtype: torch.dtype, base: str) -> None:
    """peft's own layout: keys follow the module names of the installed libraries (peft maps nothing)."""
    config = model.peft_config[ADAPTER]
    config.base_model_name_or_path = base
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in lora_state_dict(model).items()}
    if type(model).__name__ == "CLIPTextModel":
        tensors = both_clip_layouts(tensors)
    save_file({f"base_model.model.{k}": v for k, v in tensors.items()}, str(out / PEFT_WEIGHTS), metadata={"format": "pt"})


def both_clip_layouts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIPTextModel adapter under both module layouts: transformers 5 flattened the model (`encoder.layers.0…`),
    transformers 4 has `text_model.encoder.layers.0…`. peft loads with strict=False, so each version takes its own
    keys and ignores the others (with only its own, the other version leaves every lora_B at zero)."""
    out = {}
    for key, value in tensors.items():
        flat = key.removeprefix("text_model.")
        out[flat], out[f"text_model.{flat}"] = value, value.clone()  # safetensors stores no shared tensors
    return out


def write_peft(adapted: Adapted, out: Path, dtype: torch.dtype) -> None:
    denoiser = adapted.family.denoiser
    _write_peft_model(getattr(adapted.pipe, denoiser), out, dtype, f"{adapted.pretrained}/{denoiser}")
    for name, encoder in zip(adapted.family.text_encoders, adapted.text_encoders):
        if encoder is not None:
            _write_peft_model(encoder, out / name, dtype, f"{adapted.pretrained}/{name}")


def write_kohya(adapted: Adapted, out: Path, dtype: torch.dtype) -> None:
    if lycoris_layers(denoiser_of(adapted.pipe)):
        save_lycoris(adapted.family, denoiser_of(adapted.pipe), out, adapted.text_encoders, dtype)
        return
    kohya.save_kohya(out, adapted.family, denoiser_of(adapted.pipe), adapted.text_encoders, adapted.info, dtype)


def write_merged(adapted: Adapted, out: Path, dtype: torch.dtype, scale: float, single_file: bool = False) -> None:
    """Fold the adapter into the weights at `scale` and save the whole pipeline, or with `single_file` the whole
    model as one checkpoint in the original layout (this consumes `adapted`)."""
    pipe, family = adapted.pipe, adapted.family
    components = [family.denoiser] + [name for name, encoder in zip(family.text_encoders, adapted.text_encoders) if encoder is not None]
    pipe.set_adapters([ADAPTER], [1.0])  # fuse_lora's scale multiplies the active weight: apply `scale` once
    pipe.fuse_lora(components=components, lora_scale=scale, adapter_names=[ADAPTER])
    pipe.unload_lora_weights()
    if single_file:
        save_single_file(pipe, family, out, dtype)
        return
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.save_pretrained(str(out), safe_serialization=True)
    for name in family.tokenizers:
        save_tokenizer(getattr(pipe, name), out / name)


WRITERS = {"diffusers": write_diffusers, "peft": write_peft, "kohya": write_kohya}
# Printed after an export: the library versions that read the file as written.
READ_BY = {
    "diffusers": "diffusers ≥ 0.34 `load_lora_weights` (earlier versions ignore the stored alpha: alpha ≠ rank loads at the wrong strength)",
    "peft": "peft ≥ 0.20 `PeftModel.from_pretrained` (text encoders from their subfolders) with transformers 4 (≥ 4.45) or 5: "
    "the CLIP text encoder's keys are written in both versions' module names",
}


# --- consumers ---------------------------------------------------------------------------------------------------


def load_with_diffusers(base, path: Path):
    from safetensors import safe_open

    pipe = base()
    weights = adapter_file(path)
    with safe_open(str(weights), "pt") as file:
        if is_lycoris(file.keys()):
            load_lycoris(pipe, weights, "check")
            return pipe
    pipe.load_lora_weights(str(weights.parent), weight_name=weights.name, adapter_name="check")
    return pipe


def load_with_peft(base, path: Path):
    from peft import PeftModel

    pipe = base()
    family = family_of_pipeline(pipe)
    PeftModel.from_pretrained(denoiser_of(pipe), str(path))  # injects the layers into the denoiser in place
    for name in family.text_encoders:
        if (path / name).is_dir():
            PeftModel.from_pretrained(getattr(pipe, name), str(path / name))
    return pipe


def load_merged(base, path: Path):
    from sdtune.models.pretrained import load_pipeline

    return load_pipeline(str(path))


def load_single_file(base_model: tuple[str, str | None, str | None], path: Path):
    """A whole-model file as diffusers' `from_single_file` reads it, with the base model's configs."""
    from sdtune.models.pretrained import detect_family, resolve_source
    from sdtune.models.single_file import pipeline_from_single_file

    pretrained, revision, config = base_model
    source = resolve_source(pretrained, revision, config)
    return pipeline_from_single_file(detect_family(source, revision), path, source.configs)


CONSUMERS = {"diffusers": load_with_diffusers, "kohya": load_with_diffusers, "peft": load_with_peft, "merged": load_merged}


def load_back(kind: str, base_model: tuple[str, str | None, str | None], path: Path):
    """`path` as its consumer loads it: adapter files onto a fresh copy of the base model
    (`base_model`: pretrained, revision, pretrained_config)."""
    from sdtune.models.pretrained import load_pipeline

    def base():
        pretrained, revision, config = base_model
        return load_pipeline(pretrained, revision=revision, pretrained_config=config)

    try:
        if kind == "single-file":  # a whole model: read with the base model's configs, not loaded onto it
            return load_single_file(base_model, path)
        return CONSUMERS[kind](base, path)
    except SdtuneError:
        raise
    except Exception as err:  # whatever the consumer raises, the file is unusable: report it in one line
        raise SdtuneError(f"the exported {kind} file does not load back: {first_line(err)}") from err
