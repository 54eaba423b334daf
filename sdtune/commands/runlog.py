"""What reaches the console, and the run's log file (`<run dir>/sdtune.log`).

Libraries print notices a user cannot act on (`NOISE`): which optional backends are missing, advertisements,
messages that hold no information. They are kept out of the console. `fit` and `validate` write them, with every
other log line (INFO and up) and every warning, to the run's log file; the notices of the imports that come before
the run directory is known are held until it opens. Commands without a run directory drop them.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# By logger: a fragment of the messages that are noise ("" for all of them).
NOISE = {
    # Optional backends sdtune does not use (torchvision image processors) or does not need to be fast (bitsandbytes'
    # 4-bit CPU kernels, from the `kernels` package, when a run holds its model in nf4 on a CPU).
    "transformers.utils.import_utils": "",
    "bitsandbytes.backends.cpu.ops": "",
    "kernels": "",
    # Lightning's advertisements for its cloud services (litlogger, litmodels).
    "lightning.pytorch.utilities.rank_zero": "💡 Tip:",
    "lightning.fabric.utilities.rank_zero": "💡 Tip:",
    # An adapter without text-encoder layers; a cast with nothing to keep in float32.
    "diffusers.loaders.lora_base": "No LoRA keys associated to",
    "diffusers.loaders.peft": "No LoRA keys associated to",
    "diffusers.models.modeling_utils": "should be kept in float32: [].",
}
LOG_NAME = "sdtune.log"
HELD = 500  # noise kept for a log file not open yet; older lines are dropped
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Loggers that do not pass their lines on to the root logger (Lightning prints its own): the log file listens there too.
OWN_HANDLERS = ("lightning.pytorch", "lightning.fabric")

_held: list[logging.LogRecord] = []
_file: list[logging.Handler] = []  # the open run log, if any


class Divert(logging.Filter):
    """Keeps a logger's noise off the console: into the open run log, or held until one opens. Errors pass."""

    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR or self.fragment not in record.getMessage():
            return True
        if _file:
            _file[0].handle(record)
        else:
            _held.append(record)
            del _held[:-HELD]
        return False


def quiet_console() -> None:
    """Divert every logger's noise (`NOISE`); once per process."""
    for name, fragment in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, Divert) and f.fragment == fragment for f in logger.filters):
            logger.addFilter(Divert(fragment))


@contextmanager
def run_log(folder: Path) -> Iterator[Path]:
    """`folder/sdtune.log` (appended to) receives, until the block ends, the held noise and then every log line and
    warning of the process; the console shows what it showed before."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOG_NAME
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.setLevel(logging.INFO)
    for record in _held:
        handler.handle(record)
    _held.clear()
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in OWN_HANDLERS if not logging.getLogger(name).propagate)]
    for logger in loggers:
        logger.addHandler(handler)
    show = warnings.showwarning

    def show_and_log(message, category, filename, lineno, file=None, line=None):
        show(message, category, filename, lineno, file, line)
        handler.handle(logging.makeLogRecord({"name": "py.warnings", "levelno": logging.WARNING, "levelname": "WARNING",
                                              "msg": f"{category.__name__}: {message} ({filename}:{lineno})"}))  # fmt: skip

    warnings.showwarning = show_and_log
    _file.append(handler)
    try:
        yield path
    finally:
        _file.remove(handler)
        warnings.showwarning = show
        for logger in loggers:
            logger.removeHandler(handler)
        handler.close()
