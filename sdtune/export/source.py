"""What `sdtune export` reads: a run directory, a training checkpoint, or an adapter file/folder — turned into the
base pipeline with the adapter attached (peft adapter "default" on the UNet and, if trained, the text encoder),
plus what is known about the training for the file's metadata."""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from sdtune.adapters.files import ADAPTER_WEIGHTS, LYCORIS_WEIGHTS, adapter_file
from sdtune.adapters.kohya import TrainingInfo, lora_layers, training_info
from sdtune.adapters.lycoris import lycoris_layers
from sdtune.errors import SdtuneError, first_line
from sdtune.models.families import ModelFamily, family_of_pipeline

ADAPTER = "default"
EMBEDDINGS_ONLY = ("{} trained new-token embeddings alone (TextualInversion), so there is no LoRA to export; they are "
                   "in adapter/embeddings/ (diffusers) and adapter/embeddings_a1111/ (A1111), checked when written")
# A last.ckpt this much newer than adapter/ comes from training that went on after the adapter was written.
UNFINISHED_AFTER_S = 60


@dataclass
class Adapted:
    """The base pipeline with the adapter under export attached, and where it came from."""

    pipe: object  # the family's text-to-image pipeline
    pretrained: str
    revision: str | None
    pretrained_config: str | None  # configs of a single-file `pretrained`
    described: str  # "runs/x/checkpoints/last.ckpt (step 300)", for messages
    info: TrainingInfo
    run_dir: Path | None = None  # the run the source belongs to, when known (its samples go into model cards)

    @property
    def family(self) -> ModelFamily:
        return family_of_pipeline(self.pipe)

    @property
    def text_encoders(self) -> list:
        """Each of the model's text encoders (SDXL: two), None where it carries no adapter."""
        encoders = [getattr(self.pipe, name) for name in self.family.text_encoders]
        return [encoder if lora_layers(encoder, ADAPTER) or lycoris_layers(encoder, ADAPTER) else None for encoder in encoders]


@dataclass
class RunRecord:
    """The run a source belongs to: its saved config (config.yaml) and checkpoint, when they exist."""

    config: dict
    config_path: Path | None
    checkpoint: Path | None

    @classmethod
    def around(cls, path: Path) -> RunRecord:
        """Look for `config.yaml` in `path` and up to two parents (adapter/step_000500/ sits two below the run)."""
        for folder in [path, *path.parents[:3]]:
            config = folder / "config.yaml"
            if config.is_file():
                try:
                    loaded = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
                except yaml.YAMLError:
                    continue
                if isinstance(loaded, dict) and "model" in loaded:
                    last = folder / "checkpoints" / "last.ckpt"
                    return cls(loaded, config, last if last.is_file() else None)
        return cls({}, None, None)

    @property
    def run_dir(self) -> Path | None:
        return self.config_path.parent if self.config_path else None

    def get(self, *keys, default=None):
        value = self.config
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                return default
            value = value[key]
        return value

    def model_arg(self, key, default=None):
        return self.get("model", "init_args", key, default=default)


def _read_checkpoint(path: Path) -> dict:
    from sdtune.finetune.checkpointing import unpickling_error

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise unpickling_error(str(path), err, "export a checkpoint sdtune wrote") from err
    except Exception as err:  # zip and storage errors have no common base class
        raise SdtuneError(f"{path}: not a readable checkpoint ({first_line(err)})") from err
    if not isinstance(checkpoint, dict) or "_class_path" not in checkpoint.get("hyper_parameters", {}):
        raise SdtuneError(f"{path}: not an sdtune training checkpoint (no recorded model class)")
    return checkpoint


def _module_from_checkpoint(checkpoint: dict, path: Path, pretrained: str | None, pretrained_config: str | None):
    from sdtune.finetune import METHODS, LoRAFineTune, TextualInversion

    hparams = dict(checkpoint["hyper_parameters"])
    class_path = str(hparams.pop("_class_path"))
    hparams.pop("_instantiator", None)  # what LightningCLI adds to rebuild the module; not an argument
    cls = METHODS.get(class_path)  # a method sdtune knows, never a class a file names
    if cls is None:
        raise SdtuneError(f"{path}: not an sdtune training checkpoint (its model class is {class_path})")
    if cls is TextualInversion:
        raise SdtuneError(EMBEDDINGS_ONLY.format(path))
    if not issubclass(cls, LoRAFineTune):
        raise SdtuneError(f"{path} is a {cls.__name__} checkpoint: a full fine-tune has no adapter to export (its model/ folder is a diffusers pipeline)")
    # Export and check at full precision, on the unquantized base (a QLoRA adapter is the same tensors).
    hparams.update(weight_dtype="float32", gradient_checkpointing=False)
    if "quantize" in hparams:
        hparams["quantize"] = None
    hparams.pop("init_adapter", None)  # the checkpoint holds the trained weights; the starting file may be gone
    if pretrained is not None:
        hparams.update(pretrained=pretrained, pretrained_config=pretrained_config)
    module = cls(**hparams)
    module.on_load_checkpoint(checkpoint)  # one-line error when the tensors do not fit
    module.load_state_dict(checkpoint["state_dict"], strict=False)
    return module


def _pipeline_of(module):
    from sdtune.models.pretrained import load_inference_scheduler

    scheduler = load_inference_scheduler(module.pretrained, module.revision, module.pretrained_config)
    return module.parts.pipeline(module.objective.inference_scheduler(scheduler))


def _pick_in_run(run_dir: Path) -> Path:
    """A run's final adapter; its last checkpoint when there is no adapter or the checkpoint was written well after
    it (a resumed run that did not finish). Lightning writes last.ckpt just after the adapter at a normal end."""
    adapter = adapter_file(run_dir / "adapter")
    last = run_dir / "checkpoints" / "last.ckpt"
    if (run_dir / "model" / "model_index.json").is_file() and not adapter.is_file():
        raise SdtuneError(f"{run_dir} is a full fine-tune: its model/ folder already is a diffusers pipeline")
    if (run_dir / "adapter" / "embeddings").is_dir() and not adapter.is_file():
        raise SdtuneError(EMBEDDINGS_ONLY.format(run_dir))
    if adapter.is_file() and (not last.is_file() or last.stat().st_mtime < adapter.stat().st_mtime + UNFINISHED_AFTER_S):
        return adapter
    if last.is_file():
        return last
    raise SdtuneError(f"{run_dir} has neither adapter/{ADAPTER_WEIGHTS} nor checkpoints/last.ckpt")


def load_source(source: str | Path, model: str | None = None, model_config: str | None = None) -> Adapted:
    """Resolve SOURCE (run dir, .ckpt, adapter folder or .safetensors file) into an `Adapted`."""
    path = Path(source).expanduser()
    if not path.exists():
        raise SdtuneError(f"{source} does not exist (pass a run directory, a checkpoint or an adapter)")
    run = RunRecord.around(path if path.is_dir() else path.parent)
    if path.is_dir() and (path / "config.yaml").is_file():
        path = _pick_in_run(path)
    elif path.is_dir():
        if not adapter_file(path).is_file():
            raise SdtuneError(f"{source} has no {ADAPTER_WEIGHTS} (pass a run directory, a checkpoint or an adapter)")
        path = adapter_file(path)
    # Named after the run, else the adapter (a file sdtune names after its folder: they all have one name).
    title = run.config_path.parent.name if run.config_path else path.parent.name if path.name in (ADAPTER_WEIGHTS, LYCORIS_WEIGHTS) else path.stem
    if path.suffix == ".ckpt":
        checkpoint = _read_checkpoint(path)
        module = _module_from_checkpoint(checkpoint, path, model, model_config)
        step = checkpoint.get("global_step")
        pipe = _pipeline_of(module)
        info = training_info(run.config, run.config_path, module.pretrained, title, step, module.prediction_type)
        described = f"{path} (step {step})"
        return Adapted(pipe, module.pretrained, module.revision, module.pretrained_config, described, info, run.run_dir)
    return _from_adapter_file(path, run, model, model_config, title)


# The adapter folders a run writes by step: `step_000500` (adapter.every_n_train_steps) and
# `best_step000500_loss0.1234` (best_adapters.keep).
STEP_FOLDER = re.compile(r"step_(\d+)|best_step(\d+)_loss.+")


def _steps_of(path: Path, run: RunRecord) -> int | None:
    by_step = STEP_FOLDER.fullmatch(path.parent.name)
    if by_step:
        return int(by_step.group(1) or by_step.group(2))
    if run.checkpoint is not None:
        try:
            return torch.load(run.checkpoint, map_location="cpu", weights_only=True, mmap=True).get("global_step")
        except Exception:  # the step only feeds metadata; an unreadable checkpoint just leaves it out
            return None
    return run.get("trainer", "max_steps")


def _from_adapter_file(path: Path, run: RunRecord, model: str | None, model_config: str | None, title: str) -> Adapted:
    from sdtune.inference.sampling import load_lora_file
    from sdtune.models.pretrained import load_pipeline

    pretrained = model or run.model_arg("pretrained")
    if pretrained is None:
        raise SdtuneError(f"{path} is not inside a run directory, so its base model is unknown: pass --model")
    revision, config = (run.model_arg("revision"), run.model_arg("pretrained_config")) if model is None else (None, model_config)
    pipe = load_pipeline(pretrained, revision=revision, pretrained_config=config)
    from sdtune.finetune.base import as_settings
    from sdtune.finetune.objective import Objective

    objective = as_settings(Objective, run.model_arg("objective") or {})
    prediction_type = objective.prediction_type
    pipe.scheduler = objective.inference_scheduler(pipe.scheduler)
    load_lora_file(pipe, path, ADAPTER, what="SOURCE", model=pretrained)
    # A flow-matching model's scheduler has no prediction type: it learns the velocity ("flow").
    prediction_type = prediction_type or pipe.scheduler.config.get("prediction_type", "flow")
    info = training_info(run.config, run.config_path, pretrained, title, _steps_of(path, run), prediction_type)
    return Adapted(pipe, pretrained, revision, config, str(path), info, run.run_dir)
