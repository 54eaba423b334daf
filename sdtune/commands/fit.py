"""`sdtune fit` and `sdtune validate`: the command line checked first (`sdtune.commands.precheck`, no torch,
Lightning, diffusers or transformers imported, so a typo costs a fraction of a second), then LightningCLI
(`sdtune.commands.lightning_cli`), with sdtune's run-directory layout and the full checks before any weights load.
"""

from __future__ import annotations

import json
import signal
from contextlib import ExitStack
from typing import Any

from sdtune.commands.precheck import command_line_problems, needs_bitsandbytes
from sdtune.commands.recipes import find_recipe
from sdtune.environment import hidden
from sdtune.errors import SdtuneErrors

FIT_EPILOG = """examples:
  sdtune fit --config sd15/lora --model.pretrained stable-diffusion-v1-5/stable-diffusion-v1-5 \\
             --data.root ./my_dataset --trainer.max_steps 1500 --trainer.default_root_dir runs/my_lora
  sdtune fit --config sd15/lora --config overrides.yaml --model.lora.rank 32 --print_config
  sdtune fit --config sd15/lora ... --ckpt_path last       # resume from runs/my_lora/checkpoints/last.ckpt
  sdtune fit --config sd15/lora ... --trainer.logger+=WandbLogger --trainer.logger.project my_lora \\
             --trainer.logger+=MLFlowLogger --trainer.logger.tracking_uri http://localhost:5000   # + TensorBoard
  sdtune fit --config sd15/lora ... --data.val_fraction 0.1 --trainer.val_check_interval 250 \\
             --trainer.check_val_every_n_epoch null --best_adapters.keep 3 --early_stopping.patience 4
             # adapter/best_step…_loss…/ of the 3 lowest val/loss; stop after 4 validations without a lower one

--config takes a packaged recipe name (see `sdtune ls`) or a YAML path; later configs and flags override earlier.
The run directory (--trainer.default_root_dir) receives config.yaml, sdtune.log (the full log), logs/ (TensorBoard),
checkpoints/ and adapter/. Paths, recipe names and plain numbers are checked before any library is imported.
Progress is shown in optimizer steps of trainer.max_steps, with speed, time left, loss and learning rate.
"""

VALIDATE_EPILOG = """example:
  sdtune validate --config sd15/lora --model.pretrained ./my_model --data.root ./my_dataset \\
                  --data.val_fraction 0.1 --ckpt_path runs/my_lora/checkpoints/last.ckpt
"""


def resolve_configs(args: list[str]) -> list[str]:
    """Let `--config sd15/lora` name a packaged recipe as well as a file."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg in ("--config", "-c") and i + 1 < len(args):
            out += [arg, str(find_recipe(args[i + 1]))]
            i += 2
            continue
        if arg.startswith("--config="):
            arg = "--config=" + str(find_recipe(arg.split("=", 1)[1]))
        out.append(arg)
        i += 1
    return out


NULLS = ("null", "Null", "NULL", "~")  # what YAML reads as null


def nested_nulls(args: list[str]) -> list[str]:
    """`--model.objective.min_snr_gamma null` → `--model.objective '{"min_snr_gamma": null}'`. jsonargparse (4.53)
    hands a null two or more keys below a class_path on to the class's parser as the text "None" (then "Expected a
    float"); a mapping one key below the class_path merges with the values set before, as the flag means."""
    out, i = [], 0
    while i < len(args):
        key, sep, value = args[i].partition("=")
        taken = 1
        if not sep and i + 1 < len(args):
            value, taken = args[i + 1], 2
        root, *keys = key[2:].split(".") if key.startswith(("--model.", "--data.")) else [""]
        keys = keys[1:] if keys[:1] == ["init_args"] else keys
        if value in NULLS and len(keys) >= 2:
            nested: Any = None
            for name in reversed(keys[1:]):
                nested = {name: nested}
            out += [f"--{root}.{keys[0]}", json.dumps(nested)]
            i += taken
        else:
            out.append(args[i])
            i += 1
    return out


def run(subcommand: str, args: list[str]) -> int:
    args = nested_nulls(resolve_configs(args))
    if not any(arg in ("-h", "--help") or arg.startswith("--print_config") for arg in args):
        problems = command_line_problems(args, subcommand)
        if problems:
            raise SdtuneErrors(problems)
    # peft imports bitsandbytes whenever it is installed: seconds, and notices about its CPU kernels, for a run
    # that holds nothing quantized.
    with ExitStack() as stack:
        if not needs_bitsandbytes(args):
            stack.enter_context(hidden("bitsandbytes"))
        return _run_cli(subcommand, args)


def _run_cli(subcommand: str, args: list[str]) -> int:
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from sdtune.callbacks.graceful_stop import received
    from sdtune.commands.lightning_cli import finish_wandb_runs, run_cli

    epilog = FIT_EPILOG if subcommand == "fit" else VALIDATE_EPILOG
    with ExitStack() as locks:  # the run directory's lock, released however the command ends
        try:
            cli = run_cli([subcommand, *args], epilog, locks)
        except SIGTERMException:  # stopped by SIGTERM or Ctrl+C after a checkpoint was saved (GracefulStop)
            return 128 + int(received["signal"] or signal.SIGTERM)
    finish_wandb_runs(cli.trainer.loggers)
    return 0


def fit(args: list[str]) -> int:
    return run("fit", args)


def validate(args: list[str]) -> int:
    return run("validate", args)
