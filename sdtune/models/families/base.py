"""The interface every model family implements, and `ModelParts`, the loaded components of one model.

A family is everything that sets one kind of model apart, in one place: which components a pipeline folder holds
(and their classes), how a prompt's token ids become the denoiser's conditioning, how the denoiser is called, which
diffusers pipelines sample it, and how its adapters are named in files. Code elsewhere asks the family instead of
testing which model it has, so a new family is a new module here (and its tests), not edits across sdtune.

The UNet families (SD1.x, SD2.x, SDXL) share the DDPM training objective (`objective = "diffusion"`): noise added
to VAE latents by the scheduler's betas, the denoiser predicts the noise or v. A flow-matching family (SD3, Flux)
sets `objective = "flow"`, names a `transformer` as its denoiser and implements the same methods.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch


@dataclass
class TextConditioning:
    """What the denoiser is conditioned on by the prompt: `hidden` (B×tokens×width) through cross-attention and,
    for families that have one, `pooled` (B×width), a whole-prompt embedding added to the timestep's."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    def to(self, *args: Any, **kwargs: Any) -> TextConditioning:
        """Both tensors moved or cast as `torch.Tensor.to(*args, **kwargs)`."""
        return TextConditioning(self.hidden.to(*args, **kwargs), None if self.pooled is None else self.pooled.to(*args, **kwargs))


@dataclass
class Layout:
    """What a model folder (or Hub repo) shows before any weights load: its subfolders (model_index.json's names for
    a Hub id) and the first text encoder's config, which tell the families apart."""

    folders: frozenset[str]
    text_encoder_config: Mapping[str, Any] = field(default_factory=dict)
    model_index: Mapping[str, Any] = field(default_factory=dict)


class ModelFamily:
    """One family of models. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str]  # "sd1", "sd2", "sdxl": what users and files see
    label: ClassVar[str]  # "SD1.x", as messages name it
    objective: ClassVar[str] = "diffusion"  # the training objective: "diffusion" (DDPM noise or v) or "flow"
    denoiser: ClassVar[str] = "unet"  # the pipeline component that is trained
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)  # pipeline component names, in prompt order
    tokenizers: ClassVar[tuple[str, ...]] = ("tokenizer",)  # one per text encoder
    # The text encoders that may train (a LoRA or a full fine-tune): every one but T5; null: all of them.
    trainable_encoders: ClassVar[tuple[str, ...] | None] = None
    # The denoiser modules a LoRA adapts by default: the attention projections.
    default_lora_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    # Class of each component (diffusers' or transformers' name), for loading.
    classes: ClassVar[Mapping[str, str]] = {}
    # The diffusers pipelines that sample this family: text-to-image, image-to-image, inpainting.
    pipelines: ClassVar[Mapping[str, str]] = {}
    # model_index.json settings the pipelines take (kept in `ModelParts.options`).
    index_options: ClassVar[tuple[str, ...]] = ()
    single_file: ClassVar[bool] = True  # a single-file checkpoint in the original layout can be loaded
    new_tokens: ClassVar[bool] = True  # textual inversion / pivotal tuning is supported
    init_adapter: ClassVar[bool] = True  # model.init_adapter is supported
    # How cached text outputs are stored: float32, or float16 for the large T5 sequences (SD3, Flux).
    text_cache_dtype: ClassVar[str] = "float32"
    # The kohya / A1111 LoRA file: key prefix of each adapted component, and the metadata naming the base model.
    kohya_prefixes: ClassVar[Mapping[str, str]] = {}
    kohya_base_version: ClassVar[str] = ""  # ss_base_model_version
    # How the denoiser's modules are named: "diffusers" (their paths, as diffusers' SDXL scripts write them) or
    # "flux" (Black Forest Labs' original modules, some of them fused: sdtune.adapters.kohya_flux).
    kohya_layout: ClassVar[str] = "diffusers"
    modelspec_architecture: ClassVar[str] = ""  # modelspec.architecture, before "/lora"

    # --- recognising and loading ----------------------------------------------------------------------------------

    @classmethod
    def matches(cls, layout: Layout) -> bool:
        raise NotImplementedError

    @classmethod
    def components(cls) -> tuple[str, ...]:
        """Every component a pipeline folder of this family holds, scheduler included."""
        return ("vae", cls.denoiser, *cls.text_encoders, *cls.tokenizers, "scheduler")

    @classmethod
    def component_class(cls, name: str) -> type:
        """The class `name` loads with (`classes`' entry, from diffusers or transformers)."""
        import diffusers
        import transformers

        class_name = cls.classes[name]
        return getattr(diffusers, class_name, None) or getattr(transformers, class_name)

    @classmethod
    def trainable_text_encoders(cls) -> tuple[str, ...]:
        return cls.trainable_encoders if cls.trainable_encoders is not None else cls.text_encoders

    # --- prompts ----------------------------------------------------------------------------------------------------

    def tokenize(self, tokenizers: Sequence[Any], caption: str, max_tokens: int) -> list[torch.Tensor]:
        """A caption's token ids for each tokenizer: CLIP's `max_tokens` in 75-token windows, (chunks, 77) each."""
        from sdtune.models.text import caption_ids

        return [caption_ids(tokenizer, max_tokens, caption) for tokenizer in tokenizers]

    def encode_prompt(self, text_encoders: Sequence[torch.nn.Module], ids: Sequence[torch.Tensor], clip_skip: int = 1) -> TextConditioning:
        """Token ids (one tensor per text encoder, B×L or B×chunks×L) → the denoiser's conditioning."""
        raise NotImplementedError

    def max_clip_skip(self, text_encoders: Sequence[torch.nn.Module]) -> int:
        """The largest clip_skip the encoders allow (their depth)."""
        return min(encoder.config.num_hidden_layers for encoder in text_encoders)

    # --- the denoiser ---------------------------------------------------------------------------------------------

    def compute_dtype(self, denoiser: torch.nn.Module) -> torch.dtype:
        """The dtype inputs are cast to: that of the denoiser's first floating-point weight (quantized layers hold
        integers; diffusers' `.dtype` walks every module)."""
        return next(p.dtype for p in denoiser.parameters() if p.is_floating_point())

    def predict(
        self, denoiser: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor, text: TextConditioning,
        sizes: Mapping[str, Any] | None = None, pixel_size: tuple[int, int] | None = None, guidance: float | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """The denoiser's prediction for `latents` (B×C×h×w) at `timesteps`. `sizes` holds each sample's
        "original_size" and "crop_top_left" when the family conditions on them; `pixel_size` is the (h, w) the
        latents decode to; `guidance` is the distilled guidance of a model that embeds it (Flux dev)."""
        raise NotImplementedError

    def size_multiple(self, denoiser_config: Mapping[str, Any], vae_factor: int) -> int:
        """Image sides must be multiples of this many pixels: the VAE's factor (times a transformer's patch size)."""
        return vae_factor * int(denoiser_config.get("patch_size", 1) or 1)

    def default_size(self, denoiser_config: Mapping[str, Any], vae_factor: int) -> tuple[int, int]:
        """(height, width) the denoiser was built for: its latent sample_size times the VAE factor."""
        size = denoiser_config["sample_size"]
        height, width = (size, size) if isinstance(size, int) else size
        return height * vae_factor, width * vae_factor

    def image_tokens(self, latent_size: tuple[int, int]) -> int:
        """How many tokens the denoiser sees for latents of `latent_size` (the resolution-dependent shift's input)."""
        return latent_size[0] * latent_size[1]

    # --- sampling and files ---------------------------------------------------------------------------------------

    def pipeline(self, components: Mapping[str, Any], scheduler: Any, task: str = "text2image", options: Mapping[str, Any] | None = None):
        """The diffusers pipeline of `task` around modules already in memory (nothing copied or reloaded)."""
        import diffusers

        return getattr(diffusers, self.pipelines[task])(**components, scheduler=scheduler, **self.pipeline_options(options or {}))

    def pipeline_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Constructor arguments of this family's pipelines besides the components, from `ModelParts.options`."""
        return {}

    def pipeline_latents(self, latents: torch.Tensor, pixel_size: tuple[int, int], vae_factor: int) -> torch.Tensor:
        """A pipeline's `output_type="latent"` result as B×C×h×w latents for the VAE (Flux's come packed)."""
        return latents

    def zero_negative(self, options: Mapping[str, Any]) -> bool:
        """Whether a missing negative prompt is zero embeddings rather than the encoded empty prompt."""
        return False

    def prompt_kwargs(self, positive: TextConditioning, negative: TextConditioning) -> dict[str, torch.Tensor]:
        """The pipeline call's embedding arguments for a prompt and its negative."""
        return {"prompt_embeds": positive.hidden, "negative_prompt_embeds": negative.hidden}

    def save_lora_weights(self, out_dir, layers: Mapping[str, dict], configs: Mapping[str, dict], weight_name: str) -> None:
        """Write the adapters of each component (`layers[name]`: tensors in peft naming; `configs[name]`: its peft
        config) as diffusers' `load_lora_weights` for this family reads them."""
        import diffusers

        pipeline = getattr(diffusers, self.pipelines["text2image"])
        kwargs = {f"{name}_lora_layers": tensors for name, tensors in layers.items()}
        kwargs |= {f"{name}_lora_adapter_metadata": config for name, config in configs.items()}
        pipeline.save_lora_weights(save_directory=out_dir, weight_name=weight_name, **kwargs)


@dataclass
class ModelParts:
    """The loaded components of one model, by their pipeline names, with its family and training scheduler.

    `components["unet"]` (or the family's denoiser) is None when the model was loaded without it. `options` holds
    model_index.json settings the pipelines take (SDXL's force_zeros_for_empty_prompt)."""

    family: ModelFamily
    components: dict[str, Any]
    noise_scheduler: Any
    options: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:  # parts.vae, parts.unet, parts.text_encoder_2, ...
        components = self.__dict__.get("components", {})
        if name in components:
            return components[name]
        raise AttributeError(name)

    @property
    def denoiser(self) -> torch.nn.Module | None:
        return self.components.get(self.family.denoiser)

    @property
    def text_encoder_list(self) -> list[torch.nn.Module]:
        return [self.components[name] for name in self.family.text_encoders]

    @property
    def tokenizer_list(self) -> list[Any]:
        return [self.components[name] for name in self.family.tokenizers]

    @property
    def vae_scale_factor(self) -> int:
        return vae_scale_factor(self.components["vae"])

    def pipeline(self, scheduler: Any, task: str = "text2image"):
        """The family's pipeline of `task` around these modules (see `ModelFamily.pipeline`)."""
        names = [name for name in self.family.components() if name != "scheduler"]
        return self.family.pipeline({name: self.components[name] for name in names}, scheduler, task, self.options)


def vae_scale_factor(vae: torch.nn.Module | Mapping[str, Any]) -> int:
    """Pixels per latent cell along one side (8 for SD): 2 per VAE level after the first, read from the VAE's
    config (the VAE or its config.json as a dict)."""
    config = getattr(vae, "config", vae)
    blocks = config["block_out_channels"] if isinstance(config, Mapping) else config.block_out_channels
    return 2 ** (len(blocks) - 1)
