"""The one exception type users see: a single line that says what is wrong and which setting to change."""

import errno
import os
import re

# How every refusal of a `--ckpt_path` file ends.
RESUME_ADVICE = "resume from a checkpoint sdtune wrote, or start fresh without --ckpt_path"
# A full disk, a quota, a read-only filesystem, a file-size limit or missing permissions: the machine refused a write.
WRITE_REFUSED = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM}


class SdtuneError(Exception):
    """A problem with the user's input (paths, configs, models). The CLI prints it as one line, no traceback."""


class SdtuneErrors(SdtuneError):
    """Several independent problems found at once (the checks before training); the CLI prints one line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def first_line(err: BaseException) -> str:
    """An exception's message for a one-line error: its first line, or its type when it has none."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def write_refused(err: BaseException) -> str | None:
    """'<path>: <reason>' when `err` is the machine refusing a write (see WRITE_REFUSED), else None. Libraries
    with their own I/O (safetensors) report it as '... (os error N)' in another exception type."""
    if isinstance(err, OSError):
        if err.errno not in WRITE_REFUSED:
            return None
        reason = err.strerror or first_line(err)
        return f"{err.filename}: {reason}" if err.filename else reason
    found = re.search(r"\(os error (\d+)\)", str(err))
    if found is None or int(found.group(1)) not in WRITE_REFUSED:
        return None
    return os.strerror(int(found.group(1)))


def refused_pickle(err: BaseException | None) -> str | None:
    """What `torch.load(weights_only=True)` refused to unpickle (e.g. "io.open", or "unknown"), or None when neither
    `err` nor an error it was raised from is that refusal (diffusers re-raises it as an OSError)."""
    while err is not None:
        text = str(err)
        if "Weights only load failed" in text:
            found = re.search(r"GLOBAL (\S+)", text)
            return found[1] if found else "unknown"
        err = err.__cause__ or err.__context__
    return None


def pickled_objects(found: str) -> str:
    """The end of a one-line error for a file `refused_pickle` explains."""
    return f"pickled Python objects ({found}) that sdtune will not load, since unpickling them can run code"
