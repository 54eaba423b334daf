"""Checks `sdtune fit` runs on the parsed config before any weights are loaded, so a bad setting costs seconds, not
the minutes of loading a model (or the hours until the first checkpoint), and every problem is reported at once.

What is checked, each problem one line naming the key to change:
- paths: the model (a directory with its subfolders, a Hub id, or a single file with its configs), the data folders
  (root, subsets, val_root, mask_dir), model.init_adapter;
- outputs apart from inputs: the run directory is none of those paths nor inside one, and what the run writes in it
  (config.yaml, logs, checkpoints, adapter or model, samples) holds none of them;
- loggers whose package is an extra of sdtune's (W&B, MLflow): installed; MLflow's local folder store allowed;
- settings the classes check themselves (the DataModule's arguments, the LoRA shapes, the Trainer's, the optimizer's
  and every callback's), with the classes' own validators: each class is built with the settings (the Trainer without
  loggers or callbacks, the optimizer on a one-number parameter), and again after each refusal with the refused
  setting back at its default, so every problem is collected instead of only the first; the few Trainer settings
  Lightning takes unchecked are checked against their domains (`sdtune.commands.precheck.DOMAINS`, which also
  checks them on the command line before anything is imported);
- against the model built from its configs on the meta device (no weights): data.resolution and data.bucket_step
  divisible by the VAE's downscaling, every LoRA target module present in the UNet and the text encoders (the check
  `add_lora` runs);
- the data: images found, and an epoch with at least one batch per device and at least
  trainer.accumulate_grad_batches batches per device (buckets counted when data.buckets is on);
- free disk space for the checkpoints this run will keep.
"""

from __future__ import annotations

import inspect
import logging
import math
import re
import shutil
import warnings
from contextlib import contextmanager
from importlib import import_module
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Callable

from lightning.pytorch.callbacks import ModelCheckpoint

from sdtune.adapters.lora import check_targets
from sdtune.callbacks import (
    EMA,
    BestAdapters,
    EarlyStop,
    GracefulStop,
    NonFiniteGuard,
    SampleImages,
    SaveAdapter,
    Throughput,
)
from sdtune.commands.precheck import (
    DOMAINS,
    PRETRAINED_UNSET,
    domain_problem,
    input_paths,
    path_problems,
    run_dir_problem,
    validation_problems,
)
from sdtune.commands.runlog import LOG_NAME
from sdtune.errors import SdtuneError, first_line
from sdtune.models.pretrained import model_skeleton, size_multiple
from sdtune.paths import check_output_apart

GB = 1024**3


def fit_problems(config: Any) -> list[str]:
    """Every problem found in a parsed `sdtune fit` config (a jsonargparse Namespace); [] when it looks runnable."""
    model_class, data_class = str(config.get("model.class_path") or ""), str(config.get("data.class_path") or "")
    problems = settings_problems(config)
    if not (model_class.startswith("sdtune.") and data_class == "sdtune.data.CaptionDataModule"):
        return problems  # someone else's classes: nothing more known to check
    model, data = config.model.init_args, config.data.init_args

    def check(step: Callable[[], Any]) -> Any:
        try:
            return step()
        except SdtuneError as err:
            problems.append(first_line(err))
            return None

    source = check(lambda: _model_source(model))
    lora = check(lambda: _lora_settings(model)) if "lora" in model else None
    text_lora = check(lambda: _text_encoder_lora(model))
    problems += path_problems(model, data)
    problems += validation_problems({"data.val_fraction": data.get("val_fraction"), "data.val_root": data.get("val_root"),
                                     "best_adapters.keep": config.get("best_adapters.keep"),
                                     "early_stopping.patience": config.get("early_stopping.patience")})  # fmt: skip
    problems += outputs_problems(config)
    datamodule = check(lambda: _instantiate(data_class, data))
    if source is not None:
        skeleton = check(lambda: model_skeleton(str(model.pretrained), model.get("revision"), model.get("pretrained_config")))
        if skeleton is not None:
            multiple, why = size_multiple(skeleton.family, skeleton.denoiser.config, skeleton.vae_scale_factor)
            check(lambda: _check_vae_factor(multiple, data, why))
            if lora is not None:
                lora = lora.for_family(skeleton.family)
                denoiser = "the UNet" if skeleton.family.denoiser == "unet" else f"the {skeleton.family.denoiser}"
                check(lambda: check_targets(skeleton.denoiser, lora, denoiser))
            if text_lora is not None:
                for encoder in [skeleton.components[name] for name in skeleton.family.trainable_text_encoders()]:
                    check(lambda encoder=encoder: check_targets(encoder, text_lora, "the text encoder"))
            if "objective" in model:
                check(lambda: _objective(model).check_for(skeleton.family.objective, skeleton.family.label))
            check(lambda: _check_disk(config, skeleton.denoiser, lora))
    if datamodule is not None and not any(p.startswith(("data.root", "data.subsets", "data.val_root")) for p in problems):
        check(lambda: _check_batches(config, datamodule))
    return list(dict.fromkeys(problems))  # SDXL's two text encoders can fail the same way


# --- Trainer, optimizer and callback settings --------------------------------------------------------------------

# The callbacks `sdtune fit` adds, by the config key of their settings, in the order they run (Throughput first: its
# batch-end timing then stops before the others save or sample).
CALLBACKS = {"checkpoint": ModelCheckpoint, "throughput": Throughput, "nonfinite": NonFiniteGuard,
             "graceful_stop": GracefulStop, "adapter": SaveAdapter, "best_adapters": BestAdapters,
             "early_stopping": EarlyStop, "samples": SampleImages, "ema": EMA}  # fmt: skip
# Loggers whose package comes with an extra of sdtune's of the same name (pyproject.toml), by class name.
LOGGER_EXTRAS = {"WandbLogger": "wandb", "MLFlowLogger": "mlflow"}
# What the domain is where the class's own message only says the value is wrong.
DOMAIN_HINTS = {"devices": "a positive integer, -1 (all), 'auto' or a list of device indices", "lr": "a number ≥ 0",
                "eps": "a number ≥ 0", "weight_decay": "a number ≥ 0", "momentum": "a number ≥ 0",
                "betas": "two numbers in [0, 1)"}  # fmt: skip
# Messages that name a setting in words: torch.optim's ("Invalid learning rate: -1"), Lightning's for max_time (its
# Timer's) and for a GPU accelerator on a machine without one.
OPTIMIZER_WORDS = {"learning rate": "lr", "epsilon": "eps", "beta": "betas"}
TRAINER_WORDS = {"timer(duration=": "max_time", "gpu backend": "accelerator"}


def settings_problems(config: Any) -> list[str]:
    """The Trainer's, the optimizer's and the callbacks' settings, each checked by its class (see the module's doc)."""
    problems = [*_logger_problems(config.get("trainer.logger")), *_trainer_problems(config.get("trainer"))]
    for key, cls in CALLBACKS.items():
        if config.get(key) is not None:
            problems += _refusals(cls, dict(vars(config.get(key))), key)
    for i, callback in enumerate(config.get("trainer.callbacks") or []):
        class_path = str(_get(callback, "class_path") or "")
        if class_path.startswith("lightning."):  # Lightning's own callbacks are safe to build twice; others may not be
            init_args = _get(callback, "init_args")
            problems += _refusals(_import(class_path), dict(vars(init_args)) if init_args else {}, f"trainer.callbacks[{i}].init_args")
    optimizer = config.get("model.init_args.optimizer")
    if optimizer is not None and _get(optimizer, "class_path"):
        try:
            problems += _optimizer_problems(config.model.init_args, optimizer)
        except Exception:  # noqa: BLE001 - an optimizer that cannot be built on a CPU number is left to the run
            pass
    return problems


def _get(value: Any, key: str) -> Any:
    return value.get(key) if isinstance(value, dict) else getattr(value, key, None)


def _import(class_path: str) -> Any:
    module, name = class_path.rsplit(".", 1)
    return getattr(import_module(module), name)


def _refusals(build: Callable[..., Any], settings: dict[str, Any], prefix: str, errors: tuple[type, ...] = (Exception,),
              words: dict[str, str] | None = None) -> list[str]:  # fmt: skip
    """Every setting `build` refuses, one line each: built with `settings`, then again after each refusal with the
    refused setting back at its default. A refusal naming no setting (or one of sdtune's own errors, which name
    their key) ends the search."""
    defaults = {name: p.default for name, p in inspect.signature(build).parameters.items() if p.default is not p.empty}
    settings, problems = dict(settings), []
    for _ in range(len(settings) + 1):
        try:
            with _quiet():
                build(**settings)
            return problems
        except SdtuneError as err:
            return [*problems, first_line(err)]
        except errors as err:
            message = first_line(err)
            key = _named_setting(message, [k for k in settings if k in defaults and settings[k] != defaults[k]], words or {})
            if key is None:
                return [*problems, f"{prefix}: {message}"]
            hint = f" (takes {DOMAIN_HINTS[key]})" if key in DOMAIN_HINTS else ""
            problems.append(f"{prefix}.{key} {_shown(settings[key])}: {message}{hint}")
            settings[key] = defaults[key]
    return problems


def _named_setting(message: str, keys: list[str], words: dict[str, str]) -> str | None:
    """The setting a class's error message is about: quoted (`key`, key=...), else named (the longest such name),
    else in words."""
    for pattern in (r"`{}`|(?<![\w.]){}=", r"(?<![\w.]){}(?!\w)"):
        for key in sorted(keys, key=len, reverse=True):
            if re.search(pattern.format(re.escape(key), re.escape(key)), message):
                return key
    lowered = message.lower()
    return next((key for word, key in words.items() if word in lowered and key in keys), None)


def _shown(value: Any) -> str:
    return "null" if value is None else str(list(value) if isinstance(value, tuple) else value)


@contextmanager
def _quiet():
    """Building a Trainer reports the devices it found and warns about choices; the real one will say it again."""
    level = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(level)


def _logger_problems(logger: Any) -> list[str]:
    """A logger whose package is an optional extra of sdtune's and not installed (Lightning would fail on it after the
    model has loaded)."""
    loggers = logger if isinstance(logger, (list, tuple)) else [logger]
    problems = []
    for each in loggers:
        name = str(_get(each, "class_path") or "").rsplit(".", 1)[-1]
        if name in LOGGER_EXTRAS and find_spec(LOGGER_EXTRAS[name]) is None:
            extra = LOGGER_EXTRAS[name]
            problems.append(f"trainer.logger: {name} needs the {extra} package: pip install 'sdtune[{extra}]'")
        elif name == "MLFlowLogger":
            problems += _mlflow_store_problems(_get(each, "init_args") or {})
    return problems


def _mlflow_store_problems(init_args: Any) -> list[str]:
    """MLflow 3 refuses a local folder as its tracking store (Lightning's default, `./mlruns`) unless
    MLFLOW_ALLOW_FILE_STORE is set: after the model has loaded, with a traceback. (Versions without the setting take
    a folder.)"""
    try:
        from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
    except ImportError:
        return []
    from lightning.pytorch.loggers.mlflow import LOCAL_FILE_URI_PREFIX, MLFlowLogger

    defaults = inspect.signature(MLFlowLogger.__init__).parameters  # the store Lightning picks when none is given
    uri = _get(init_args, "tracking_uri") or defaults["tracking_uri"].default
    uri = str(uri or f"{LOCAL_FILE_URI_PREFIX}{_get(init_args, 'save_dir') or defaults['save_dir'].default}")
    local = "://" not in uri or uri.startswith(LOCAL_FILE_URI_PREFIX)
    if local and not MLFLOW_ALLOW_FILE_STORE.get():
        return [f"trainer.logger: MLflow refuses the local folder {uri} as its store unless MLFLOW_ALLOW_FILE_STORE=true "
                "is set; set it, or give --trainer.logger.tracking_uri http://your-mlflow-server"]
    return []


def _trainer_problems(trainer: Any) -> list[str]:
    from lightning.pytorch import Trainer

    if trainer is None:
        return []
    settings = {key: value for key, value in vars(trainer).items() if key in inspect.signature(Trainer).parameters}
    problems = []
    for key in [key for key in DOMAINS if key.startswith("trainer.")]:
        problem = domain_problem(key, settings.get(key.removeprefix("trainer.")))
        if problem is not None:
            problems.append(problem)
            settings.pop(key.removeprefix("trainer."))
    # What needs building from its class_path (loggers, callbacks, plugins; a strategy or profiler given as a class) is
    # left out: the settings are checked, not the objects.
    for key in ("logger", "callbacks", "plugins", "strategy", "profiler"):
        if key in settings and not (key in ("strategy", "profiler") and isinstance(settings[key], str)):
            settings.pop(key)
    return [*problems, *_refusals(Trainer, {**settings, "logger": False}, "trainer", words=TRAINER_WORDS)]


def _optimizer_problems(model: Any, optimizer: Any) -> list[str]:
    """model.optimizer's settings, and each learning rate the model sets for a group of its own (a text encoder's,
    new tokens'), checked by building the optimizer on one number: torch.optim checks its arguments when built, but
    not a parameter group's."""
    import torch

    cls = _import(str(_get(optimizer, "class_path")))
    init_args = _get(optimizer, "init_args")
    settings = dict(vars(init_args)) if init_args else {}

    def build(**kwargs: Any) -> Any:
        return cls([torch.nn.Parameter(torch.zeros(1))], **kwargs)

    build.__signature__ = inspect.signature(cls)  # the optimizer's defaults, for `_refusals`
    problems = _refusals(build, settings, "model.optimizer.init_args", (ValueError,), OPTIMIZER_WORDS)
    if problems:
        return problems
    for key, lr in _group_lrs(model):
        try:
            build(**{**settings, "lr": lr})
        except ValueError as err:
            problems.append(f"{key} {lr}: {first_line(err)} (takes {DOMAIN_HINTS['lr']}, as model.optimizer's lr)")
    return problems


def _group_lrs(model: Any) -> list[tuple[str, float]]:
    """The model's own learning rates: `*_lr` settings and the `lr` of its settings blocks (text_encoder_lora, ...)."""
    found = []
    for key, value in vars(model).items():
        if key.endswith("_lr") and isinstance(value, (int, float)):
            found.append((f"model.{key}", value))
        elif value is not None and not isinstance(value, (str, int, float, list, tuple)) and key != "optimizer":
            lr = _get(value, "lr")
            if isinstance(lr, (int, float)):
                found.append((f"model.{key}.lr", lr))
    return found


# --- the model ----------------------------------------------------------------------------------------------------


def _model_source(model: Any):
    from sdtune.models.pretrained import resolve_source

    if not model.get("pretrained"):
        raise SdtuneError(PRETRAINED_UNSET)
    return resolve_source(str(model.pretrained), model.get("revision"), model.get("pretrained_config"))


def _lora_settings(model: Any):
    from sdtune.adapters.lora import LoraSettings
    from sdtune.finetune.base import as_settings

    return as_settings(LoraSettings, model.get("lora"))


def _objective(model: Any):
    from sdtune.finetune.base import as_settings
    from sdtune.finetune.objective import Objective

    return as_settings(Objective, model.get("objective"))


def _text_encoder_lora(model: Any):
    from sdtune.adapters.lora import TextEncoderLora
    from sdtune.finetune.base import as_settings

    return as_settings(TextEncoderLora, model.get("text_encoder_lora"))


def _check_vae_factor(factor: int, data: Any, why: str = "the VAE's downscaling") -> None:
    resolution = int(data.get("resolution") or 0)
    if resolution % factor:
        raise SdtuneError(
            f"data.resolution {resolution} is not a multiple of {factor}, {why}; use e.g. "
            f"{max(factor, resolution // factor * factor)}"
        )
    step = int(data.get("bucket_step") or 0)
    if data.get("buckets") and step % factor:
        raise SdtuneError(f"data.bucket_step {step} is not a multiple of {factor}, {why}")


# --- paths and data -----------------------------------------------------------------------------------------------


def _run_outputs(config: Any, root: Path) -> list[tuple[str, Path, str]]:
    """What a run writes (name, path, the setting that moves it): config.yaml, sdtune.log, logs, checkpoints, the adapter (or
    model) folder and its EMA twin, samples."""
    output = getattr(_import(str(config.get("model.class_path"))), "output_dirname", "adapter")
    saved = config.get("adapter.dirname") or output
    samples = config.get("samples.dirname") or "samples"
    setting = "trainer.default_root_dir"
    entries = ("config.yaml", LOG_NAME, "logs", saved, f"{output}_ema", samples)  # EMA's folder keeps the method's name
    outputs = [(f"the run's {entry}", root / entry, setting) for entry in entries]
    dirpath = config.get("checkpoint.dirpath")
    if dirpath:
        return [*outputs, ("checkpoint.dirpath", Path(str(dirpath)).expanduser(), "checkpoint.dirpath")]
    return [*outputs, ("the run's checkpoints", root / "checkpoints", setting)]


def outputs_problems(config: Any) -> list[str]:
    """The run directory is none of the run's inputs (model, configs, data, init adapter) and lies inside none; what
    the run writes there contains none either. Shared by `fit` and `validate`, which both write a run directory."""
    from sdtune.paths import local_model_path

    model_class, data_class = str(config.get("model.class_path") or ""), str(config.get("data.class_path") or "")
    if not (model_class.startswith("sdtune.") and data_class == "sdtune.data.CaptionDataModule"):
        return []
    model, data = config.model.init_args, config.data.init_args
    inputs = [("model.pretrained", local_model_path(model.get("pretrained"))),
              ("model.pretrained_config", local_model_path(model.get("pretrained_config"))), *input_paths(model, data)]  # fmt: skip
    root = Path(str(config.get("trainer.default_root_dir") or Path.cwd())).expanduser()
    if run_dir_problem(root) is not None:
        return [run_dir_problem(root)]
    try:
        check_output_apart(root, inputs, "trainer.default_root_dir", may_contain=True)
        for name, path, setting in _run_outputs(config, root):
            check_output_apart(path, inputs, name, setting=setting)
    except SdtuneError as err:
        return [first_line(err)]
    return []


def _instantiate(class_path: str, init_args: Any):
    return _import(class_path)(**dict(vars(init_args)))


def _devices(config: Any) -> int:
    devices, nodes = config.get("trainer.devices", 1), int(config.get("trainer.num_nodes") or 1)
    if isinstance(devices, (list, tuple)):
        count = len(devices)
    elif isinstance(devices, int) or (isinstance(devices, str) and devices.lstrip("-").isdigit()):
        count = int(devices)
        if count == -1:
            count = _available_devices(config)
    else:  # "auto"
        count = _available_devices(config)
    return max(1, count) * nodes


def _available_devices(config: Any) -> int:
    import torch

    accelerator = str(config.get("trainer.accelerator") or "auto")
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.cuda.device_count()
    return 1


def _check_batches(config: Any, datamodule: Any) -> None:
    """Finds the records the run will train on (no tokenizer, no weights) and counts batches per device."""
    from sdtune.data.bucket_sampler import BucketBatchSampler

    pairs = datamodule.training_pairs(announce=False, skipped=[])  # setup() warns about what it leaves out
    if datamodule.val_root is None and datamodule.val_fraction > 0:
        pairs, _ = datamodule.split(pairs)
    records = [record for record, repeats in pairs for _ in range(repeats)]
    batch_size = datamodule.batch_size
    sampler = BucketBatchSampler(datamodule.assign_buckets(records), batch_size, datamodule.seed)
    batches, bucket_count = sampler.total_batches, len(sampler.groups)
    devices = _devices(config)
    per_device = batches // devices
    accumulate = int(config.get("trainer.accumulate_grad_batches") or 1)
    made = f"{len(records)} samples make {batches} batch{'es' if batches != 1 else ''} of data.batch_size {batch_size}"
    if bucket_count > 1:
        made += f" in {bucket_count} buckets"
    if per_device == 0:
        raise SdtuneError(f"{made}, fewer than the {devices} devices; lower data.batch_size or use fewer devices")
    if per_device < accumulate:
        raise SdtuneError(
            f"{made}: {per_device} per device, fewer than trainer.accumulate_grad_batches {accumulate}, so no "
            "optimizer step would see a whole accumulation; lower it or data.batch_size, or add images"
        )


# --- disk -----------------------------------------------------------------------------------------------------------


def _trainable_params(config: Any, unet: Any, lora: Any) -> int:
    import torch

    if lora is None:  # a full fine-tune trains every UNet weight
        return sum(p.numel() for p in unet.parameters())
    total = 0
    targets = set(lora.target_modules)
    conv_targets = set(lora.conv_target_modules) if lora.conv_rank else set()
    for name, module in unet.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        matches = {t for t in targets | conv_targets if name == t or name.endswith("." + t) or leaf == t}
        if not matches:
            continue
        if isinstance(module, torch.nn.Linear) and matches & targets:
            total += lora.rank * (module.in_features + module.out_features)
        elif isinstance(module, torch.nn.Conv2d) and matches & conv_targets:
            k = module.kernel_size[0] * module.kernel_size[1]
            total += lora.conv_rank * (module.in_channels * k + module.out_channels)
    return total


def _check_disk(config: Any, unet: Any, lora: Any) -> None:
    params = _trainable_params(config, unet, lora)
    # fp32 weights + AdamW's two moments in each checkpoint; last.ckpt plus the kept top-k files.
    per_file = params * 4 * 3
    files = 1 + max(0, int(config.get("checkpoint.save_top_k") if config.get("checkpoint.save_top_k") is not None else 1))
    need = per_file * files * 1.1 + 64 * 1024**2  # and room for adapters, logs, samples
    root = Path(str(config.get("trainer.default_root_dir") or ".")).expanduser().absolute()
    existing = next(p for p in (root, *root.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < need:
        raise SdtuneError(
            f"{existing} has {free / GB:.1f} GB free, but this run's checkpoints need about {math.ceil(need / GB * 10) / 10:.1f} "
            f"GB ({files} files of {per_file / GB:.2f} GB); free some space, set trainer.default_root_dir elsewhere or "
            "lower checkpoint.save_top_k"
        )
