"""A checkpoint given to `sdtune fit` or `sdtune validate` (`--ckpt_path`) is read, never obeyed.

Lightning's CLI would apply the settings a checkpoint recorded over the config and the command line; here the
config wins. Before any weights load, the file is checked (`read_checkpoint`: complete, written by torch.save,
tensors and plain values only) and its recorded settings are compared with the config's: a setting that fixes what
the trained tensors are (the method, a LoRA's rank, alpha and targets, …: each method's `fixed_on_resume`) must be
the same, or the run stops with one line naming it and both values; any other difference (the objective, the
schedule, the paths) is reported in one line and the config's value is used.
"""

from __future__ import annotations

import json
from importlib import import_module
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info

from sdtune.errors import SdtuneError
from sdtune.finetune import METHODS
from sdtune.finetune.base import plain
from sdtune.finetune.checkpointing import read_checkpoint


def check_checkpoint(path: str | Path, config: Any, resume: bool, verified: bool = False) -> None:
    """Refuse, in one line, a checkpoint `path` that cannot be read safely or whose recorded settings conflict with
    the parsed config (`config`, the subcommand's Namespace); report the settings the config changes. `resume`: it
    must hold the optimizer state too (fit). `verified`: its zip checksums were just checked."""
    what = f"--ckpt_path {path}"
    checkpoint = read_checkpoint(path, what, resume=resume, verified=verified)
    saved = dict(checkpoint.get("hyper_parameters") or {})
    class_path = str(config.get("model.class_path") or "")
    if not saved or not class_path.startswith("sdtune."):
        return  # not written by an sdtune method, or a config with someone else's class: nothing known to compare
    module, name = class_path.rsplit(".", 1)
    method = getattr(import_module(module), name)
    saved_class = str(saved.pop("_class_path", ""))
    saved.pop("_instantiator", None)  # what LightningCLI adds to rebuild the module; not a setting
    if saved_class and METHODS.get(saved_class) is not method:
        written_by = METHODS[saved_class].__name__ if saved_class in METHODS else saved_class
        raise SdtuneError(
            f"model.class_path: {what} was written by a {written_by} run, the config trains {method.__name__}; resume "
            "with the config of the run that wrote it, or start fresh without --ckpt_path"
        )
    changes = changed_settings(saved, plain(config.model.get("init_args")), "model")
    fixed = [f"model.{key}" for key in getattr(method, "fixed_on_resume", ())]
    for key, was, now in changes:
        if any(key == setting or setting.startswith(f"{key}.") for setting in fixed):
            raise SdtuneError(
                f"{key}: {what} was trained with {show(was)}, the config has {show(now)}; the trained weights only fit "
                f"the setting they were trained with: set {key} to {show(was)} to resume, or start fresh without --ckpt_path"
            )
    if changes:
        listed = ", ".join(f"{key} {show(was)} → {show(now)}" for key, was, now in changes)
        rank_zero_info(f"resuming with the config's settings where they differ from the checkpoint's: {listed}")


def changed_settings(saved: Any, configured: Any, key: str) -> list[tuple[str, Any, Any]]:
    """Where the settings a checkpoint recorded differ from the config's, as (key, checkpoint's, config's): the
    deepest keys that differ, or the key where only one side is a mapping (a null adapter against a set one). Keys
    only one side has are left out (a checkpoint of an older sdtune records fewer)."""
    if isinstance(saved, dict) and isinstance(configured, dict):
        return [change for name in configured if name in saved
                for change in changed_settings(saved[name], configured[name], f"{key}.{name}")]  # fmt: skip
    return [] if _comparable(saved) == _comparable(configured) else [(key, saved, configured)]


def _comparable(value: Any) -> Any:
    """Lists and tuples alike, paths as strings: the forms a value takes in a checkpoint and in a parsed config."""
    if isinstance(value, dict):
        return {key: _comparable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_comparable(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def show(value: Any) -> str:
    """A setting as a config spells it: null, true, 4.0, ["to_q", "to_k"]."""
    value = _comparable(value)
    return str(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else json.dumps(value)
