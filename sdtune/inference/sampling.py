"""Guided sampling with diffusers pipelines built from modules already in memory (no reload).

Prompts are encoded by sdtune itself (the model family's `encode_prompt`: 75-token windows and clip-skip, the same
as training) and handed to the pipeline as embeddings; latents are decoded by the VAE in float32 whatever the
training dtype, because half-precision VAE decodes overflow into black or NaN images.

One denoising loop, three uses: text-to-image, image-to-image and inpainting, each the family's diffusers pipeline
(StableDiffusionPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline; for SDXL the
StableDiffusionXL pipelines, with its two text encoders and pooled embedding) built from the same components. Init images are
encoded by the VAE in float32 to its posterior mode and handed to those pipelines as latents, so the starting point
does not depend on the VAE dtype or on a random posterior draw.
"""

from __future__ import annotations

import inspect
import logging
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import diffusers
import numpy as np
import torch
from PIL import Image, ImageFilter

from sdtune.adapters.files import ADAPTER_WEIGHTS, Adapter, adapter_file
from sdtune.adapters.lycoris import is_lycoris, load_lycoris
from sdtune.errors import SdtuneError, first_line
from sdtune.inference.schedulers import FLOW_SCHEDULERS, SCHEDULER_CLASSES, check_strength
from sdtune.models.families import ModelFamily, TextConditioning, family_of_pipeline
from sdtune.models.families import vae_scale_factor as vae_factor
from sdtune.models.text import text_token_ids

SCHEDULERS = {name: getattr(diffusers, cls) for name, cls in SCHEDULER_CLASSES.items()}


# Scheduler settings of a zero-terminal-SNR model: the last timestep is pure noise and sampling starts there.
ZERO_SNR = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


def supports_zero_snr(scheduler_class) -> bool:
    """Whether a diffusers scheduler class can rescale its betas to zero terminal SNR."""
    return "rescale_betas_zero_snr" in inspect.signature(scheduler_class.__init__).parameters


def is_flow_config(scheduler_config: dict) -> bool:
    """Whether a scheduler config is a flow-matching model's (it has a shift, not betas)."""
    return "FlowMatch" in str(scheduler_config.get("_class_name", "")) or ("shift" in scheduler_config and "beta_start" not in scheduler_config)


def scheduler_name(name: str | None, training_scheduler_config: dict) -> str:
    """`name`, or the default sampler of the model's kind: ddim, or flow_euler for flow-matching models."""
    return name or ("flow_euler" if is_flow_config(training_scheduler_config) else "ddim")


def default_guidance(pipe) -> float:
    """The guidance scale the model's diffusers pipeline takes when given none: 7.5 for SD1/2, 5.0 for SDXL, 7.0 for
    SD3, and 3.5 for Flux, whose guidance is embedded in the transformer (7.5 would overcook Flux.1 dev)."""
    return float(inspect.signature(type(pipe).__call__).parameters["guidance_scale"].default)


def make_scheduler(name: str | None, training_scheduler_config: dict):
    """An inference scheduler with the checkpoint's betas and prediction type (or, for a flow-matching model, its
    shift); for a zero-terminal-SNR schedule (rescale_betas_zero_snr) the rescaled betas and trailing timesteps,
    so sampling starts from pure noise. `name` None takes the model's kind's default: ddim, or flow_euler.

    "pndm" is PNDM without its Runge-Kutta warm-up (PLMS, as Stable Diffusion ships it): the warm-up steps cannot
    start part-way down the schedule, so image-to-image with them diverges."""
    flow = is_flow_config(training_scheduler_config)
    name = scheduler_name(name, training_scheduler_config)
    if name not in SCHEDULERS:
        raise SdtuneError(f"unknown scheduler '{name}'; choose one of {', '.join(SCHEDULERS)}")
    if flow != (name in FLOW_SCHEDULERS):
        kind, fits = ("a flow-matching model (SD3, Flux)", FLOW_SCHEDULERS) if flow else ("a noise-prediction model", [n for n in SCHEDULERS if n not in FLOW_SCHEDULERS])
        raise SdtuneError(f"scheduler '{name}' does not sample {kind}; choose one of {', '.join(fits)}")
    overrides = {"skip_prk_steps": True} if name == "pndm" else {}
    if training_scheduler_config.get("rescale_betas_zero_snr"):
        supported = [other for other, cls in SCHEDULERS.items() if supports_zero_snr(cls)]
        if not supports_zero_snr(SCHEDULERS[name]):
            raise SdtuneError(f"scheduler '{name}' cannot sample a zero-terminal-SNR model; choose one of {', '.join(supported)}")
        overrides |= ZERO_SNR
    try:
        return SCHEDULERS[name].from_config(training_scheduler_config, **overrides)
    except ImportError as err:  # diffusers' placeholder class when an optional backend (scipy for lms) is missing
        needs = "scipy" if "scipy" in str(err) else "an optional package diffusers could not import"
        raise SdtuneError(f"scheduler '{name}' needs {needs}, which is not installed (pip install scipy); choose another scheduler or install it") from err


def prompt_encoders(pipe) -> tuple[ModelFamily, list, list]:
    """(family, tokenizers, text encoders) of a pipeline: one of each for SD1/2, two for SDXL."""
    family = family_of_pipeline(pipe)
    return family, [getattr(pipe, n) for n in family.tokenizers], [getattr(pipe, n) for n in family.text_encoders]


def denoiser_of(pipe) -> torch.nn.Module:
    """The network that denoises: the pipeline's UNet (or transformer)."""
    return getattr(pipe, family_of_pipeline(pipe).denoiser)


def pipeline_options(pipe, family: ModelFamily) -> dict:
    """The model_index.json settings a pipeline was built with (SDXL's force_zeros_for_empty_prompt)."""
    return {key: pipe.config[key] for key in family.index_options if key in pipe.config}


def encode_prompt_pair(
    pipe, prompt: str, negative_prompt: str | None, clip_skip: int = 1
) -> tuple[TextConditioning, TextConditioning]:
    """(prompt, negative) text conditioning, both with as many 75-token windows as the longer one needs.

    A family whose pipelines give zeros as the negative when there is none (SDXL base, by its config's
    force_zeros_for_empty_prompt) gets zeros here too; an empty string "" is encoded like any prompt."""
    family, tokenizers, encoders = prompt_encoders(pipe)
    window = tokenizers[0].model_max_length - 2
    texts = [prompt, negative_prompt or ""]
    longest = max(len(ids) for ids in text_token_ids(tokenizers[0], texts))  # the CLIP windows; T5 has its length
    max_tokens = max(1, -(-longest // window)) * window
    denoiser = denoiser_of(pipe)
    out = []
    for text in texts:
        ids = [ids[None].to(encoders[0].device) for ids in family.tokenize(tokenizers, text, max_tokens)]
        # The text encoders may sit on the CPU while the denoiser is on the GPU (a run whose text comes from the cache).
        out.append(family.encode_prompt(encoders, ids, clip_skip).to(denoiser.device, denoiser.dtype))
    positive, negative = out
    if negative_prompt is None and family.zero_negative(pipeline_options(pipe, family)):
        negative = TextConditioning(torch.zeros_like(negative.hidden), None if negative.pooled is None else torch.zeros_like(negative.pooled))
    return positive, negative


def vae_scale_factor(pipe) -> int:
    """Pixels per latent cell along one side, read from the VAE config (8 for SD, 2 for the tiny test model)."""
    return vae_factor(pipe.vae)


def default_size(pipe) -> tuple[int, int]:
    """(width, height) the denoiser was built for (its family says how: a UNet's latent sample_size times the VAE
    factor, Flux's 1024 px)."""
    height, width = family_of_pipeline(pipe).default_size(denoiser_of(pipe).config, vae_scale_factor(pipe))
    return width, height


@contextmanager
def _vae_in_fp32(vae):
    """The VAE in float32 for the duration, outside any autocast (a bf16-mixed run samples inside one)."""
    dtype = vae.dtype
    with torch.autocast(device_type=vae.device.type, enabled=False):
        if dtype == torch.float32:
            yield vae
            return
        vae.to(torch.float32)
        try:
            yield vae
        finally:
            vae.to(dtype)


@torch.no_grad()
def decode_fp32(pipe, latents: torch.Tensor) -> Image.Image:
    """Latents → PIL in float32; warns when the result is NaN or black (usually a diverged model or fp16 VAE)."""
    with _vae_in_fp32(pipe.vae) as vae:
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        pixels = vae.decode(latents.to(vae.device, torch.float32) / vae.config.scaling_factor + shift).sample
    if not torch.isfinite(pixels).all() or pixels.max() <= -0.99:
        warnings.warn("a sample decoded to NaN or black: the model has diverged or the VAE overflowed", stacklevel=2)
        pixels = torch.nan_to_num(pixels, nan=-1.0)
    return pipe.image_processor.postprocess(pixels, output_type="pil")[0]


@torch.no_grad()
def encode_fp32(pipe, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels (B×3×H×W in [-1, 1]) → scaled latents, in float32 at the posterior mode (no random draw)."""
    with _vae_in_fp32(pipe.vae) as vae:
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        mode = vae.encode(pixels.to(vae.device, torch.float32)).latent_dist.mode()
    return ((mode - shift) * vae.config.scaling_factor).to(denoiser_of(pipe).dtype)


@dataclass
class ImageCondition:
    """The init image of image-to-image (and its mask for inpainting), prepared once for every prompt and seed.

    `latents` is the init image through the VAE; `mask` is white where the image is repainted (binarised at 0.5);
    `masked_latents` is the init image with the masked part blanked, through the VAE (what inpainting UNets with 9
    input channels read). `strength` is the fraction of the noise schedule that is re-run: 1 starts from pure noise.
    For inpainting, `image` (the resized init image) is pasted back outside `overlay`, the mask feathered by half a
    latent cell, as AUTOMATIC1111 does: the loop keeps the unmasked latents, but the VAE decoder (GroupNorm and
    attention see the whole image) would still shift the unmasked pixels.
    """

    latents: torch.Tensor
    strength: float
    mask: Image.Image | None = None
    masked_latents: torch.Tensor | None = None
    image: Image.Image | None = None
    overlay: Image.Image | None = None

    @property
    def mode(self) -> str:
        return "inpainting" if self.mask is not None else "image-to-image"

    def finish(self, decoded: Image.Image) -> Image.Image:
        """The decoded sample, with the init image's own pixels outside the (feathered) inpainting mask."""
        if self.overlay is None or self.image is None:
            return decoded
        return Image.composite(decoded, self.image, self.overlay)


def prepare_condition(
    pipe, image: Image.Image, width: int, height: int, strength: float, mask: Image.Image | None = None
) -> ImageCondition:
    """Resize the init image (and mask) to width × height and encode it; the mask is white = repaint."""
    image = image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
    pixels = pipe.image_processor.preprocess(image, height=height, width=width)
    latents = encode_fp32(pipe, pixels)
    if mask is None:
        return ImageCondition(latents=latents, strength=strength)
    mask = mask.convert("L").resize((width, height), Image.Resampling.BILINEAR)
    binary = mask.point(lambda v: 255 if v >= 128 else 0)  # what diffusers' mask processor keeps (≥ 0.5)
    keep = torch.from_numpy(np.asarray(binary) < 128)[None, None]
    return ImageCondition(
        latents=latents, strength=strength, mask=binary, masked_latents=encode_fp32(pipe, pixels * keep),
        image=image, overlay=binary.filter(ImageFilter.GaussianBlur(vae_scale_factor(pipe) / 2)),
    )  # fmt: skip


def pipeline_for(pipe, condition: ImageCondition | None):
    """`pipe` itself for text-to-image; else the family's img2img/inpaint pipeline sharing its modules (cached on `pipe`)."""
    if condition is None:
        return pipe
    family = family_of_pipeline(pipe)
    task = "inpaint" if condition.mask is not None else "image2image"
    cache = pipe.__dict__.setdefault("_sdtune_pipelines", {})
    other = cache.get(task)
    if other is None or any(getattr(other, name) is not module for name, module in pipe.components.items()):
        components = {name: pipe.components[name] for name in family.components() if name != "scheduler"}
        other = family.pipeline(components, pipe.scheduler, task, pipeline_options(pipe, family))
        cache[task] = other
    other.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return other


def denoise(
    pipe,
    prompt_embeds: TextConditioning,
    negative_embeds: TextConditioning,
    seed: int,
    steps: int,
    guidance_scale: float,
    height: int | None,
    width: int | None,
    condition: ImageCondition | None = None,
) -> torch.Tensor:
    """The final latents of one image; its noise comes from a CPU generator seeded with `seed`."""
    generator = torch.Generator("cpu").manual_seed(seed)
    family = family_of_pipeline(pipe)
    common = dict(num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator, output_type="latent")
    common |= family.prompt_kwargs(prompt_embeds, negative_embeds)
    in_channels = getattr(pipe, family.denoiser).config.in_channels
    if height is None or width is None:
        width, height = default_size(pipe)
    finish = lambda latents: family.pipeline_latents(latents, (height, width), vae_scale_factor(pipe))  # noqa: E731
    if family.objective == "flow":
        in_channels = pipe.vae.config.latent_channels  # the transformer reads latents packed or in patches
    if condition is None:
        if in_channels != pipe.vae.config.latent_channels:
            raise SdtuneError(f"this UNet takes {in_channels} input channels (an inpainting model): pass an init image and a mask")
        return finish(pipe(height=height, width=width, **common).images)
    check_strength(condition.strength, steps)
    if condition.mask is None and in_channels != pipe.vae.config.latent_channels:
        raise SdtuneError(f"this UNet takes {in_channels} input channels (an inpainting model): pass a mask too")
    runner = pipeline_for(pipe, condition)
    if condition.mask is None:
        # A tensor with the VAE's channels is taken as latents: noised to the strength's timestep, then denoised.
        size = {"height": height, "width": width} if family.objective == "flow" else {}  # the UNet pipelines take the image's
        return finish(runner(image=condition.latents, strength=condition.strength, **size, **common).images)
    # Latents as `image` (and the masked image as `masked_image_latents`) skip diffusers' own VAE encode. With a
    # 4-channel UNet the unmasked region is reset to the (re-noised) init latents after every step.
    return finish(runner(
        image=condition.latents, mask_image=condition.mask, masked_image_latents=condition.masked_latents,
        strength=condition.strength, height=height, width=width, **common,
    ).images)  # fmt: skip


@torch.no_grad()
def iter_images(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = 25,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    negative_prompts: Sequence[str | None] | None = None,
    clip_skip: int = 1,
    condition: ImageCondition | None = None,
) -> Iterator[tuple[int, int, Image.Image]]:
    """(prompt index, seed, image) for every prompt × seed, prompt-major; each prompt is encoded once."""
    negative_prompts = list(negative_prompts) if negative_prompts is not None else [None] * len(prompts)
    for index, (prompt, negative) in enumerate(zip(prompts, negative_prompts, strict=True)):
        prompt_embeds, negative_embeds = encode_prompt_pair(pipe, prompt, negative, clip_skip)
        for seed in seeds:
            latents = denoise(pipe, prompt_embeds, negative_embeds, seed, steps, guidance_scale, height, width, condition)
            image = decode_fp32(pipe, latents)
            yield index, seed, condition.finish(image) if condition is not None else image


@torch.no_grad()
def generate(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = 25,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    clip_skip: int = 1,
    condition: ImageCondition | None = None,
) -> list[list[Image.Image]]:
    """Images[prompt][seed]; each image's noise comes from its own seeded CPU generator, so runs are comparable.
    With `condition` (see `prepare_condition`) the same call does image-to-image or inpainting."""
    grid: list[list[Image.Image]] = [[] for _ in prompts]
    for index, _, image in iter_images(
        pipe, prompts, seeds, steps, guidance_scale, height, width, [negative_prompt] * len(prompts), clip_skip, condition
    ):
        grid[index].append(image)
    return grid


# Where diffusers and peft report a failed LoRA load before raising it: one line per mismatched tensor.
LORA_LOADERS = ("diffusers.loaders.peft", "diffusers.loaders.lora_base", "diffusers.loaders.lora_pipeline", "peft")
SIZE_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape torch.Size\((\[[^]]*\])\) from checkpoint, "
                           r"the shape in current model is torch.Size\((\[[^]]*\])\)")  # fmt: skip


@contextmanager
def held_logs(*names: str) -> Iterator[None]:
    """Hold what the named loggers and `warnings` print until the block ends: passed on when it succeeds, dropped
    when it raises (the caller turns the exception into one line)."""
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        held.append(record)
        return False

    loggers = [logging.getLogger(name) for name in names]
    for logger in loggers:
        logger.addFilter(hold)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(hold)
    # Only reached without an exception.
    for record in held:
        logging.getLogger(record.name).handle(record)
    for warning in caught:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


def load_failure(err: BaseException, model: str) -> str:
    """Why a LoRA file did not load, in one line: for tensors of other shapes, how many and the first of them."""
    mismatches = SIZE_MISMATCH.findall(str(err))
    if not mismatches:
        return f"could not be loaded into {model}: {first_line(err)}"
    key, in_file, in_model = mismatches[0]
    key = re.sub(r"\.(lora_[AB]|lora_magnitude_vector)\.[^.]+\.", r".\1.", key)  # without the adapter's load name
    count = f"{len(mismatches)} of its tensors do not" if len(mismatches) > 1 else "one of its tensors does not"
    return (f"made for another architecture or rank layout: {count} fit {model} (e.g. {key}: {in_file} in the "
            f"file, {in_model} in the model); pass an adapter trained on this model's architecture")  # fmt: skip


def load_lora_file(pipe, path: Path, name: str, what: str = "--adapter", model: str | None = None) -> None:
    """Load one LoRA file — diffusers or kohya/A1111 format, which diffusers converts; a LoHa/LoKr in LyCORIS naming,
    which `sdtune.adapters.lycoris` reads onto peft layers — as adapter `name`, with
    one-line errors for a missing, truncated or foreign file (one made for another architecture included: what
    diffusers and peft print about each mismatched tensor is dropped). `model` names the model in those errors."""
    from safetensors import SafetensorError, safe_open

    weights = adapter_file(path)
    if not weights.is_file():
        where = f"{path} has no {ADAPTER_WEIGHTS}" if path.is_dir() else f"{path} does not exist"
        raise SdtuneError(f"{what}: {where} (pass an adapter folder or its .safetensors file)")
    try:
        with safe_open(str(weights), "pt") as file:
            keys = list(file.keys())
    except (SafetensorError, OSError) as err:
        raise SdtuneError(f"{what} {path}: not a readable .safetensors file (truncated or corrupt?): {first_line(err)}") from err
    if any(k.startswith("text_encoder") and "lora_magnitude_vector" in k for k in keys):
        raise SdtuneError(f"{what} {path}: a text-encoder DoRA adapter; diffusers (with transformers 5) drops its magnitudes when loading it")
    if is_lycoris(keys):  # LoHa/LoKr: diffusers reads LoRA only; peft holds them, sdtune converts the names
        try:
            load_lycoris(pipe, weights, name)
        except SdtuneError as err:
            raise SdtuneError(f"{what} {path}: {err}") from err
        return
    try:
        with held_logs(*LORA_LOADERS):
            pipe.load_lora_weights(str(weights.parent), weight_name=weights.name, adapter_name=name)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
        raise SdtuneError(f"{what} {path}: {load_failure(err, f'model {model}' if model else 'this model')}") from err
    loaded = {n for names_ in pipe.get_list_adapters().values() for n in names_}
    if name not in loaded:
        raise SdtuneError(f"{what} {path}: no LoRA weights matching this model's UNet or text encoder")


def load_embedding(pipe, path: Path, token: str | None = None) -> str:
    """Load a textual-inversion embedding with diffusers' `load_textual_inversion`; returns its token: `token`, else
    the file's own (diffusers format: its one key), else for A1111's {"emb_params"} the file name, as A1111 does."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as file:
            keys = list(file.keys())
    except (SafetensorError, OSError) as err:
        raise SdtuneError(f"--embedding {path}: not a readable .safetensors file: {first_line(err)}") from err
    if len(keys) != 1:
        raise SdtuneError(f"--embedding {path}: not a textual-inversion embedding (it holds {len(keys)} tensors, not one)")
    token = token or (path.stem if keys[0] == "emb_params" else keys[0])
    try:
        pipe.load_textual_inversion(str(path), token=token)
    except (ValueError, RuntimeError) as err:
        raise SdtuneError(f"--embedding {path}: could not be loaded as '{token}': {first_line(err)}") from err
    return token


def load_adapters(pipe, adapters: Sequence[Adapter], model: str | None = None) -> list[str]:
    """Load each adapter as `a0`, `a1`, ... (diffusers `load_lora_weights`) and activate them all at their scales.

    The scale multiplies the LoRA update, so scale 0 gives the base model's output exactly."""
    names = []
    for i, adapter in enumerate(adapters):
        names.append(f"a{i}")
        load_lora_file(pipe, adapter.path, names[-1], model=model)
    if names:
        pipe.set_adapters(names, [adapter.scale for adapter in adapters])
    return names
