"""The LightningCLI behind `sdtune fit` and `sdtune validate`, with sdtune's run-directory layout.

What sdtune adds to a plain LightningCLI: a ModelCheckpoint (`--checkpoint.*`, `save_last` on) writing to the fixed
folder `<run dir>/checkpoints`, a SaveAdapter callback (`--adapter.*`), a SampleImages callback (`--samples.*`, off
unless the config's `samples:` block or `--samples.enabled true` turns it on), a Throughput callback (`--throughput.*`,
`perf/*` speed and memory logs), an EMA of the trained weights (`--ema.*`, off unless `--ema.enabled true`), a NonFiniteGuard (`--nonfinite.*`: steps with NaN/inf gradients skipped, the run
stopped after N in a row), a GracefulStop (`--graceful_stop.*`: SIGTERM or Ctrl+C saves last.ckpt after the current
batch and exits with 128 + the signal's number), the adapters of the best validations (`--best_adapters.*`), early
stopping (`--early_stopping.*`), a progress line in optimizer steps (`StepProgress`), TensorBoard logs in
`<run dir>/logs` (besides the loggers `--trainer.logger` adds: W&B,
MLflow), the full log in `<run dir>/sdtune.log` (`sdtune.commands.runlog`), the resolved config in `<run dir>/config.yaml` (rewritten on resume), a lock so that one process at a time writes the
run directory (`sdtune.runlock`), and the model's `pretrained` linked to the data
module (with `revision` and `pretrained_config`) so both use the same tokenizer. Checkpoints are written atomically
and verified (`sdtune.finetune.checkpointing`); `--ckpt_path last` resumes from the newest complete one.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import sys
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import set_parsing_settings
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from sdtune.callbacks import SaveRunConfig, StepProgress
from sdtune.commands.precheck import is_file_path
from sdtune.commands.preflight import CALLBACKS, fit_problems, outputs_problems, settings_problems
from sdtune.commands.resume import check_checkpoint
from sdtune.commands.runlog import run_log
from sdtune.errors import SdtuneError, SdtuneErrors
from sdtune.finetune.checkpointing import AtomicCheckpointIO, pick_resume_checkpoint, remove_unfinished
from sdtune.finetune.sharding import resolve_strategy
from sdtune.runlock import RunLock, is_launching_process

UNION_REPORT = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "- Problem with given class_path",
    "- Expected a <class 'NoneType'>",
    "Given value",
)


# The types of a union in jsonargparse's report: "Subtypes: [typing.Literal['16-mixed', ...], <class 'NoneType'>]".
SUBTYPE = re.compile(r"typing\.Literal\[([^]]*)\]|<class '([\w.]+)'>")
TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string", "NoneType": "null"}


def summarize_union_error(message: str) -> str | None:
    """A value no type of a union of plain types takes → `trainer.precision: Expected one of 16-mixed, ..., null. Got
    value: 8-mixed`, keyed as the user wrote it (`model.optimizer.init_args.lr`); None for any other report."""
    keys = list(dict.fromkeys(re.findall(r'Parser key "([^"]+)"', message)))
    if not keys:
        return None
    inner = message[message.rfind(f'Parser key "{keys[-1]}"') :]
    subtypes = re.search(r"^\s*Subtypes: (.*)$", inner, re.MULTILINE)
    given = re.search(r"^\s*Given value: (.*?)(?:\. Got value: .*)?$", inner, re.MULTILINE)
    if subtypes is None or given is None or "Problem with given class_path" in inner[: given.start()]:
        return None
    choices: list[str] = []
    for literal, name in SUBTYPE.findall(subtypes.group(1)):
        choices += [str(value) for value in ast.literal_eval(f"[{literal}]")] if literal else [TYPE_NAMES.get(name, "")]
    choices = [choice for choice in dict.fromkeys(choices) if choice]
    if not choices:
        return None
    nested = re.search(r"Given value: NestedArg\(key='([^']+)', val='(.*)'\)\s*$", message)
    key, value = (f"{keys[0]}.{nested.group(1)}", nested.group(2)) if nested else (".".join(keys), given.group(1))
    if "typing.Literal" in subtypes.group(1):
        expected = f"one of {', '.join(choices)}"
    else:
        expected = ", ".join(choices[:-1]) + (" or " if len(choices) > 1 else "") + choices[-1]
    return f"{key}: Expected {expected}. Got value: {value}"


def summarize_parse_error(message: str) -> str:
    """jsonargparse's nested union report → `model.lora.rank: Expected a <class 'int'>. Got value: abc`."""
    union = summarize_union_error(message)
    if union is not None:
        return union
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    keys: list[str] = []
    details: list[str] = []
    for line in lines:
        key = re.match(r'Parser key "([^"]+)":\s*(.*)', line)
        if key:
            keys.append(key.group(1))
            details = [key.group(2)] if key.group(2) else []
        elif not line.startswith(UNION_REPORT):
            details.append(line)
    reason = details[0].lstrip("- ") if details else (lines[0] if lines else message)
    return f"{'.'.join(dict.fromkeys(keys))}: {reason}" if keys else reason


class SdtuneParser(LightningArgumentParser):
    """Bad values and unknown keys are reported as one line instead of the full usage and union report."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:
            return super().error(message, ex)
        sys.stderr.write(f"sdtune: error: {summarize_parse_error(message)} (see `{self.prog.replace(' [options]', '')} --help`)\n")
        sys.exit(2)


class SdtuneCLI(LightningCLI):
    def __init__(self, *args: Any, locks: ExitStack | None = None, **kwargs: Any) -> None:
        self.locks = locks  # holds the run directory's lock until the command ends
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"}, "validate": {"model", "dataloaders", "datamodule"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for key, callback in CALLBACKS.items():  # in the order they run
            parser.add_lightning_class_args(callback, key)
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 1, "checkpoint.every_n_train_steps": 500})
        parser.set_defaults({"samples.enabled": False, "ema.enabled": False})
        # The DataModule's BucketBatchSampler splits batches between ranks; Lightning must not wrap it.
        parser.set_defaults({"trainer.use_distributed_sampler": False})
        parser.link_arguments("model.init_args.pretrained", "data.init_args.pretrained")
        parser.link_arguments("model.init_args.revision", "data.init_args.revision")
        parser.link_arguments("model.init_args.pretrained_config", "data.init_args.pretrained_config")
        parser.link_arguments("model.init_args.clip_skip", "data.init_args.clip_skip")  # cached text outputs
        parser.link_arguments("data.init_args.cache", "model.init_args.cached_text")
        # Textual inversion: the data module tokenizes captions with the model's new tokens (and their ids).
        parser.link_arguments("model", "data.init_args.added_tokens", compute_fn=added_tokens, apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        """Lightning 2.6's CLI parses the settings a `--ckpt_path` checkpoint recorded over the config here, so the
        checkpoint (an edited one, or one of another run) overrode the command line. sdtune checks the file and
        compares its settings instead, and the config stays as given (`sdtune.commands.resume`).

        `fit --ckpt_path last` is resolved here too, before any weights load: the newest complete checkpoint of the
        run, skipping damaged ones with a warning (Lightning's own "last" would take `last.ckpt` as it is); none
        yet: start from scratch."""
        subcommand = self.config.get("subcommand")
        if subcommand is None:
            return
        config = self.config[subcommand]
        ckpt_path, verified = config.get("ckpt_path"), False
        if subcommand == "fit" and ckpt_path == "last":
            found = pick_resume_checkpoint(checkpoint_folder(config))
            config["ckpt_path"] = ckpt_path = None if found is None else str(found)
            verified = True
            if found is None:
                rank_zero_info("--ckpt_path last: no checkpoint yet, starting from scratch")
        if is_file_path(ckpt_path):
            check_checkpoint(ckpt_path, config, resume=subcommand == "fit", verified=verified)

    def before_instantiate_classes(self) -> None:
        """`fit` checks paths, settings, the model's configs, the data and free disk before any weights load (`validate`
        the Trainer's and callbacks' settings, and that its run directory stays apart from its inputs); then the run
        directory is locked, so a second process on it refuses before loading anything, and its log file (`sdtune.log`,
        `sdtune.commands.runlog`) opens; the checkpoint settings that follow from others are set before the callback is
        built."""
        config = self.config[self.subcommand]
        resolve_strategy(config)  # trainer.strategy fsdp → sdtune.finetune.sharding.FSDP, which runs on CPU too
        problems = fit_problems(config) if self.subcommand == "fit" else [*settings_problems(config), *outputs_problems(config)]
        if problems:
            raise SdtuneErrors(problems)
        if self.locks is not None and is_launching_process():  # DDP ranks re-run this command: the launcher holds it
            root = Path(str(config.get("trainer.default_root_dir") or os.getcwd()))
            self.locks.enter_context(RunLock(root, "trainer.default_root_dir"))
            self.locks.enter_context(run_log(root))
        keys = ("checkpoint.monitor", "best_adapters.keep", "early_stopping.patience")
        by_validation = [f"{key}={config.get(key)}" for key in keys if config.get(key) not in (None, 0)]
        if by_validation and config.get("checkpoint.every_n_train_steps"):
            # A step-triggered save runs before that step's validation: it would be scored with the previous
            # val/loss and hold the best adapters and early-stopping count of before it. Saving when validation
            # ends scores every checkpoint by its own and resumes with what that validation decided.
            config["checkpoint.every_n_train_steps"] = None
            config["checkpoint.every_n_epochs"] = max(1, config.get("checkpoint.every_n_epochs") or 0)
            rank_zero_info(f"{', '.join(by_validation)}: checkpoints are saved after each validation")
        if config.get("ckpt_path") is not None:
            # A resumed run continues the same run: its saves replace last.ckpt (atomically) instead of adding
            # last-v1.ckpt next to a damaged or older last.ckpt. Fresh runs keep Lightning's versioning, and its
            # warning about a checkpoint folder that is not empty, which on a resume is expected.
            config["checkpoint.enable_version_counter"] = False
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")

    def instantiate_classes(self) -> None:
        """jsonargparse wraps errors raised in __init__ into a multi-line parse error; surface ours as they are."""
        try:
            super().instantiate_classes()
        except Exception as err:
            cause = err
            while cause is not None and not isinstance(cause, SdtuneError):
                cause = cause.__cause__ or cause.__context__
            if cause is not None:
                raise cause from None
            raise

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        config = self.config_init[self.subcommand]
        root = Path(config.trainer.default_root_dir or os.getcwd())
        checkpoint: ModelCheckpoint = config.checkpoint
        if checkpoint.dirpath is None:
            checkpoint.dirpath = str(checkpoint_folder(self.config[self.subcommand]))
        if is_launching_process():  # the run's lock is held: what a killed save left is nobody's
            left = remove_unfinished(checkpoint.dirpath)
            if left:
                rank_zero_info(f"removed {len(left)} unfinished checkpoint files left by an earlier run in {checkpoint.dirpath}")
        kwargs["logger"] = with_tensorboard(config.trainer.logger, root)
        callbacks = config.trainer.callbacks
        callbacks = [] if callbacks is None else list(callbacks) if isinstance(callbacks, list) else [callbacks]
        progress = self.subcommand == "fit" and config.trainer.enable_progress_bar is not False
        if progress and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs["callbacks"] = [*callbacks, StepProgress()]  # optimizer steps of max_steps, not batches of an epoch
        plugins = config.trainer.plugins
        if plugins is None or (isinstance(plugins, list) and not any(is_checkpoint_io(p) for p in plugins)):
            kwargs["plugins"] = [*(plugins or []), AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)


def with_tensorboard(logger: Any, root: Path) -> Any:
    """The run's loggers: TensorBoard in `<run dir>/logs` (what `sdtune report` reads) first, then the configured
    ones (`--trainer.logger`: one logger or a list, e.g. W&B and MLflow) unless they include a TensorBoardLogger;
    `false` logs nothing."""
    if logger is False:
        return False
    given = [] if logger in (None, True) else list(logger) if isinstance(logger, (list, tuple)) else [logger]
    if any(isinstance(each, TensorBoardLogger) for each in given):
        return given
    return [TensorBoardLogger(save_dir=str(root), name="logs", version=""), *given]


def finish_wandb_runs(loggers: list[Any]) -> None:
    """Lightning leaves a W&B run open after fit (for more logging); the command's run ends with the command, so
    its files are complete and a next command in the same process (`sdtune demo`) starts a run of its own."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()


def checkpoint_folder(config: Any) -> Path:
    """Where the run's checkpoints go: checkpoint.dirpath, or `checkpoints/` in the run directory."""
    dirpath = config.get("checkpoint.dirpath")
    if dirpath:
        return Path(str(dirpath)).expanduser()
    return Path(os.path.realpath(Path(str(config.get("trainer.default_root_dir") or os.getcwd())) / "checkpoints"))


def added_tokens(model: Any) -> dict[str, int]:
    """The tokens a model added to its tokenizer, with their ids ({} for methods that add none)."""
    return dict(getattr(model, "added_tokens", {}) or {})


def is_checkpoint_io(plugin: Any) -> bool:
    from lightning.fabric.plugins import CheckpointIO

    return isinstance(plugin, CheckpointIO)


# Expected with frozen encoders, or when a dataset has no validation split.
QUIET = [
    r".*module\(s\) in eval mode at the start of training.*",
    r"Total length of .* across ranks is zero.*",
    r".*LightningCLI's args parameter is intended to run from within Python.*",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # inside Lightning's own pytree helpers
    # The DataModule saves the sampler's position itself (CaptionDataModule.state_dict), not the loader.
    r"You're resuming from a checkpoint that ended before the epoch ended and your dataloader is not resumable.*",
]


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings meant for the user (long captions, missing masks) as one line, without the source line."""
    return f"warning: {message}\n"


def run_cli(args: list[str], epilog: str, locks: ExitStack | None = None) -> SdtuneCLI:
    # The settings dataclasses document each field with a docstring under it; show those in --help.
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    for pattern in QUIET:
        warnings.filterwarnings("ignore", message=pattern)
    warnings.formatwarning = one_line_warning
    subcommand = args[0]
    return SdtuneCLI(
        model_class=L.LightningModule,
        datamodule_class=L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_class=SdtuneParser,
        save_config_callback=SaveRunConfig,
        auto_configure_optimizers=False,
        parser_kwargs={subcommand: {"epilog": epilog, "formatter_class": argparse.RawDescriptionHelpFormatter}},
        args=args,
        locks=locks,
    )
