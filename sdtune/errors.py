"""The one exception type users see: a single line that says what is wrong and which setting to change."""


class SdtuneError(Exception):
    """A problem with the user's input (paths, configs, models). The CLI prints it as one line, no traceback."""


def first_line(err: BaseException) -> str:
    """An exception's message for a one-line error: its first line, or its type when it has none."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
