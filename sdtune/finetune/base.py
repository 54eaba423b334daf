"""What every training method shares: the model loaded by its family with every part frozen, the optimizer and LR
schedule, reproducible randomness, and lean checkpoints. Each method (`diffusion.py` and its subclasses, `vae.py`)
unfreezes what it trains and defines its loss.

Checkpoints hold what resumes training and nothing else: `state_dict()` is the trainable parameters and the
method's own persistent buffers (the frozen base is reloaded from `pretrained`), so `strict_loading` is off.

The random draws of a training step come from one generator per sample, seeded by (noise seed, epoch, dataset
index), the key the DataModule's samples carry. A sample's draws are then the same whatever batch, batch size,
process or resume it is trained in, so two processes with batch b train like one with batch b and two accumulated
batches. A batch without keys (built by hand) draws from `noise_generator`, which this module owns and checkpoints.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

import lightning as L
import torch
from diffusers.optimization import get_scheduler
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info

from sdtune.data.dataset import derive_seed
from sdtune.errors import SdtuneError
from sdtune.finetune.checkpointing import resume_after_last_batch
from sdtune.finetune.rng_state import gather_states, restore_states
from sdtune.models import ModelParts, load_model
from sdtune.models.families import FAMILIES

SCHEDULES_NEEDING_LENGTH = ("cosine", "cosine_with_restarts", "linear", "polynomial")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LRSchedule:
    """Learning-rate schedule, stepped every optimizer step (diffusers' `get_scheduler`)."""

    name: Literal["constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "polynomial"] = (
        "constant_with_warmup"
    )
    """Shape after warmup; cosine/linear/polynomial decay to zero at the run's last step (needs trainer.max_steps)."""
    warmup_steps: int = 0
    """Linear warmup from 0 over this many optimizer steps."""
    num_cycles: int = 1
    """Hard restarts for cosine_with_restarts."""

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise SdtuneError(f"model.lr_schedule.warmup_steps must be ≥ 0, got {self.warmup_steps}")
        if self.num_cycles < 1:
            raise SdtuneError(f"model.lr_schedule.num_cycles must be ≥ 1, got {self.num_cycles}")


def as_settings(cls, value):
    """A settings dataclass from a dict (Python callers) or a parsed config's Namespace (pre-flight checks)."""
    if value is None or isinstance(value, cls):
        return value
    return cls(**(value if isinstance(value, dict) else vars(value)))


def plain(value: Any) -> Any:
    """Settings as plain types (dataclasses and Namespaces as dicts), so a checkpoint's hyperparameters load with
    `torch.load(weights_only=True)`."""
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if hasattr(value, "__dict__") and type(value).__name__ == "Namespace":
        return {k: plain(v) for k, v in vars(value).items()}
    return value


class ModelFineTune(L.LightningModule):
    """Base of the training methods: a model loaded by its family (`sdtune.models.families`), every part frozen.

    Args:
        pretrained: Diffusers model directory or Hugging Face Hub id, e.g. stable-diffusion-v1-5/stable-diffusion-v1-5,
            or a single-file checkpoint in the original layout (.safetensors or .ckpt, as AUTOMATIC1111 uses).
        revision: Hub revision (branch, tag or commit) of `pretrained`, or of `pretrained_config` for a single file.
        variant: Weight file variant of `pretrained`, e.g. "fp16" (not used for a single file).
        pretrained_config: For a single-file `pretrained` only: the diffusers directory or Hub id whose configs,
            tokenizer and scheduler describe it (same architecture), e.g. stable-diffusion-v1-5/stable-diffusion-v1-5.
            Only its json/txt files are needed; the weights come from the file. Ignored for a directory or Hub id.
        optimizer: Optimizer (class_path + init_args): torch.optim.AdamW, bitsandbytes.optim.AdamW8bit,
            prodigyopt.Prodigy, transformers.optimization.Adafactor, …
        lr_schedule: Step-wise learning-rate schedule with warmup.
        weight_dtype: Dtype of the frozen weights (VAE, text encoder, LoRA base UNet); trainable ones stay float32.
        gradient_checkpointing: Recompute the denoiser's activations in the backward pass: less memory, ~30 % slower.
        channels_last: Keep the UNet's (and VAE's) 4-D tensors in NHWC layout: faster convolutions on recent GPUs
            (tensor cores), usually slower on CPU.
        compile: `torch.compile` the denoiser in place (names and saved files unchanged): faster steps on GPU after a
            compilation of minutes at the first step; the attention already uses PyTorch's fused SDPA kernels.
        noise_seed: Seed of each sample's random draws (latents, noise, timesteps); null takes seed_everything's value.
        cached_text: The text encoders' outputs come from the data's cache (`sdtune fit` links it to data.cache):
            text encoders that do not train then stay on the CPU, out of the accelerator's memory (they only encode
            the sample prompts), which for SD3 and Flux keeps T5-XXL's 9.5 GB off the GPU.
    """

    output_dirname: ClassVar[str] = "adapter"  # where SaveAdapter writes `save_weights` output inside the run directory
    mismatch_hint: ClassVar[str] = "was it written by another kind of run?"  # ends the error when a checkpoint does not fit
    # Settings that fix what a checkpoint's trained tensors are (their shapes, or how they act on the model): a resume
    # with other values is refused (`sdtune.commands.resume`); every other setting is the config's on resume.
    fixed_on_resume: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        pretrained: str,
        revision: str | None = None,
        variant: str | None = None,
        pretrained_config: str | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_schedule: LRSchedule = LRSchedule(),
        weight_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        gradient_checkpointing: bool = False,
        channels_last: bool = False,
        compile: bool = False,
        noise_seed: int | None = None,
        cached_text: bool = False,
    ) -> None:
        super().__init__()
        # Every __init__ argument of the method (its own and these), as plain types; `_class_path` lets LightningCLI
        # read them back from `--ckpt_path`. The optimizer is a factory, not a setting that can be stored.
        self.save_hyperparameters(ignore=["optimizer"])
        for key, value in list(self.hparams.items()):
            self.hparams[key] = plain(value)
        self.hparams["_class_path"] = f"{type(self).__module__}.{type(self).__qualname__}"
        self.lr_schedule = as_settings(LRSchedule, lr_schedule)
        if weight_dtype not in DTYPES:
            raise SdtuneError(f"model.weight_dtype must be one of {', '.join(DTYPES)}, got '{weight_dtype}'")
        self.pretrained, self.revision, self.pretrained_config = pretrained, revision, pretrained_config
        self.optimizer_factory = optimizer
        self.weight_dtype = DTYPES[weight_dtype]
        self.noise_seed, self.cached_text = noise_seed, cached_text
        self._initial_seed = torch.initial_seed()  # seed_everything's value: LightningCLI seeds before building
        self.strict_loading = False  # checkpoints hold what trains; the frozen base comes from `pretrained`

        parts = load_model(
            pretrained, revision=revision, variant=variant, dtype=self.weight_dtype, denoiser_dtype=self.denoiser_dtype,
            pretrained_config=pretrained_config,
        )  # fmt: skip
        self.family, self.options, self.noise_scheduler = parts.family, parts.options, parts.noise_scheduler
        self.vae_scale_factor = parts.vae_scale_factor
        for name, component in parts.components.items():  # vae, unet, text_encoder(s) as submodules; tokenizers
            setattr(self, name, component)
        for frozen in (self.vae, self.denoiser, *self.text_encoders):
            frozen.requires_grad_(False)
        self.vae.eval()
        for encoder in self.text_encoders:
            encoder.eval()
        if gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
        if channels_last:
            self.denoiser.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
        if compile:
            self.denoiser.compile()  # nn.Module.compile: in place, so parameter names (and checkpoints) stay the same
        self.noise_generator: torch.Generator | None = None
        self._pending_generator_state: torch.Tensor | None = None
        # Other weights to sample with (a callback's, e.g. the EMA's): a name for logs and a context that swaps them
        # in. Callbacks meet here rather than reaching for each other.
        self.sampling_weights: tuple[str, Callable[[], AbstractContextManager]] | None = None

    @property
    def denoiser_dtype(self) -> torch.dtype:
        """Dtype the denoiser is loaded in: frozen-weight dtype by default; methods that train it override this."""
        return self.weight_dtype

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network that denoises (the UNet), under its pipeline name."""
        return getattr(self, self.family.denoiser)

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        """The model's text encoders: one for SD1/2, two for SDXL."""
        return [getattr(self, name) for name in self.family.text_encoders]

    @property
    def tokenizers(self) -> list[Any]:
        return [getattr(self, name) for name in self.family.tokenizers]

    @property
    def parts(self) -> ModelParts:
        """The model's components as they are now (trained ones included), e.g. to build a pipeline from them."""
        names = [name for name in self.family.components() if name != "scheduler"]
        return ModelParts(self.family, {name: getattr(self, name) for name in names}, self.noise_scheduler, self.options)

    def weights_for_sampling(self) -> tuple[str | None, AbstractContextManager]:
        """(name, context) of the weights samples are drawn with: the trained ones (None, nothing swapped), or those
        a callback set in `sampling_weights`."""
        if self.sampling_weights is None:
            return None, nullcontext()
        name, swap = self.sampling_weights
        return name, swap()

    @property
    def text_encoder_trains(self) -> bool:
        return any(p.requires_grad for encoder in self.text_encoders for p in encoder.parameters())

    def train(self, mode: bool = True) -> ModelFineTune:
        """Lightning switches the whole module to train mode; frozen encoders stay in eval."""
        super().train(mode)
        self.vae.eval()
        for encoder in self.text_encoders:
            encoder.train(mode and any(p.requires_grad for p in encoder.parameters()))
        return self

    # --- training hooks --------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        self._make_generator(self.trainer.strategy.root_device)
        if self.cached_text:
            self.keep_frozen_text_encoders_on_cpu()

    def keep_frozen_text_encoders_on_cpu(self) -> None:
        """Take the text encoders that do not train out of the module tree, so moving the module to the device
        leaves them on the CPU (they hold no trained weights, so checkpoints do not change)."""
        for name in self.family.text_encoders:
            encoder = self._modules.get(name)
            if encoder is not None and not any(p.requires_grad for p in encoder.parameters()):
                del self._modules[name]
                self.__dict__[name] = encoder.to("cpu")

    def on_fit_start(self) -> None:
        # from_pretrained returns modules in eval mode and Lightning keeps the mode it finds; LoRA dropout (and any
        # dropout in the UNet) needs train mode. `train` keeps the frozen encoders in eval.
        self.train()

    def on_train_start(self) -> None:
        """A resume restores the optimizer and its schedule with the learning rates the checkpoint's run had; the
        config's win, as every other setting does, at the point of the schedule the run has reached."""
        configured = getattr(self, "_configured_lrs", None)
        scheduler = self.lr_schedulers()
        if not configured or not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            return  # diffusers' schedules are all LambdaLR; an optimizer configured elsewhere is left as it is
        changed = []
        for i, (group, lr) in enumerate(zip(self.optimizers(use_pl_optimizer=False).param_groups, configured)):
            if group.get("initial_lr", lr) == lr:
                continue
            changed.append(f"{group.get('name', i)} {group['initial_lr']:g} → {lr:g}")
            group["initial_lr"] = scheduler.base_lrs[i] = lr
            group["lr"] = scheduler._last_lr[i] = lr * scheduler.lr_lambdas[i](scheduler.last_epoch)
        if changed:
            rank_zero_info(f"learning rate from the config, not the checkpoint: {', '.join(changed)}")

    def validation_generator(self, batch: dict[str, Any], batch_idx: int) -> torch.Generator | list[torch.Generator]:
        """Fixed draws per validation sample (dataset index; per batch index for a batch without keys), whatever
        the seed, epoch or batch size, so validation curves (and adapters) compare like with like."""
        keys = batch.get("sample_key")
        if keys is None:
            return torch.Generator(self.device).manual_seed(1_000_003 + batch_idx)
        return [torch.Generator(self.device).manual_seed(derive_seed("validation", index)) for _, index in keys]

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups; a group's own "lr" overrides the optimizer's. "name" labels the LR logs."""
        return [{"name": self.family.denoiser, "params": [p for p in self.denoiser.parameters() if p.requires_grad]}]

    def text_encoder_groups(self, lr: float | None) -> list[dict[str, Any]]:
        """Each text encoder's trainable weights as a parameter group named after it, with its own `lr` unless None."""
        groups = []
        for name, encoder in zip(self.family.text_encoders, self.text_encoders):
            group = {"name": name, "params": [p for p in encoder.parameters() if p.requires_grad]}
            if lr is not None:
                group["lr"] = lr
            groups.append(group)
        return groups

    def configure_optimizers(self) -> dict[str, Any]:
        groups = [group for group in self.parameter_groups() if group["params"]]
        optimizer = self.optimizer_factory(groups)
        if any(group.get("lr") is None for group in optimizer.param_groups):
            raise SdtuneError(
                "model.optimizer has no lr (e.g. Adafactor with relative_step: true), but model.lr_schedule scales one: "
                "set relative_step: false and an lr"
            )
        self._configured_lrs = [group["lr"] for group in optimizer.param_groups]  # see on_train_start
        total = self.trainer.estimated_stepping_batches
        if self.lr_schedule.name in SCHEDULES_NEEDING_LENGTH and not math.isfinite(total):
            raise SdtuneError(f"model.lr_schedule.name={self.lr_schedule.name} needs a run length: set trainer.max_steps")
        # diffusers' "constant" ignores warmup; here warmup always applies and `name` is the shape after it.
        name = "constant_with_warmup" if self.lr_schedule.name == "constant" else self.lr_schedule.name
        scheduler = get_scheduler(
            name,
            optimizer,
            num_warmup_steps=self.lr_schedule.warmup_steps,
            num_training_steps=int(total) if math.isfinite(total) else None,
            num_cycles=self.lr_schedule.num_cycles,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- checkpoints and export ------------------------------------------------------------------------------

    def state_dict(self, *args: Any, destination: dict | None = None, prefix: str = "", keep_vars: bool = False) -> dict:
        """What resumes training: the trainable parameters and the persistent buffers of this module itself
        (registered on it, not inside the loaded model parts). The frozen base is not in it."""
        out = OrderedDict() if destination is None else destination
        for name, param in self.named_parameters():
            if param.requires_grad:
                out[prefix + name] = param if keep_vars else param.detach()
        for name, buffer in self._buffers.items():
            if buffer is not None and name not in self._non_persistent_buffers_set:
                out[prefix + name] = buffer if keep_vars else buffer.detach()
        return out

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Every rank's random states (see sdtune.finetune.rng_state), and the model family the weights belong to.
        checkpoint["sdtune"] = {"rng": gather_states(self._rng()), "family": self.family.name}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        family = checkpoint.get("sdtune", {}).get("family", self.family.name)  # older checkpoints do not record it
        if family != self.family.name:
            label = next((f.label for f in FAMILIES if f.name == family), family)
            raise SdtuneError(
                f"model.pretrained: the checkpoint was trained for {label}, {self.pretrained} is {self.family.label}; "
                "resume with the model it was trained on"
            )
        saved = checkpoint.get("state_dict", {})
        own = self.state_dict(keep_vars=True)
        missing = [name for name in own if name not in saved]
        if missing:
            raise SdtuneError(f"checkpoint has no weights for {len(missing)} trainable tensors (e.g. {missing[0]}); {self.mismatch_hint}")
        for name, tensor in own.items():
            if saved[name].shape != tensor.shape:
                raise SdtuneError(f"checkpoint tensor {name} has shape {tuple(saved[name].shape)}, this model {tuple(tensor.shape)}: {self.mismatch_hint}")
        resume_after_last_batch(checkpoint)
        step, epoch = checkpoint.get("global_step"), checkpoint.get("epoch")
        rank_zero_info(f"resuming after optimizer step {step} (epoch {epoch})")
        extra = checkpoint.get("sdtune", {})
        if "rng" in extra:
            world_size, rank = (self.trainer.world_size, self.trainer.global_rank) if self._trainer else (1, 0)
            state = restore_states(extra["rng"], rank, world_size)
        else:  # written before per-rank states: the noise generator alone
            state = extra.get("generator")
        if state is not None:
            self._pending_generator_state = state
            if self.noise_generator is not None:
                self.noise_generator.set_state(state)

    def save_weights(self, out_dir: str | Path) -> Path:
        """Write what this run trained into `out_dir`; returns the main file or folder written."""
        raise NotImplementedError

    # --- randomness ------------------------------------------------------------------------------------------

    def step_generator(self, batch: dict[str, Any]) -> torch.Generator | list[torch.Generator]:
        """Where a training batch's draws come from: a generator per sample, seeded by its (epoch, index) key; the
        module's own generator for a batch without keys."""
        keys = batch.get("sample_key")
        if keys is None:
            return self._rng()
        seed = self.seed
        return [torch.Generator(self.device).manual_seed(derive_seed(seed, "noise", *key)) for key in keys]

    @property
    def seed(self) -> int:
        """`noise_seed`, or the seed of torch's global generator when the module was built."""
        return self.noise_seed if self.noise_seed is not None else self._initial_seed

    def _make_generator(self, device: torch.device) -> None:
        rank = self.trainer.global_rank if self._trainer is not None else 0
        self.noise_generator = torch.Generator(device).manual_seed((self.seed + rank) % 2**63)
        if self._pending_generator_state is not None:
            self.noise_generator.set_state(self._pending_generator_state)

    def _rng(self) -> torch.Generator:
        if self.noise_generator is None or self.noise_generator.device.type != self.device.type:
            self._make_generator(self.device)
        return self.noise_generator
