"""The one exception type users see: a single line that says what is wrong and which setting to change."""


class SdtuneError(Exception):
    """A problem with the user's input (paths, configs, models). The CLI prints it as one line, no traceback."""
