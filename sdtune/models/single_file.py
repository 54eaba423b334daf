"""Stable Diffusion 1.x/2.x and SDXL weights from one file in the original LDM/CompVis layout (SGM's for SDXL;
.safetensors or .ckpt, as AUTOMATIC1111 and Civitai distribute them), converted part by part by diffusers with
configs from elsewhere.

A .ckpt is a pickle: it is read with `weights_only=True`, so a file that pickles Python objects besides tensors is
refused rather than allowed to run code.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from sdtune.errors import SdtuneError, first_line, refused_pickle

# Key prefixes of the original layout that a Stable Diffusion single file must have, by part.
LDM_PARTS = {
    "UNet (model.diffusion_model.*)": ("model.diffusion_model.",),
    "VAE (first_stage_model.*)": ("first_stage_model.", "vae."),
    "text encoder (cond_stage_model.* or conditioner.embedders.*)": ("cond_stage_model.", "conditioner.embedders."),
}
SDXL_TEXT_PREFIX = "conditioner.embedders."  # SGM's text encoders; SD1.x/2.x files have cond_stage_model.*

def _describe(err: BaseException) -> str:
    """Type and first line: for errors from deep inside torch or diffusers, the type is often the clearer half."""
    text = str(err).strip()
    return f"{type(err).__name__}: {first_line(err)}" if text else type(err).__name__


def read_single_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors or .ckpt file. A .ckpt is a pickle, so it is read with `weights_only=True`
    (as diffusers' own loader does): tensors and plain containers only, never code from the file."""
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:  # mmap keeps a multi-GB zip-format .ckpt out of RAM until each tensor is converted
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        found = refused_pickle(err)
        if found is None:
            raise SdtuneError(f"model.pretrained '{path}' could not be read (truncated or not a checkpoint?): {_describe(err)}") from err
        raise SdtuneError(
            f"model.pretrained '{path}' pickles Python objects besides tensors ({found}), "
            "which sdtune does not load since unpickling them can run code: use a .safetensors release of the model"
        ) from err
    except Exception as err:  # torch.load and safetensors raise anything from KeyError to OSError on damaged files
        raise SdtuneError(f"model.pretrained '{path}' could not be read (truncated or not a checkpoint?): {_describe(err)}") from err
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # CompVis/A1111 .ckpt nesting
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise SdtuneError(f"model.pretrained '{path}' holds a {type(state).__name__}, not a state dict of tensors")
    state = {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}
    _check_ldm_layout(path, state)
    return state


def _check_ldm_layout(path: Path, state: dict[str, torch.Tensor]) -> None:
    """A LoRA, a VAE alone or an embedding would otherwise fail deep in the conversion."""
    missing = [part for part, prefixes in LDM_PARTS.items() if not any(key.startswith(prefixes) for key in state)]
    if missing:
        raise SdtuneError(
            f"model.pretrained '{path}' is not a Stable Diffusion checkpoint in the original layout: no {', '.join(missing)} "
            "weights (a LoRA, VAE or embedding file?)"
        )


def check_family(path: Path, state: dict[str, torch.Tensor], family) -> None:
    """An SDXL file needs SDXL configs and an SD1.x/2.x file SD1.x/2.x ones (which of the two, the conversion tells)."""
    file_is_sdxl = any(key.startswith(SDXL_TEXT_PREFIX) for key in state)
    if file_is_sdxl != (family.name == "sdxl"):
        kind = "an SDXL" if file_is_sdxl else "an SD1.x/2.x"
        example = "stabilityai/stable-diffusion-xl-base-1.0" if file_is_sdxl else "stable-diffusion-v1-5/stable-diffusion-v1-5"
        raise SdtuneError(
            f"model.pretrained '{path}' is {kind} checkpoint but model.pretrained_config is {family.label}: pass the "
            f"configs of its architecture (e.g. {example})"
        )


SHAPE_MISMATCH = re.compile(r"because (\S+) expected shape torch\.Size\(\[([^\]]*)\]\), but got torch\.Size\(\[([^\]]*)\]\)")


def _conversion_detail(err: BaseException) -> str:
    """The useful part of diffusers' conversion errors: which tensor does not fit, or that weights are missing
    (diffusers then fails moving the uninitialised "meta" tensors), without its advice to ignore mismatched sizes."""
    text = str(err)
    if shape := SHAPE_MISMATCH.search(text):
        return f"{shape[1]} is ({shape[3]}) in the file but ({shape[2]}) in the config"
    if "meta tensor" in text:
        return "the file lacks some of its weights"
    return _describe(err)


def part_from_single_file(cls, state: dict[str, torch.Tensor], source, subfolder: str, dtype: torch.dtype):
    """One part, converted from the LDM layout by diffusers, with its config from `source.configs` (a
    `pretrained.Source`)."""
    try:
        if cls in (CLIPTextModel, CLIPTextModelWithProjection):
            # transformers has no from_single_file; this is what the pipelines' from_single_file call for each text
            # encoder: it finds SD1's CLIP, SD2's OpenCLIP or SDXL's two by their keys and widths (and handles the
            # text_model level that transformers 5 flattened away).
            from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

            model = create_diffusers_clip_model_from_ldm(
                cls, state, subfolder=subfolder, config=source.configs, torch_dtype=dtype, local_files_only=True
            )
        else:
            model = cls.from_single_file(state, config=source.configs, subfolder=subfolder, torch_dtype=dtype, local_files_only=True)
    except Exception as err:  # a file of another architecture fails anywhere in the conversion (KeyError, shapes, meta tensors)
        raise SdtuneError(
            f"model.pretrained '{source.single_file}': {subfolder} could not be loaded with the configs of {source.where()} "
            f"(the same architecture as the file, e.g. SD1.x or SD2.x?): {_conversion_detail(err)}"
        ) from err
    empty = [name for name, tensor in model.state_dict().items() if tensor.is_meta]
    if empty:  # diffusers leaves weights the file lacks uninitialised instead of failing
        raise SdtuneError(
            f"model.pretrained '{source.single_file}' has no weights for {len(empty)} {subfolder} tensors (e.g. {empty[0]}): "
            f"is {source.where()} the same architecture as the file?"
        )
    return model


def pipeline_from_single_file(family, path: Path, configs: str):
    """The family's text-to-image pipeline as diffusers' own `from_single_file` builds it from a whole-model file, with
    the configs, tokenizers and scheduler of `configs` (a diffusers folder or Hub id), in float32."""
    import diffusers

    pipeline = getattr(diffusers, family.pipelines["text2image"])
    return pipeline.from_single_file(str(path), config=configs, torch_dtype=torch.float32)
