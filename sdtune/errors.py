"""The one exception type users see: a single line that says what is wrong and which setting to change."""

import re


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
