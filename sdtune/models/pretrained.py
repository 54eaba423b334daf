"""Loading Stable Diffusion components. This module (with `single_file.py`) is the only caller of `from_pretrained`
and `from_single_file`.

`pretrained` is a local directory in the diffusers layout (model_index.json, unet/, vae/, text_encoder/,
tokenizer/, scheduler/) or a Hugging Face Hub id, with an optional revision and weight variant ("fp16"); or a
single-file checkpoint in the original LDM/CompVis layout (.safetensors or .ckpt, as AUTOMATIC1111 users have them).
A single file holds only weights, so `pretrained_config` (a diffusers directory or Hub id of the same architecture)
gives the model configs, the tokenizer and the scheduler. `sdtune:toy` names the toy base model inside the package.

Stable Diffusion XL is recognised by its second text encoder (`text_encoder_2/`, `tokenizer_2/`): the parts then
carry both encoders and tokenizers, and pipelines built from them are `StableDiffusionXLPipeline`s.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sdtune.errors import SdtuneError, first_line
from sdtune.models.single_file import SINGLE_FILE_SUFFIXES, part_from_single_file, read_single_file

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_SUBFOLDERS = ("text_encoder_2", "tokenizer_2")
CONFIG_EXAMPLE = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# What a config source needs from the Hub: configs and tokenizer files, never weights.
CONFIG_FILES = ["*.json", "**/*.json", "*.txt", "**/*.txt", "**/*.model"]


@dataclass
class StableDiffusionParts:
    """The pieces of a Stable Diffusion checkpoint that training needs."""

    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    unet: UNet2DConditionModel | None  # None when loaded without it
    noise_scheduler: DDPMScheduler
    # SDXL only: the second (projected) text encoder and its tokenizer; whether a missing negative prompt means zero
    # embeddings (model_index.json's force_zeros_for_empty_prompt, as StableDiffusionXLPipeline does).
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None
    force_zeros_for_empty_prompt: bool = False

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along one side (8 for SD; read from the VAE config, never assumed)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


@dataclass(frozen=True)
class Source:
    """Where a model's configs, tokenizer and scheduler load from (`configs`: a local directory or Hub id), and its
    weights: the same place, or `single_file`. `setting` and `name` say which option to fix when loading fails."""

    configs: str
    setting: str = "model.pretrained"
    name: str = ""
    single_file: Path | None = None

    def where(self) -> str:
        return f"{self.setting} '{self.name or self.configs}'"


def _check_local(path: Path, setting: str = "model.pretrained", name: str | None = None) -> None:
    """`name` is what the user wrote when `path` is its Hub cache folder (which offline may hold only part of it)."""
    expected = SUBFOLDERS + (SDXL_SUBFOLDERS if any((path / sub).is_dir() for sub in SDXL_SUBFOLDERS) else ())
    missing = [sub for sub in expected if not (path / sub).is_dir()]
    if missing:
        hint = (
            "(pass a .safetensors/.ckpt file with model.pretrained_config for single-file checkpoints, or a Hub id)"
            if setting == "model.pretrained"
            else f"(it gives the single file's configs, tokenizer and scheduler: a diffusers model of the same architecture, e.g. {CONFIG_EXAMPLE})"
        )
        missing_list = ", ".join(m + "/" for m in missing)
        cached = _offline_hint() if name else ""
        raise SdtuneError(f"{setting} '{name or path}' is not a diffusers model directory{cached}: missing {missing_list} {hint}")


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Models inside the sdtune package, by the name `model.pretrained` (and --model) accepts.
EMBEDDED = {"sdtune:toy": Path(__file__).parent / "toy_base"}


def _resolve(pretrained: str) -> str:
    if pretrained.startswith("sdtune:"):
        if pretrained not in EMBEDDED:
            raise SdtuneError(f"model.pretrained '{pretrained}' is not a model sdtune ships (those are: {', '.join(EMBEDDED)})")
        _check_local(EMBEDDED[pretrained])
        return str(EMBEDDED[pretrained])
    path = Path(pretrained).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SdtuneError(
                f"model.pretrained '{pretrained}' is a file but not a {'/'.join(SINGLE_FILE_SUFFIXES)} checkpoint; "
                "pass a single-file checkpoint, a diffusers model directory or a Hub id"
            )
        _check_local(path)
        return str(path)
    if not HUB_ID.match(pretrained):
        raise SdtuneError(f"model.pretrained '{pretrained}' does not exist (not a local directory nor a Hub id 'org/name')")
    return pretrained


def _single_file(pretrained: str) -> Path | None:
    """The checkpoint file `pretrained` names, or None for a directory or Hub id."""
    path = Path(pretrained).expanduser()
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        return None
    if not path.exists():
        raise SdtuneError(f"model.pretrained '{pretrained}' does not exist")
    return path if path.is_file() else None


def _config_dir(pretrained_config: str, revision: str | None) -> str:
    """A local directory with the configs, tokenizer and scheduler for a single file. A Hub id is fetched without its
    weights (json and txt files only), so every part, the text encoder included, reads the same revision."""
    setting = "model.pretrained_config"
    path = Path(pretrained_config).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SdtuneError(f"{setting} '{pretrained_config}' is a file; pass a diffusers model directory or Hub id (e.g. {CONFIG_EXAMPLE})")
        _check_local(path, setting)
        return str(path)
    if not HUB_ID.match(pretrained_config):
        raise SdtuneError(f"{setting} '{pretrained_config}' does not exist (not a local directory nor a Hub id 'org/name')")
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(pretrained_config, revision=revision, allow_patterns=CONFIG_FILES)
    except (OSError, ValueError) as err:
        raise SdtuneError(f"{setting} '{pretrained_config}' could not be loaded{_offline_hint()}: {first_line(err)}") from err
    _check_local(Path(folder), setting, pretrained_config)
    return folder


def resolve_source(pretrained: str, revision: str | None = None, pretrained_config: str | None = None) -> Source:
    """Check `pretrained` (and `pretrained_config`) without loading weights: a file with the wrong suffix, a single
    file without its configs, a missing directory or subfolder fail here, in one line.

    A directory or Hub id brings its own configs, so `pretrained_config` is ignored for it: a run trained from a
    single file records both, and commands that swap in another base model (`sdtune export --model`) keep working."""
    single_file = _single_file(pretrained)
    if single_file is None:
        return Source(_resolve(pretrained), name=pretrained)
    if pretrained_config is None:
        raise SdtuneError(
            "model.pretrained is a single-file checkpoint: set model.pretrained_config (--model-config for sdtune "
            "sample/evaluate) to a diffusers directory or Hub id with its configs, tokenizer and scheduler "
            f"(e.g. {CONFIG_EXAMPLE})"
        )
    return Source(_config_dir(pretrained_config, revision), "model.pretrained_config", pretrained_config, single_file)


def _offline_hint() -> str:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("0", "", "false", "no"):
        return ""
    return " (HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache: download it first or pass a local directory)"


def _load(cls, source: Source, subfolder: str, **kwargs):
    """`cls.from_pretrained` (or `cls` itself when it is a loading function) with one-line errors."""
    load = cls.from_pretrained if hasattr(cls, "from_pretrained") else cls
    try:
        return load(source.configs, subfolder=subfolder, **kwargs)
    except (OSError, ValueError, EnvironmentError) as err:
        raise SdtuneError(f"{source.where()}: {subfolder}/ could not be loaded{_offline_hint()}: {first_line(err)}") from err


def load_tokenizer(pretrained: str, revision: str | None = None, pretrained_config: str | None = None) -> CLIPTokenizer:
    """The CLIP tokenizer from the `tokenizer/` subfolder, with its length capped by the text encoder's positions.
    For a single-file `pretrained` it comes from `pretrained_config` (the file itself is not read)."""
    return _load_tokenizer(resolve_source(pretrained, revision, pretrained_config), revision)


def load_tokenizers(pretrained: str, revision: str | None = None, pretrained_config: str | None = None) -> list[CLIPTokenizer]:
    """Every tokenizer the model's text encoders read: `tokenizer/`, and `tokenizer_2/` for SDXL."""
    source = resolve_source(pretrained, revision, pretrained_config)
    tokenizers = [_load_tokenizer(source, revision)]
    if is_sdxl(source, revision):
        tokenizers.append(_load_tokenizer(source, revision, "_2"))
    return tokenizers


def _load_tokenizer(source: Source, revision: str | None, suffix: str = "") -> CLIPTokenizer:
    """`tokenizer{suffix}/`, whose length its text encoder (`text_encoder{suffix}/`) caps."""
    tokenizer = _load(CLIPTokenizer, source, "tokenizer" + suffix, revision=revision)
    # Recent transformers build an empty tokenizer instead of failing when the vocabulary files are missing.
    if tokenizer.vocab_size <= 3:
        raise SdtuneError(f"{source.where()}: tokenizer{suffix}/ has no vocabulary (vocab.json + merges.txt){_offline_hint()}")
    if tokenizer.model_max_length > 100_000:  # no model_max_length in tokenizer_config.json
        config = _load(CLIPTextConfig, source, "text_encoder" + suffix, revision=revision)
        tokenizer.model_max_length = config.max_position_embeddings
    return tokenizer


def model_index(source: Source, revision: str | None) -> dict:
    """The pipeline's model_index.json; {} when there is none (a local directory without it, a Hub model offline
    whose cache holds only its subfolders)."""
    path = Path(source.configs)
    if path.is_dir():
        index = path / "model_index.json"
        return json.loads(index.read_text(encoding="utf-8")) if index.is_file() else {}
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(source.configs, "model_index.json", revision=revision)).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # what loading the parts themselves reports, if they are missing too
        return {}


def is_sdxl(source: Source, revision: str | None) -> bool:
    """Whether the model is Stable Diffusion XL: it has a second text encoder."""
    path = Path(source.configs)
    if path.is_dir():
        return (path / "text_encoder_2").is_dir()
    if "text_encoder_2" in model_index(source, revision):
        return True
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(source.configs, "text_encoder_2/config.json", revision=revision), str)


def load_stable_diffusion(
    pretrained: str,
    revision: str | None = None,
    variant: str | None = None,
    dtype: torch.dtype = torch.float32,
    unet_dtype: torch.dtype | None = None,
    pretrained_config: str | None = None,
    load_unet: bool = True,
) -> StableDiffusionParts:
    """Load VAE and text encoder in `dtype`, the UNet in `unet_dtype` (default `dtype`; not at all, `unet` None,
    without `load_unet`), the tokenizer and the DDPM training scheduler. Loading in the target dtype avoids a float32
    copy of every weight on the way.

    A single-file `pretrained` is read once and each part converted from it; `variant` does not apply to it (the
    file has one set of weights) and `revision` then applies to `pretrained_config`."""
    source = resolve_source(pretrained, revision, pretrained_config)
    unet_dtype = unet_dtype or dtype
    sdxl = is_sdxl(source, revision)
    text_encoder_2 = None
    if source.single_file is not None and sdxl:
        raise SdtuneError(
            f"model.pretrained '{source.single_file}': single-file SDXL checkpoints are not supported; pass the "
            "diffusers directory or Hub id (e.g. stabilityai/stable-diffusion-xl-base-1.0)"
        )
    if source.single_file is not None:
        state = read_single_file(source.single_file)
        vae = part_from_single_file(AutoencoderKL, state, source, "vae", dtype)
        text_encoder = part_from_single_file(CLIPTextModel, state, source, "text_encoder", dtype)
        unet = None
        if load_unet:
            unet = part_from_single_file(UNet2DConditionModel, state, source, "unet", unet_dtype)
        del state
    else:
        weights = dict(revision=revision, variant=variant, torch_dtype=dtype)
        vae = _load(AutoencoderKL, source, "vae", **weights)
        text_encoder = _load(CLIPTextModel, source, "text_encoder", **weights)
        if sdxl:
            text_encoder_2 = _load(CLIPTextModelWithProjection, source, "text_encoder_2", **weights)
        unet = None
        if load_unet:
            unet = _load(UNet2DConditionModel, source, "unet", **{**weights, "torch_dtype": unet_dtype})
    return StableDiffusionParts(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_load_tokenizer(source, revision),
        unet=unet,
        # Training always uses DDPM noising with the checkpoint's betas and prediction type.
        noise_scheduler=_load(DDPMScheduler, source, "scheduler", revision=revision),
        text_encoder_2=text_encoder_2,
        tokenizer_2=_load_tokenizer(source, revision, "_2") if sdxl else None,
        # StableDiffusionXLPipeline's default when model_index.json does not say.
        force_zeros_for_empty_prompt=sdxl and model_index(source, revision).get("force_zeros_for_empty_prompt", True),
    )


def load_inference_scheduler(pretrained: str, revision: str | None = None, pretrained_config: str | None = None):
    """The scheduler class the checkpoint ships for sampling (PNDM for SD1.5), as named in its config (that of
    `pretrained_config` for a single file)."""
    import diffusers

    source = resolve_source(pretrained, revision, pretrained_config)
    config = _load(DDPMScheduler.load_config, source, "scheduler", revision=revision)
    scheduler_class = getattr(diffusers, config.get("_class_name") or "DDPMScheduler", DDPMScheduler)
    return _load(scheduler_class, source, "scheduler", revision=revision)


def load_pipeline(
    pretrained: str,
    revision: str | None = None,
    variant: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    pretrained_config: str | None = None,
):
    """A StableDiffusionPipeline for sampling: every component in `dtype` (on `device`), the checkpoint's own inference
    scheduler, no safety checker. Built from the same one-line-error loaders as training, so a missing directory,
    an uncached Hub id offline, a missing subfolder or a damaged single file is one clear line, never a traceback."""
    from sdtune.sampling import pipeline_from_parts

    parts = load_stable_diffusion(pretrained, revision=revision, variant=variant, dtype=dtype, pretrained_config=pretrained_config)
    scheduler = load_inference_scheduler(pretrained, revision=revision, pretrained_config=pretrained_config)
    pipe = pipeline_from_parts(parts, scheduler)
    return pipe.to(device) if device is not None else pipe
