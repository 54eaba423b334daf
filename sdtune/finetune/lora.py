"""LoRA (or DoRA) fine-tuning: adapters on the denoiser and, optionally, the text encoders; the base stays frozen.
With `new_tokens`, new tokens' embeddings train beside the adapters (pivotal tuning)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import yaml
from lightning.pytorch.utilities import rank_zero_info

from sdtune.adapters.files import ADAPTER_WEIGHTS, LYCORIS_WEIGHTS
from sdtune.adapters.init import load_init_adapter
from sdtune.adapters.kohya import save_kohya, training_info
from sdtune.adapters.lora import (
    LoraSettings,
    TextEncoderLora,
    add_lora,
    save_diffusers_adapter,
)
from sdtune.adapters.lycoris import save_lycoris
from sdtune.adapters.new_tokens import (
    NewTokens,
    TokenEmbedding,
    add_tokens,
    embedding_group,
    save_new_tokens,
    token_embedding,
)
from sdtune.adapters.quantize import QUANTIZE, Quantize, quantize_linears
from sdtune.errors import SdtuneError
from sdtune.finetune.base import as_settings
from sdtune.finetune.diffusion import DiffusionFineTune


class LoRAFineTune(DiffusionFineTune):
    """A peft LoRA adapter on the denoiser (and the text encoders if asked) as the only weights that train. Saves
    `adapter/pytorch_lora_weights.safetensors`, which diffusers' `load_lora_weights` reads, and beside it the kohya
    file AUTOMATIC1111, Forge and ComfyUI read (`save_kohya_weights`); a LoHa or LoKr (`lora.type`) saves
    `adapter/lycoris_weights.safetensors` in LyCORIS naming instead, and the same file named after the run.

    Args:
        pretrained: Diffusers model directory or Hugging Face Hub id, e.g. stable-diffusion-v1-5/stable-diffusion-v1-5.
        lora: Denoiser adapter: type (lora, loha, lokr), rank, alpha, dropout, targets, DoRA, conv rank/alpha (LoCon).
        text_encoder_lora: Text-encoder adapter with its own learning rate; null keeps the text encoder frozen. For
            SDXL it adapts both text encoders, with the same settings; its type is model.lora's.
        new_tokens: Tokens to add to the text encoder, each with a trainable embedding row initialised from a word
            (pivotal tuning). Written beside the adapter for diffusers' load_textual_inversion (`embeddings/`) and
            AUTOMATIC1111 (`embeddings_a1111/`). `TextualInversion` trains them without a LoRA.
        quantize: QLoRA: hold the frozen denoiser's linear layers quantized (bitsandbytes nf4 or int8) under the
            adapter, about a quarter (nf4) or half (int8) of their bf16 memory; the adapter trains in float32 and is
            saved for the unquantized model. Flux.1's transformer: 23.8 GB in bf16, 6.1 GB in nf4.
        init_adapter: A LoRA whose weights start training: an sdtune/diffusers adapter folder or
            pytorch_lora_weights.safetensors, or a kohya/AUTOMATIC1111 .safetensors; its ranks must match model.lora
            (and model.text_encoder_lora). Its alpha may differ: the weights are rescaled to the same update.
            A checkpoint given with --ckpt_path overrides these weights.
        **kwargs: The options every diffusion method shares (revision, optimizer, lr_schedule, objective, …).
    """

    mismatch_hint: ClassVar[str] = "model.lora.rank or target modules differ from the run that wrote it"
    fixed_on_resume: ClassVar[tuple[str, ...]] = (
        *(f"{key}.{name}" for key in ("lora", "text_encoder_lora") for name in ("rank", "alpha", "use_dora", "target_modules")),
        "lora.type", "lora.decompose_factor", "lora.conv_rank", "lora.conv_alpha", "lora.conv_target_modules", "new_tokens.tokens",
    )  # fmt: skip

    def __init__(
        self,
        pretrained: str,
        lora: LoraSettings = LoraSettings(),
        text_encoder_lora: TextEncoderLora | None = None,
        new_tokens: NewTokens | None = None,
        init_adapter: str | None = None,
        quantize: Quantize | None = None,
        **kwargs: Any,
    ) -> None:
        lora = as_settings(LoraSettings, lora)
        text_encoder_lora = as_settings(TextEncoderLora, text_encoder_lora)
        new_tokens = as_settings(NewTokens, new_tokens)
        if lora is None:
            raise SdtuneError("model.lora is null: nothing would train (new tokens alone are sdtune.finetune.TextualInversion)")
        if quantize is not None and quantize not in QUANTIZE:
            raise SdtuneError(f"model.quantize must be one of {', '.join(QUANTIZE)} or null, got '{quantize}'")
        if text_encoder_lora is not None and text_encoder_lora.type != lora.type:
            raise SdtuneError(f"model.text_encoder_lora.type is {text_encoder_lora.type}, model.lora.type {lora.type}: "
                              "one file holds both adapters, so they share a type")  # fmt: skip
        super().__init__(pretrained=pretrained, **kwargs)
        lora = lora.for_family(self.family)
        self.lora, self.text_encoder_lora, self.new_tokens = lora, text_encoder_lora, new_tokens
        self.init_adapter = None if init_adapter is None else str(init_adapter)
        if new_tokens is not None and not self.family.new_tokens:
            raise SdtuneError(f"model.new_tokens is not supported for {self.family.label} models yet")
        if self.init_adapter is not None and not self.family.init_adapter:
            raise SdtuneError(f"model.init_adapter is not supported for {self.family.label} models yet; train from a fresh adapter")
        if lora.type != "lora":
            self._check_lycoris(lora.type)
        self.quantize = quantize
        if quantize is not None:
            quantize_linears(self.denoiser, quantize, self.weight_dtype)
        add_lora(self.denoiser, lora)
        if text_encoder_lora is not None:  # on both of SDXL's text encoders, as kohya's sdxl_train_network; never T5
            for encoder in self.adapted_text_encoders:
                add_lora(encoder, text_encoder_lora)
        if self.init_adapter is not None:
            load_init_adapter(self.init_adapter, self.denoiser, self.text_encoder, lora, text_encoder_lora)
        if new_tokens is not None:  # after the adapters, which freeze everything else in the text encoder
            add_tokens(self.tokenizer, self.text_encoder, new_tokens)

    def _check_lycoris(self, kind: str) -> None:
        """The cases a LoHa/LoKr run cannot cover, in one line each."""
        if self.family.kohya_layout != "diffusers" or self.family.denoiser not in self.family.kohya_prefixes:
            raise SdtuneError(f"model.lora.type {kind}: LoHa/LoKr train on UNet models (SD1, SD2, SDXL), not {self.family.label}")
        if self.init_adapter is not None:
            raise SdtuneError(f"model.init_adapter starts a LoRA from a file; a {kind} starts fresh (drop init_adapter)")

    @property
    def adapted_text_encoders(self) -> list:
        """The text encoders a text-encoder LoRA adapts: every CLIP of the model (not T5)."""
        return [getattr(self, name) for name in self.family.trainable_text_encoders()]

    @property
    def token_embedding(self) -> TokenEmbedding | None:
        """The text encoder's embedding with the new tokens' rows, or None without new tokens."""
        return token_embedding(self.text_encoder)

    @property
    def added_tokens(self) -> dict[str, int]:
        """The tokens this run added to the tokenizer and their ids (the data module adds them to its own)."""
        tokens = list(self.new_tokens.tokens) if self.new_tokens is not None else []
        return dict(zip(tokens, self.tokenizer.convert_tokens_to_ids(tokens)))

    def parameter_groups(self) -> list[dict[str, Any]]:
        groups = super().parameter_groups()
        if self.text_encoder_lora is not None:
            groups += self.text_encoder_groups(self.text_encoder_lora.lr)  # a frozen T5's group is empty and dropped
        if self.token_embedding is not None:  # the new rows in a group of their own
            added = self.token_embedding.added
            groups = [{**group, "params": [p for p in group["params"] if p is not added]} for group in groups]
            groups.append(embedding_group(self.token_embedding, self.new_tokens))
        return groups

    def save_weights(self, out_dir: str | Path) -> Path:
        """Write the adapter(s) in the diffusers format (`pytorch_lora_weights.safetensors`; a LoHa/LoKr as
        `lycoris_weights.safetensors`) and the new tokens' embeddings beside them."""
        if self.token_embedding is not None:
            save_new_tokens(out_dir, self.new_tokens, self.token_embedding)
        encoders = self.adapted_text_encoders if self.text_encoder_lora is not None else []
        if self.lora.type != "lora":
            return save_lycoris(self.family, self.denoiser, Path(out_dir) / LYCORIS_WEIGHTS, encoders)
        return save_diffusers_adapter(self.family, self.denoiser, out_dir, encoders)

    def save_kohya_weights(self, out_dir: str | Path, name: str) -> Path | None:
        """Write the adapter(s) as `out_dir/<name>.safetensors` in the kohya format AUTOMATIC1111, Forge and ComfyUI
        load, with the metadata `sdtune export --format kohya` writes (read from the run's config.yaml and step).
        None, without a file, for a family shared in the diffusers format (SD3) or an adapter the format cannot hold
        (DoRA: one info line says which export to use instead); the run goes on either way."""
        if not self.family.kohya_prefixes:
            return None
        run_dir = Path(self.trainer.default_root_dir)
        config_path = run_dir / "config.yaml"
        config = yaml.safe_load(config_path.read_text(encoding="utf-8")) if config_path.is_file() else None
        if not isinstance(config, dict):
            config, config_path = {}, None
        info = training_info(config, config_path, self.pretrained, name, self.trainer.global_step, self.prediction_type)
        adapted = self.family.trainable_text_encoders() if self.text_encoder_lora is not None else ()
        encoders = [getattr(self, n) if n in adapted else None for n in self.family.text_encoders]
        path = Path(out_dir) / f"{name}.safetensors"
        if path.name in (ADAPTER_WEIGHTS, LYCORIS_WEIGHTS):  # a run named after sdtune's own file keeps both
            path = path.with_name(f"{name}-kohya.safetensors")
        if self.lora.type != "lora":  # LyCORIS naming is what these tools read for a LoHa/LoKr
            return save_lycoris(self.family, self.denoiser, path, encoders)
        try:
            save_kohya(path, self.family, self.denoiser, encoders, info)
        except SdtuneError as err:
            rank_zero_info(f"no A1111/ComfyUI file in {out_dir}: {err}")
            return None
        return path
