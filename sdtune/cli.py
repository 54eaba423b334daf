"""The `sdtune` command: sets up the process, dispatches through `sdtune.commands.COMMANDS`, and prints every
problem the user can fix as one `sdtune: error:` line (exit code 2) instead of a traceback."""

from __future__ import annotations

import os
import sys

from sdtune.commands import COMMANDS, run
from sdtune.commands.runlog import quiet_console
from sdtune.errors import SdtuneError, SdtuneErrors, write_refused

USAGE = """usage: sdtune <command> [options]

commands:
{commands}

examples:
  sdtune prep build ~/photos/my_dog --out data/my_dog --prefix "sks dog"
  sdtune ls
  sdtune cp sd15/lora my_lora.yaml
  sdtune fit --config sd15/lora --model.pretrained stable-diffusion-v1-5/stable-diffusion-v1-5 \\
             --data.root ./my_dataset --trainer.max_steps 1500 --trainer.default_root_dir runs/my_lora
  sdtune fit --config sd15/lora ... --ckpt_path last        # resume that run
  sdtune sample --model stable-diffusion-v1-5/stable-diffusion-v1-5 --adapter runs/my_lora/adapter:0.8 \\
                --prompt "a photo of sks dog" --seed 0 --seed 1 --out samples/my_lora
  sdtune export runs/my_lora --format kohya --out loras/my_lora.safetensors
  sdtune inspect loras/some_lora.safetensors                 # what a file is and which tools read it

Run `sdtune <command> --help` for a command's options.
"""


def one_line(err: SdtuneError) -> str:
    """The message itself; a DataLoader worker re-raises it with the worker's traceback in front."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1].removeprefix(f"{SdtuneError.__module__}.{SdtuneError.__name__}: ") if lines else type(err).__name__


# Commands that load no model run whatever is installed; `env` reports what is wrong instead of refusing.
NO_VERSION_CHECK = ("ls", "cp", "env", "inspect")


def usage() -> str:
    return USAGE.format(commands="\n".join(f"  {name:<11} {command.summary}" for name, command in COMMANDS.items()))


def main(argv: list[str] | None = None) -> int:
    # DataLoader workers fork after the tokenizers are loaded; their Rust thread pool would warn and deadlock.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_console()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"sdtune: error: unknown command '{command}' (see `sdtune --help` for the commands)", file=sys.stderr)
        return 2
    try:
        if command not in NO_VERSION_CHECK and "-h" not in rest and "--help" not in rest:
            from sdtune.environment import check_requirements

            problems = check_requirements()
            if problems:
                raise SdtuneErrors(problems)
        return run(argv)
    except SdtuneErrors as err:
        for problem in err.problems:
            print(f"sdtune: error: {problem}", file=sys.stderr)
        return 2
    except SdtuneError as err:
        print(f"sdtune: error: {one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # the machine refusing a write; anything else is a bug worth its traceback
        refused = write_refused(err)
        if refused is None:
            raise
        again = "the same command with --ckpt_path last to continue" if command == "fit" else "the command again"
        print(f"sdtune: error: could not write {refused}; free space or fix permissions, then run {again}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sdtune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
