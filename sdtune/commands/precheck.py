"""Checks `sdtune fit` and `sdtune validate` run on the command line and its config files alone, before torch,
Lightning, diffusers or transformers are imported: importing them takes 10-30 s, these checks milliseconds, so a
typo in a path or a number costs no more than `--help`.

What is checked, every problem one line: the config files parse; the folders and files the run reads exist
(`model.pretrained` and `model.pretrained_config` when they are paths rather than Hub ids, the data folders,
`model.init_adapter`, `--ckpt_path`); the run directory is not a file; plain numbers lie in their domains
(`DOMAINS`); keeping the best adapters or stopping early has a validation loss to go by (fit). Each rule is written
once, here or in a light module, and `sdtune.commands.preflight` applies the same ones to the parsed config, with
the classes' own checks, as the backstop for what is only known after parsing (defaults, values a flag spells
differently, settings of classes named in the config).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import yaml

from sdtune.errors import RESUME_ADVICE, SdtuneError
from sdtune.paths import model_name_problem

PRETRAINED_UNSET = "model.pretrained is not set: pass a diffusers directory, Hub id or single file"
# `--ckpt_path` values Lightning resolves itself, rather than files.
NAMED_CHECKPOINTS = ("last", "best", "hpc", "registry")
# Plain numbers with a lower bound, by the key users write (`init_args` left out): below it, or not a number, is one
# line "KEY must be DOMAIN, got VALUE". Trainer settings Lightning takes without a check are here too, though a value
# outside these domains fails only after the model has loaded (accumulate_grad_batches 0: a division by zero) or
# quietly does something else (a negative gradient_clip_val flips the gradients' sign; check_val_every_n_epoch 0
# divides by zero at the first epoch's end).
DOMAINS: dict[str, tuple[float, str]] = {
    "trainer.max_steps": (-1, "an integer ≥ -1 (-1: no limit)"),
    "trainer.max_epochs": (-1, "an integer ≥ -1 (-1: no limit) or null"),
    "trainer.accumulate_grad_batches": (1, "an integer ≥ 1"),
    "trainer.gradient_clip_val": (0, "a number ≥ 0 (0 or null: no clipping)"),
    "trainer.log_every_n_steps": (0, "an integer ≥ 0 (0: no step logs)"),
    "trainer.check_val_every_n_epoch": (1, "an integer ≥ 1 or null"),
    "trainer.num_sanity_val_steps": (-1, "an integer ≥ -1 (-1: the whole validation set)"),
    "trainer.min_steps": (0, "an integer ≥ 0 or null"),
    "trainer.min_epochs": (0, "an integer ≥ 0 or null"),
    "data.batch_size": (1, "at least 1"),
    "data.resolution": (1, "positive"),
    "data.num_workers": (0, "0 or more"),
    "model.optimizer.lr": (0, "a number ≥ 0"),
}
# A Python import path (`torch.optim.AdamW`): the classes a config names.
IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")
# Classes whose modules import no optional library (bitsandbytes) on their own.
KNOWN_MODULES = ("sdtune.", "torch.", "lightning.")


def domain_problem(key: str, value: Any) -> str | None:
    """`value` of a `DOMAINS` key outside its domain (or not a number), as one line; None when it is fine or null."""
    low, domain = DOMAINS[key]
    if value is None:
        return None
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or number < low:
        return f"{key} must be {domain}, got {value}"
    return None


def input_paths(model: Any, data: Any) -> list[tuple[str, Any]]:
    """The data folders and the starting adapter a run reads, by the key that names them (None when not set);
    `model` and `data` answer `.get(key)` (the parsed config's init_args, or `Section` of the command line)."""
    paths = [("data.root", data.get("root")), ("data.val_root", data.get("val_root")),
             ("data.mask_dir", data.get("mask_dir")), ("model.init_adapter", model.get("init_adapter"))]  # fmt: skip
    for i, subset in enumerate(data.get("subsets") or []):
        get = subset.get if isinstance(subset, dict) else lambda key, default=None: getattr(subset, key, default)
        if not get("generate", 0):  # a folder of class images still to generate is made by the run
            paths.append((f"data.subsets[{i}].root", get("root")))
    return [(key, None if value is None else str(value)) for key, value in paths]


def path_problems(model: Any, data: Any) -> list[str]:
    """Each input path that does not exist, and each data folder that is a file."""
    problems = []
    for key, value in input_paths(model, data):
        if value is None:
            continue
        path = Path(value).expanduser()
        if not path.exists():
            problems.append(f"{key} '{value}' does not exist")
        elif key.startswith("data.") and not path.is_dir():
            problems.append(f"{key} '{value}' is a file, not a folder")
    return problems


def run_dir_problem(root: Any) -> str | None:
    if root is not None and Path(str(root)).expanduser().is_file():
        return f"trainer.default_root_dir '{root}' is a file; the run directory is a folder (or does not exist yet)"
    return None


def is_file_path(ckpt_path: Any) -> bool:
    """A path to a local file, not one of Lightning's names nor a remote URL."""
    text = str(ckpt_path)
    return bool(ckpt_path) and text not in NAMED_CHECKPOINTS and not text.startswith("registry:") and "://" not in text


# --- the command line as written --------------------------------------------------------------------------------


class Section:
    """The settings under one key (`model`, `data`) with `.get` as on a parsed config's init_args."""

    def __init__(self, settings: dict[str, Any], name: str) -> None:
        self.settings, self.name = settings, name

    def get(self, key: str, default: Any = None) -> Any:
        return self.settings.get(f"{self.name}.{key}", default)


def _flatten(value: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    """Nested mappings as dotted keys, without jsonargparse's `init_args` level."""
    if isinstance(value, dict):
        for key, inner in value.items():
            if key == "init_args":
                yield from _flatten(inner, prefix)
            else:
                yield from _flatten(inner, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, value


def _read_config(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as file:
            loaded = yaml.safe_load(file)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise SdtuneError(f"--config {path} is not valid YAML{where}: {getattr(err, 'problem', None) or err}") from err
    except OSError as err:
        raise SdtuneError(f"--config {path} could not be read: {err.strerror or err}") from err
    if loaded is not None and not isinstance(loaded, dict):
        raise SdtuneError(f"--config {path} holds no settings: expected a YAML mapping (`trainer:`, `model:`, ...)")
    return loaded or {}


def command_line_settings(args: list[str]) -> dict[str, Any]:
    """The settings `--config` files and `--key value` flags give, later ones winning, by dotted key without
    `init_args` (`model.lora.rank`); values as YAML reads them, as jsonargparse does. `--config` names files here
    (recipe names are resolved before)."""
    settings: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("--"):
            continue
        key, sep, text = arg[2:].partition("=")
        if not sep:
            if i >= len(args) or args[i].startswith("--"):
                continue  # a flag without a value
            text, i = args[i], i + 1
        if key in ("config", "c"):
            settings.update(_flatten(_read_config(text), ""))
            continue
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        key = ".".join(part for part in key.split(".") if part != "init_args")
        if isinstance(value, str) and f"{key}.class_path" in settings:
            key += ".class_path"  # `--model.optimizer X`: another class for a setting the configs gave one
        settings.update(_flatten(value, key) if isinstance(value, dict) else [(key, value)])
    return settings


def command_line_problems(args: list[str], subcommand: str = "fit") -> list[str]:
    """Every problem `--config` files and flags show without importing a library (see the module's doc)."""
    settings = command_line_settings(args)
    model, data = Section(settings, "model"), Section(settings, "data")
    problems = []
    if "model.pretrained" in settings and model.get("pretrained") is None:
        problems.append(PRETRAINED_UNSET)
    for key in ("pretrained", "pretrained_config"):
        if model.get(key) is not None:
            problems.append(model_name_problem(str(model.get(key)), f"model.{key}"))
    problems += path_problems(model, data)
    problems.append(run_dir_problem(settings.get("trainer.default_root_dir")))
    ckpt_path = settings.get("ckpt_path")
    if is_file_path(ckpt_path) and not Path(str(ckpt_path)).expanduser().exists():
        problems.append(f"--ckpt_path {ckpt_path}: the file does not exist; {RESUME_ADVICE}")
    problems += [domain_problem(key, settings.get(key)) for key in DOMAINS]
    if subcommand == "fit":
        problems += validation_problems(settings)
    return [problem for problem in problems if problem]


def validation_problems(settings: dict[str, Any]) -> list[str]:
    """Keeping the best adapters and stopping early go by the validation loss: refused when there is none. (Values
    out of range are the callbacks' own to refuse.)"""
    if settings.get("data.val_fraction") or settings.get("data.val_root"):
        return []
    asked = [key for key in ("best_adapters.keep", "early_stopping.patience") if _positive(settings.get(key))]
    return [f"{key} {settings[key]} needs a validation loss: set data.val_fraction (e.g. 0.1) or data.val_root" for key in asked]


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def needs_bitsandbytes(args: list[str]) -> bool:
    """Whether the run may use bitsandbytes: QLoRA (`model.quantize`), or a class from a module other than
    sdtune's, torch's or Lightning's (an 8-bit optimizer, a user's callback), whose imports are not known here."""
    settings = command_line_settings(args)
    if settings.get("model.quantize") is not None:
        return True
    optimizer = settings.get("model.optimizer.class_path") or settings.get("model.optimizer")
    if isinstance(optimizer, str) and "." not in optimizer:
        return True  # a short class name, resolved among the optimizers imported by then
    names = [text for text in _strings(list(settings.values())) if IMPORT_PATH.match(text)]
    return any(not name.startswith(KNOWN_MODULES) for name in names)


def _strings(value: Any) -> Iterator[str]:
    """Every string in a value, inside lists and mappings too (`trainer.callbacks`' class paths)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        yield from _strings(list(value.values()))
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
