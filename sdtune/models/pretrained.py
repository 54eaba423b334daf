"""Loading Stable Diffusion components. This module (with `single_file.py`) is the only caller of `from_pretrained`
and `from_single_file`.

`pretrained` is a local directory in the diffusers layout (model_index.json, unet/, vae/, text_encoder/,
tokenizer/, scheduler/) or a Hugging Face Hub id, with an optional revision and weight variant ("fp16"); or a
single-file checkpoint in the original LDM/CompVis layout (.safetensors or .ckpt, as AUTOMATIC1111 users have them;
SD1.x, SD2.x and SDXL).
A single file holds only weights, so `pretrained_config` (a diffusers directory or Hub id of the same architecture)
gives the model configs, the tokenizer and the scheduler. `sdtune:toy` names the toy base model inside the package.

Which family a model is of (SD1.x, SD2.x, SDXL: `sdtune.models.families`) is read from its layout before any weights
load; the family says which components to load, with which classes, and which pipelines sample it.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from transformers import CLIPTextConfig, CLIPTokenizer

from sdtune.errors import SdtuneError, first_line, pickled_objects, refused_pickle
from sdtune.models.families import FAMILIES, Layout, ModelFamily, ModelParts, family_for, vae_scale_factor
from sdtune.models.single_file import check_family, part_from_single_file, read_single_file
from sdtune.paths import EMBEDDED, SINGLE_FILE_SUFFIXES, model_name_problem

CONFIG_EXAMPLE = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# What a config source needs from the Hub: configs and tokenizer files, never weights.
CONFIG_FILES = ["*.json", "**/*.json", "*.txt", "**/*.txt", "**/*.model"]


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


def local_layout(path: Path) -> Layout:
    """The layout of a local model folder: its subfolders and the first text encoder's config."""
    config = path / "text_encoder" / "config.json"
    try:
        text_config = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
    except (OSError, ValueError):
        text_config = {}
    return Layout(frozenset(p.name for p in path.iterdir() if p.is_dir()), text_config, _read_index(path))


def _read_index(path: Path) -> dict:
    index = path / "model_index.json"
    try:
        return json.loads(index.read_text(encoding="utf-8")) if index.is_file() else {}
    except (OSError, ValueError):
        return {}


def _check_local(path: Path, setting: str = "model.pretrained", name: str | None = None) -> None:
    """`name` is what the user wrote when `path` is its Hub cache folder (which offline may hold only part of it)."""
    family = family_for(local_layout(path))
    missing = [sub for sub in family.components() if not (path / sub).is_dir()]
    if missing:
        hint = (
            "(pass a .safetensors/.ckpt file with model.pretrained_config for single-file checkpoints, or a Hub id)"
            if setting == "model.pretrained"
            else f"(it gives the single file's configs, tokenizer and scheduler: a diffusers model of the same architecture, e.g. {CONFIG_EXAMPLE})"
        )
        missing_list = ", ".join(m + "/" for m in missing)
        cached = offline_hint() if name else ""
        raise SdtuneError(f"{setting} '{name or path}' is not a diffusers model directory{cached}: missing {missing_list} {hint}")


def resolve_pretrained(pretrained: str) -> str:
    problem = model_name_problem(pretrained, "model.pretrained")
    if problem is not None:
        raise SdtuneError(problem)
    if pretrained.startswith("sdtune:"):
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
    return pretrained


def _single_file(pretrained: str) -> Path | None:
    """The checkpoint file `pretrained` names, or None for a directory or Hub id."""
    path = Path(pretrained).expanduser()
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        return None
    if not path.exists():
        raise SdtuneError(model_name_problem(pretrained, "model.pretrained"))
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
    problem = model_name_problem(pretrained_config, setting)
    if problem is not None:
        raise SdtuneError(problem)
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(pretrained_config, revision=revision, allow_patterns=CONFIG_FILES)
    except (OSError, ValueError) as err:
        raise SdtuneError(f"{setting} '{pretrained_config}' could not be loaded{offline_hint()}: {first_line(err)}") from err
    _check_local(Path(folder), setting, pretrained_config)
    return folder


def resolve_source(pretrained: str, revision: str | None = None, pretrained_config: str | None = None) -> Source:
    """Check `pretrained` (and `pretrained_config`) without loading weights: a file with the wrong suffix, a single
    file without its configs, a missing directory or subfolder fail here, in one line.

    A directory or Hub id brings its own configs, so `pretrained_config` is ignored for it: a run trained from a
    single file records both, and commands that swap in another base model (`sdtune export --model`) keep working."""
    single_file = _single_file(pretrained)
    if single_file is None:
        return Source(resolve_pretrained(pretrained), name=pretrained)
    if pretrained_config is None:
        raise SdtuneError(
            "model.pretrained is a single-file checkpoint: set model.pretrained_config (--model-config for sdtune "
            "sample/evaluate) to a diffusers directory or Hub id with its configs, tokenizer and scheduler "
            f"(e.g. {CONFIG_EXAMPLE})"
        )
    return Source(_config_dir(pretrained_config, revision), "model.pretrained_config", pretrained_config, single_file)


def offline_hint() -> str:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("0", "", "false", "no"):
        return ""
    return " (HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache: download it first or pass a local directory)"


def load_part(cls, source: Source, subfolder: str, **kwargs):
    """`cls.from_pretrained` (or `cls` itself when it is a loading function) with one-line errors."""
    load = cls.from_pretrained if hasattr(cls, "from_pretrained") else cls
    try:
        return load(source.configs, subfolder=subfolder, **kwargs)
    except (OSError, ValueError, EnvironmentError, pickle.UnpicklingError) as err:
        found = refused_pickle(err)  # .bin weights: diffusers and transformers load them weights-only
        if found is not None:
            raise SdtuneError(f"{source.where()}: {subfolder}/ has weights with {pickled_objects(found)}; use a copy of the model with .safetensors weights") from err
        raise SdtuneError(f"{source.where()}: {subfolder}/ could not be loaded{offline_hint()}: {first_line(err)}") from err


def load_tokenizer(pretrained: str, revision: str | None = None, pretrained_config: str | None = None) -> CLIPTokenizer:
    """The (first) CLIP tokenizer from the `tokenizer/` subfolder, with its length capped by the text encoder's
    positions. For a single-file `pretrained` it comes from `pretrained_config` (the file itself is not read)."""
    return _load_tokenizer(resolve_source(pretrained, revision, pretrained_config), revision)


def load_tokenizers(pretrained: str, revision: str | None = None, pretrained_config: str | None = None) -> list[CLIPTokenizer]:
    """Every tokenizer the model's text encoders read, in the family's order (`tokenizer/`, SDXL's `tokenizer_2/`)."""
    source = resolve_source(pretrained, revision, pretrained_config)
    family = detect_family(source, revision)
    return [_load_tokenizer(source, revision, name, family.component_class(name)) for name in family.tokenizers]


def _load_tokenizer(source: Source, revision: str | None, name: str = "tokenizer", cls: type = CLIPTokenizer):
    """The tokenizer in folder `name`; a CLIP tokenizer's length is capped by its text encoder's positions (the
    `text_encoder…` folder of the same suffix)."""
    suffix = name.removeprefix("tokenizer")
    tokenizer = load_part(cls, source, name, revision=revision)
    # Recent transformers build an empty tokenizer instead of failing when the vocabulary files are missing.
    if tokenizer.vocab_size <= 3:
        raise SdtuneError(f"{source.where()}: {name}/ has no vocabulary (vocab.json + merges.txt){offline_hint()}")
    if cls is CLIPTokenizer and tokenizer.model_max_length > 100_000:  # no model_max_length in tokenizer_config.json
        config = load_part(CLIPTextConfig, source, "text_encoder" + suffix, revision=revision)
        tokenizer.model_max_length = config.max_position_embeddings
    return tokenizer


def model_index(source: Source, revision: str | None) -> dict:
    """The pipeline's model_index.json; {} when there is none (a local directory without it, a Hub model offline
    whose cache holds only its subfolders)."""
    path = Path(source.configs)
    if path.is_dir():
        return _read_index(path)
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(source.configs, "model_index.json", revision=revision)).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # what loading the parts themselves reports, if they are missing too
        return {}


def detect_family(source: Source, revision: str | None) -> ModelFamily:
    """The model's family, from its layout: a local folder's subfolders, or a Hub model's model_index.json (and,
    offline, the subfolders its cache holds), and the first text encoder's config."""
    path = Path(source.configs)
    if path.is_dir():
        return family_for(local_layout(path))
    from huggingface_hub import try_to_load_from_cache

    index = model_index(source, revision)
    names = {name for family in FAMILIES for name in family.components()}
    cached = {name for name in names if isinstance(try_to_load_from_cache(source.configs, f"{name}/config.json", revision=revision), str)}
    try:
        text_config = CLIPTextConfig.from_pretrained(source.configs, subfolder="text_encoder", revision=revision).to_dict()
    except (OSError, ValueError):
        text_config = {}
    return family_for(Layout(frozenset(set(index) | cached), text_config, index))


def model_family(pretrained: str, revision: str | None = None, pretrained_config: str | None = None) -> ModelFamily:
    """The family of `pretrained`, from its layout (no weights read)."""
    return detect_family(resolve_source(pretrained, revision, pretrained_config), revision)


def load_model(
    pretrained: str,
    revision: str | None = None,
    variant: str | None = None,
    dtype: torch.dtype = torch.float32,
    denoiser_dtype: torch.dtype | None = None,
    pretrained_config: str | None = None,
    load_denoiser: bool = True,
) -> ModelParts:
    """Load the VAE and text encoders in `dtype`, the denoiser (UNet) in `denoiser_dtype` (default `dtype`; not at
    all, None in the parts, without `load_denoiser`), the tokenizers and the DDPM training scheduler. Loading in the
    target dtype avoids a float32 copy of every weight on the way.

    A single-file `pretrained` is read once and each part converted from it; `variant` does not apply to it (the
    file has one set of weights) and `revision` then applies to `pretrained_config`."""
    source = resolve_source(pretrained, revision, pretrained_config)
    denoiser_dtype = denoiser_dtype or dtype
    family = detect_family(source, revision)
    if source.single_file is not None and not family.single_file:
        raise SdtuneError(
            f"model.pretrained '{source.single_file}': single-file {family.label} checkpoints are not supported; pass "
            "the diffusers directory or Hub id (single files load for SD1.x, SD2.x and SDXL)"
        )
    modules = ["vae", *family.text_encoders] + ([family.denoiser] if load_denoiser else [])
    components: dict[str, object] = {family.denoiser: None}
    if source.single_file is not None:
        state = read_single_file(source.single_file)
        check_family(source.single_file, state, family)
        for name in modules:
            part_dtype = denoiser_dtype if name == family.denoiser else dtype
            components[name] = part_from_single_file(family.component_class(name), state, source, name, part_dtype)
        del state
    else:
        weights = dict(revision=revision, variant=variant)
        for name in modules:
            part_dtype = denoiser_dtype if name == family.denoiser else dtype
            components[name] = load_part(family.component_class(name), source, name, torch_dtype=part_dtype, **weights)
    for name in family.tokenizers:
        components[name] = _load_tokenizer(source, revision, name, family.component_class(name))
    index = model_index(source, revision)
    options = {key: index[key] for key in family.index_options if key in index}
    # The training scheduler: DDPM noising with the checkpoint's betas and prediction type for the UNet families,
    # the flow-matching scheduler (its shift) for the others.
    scheduler = load_part(family.component_class("scheduler"), source, "scheduler", revision=revision)
    return ModelParts(family, components, scheduler, options)


def model_skeleton(pretrained: str, revision: str | None = None, pretrained_config: str | None = None) -> ModelParts:
    """The model's VAE, denoiser and text encoders built from their configs on the meta device: every module and
    shape, no weights read or memory taken (pre-flight checks run on it). Tokenizers and scheduler are left out."""
    source = resolve_source(pretrained, revision, pretrained_config)
    family = detect_family(source, revision)
    components: dict[str, object] = {}
    for name in ("vae", family.denoiser, *family.text_encoders):
        cls = family.component_class(name)
        if hasattr(cls, "load_config"):  # diffusers
            config = load_part(cls.load_config, source, name, revision=revision)
            build = lambda cls=cls, config=config: cls.from_config(config)  # noqa: E731
        else:  # transformers
            config = load_part(cls.config_class, source, name, revision=revision)
            build = lambda cls=cls, config=config: cls(config)  # noqa: E731
        with torch.device("meta"):
            components[name] = build()
    return ModelParts(family, components, None)


@dataclass(frozen=True)
class ImageGeometry:
    """What a model's configs say about image sizes: sides are multiples of `multiple` pixels (`why` says what sets
    it), and the denoiser was built for `width` × `height`."""

    multiple: int
    why: str
    width: int
    height: int


def size_multiple(family: ModelFamily, denoiser_config, vae_factor: int) -> tuple[int, str]:
    """The pixels image sides are multiples of, and what sets that number (for messages)."""
    multiple = family.size_multiple(denoiser_config, vae_factor)
    if multiple == vae_factor:
        return multiple, "the VAE's downscaling"
    return multiple, "the VAE's downscaling times the transformer's patch"


def image_geometry(pretrained: str, revision: str | None = None, pretrained_config: str | None = None) -> ImageGeometry:
    """The model's `ImageGeometry`, read from the VAE's and the denoiser's config files only (no module built, no
    weights), so sizes are checked before a model loads."""
    source = resolve_source(pretrained, revision, pretrained_config)
    family = detect_family(source, revision)
    configs = [load_part(family.component_class(name).load_config, source, name, revision=revision)
               for name in ("vae", family.denoiser)]  # fmt: skip
    vae, denoiser = configs
    factor = vae_scale_factor(vae)
    multiple, why = size_multiple(family, denoiser, factor)
    height, width = family.default_size(denoiser, factor)
    return ImageGeometry(multiple, why, width, height)


def load_inference_scheduler(pretrained: str, revision: str | None = None, pretrained_config: str | None = None):
    """The scheduler class the checkpoint ships for sampling (PNDM for SD1.5), as named in its config (that of
    `pretrained_config` for a single file)."""
    import diffusers

    source = resolve_source(pretrained, revision, pretrained_config)
    config = load_part(DDPMScheduler.load_config, source, "scheduler", revision=revision)
    scheduler_class = getattr(diffusers, config.get("_class_name") or "DDPMScheduler", DDPMScheduler)
    return load_part(scheduler_class, source, "scheduler", revision=revision)


def load_pipeline(
    pretrained: str,
    revision: str | None = None,
    variant: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    pretrained_config: str | None = None,
):
    """The family's text-to-image pipeline for sampling: every component in `dtype` (on `device`), the checkpoint's
    own inference scheduler, no safety checker. Built from the same one-line-error loaders as training, so a missing
    directory, an uncached Hub id offline, a missing subfolder or a damaged single file is one clear line, never a
    traceback."""
    parts = load_model(pretrained, revision=revision, variant=variant, dtype=dtype, pretrained_config=pretrained_config)
    scheduler = load_inference_scheduler(pretrained, revision=revision, pretrained_config=pretrained_config)
    pipe = parts.pipeline(scheduler)
    return pipe.to(device) if device is not None else pipe
