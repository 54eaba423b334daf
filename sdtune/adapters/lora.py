"""LoRA (and DoRA) adapters on the UNet and the CLIP text encoder through peft, saved in the diffusers format.

`model.add_adapter(LoraConfig)` names parameters the way diffusers expects, so the saved file loads with the model
family's `load_lora_weights`. Each adapter's peft config (rank, alpha, per-layer ranks, DoRA) is
stored in the file's metadata, which is how alpha ≠ rank and conv ranks survive the round trip.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig
from peft.utils import get_peft_model_state_dict

from sdtune.adapters.files import ADAPTER_WEIGHTS
from sdtune.errors import SdtuneError
from sdtune.models.families.base import ModelFamily

# peft `init_lora_weights` schemes that start with B = 0 and leave the base weights untouched.
INITS = {"gaussian": "gaussian", "kaiming": True}
# Schemes that rewrite the base weights: an adapter trained that way is wrong on any other copy of the base model.
BASE_REWRITING_INITS = ("pissa", "olora", "loftq", "eva", "corda")
# Adapter types: LoRA (B·A), and the LyCORIS ones peft implements, saved in LyCORIS naming (sdtune.adapters.lycoris).
TYPES = ("lora", "loha", "lokr")


@dataclass
class LoraShape:
    """What every adapter has: W' = W + (alpha / rank) · B·A, with A: rank×in and B: out×rank."""

    key: ClassVar[str] = "model.lora"  # config key named in error messages
    example: ClassVar[str] = "to_q"  # a valid target module, for error messages

    rank: int = 16
    """Inner dimension of the low-rank update; larger learns more and costs more memory."""
    alpha: float = 16.0
    """Scale numerator: the update is multiplied by alpha / rank (alpha = rank gives scale 1)."""
    dropout: float = 0.0
    """Dropout on the LoRA branch input during training."""
    use_dora: bool = False
    """DoRA (Liu et al., 2024): also learn a per-output-channel magnitude; slower per step, often better at low rank."""
    init: str = "gaussian"
    """Initialisation of A (B starts at zero either way): gaussian or kaiming (peft's default)."""
    target_modules: list[str] = field(default_factory=list)
    """Module names (or name suffixes) that get an adapter."""
    type: str = "lora"
    """lora: B·A. loha: LoHa, (W1a·W1b) ⊙ (W2a·W2b), a Hadamard product of two rank-r pairs (rank r² at 2× LoRA's
    parameters). lokr: LoKr, W1 ⊗ (W2a·W2b), a Kronecker product. LoHa and LoKr are saved as a LyCORIS file
    (A1111, ComfyUI, Forge), not in the diffusers format; dropout, use_dora and init are LoRA's only. The
    text-encoder adapter takes the denoiser's type."""
    decompose_factor: int = -1
    """LoKr: the size of W1's sides (W ≈ W1 ⊗ W2 splits each dimension as factor × rest); -1 picks the split nearest
    the square root. A larger factor moves parameters from W2 into the full W1."""
    rank_dropout: float = 0.0
    """LoHa/LoKr: drop this fraction of the update's output rows during training."""
    module_dropout: float = 0.0
    """LoHa/LoKr: skip a layer's whole update with this probability during training."""

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise SdtuneError(f"{self.key}.type must be one of {', '.join(TYPES)}, got '{self.type}'")
        if self.type != "lora":
            self._check_lycoris()
        if self.rank < 1:
            raise SdtuneError(f"{self.key}.rank must be ≥ 1, got {self.rank}")
        if self.alpha <= 0:
            raise SdtuneError(f"{self.key}.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise SdtuneError(f"{self.key}.dropout must be in [0, 1), got {self.dropout}")
        if self.init.lower() in BASE_REWRITING_INITS:
            raise SdtuneError(
                f"{self.key}.init={self.init} rewrites the base weights, so the exported adapter would be wrong on "
                "the real base model; use gaussian or kaiming"
            )
        if self.init not in INITS:
            raise SdtuneError(f"{self.key}.init must be one of {', '.join(INITS)}, got '{self.init}'")
        if self.target_modules is not None and not self.target_modules:
            raise SdtuneError(f"{self.key}.target_modules is empty; name at least one module (e.g. {self.example})")

    def _check_lycoris(self) -> None:
        """LoRA-only options set on a LoHa/LoKr, and options out of range: one line each."""
        if self.use_dora:
            raise SdtuneError(f"{self.key}.use_dora is a LoRA option; a {self.type} has no DoRA magnitudes (use type: lora)")
        if self.dropout:
            raise SdtuneError(f"{self.key}.dropout is LoRA's input dropout; a {self.type} uses rank_dropout and module_dropout")
        for name in ("rank_dropout", "module_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise SdtuneError(f"{self.key}.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.decompose_factor == 0 or self.decompose_factor < -1:
            raise SdtuneError(f"{self.key}.decompose_factor must be -1 (square root) or > 0, got {self.decompose_factor}")
        if self.decompose_factor != -1 and self.type != "lokr":
            raise SdtuneError(f"{self.key}.decompose_factor is a LoKr option; type is {self.type}")

    def peft_config(self) -> LoraConfig | LoHaConfig | LoKrConfig:
        if self.type == "loha":
            return LoHaConfig(r=self.rank, alpha=self.alpha, rank_dropout=self.rank_dropout,
                              module_dropout=self.module_dropout, target_modules=list(self.target_modules))  # fmt: skip
        if self.type == "lokr":
            return LoKrConfig(r=self.rank, alpha=self.alpha, rank_dropout=self.rank_dropout, module_dropout=self.module_dropout,
                              decompose_factor=self.decompose_factor, target_modules=list(self.target_modules))  # fmt: skip
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            use_dora=self.use_dora,
            init_lora_weights=INITS[self.init],
            target_modules=list(self.target_modules),
        )


@dataclass
class LoraSettings(LoraShape):
    """The denoiser's adapter. Attention projections by default; `conv_rank` > 0 adds the ResNet convs (LoCon)."""

    target_modules: list[str] | None = None
    """Denoiser module names (or name suffixes) that get an adapter; null: the model family's attention projections
    (UNet: to_q, to_k, to_v, to_out.0; SD3 and Flux also the text stream's add_q_proj, add_k_proj, add_v_proj and
    to_add_out, in the joint and the single blocks)."""
    conv_rank: int = 0
    """Rank of adapters on `conv_target_modules`; 0 leaves the convolutions alone."""
    conv_alpha: float | None = None
    """Alpha of the conv adapters; null means equal to conv_rank (scale 1)."""
    conv_target_modules: list[str] = field(default_factory=lambda: ["conv1", "conv2", "conv_shortcut", "conv"])
    """Convolutions that get an adapter when conv_rank > 0: ResNet convs, shortcuts, down/upsamplers."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.conv_rank < 0:
            raise SdtuneError(f"{self.key}.conv_rank must be ≥ 0, got {self.conv_rank}")
        if self.conv_alpha is not None and self.conv_alpha <= 0:
            raise SdtuneError(f"{self.key}.conv_alpha must be > 0 or null, got {self.conv_alpha}")
        if self.conv_rank and self.type != "lora":
            raise SdtuneError(f"{self.key}.conv_rank adds LoRA (LoCon) convolutions; a {self.type} here adapts linear layers only (set conv_rank: 0)")

    def peft_config(self) -> LoraConfig:
        config = super().peft_config()
        if self.conv_rank:
            config.target_modules = sorted(set(self.target_modules) | set(self.conv_target_modules))
            alpha = self.conv_alpha if self.conv_alpha is not None else float(self.conv_rank)
            config.rank_pattern = {name: self.conv_rank for name in self.conv_target_modules}
            config.alpha_pattern = {name: alpha for name in self.conv_target_modules}
        return config

    def all_targets(self) -> list[str]:
        return list(self.target_modules) + (list(self.conv_target_modules) if self.conv_rank else [])

    def for_family(self, family) -> LoraSettings:
        """These settings with null target_modules made the family's default attention projections."""
        if self.target_modules is not None:
            return self
        return dataclasses.replace(self, target_modules=list(family.default_lora_targets))


@dataclass
class TextEncoderLora(LoraShape):
    """The CLIP text-encoder adapter, trained with its own learning rate (text encoders overfit fast)."""

    key: ClassVar[str] = "model.text_encoder_lora"
    example: ClassVar[str] = "q_proj"

    rank: int = 8
    alpha: float = 8.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])
    """Text-encoder module names that get an adapter; the default is every attention projection."""
    lr: float | None = None
    """Learning rate of the text-encoder adapter; null uses the optimizer's lr. kohya users often take lr / 2."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.use_dora:
            raise SdtuneError(
                f"{self.key}.use_dora: diffusers (with transformers 5) drops text-encoder DoRA magnitudes when it loads "
                "an adapter, so it would be wrong wherever it is used; keep DoRA on the UNet (model.lora.use_dora)"
            )

    def all_targets(self) -> list[str]:
        return list(self.target_modules)


def check_targets(model: torch.nn.Module, settings: LoraShape, what: str | None = None) -> None:
    """Every target of `settings` names a module of `model` (a module path or its suffix), else one line saying which
    do not. Pre-flight runs it on the model built on the meta device, training on the loaded one."""
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in settings.all_targets() if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise SdtuneError(
            f"{settings.key}.target_modules: no module named {', '.join(missing)} in {what or type(model).__name__}"
            f" (e.g. {settings.example})"
        )


def add_lora(model: torch.nn.Module, settings: LoraShape) -> None:
    """Freeze `model` and attach a trainable adapter named "default"; its B starts at zero (no-op at step 0).
    Null target_modules are the attention projections every denoiser has (`ModelFamily.default_lora_targets`)."""
    if isinstance(settings, LoraSettings):
        settings = settings.for_family(ModelFamily)
    check_targets(model, settings)
    model.requires_grad_(False)
    model.add_adapter(settings.peft_config())
    # peft leaves the new parameters in the base dtype; under mixed precision they must train in fp32.
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()


def lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors in peft naming (`…to_q.lora_A.weight`), without a model prefix.

    Not diffusers' older `lora.down`/`lora.up` naming: with both attention and conv targets, diffusers 0.42 loads
    only the conv half of such a file (tests/test_adapter_export.py catches it).
    """
    # No embedding layers are targeted; "auto" would look the base model up on the Hub to decide (a warning offline).
    return get_peft_model_state_dict(model, save_embedding_layers=False)


def text_encoder_module_prefix(text_encoder: torch.nn.Module) -> str:
    """"text_model." when the CLIP text encoder's module names lack it (transformers ≥ 5), else "".

    Files name text-encoder layers `text_model.encoder.layers.N…` as transformers 4 does; a file without the prefix
    loads here but not into a transformers-4 pipeline, A1111 or ComfyUI."""
    return "" if hasattr(text_encoder, "text_model") else "text_model."


def save_diffusers_adapter(
    family, denoiser: torch.nn.Module, out_dir: str | Path, text_encoders: Sequence[torch.nn.Module | None] = (),
    dtype: torch.dtype = torch.float32,
) -> Path:  # fmt: skip
    """Write `out_dir/pytorch_lora_weights.safetensors`, loadable by the family's `pipeline.load_lora_weights(out_dir)`:
    the denoiser's adapter and those of the text encoders given (the family's adaptable ones, in order; None or left
    out: not adapted), each with its peft config in the metadata."""

    def layers(model: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
        return {prefix + k: v.detach().to("cpu", dtype).contiguous() for k, v in lora_state_dict(model).items()}

    tensors = {family.denoiser: layers(denoiser)}
    configs = {family.denoiser: denoiser.peft_config["default"].to_dict()}
    for name, encoder in zip(family.trainable_text_encoders(), text_encoders):
        if encoder is not None:
            tensors[name] = layers(encoder, text_encoder_module_prefix(encoder))
            configs[name] = encoder.peft_config["default"].to_dict()
    family.save_lora_weights(Path(out_dir), tensors, configs, ADAPTER_WEIGHTS)
    return Path(out_dir) / ADAPTER_WEIGHTS
