"""`model.init_adapter`: start LoRA training from the weights of an existing adapter file.

The configured adapters ("default", built by `add_lora`) keep their shape; only their starting weights come from the
file. diffusers reads the file (its own format, or kohya/AUTOMATIC1111 `lora_unet_*`/`lora_te_*` keys, which it
converts) into a second adapter, "init", on the same UNet and text encoder. Every layer's "init" A and B (and DoRA
magnitude) are then copied into "default", B rescaled by scale_file / scale_config so that the update
(alpha / rank) · B·A is the file's even when model.lora.alpha differs from the file's alpha, and "init" is deleted.

Where the file names a module the usual way (diffusers `unet.<module>.lora_A.weight`, kohya
`lora_unet_<module with _>.lora_down.weight`), the values are read from the file itself rather than from "init":
peft casts "init" to the base weights' dtype (bf16 under weight_dtype: bfloat16), and diffusers 0.42 gives every
kohya module the most common alpha when alphas differ between modules (its alpha_pattern keys name no module).
"""

from __future__ import annotations

import logging
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from lightning.pytorch.utilities import rank_zero_warn
from peft.functional import delete_adapter, set_adapter
from peft.tuners.lora import LoraLayer

from sdtune.adapters.files import ADAPTER_WEIGHTS, adapter_file
from sdtune.adapters.lora import LoraSettings, TextEncoderLora
from sdtune.errors import SdtuneError, first_line

KEY = "model.init_adapter"
INIT = "init"  # the file's adapter while it is copied into "default"
DEFAULT = "default"
LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, TypeError, IndexError)
# Keys of a diffusers LoRA state dict (after kohya conversion) that hold one module's down/A matrix.
DOWN_KEY = re.compile(r"(\.lora_A\.|\.lora\.down\.|_lora\.down\.|\.lora_linear_layer\.down\.)weight$")


def weights_file(path: str | Path) -> Path:
    """The .safetensors file `path` names: the file itself, or an adapter folder's pytorch_lora_weights.safetensors."""
    path = Path(path).expanduser()
    file = adapter_file(path)
    if not file.is_file():
        where = f"{path} has no {ADAPTER_WEIGHTS}" if path.is_dir() else f"{path} does not exist"
        raise SdtuneError(f"{KEY}: {where} (pass an adapter folder or a .safetensors file)")
    if file.suffix != ".safetensors":
        raise SdtuneError(f"{KEY}: {path} is not a .safetensors file (pass an adapter folder or a .safetensors file)")
    return file


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the file; a truncated or corrupt file is a one-line error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise SdtuneError(f"{KEY}: {file} is not a readable .safetensors file (truncated or corrupt?): {first_line(err)}") from err


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence what loading a second adapter prints: peft's "multiple adapters" warning, transformers' load report
    (it lists the "default" weights as missing), diffusers' notes. Failures still raise."""
    from transformers.utils import logging as transformers_logging

    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers", "peft")]
    levels = [logger.level for logger in loggers]
    progress_bar = transformers_logging.is_progress_bar_enabled()
    try:
        for logger in loggers:
            logger.setLevel(logging.CRITICAL)
        transformers_logging.disable_progress_bar()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if progress_bar:
            transformers_logging.enable_progress_bar()


def _lora_layers(model: torch.nn.Module) -> dict[str, LoraLayer]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def _short_name(module: str) -> str:
    """The target_modules entry that names `module`: its last component, with the parent's when that is an index."""
    parts = module.split(".")
    keep = 1
    while keep < len(parts) and parts[-keep].isdigit():
        keep += 1
    return ".".join(parts[-keep:])


def _matches(module: str, targets: list[str]) -> bool:
    return any(module == t or module.endswith("." + t) for t in targets)


class _Part:
    """The UNet or the text encoder: its model, settings and the file's keys for it."""

    def __init__(self, label: str, prefix: str, model: torch.nn.Module, settings: LoraSettings | TextEncoderLora | None):
        self.label, self.prefix, self.model, self.settings = label, prefix, model, settings
        # Where the file may hold a module's tensors under its plain name: diffusers (peft naming; diffusers writes
        # the text encoder with transformers 4's `text_model.` prefix) and kohya (`.` → `_`).
        if prefix == "unet":
            self.diffusers = ["unet."]
            self.kohya = ["lora_unet_"]
        else:
            self.diffusers = ["text_encoder.", "text_encoder.text_model."]
            self.kohya = ["lora_te_text_model_", "lora_te_", "lora_te1_text_model_"]

    def rank_key(self, module: str) -> str:
        settings = self.settings
        if isinstance(settings, LoraSettings) and settings.conv_rank and _matches(module, settings.conv_target_modules):
            return f"{settings.key}.conv_rank"
        return f"{settings.key}.rank"


def _from_file(raw: dict[str, torch.Tensor], part: _Part, module: str, layer: LoraLayer):
    """(A, B, DoRA magnitude or None, scale) of `module` read from the file itself, or None if it uses other names."""
    shape_a, shape_b = layer.lora_A[INIT].weight.shape, layer.lora_B[INIT].weight.shape

    def fit(tensor: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
        if tensor is None or tensor.numel() != shape.numel():
            return None
        return tensor.reshape(shape)

    for prefix in part.diffusers:
        a = fit(raw.get(f"{prefix}{module}.lora_A.weight"), shape_a)
        b = fit(raw.get(f"{prefix}{module}.lora_B.weight"), shape_b)
        if a is not None and b is not None:
            magnitude = raw.get(f"{prefix}{module}.lora_magnitude_vector")
            return a, b, magnitude, layer.scaling[INIT]  # alpha from the file's metadata, as diffusers read it
    for prefix in part.kohya:
        name = prefix + module.replace(".", "_")
        a = fit(raw.get(f"{name}.lora_down.weight"), shape_a)
        b = fit(raw.get(f"{name}.lora_up.weight"), shape_b)
        if a is not None and b is not None:
            alpha = raw.get(f"{name}.alpha")
            rank = shape_a[0]
            return a, b, None, (float(alpha.item()) if alpha is not None else float(rank)) / rank
    return None


def load_init_adapter(
    path: str | Path,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module,
    lora: LoraSettings,
    text_encoder_lora: TextEncoderLora | None,
) -> None:
    """Set the starting weights of the "default" adapters (already added by `add_lora`) from the LoRA file at `path`."""
    from diffusers import StableDiffusionPipeline

    file = weights_file(path)
    where = f"{KEY} {path}"
    raw = read_tensors(file)
    if any(k.endswith(".dora_scale") for k in raw):
        raise SdtuneError(f"{where}: kohya/LyCORIS DoRA weights (dora_scale) are not supported; start from a diffusers-format DoRA adapter")
    if any(marker in k for k in raw for marker in ("hada_", "lokr_")):
        raise SdtuneError(f"{where}: is a LyCORIS LoHa/LoKr file, not a LoRA (lora_down/lora_up or lora_A/lora_B)")
    if not any("lora" in k for k in raw):
        raise SdtuneError(f"{where}: has no LoRA weights (no lora_A/lora_B or lora_down/lora_up tensors)")

    with _quiet():
        try:
            state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(
                str(file.parent), weight_name=file.name, return_lora_metadata=True
            )
        except LOAD_ERRORS as err:
            raise SdtuneError(f"{where}: could not be read as a LoRA: {first_line(err)}") from err
    parts = [_Part("UNet", "unet", unet, lora), _Part("text-encoder", "text_encoder", text_encoder, text_encoder_lora)]
    in_file = {part.prefix: [k for k in state if k.startswith(part.prefix + ".") and DOWN_KEY.search(k)] for part in parts}
    if not any(in_file.values()):
        raise SdtuneError(f"{where}: has no LoRA weights for this model's UNet or text encoder")
    if in_file["text_encoder"] and text_encoder_lora is None:
        rank = state[in_file["text_encoder"][0]].shape[0]
        raise SdtuneError(
            f"{where}: has text-encoder LoRA weights but model.text_encoder_lora is null: set model.text_encoder_lora "
            f"(e.g. --model.text_encoder_lora.rank {rank})"
        )

    # The trainable "default" tensors as add_lora left them (fp32): loading "init" may cast them or clear requires_grad.
    own = {}
    for part in parts:
        if part.settings is not None:
            own[part.prefix] = {n: p.detach().clone() for n, p in part.model.named_parameters() if p.requires_grad}
    loaders = {"unet": StableDiffusionPipeline.load_lora_into_unet, "text_encoder": StableDiffusionPipeline.load_lora_into_text_encoder}
    for part in parts:
        if not in_file[part.prefix]:
            continue
        with _quiet():
            try:
                loaders[part.prefix](state, alphas, part.model, adapter_name=INIT, metadata=metadata)
            except LOAD_ERRORS as err:
                raise SdtuneError(f"{where}: could not be loaded into this model's {part.label}: {first_line(err)}") from err
        for name, param in part.model.named_parameters():
            if name in own[part.prefix]:
                param.data = own[part.prefix][name]

    uncovered: list[str] = []
    total = 0
    for part in parts:
        if part.settings is None:
            continue
        layers = _lora_layers(part.model)
        loaded = {name: layer for name, layer in layers.items() if INIT in layer.lora_A}
        _check(where, part, loaded, len(in_file[part.prefix]))
        _copy(where, raw, part, loaded)
        configured = [name for name, layer in layers.items() if DEFAULT in layer.lora_A]
        total += len(configured)
        uncovered += [name for name in configured if name not in loaded]
        set_adapter(part.model, DEFAULT)  # first, so that deleting "init" does not warn that it was active
        if loaded:
            delete_adapter(part.model, INIT, prefix="lora_")
            part.model.peft_config.pop(INIT, None)
        for name, param in part.model.named_parameters():
            trainable = name in own[part.prefix]
            param.requires_grad_(trainable)
            if trainable:
                param.data = param.data.float()
        if set(own[part.prefix]) != {n for n, p in part.model.named_parameters() if p.requires_grad}:
            raise AssertionError(f"{part.label} adapter parameters changed while loading {KEY}")  # a bug, not user input
    if uncovered:
        rank_zero_warn(
            f"{KEY}: {len(uncovered)} of the {total} adapted modules are not in {path} and start untrained "
            f"(B = 0), e.g. {uncovered[0]}"
        )


def _check(where: str, part: _Part, loaded: dict[str, LoraLayer], in_file: int) -> None:
    """The file's adapter fits the configured one: every file module loaded, targeted, same rank, DoRA or not."""
    settings = part.settings
    if len(loaded) < in_file:
        raise SdtuneError(
            f"{where}: {in_file - len(loaded)} of its {in_file} {part.label} LoRA modules match no module of this "
            "model (is it for another base model?)"
        )
    outside = [name for name, layer in loaded.items() if DEFAULT not in layer.lora_A]
    if outside:
        names = sorted({_short_name(name) for name in outside})
        hint = f"add {', '.join(names)} to {settings.key}.target_modules"
        if isinstance(settings, LoraSettings) and not settings.conv_rank:
            convs = [n for n in names if n in settings.conv_target_modules]
            if convs:
                rank = loaded[next(name for name in outside if _short_name(name) in convs)].r[INIT]
                hint = f"set {settings.key}.conv_rank: {rank}" + (
                    f" and add {', '.join(n for n in names if n not in convs)} to {settings.key}.target_modules"
                    if len(convs) < len(names) else ""
                )
        raise SdtuneError(
            f"{where}: adapts {len(outside)} {part.label} modules that {settings.key} does not target "
            f"(e.g. {outside[0]}): {hint}"
        )
    for name, layer in loaded.items():
        file_dora, own_dora = INIT in layer.lora_magnitude_vector, DEFAULT in layer.lora_magnitude_vector
        if file_dora and not own_dora:
            raise SdtuneError(f"{where}: is a DoRA adapter but {settings.key}.use_dora is false: set {settings.key}.use_dora: true")
        if own_dora and not file_dora:
            raise SdtuneError(f"{where}: is a plain LoRA (no DoRA magnitudes) but {settings.key}.use_dora is true: set {settings.key}.use_dora: false")
        if layer.r[INIT] != layer.r[DEFAULT]:
            key = part.rank_key(name)
            raise SdtuneError(
                f"{where}: {part.label} module {name} has rank {layer.r[INIT]} in the file but {layer.r[DEFAULT]} here: "
                f"set {key}: {layer.r[INIT]}"
            )
        if layer.lora_A[INIT].weight.shape != layer.lora_A[DEFAULT].weight.shape:
            raise SdtuneError(
                f"{where}: {part.label} module {name} has LoRA shape {tuple(layer.lora_A[INIT].weight.shape)} in the "
                f"file but {tuple(layer.lora_A[DEFAULT].weight.shape)} here"
            )
        if getattr(layer.lora_B[INIT], "bias", None) is not None:
            raise SdtuneError(f"{where}: has LoRA biases (lora_B.bias), which sdtune does not train; start from a LoRA without them")


@torch.no_grad()
def _copy(where: str, raw: dict[str, torch.Tensor], part: _Part, loaded: dict[str, LoraLayer]) -> None:
    """Copy each module's file weights into "default" so that scale_default · B'·A = scale_file · B·A."""
    alphas = {float(v.item()) for k, v in raw.items() if k.endswith(".alpha") and v.numel() == 1}
    for name, layer in loaded.items():
        source = _from_file(raw, part, name, layer)
        if source is None:  # names diffusers converted (older diffusers or LDM-style kohya keys): take "init"
            if len(alphas) > 1:
                raise SdtuneError(
                    f"{where}: has different alphas per module under names sdtune cannot match to modules "
                    f"(e.g. {part.label} {name}); diffusers would give them all one alpha"
                )
            magnitude = layer.lora_magnitude_vector[INIT].weight if INIT in layer.lora_magnitude_vector else None
            source = layer.lora_A[INIT].weight, layer.lora_B[INIT].weight, magnitude, layer.scaling[INIT]
        a, b, magnitude, scale = source
        ratio = scale / layer.scaling[DEFAULT]
        layer.lora_A[DEFAULT].weight.copy_(a.float())
        layer.lora_B[DEFAULT].weight.copy_((b.double() * ratio).float())
        if DEFAULT in layer.lora_magnitude_vector:
            if magnitude is None:
                magnitude = layer.lora_magnitude_vector[INIT].weight
            target = layer.lora_magnitude_vector[DEFAULT].weight
            target.copy_(magnitude.float().reshape(target.shape))
