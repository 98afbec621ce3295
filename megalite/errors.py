"""User-facing errors.

Raise :class:`MegaliteError` for bad input (a file, a line, a flag): the command-line entry
points print its message on one line and exit with status 2, never a traceback.
"""


class MegaliteError(Exception):
    """An error caused by the user's input; the message names the file, line or flag."""


class DataFormatError(MegaliteError):
    """A token file (.bin/.idx) or a dataset input is malformed."""


class ConfigError(MegaliteError):
    """A bad setting of a run. ``section``/``name`` say which (None: not one setting);
    ``names`` lists every field of ``section`` the message involves (``(name,)`` by default)."""

    def __init__(self, message: str, section: str | None = None, name: str | None = None,
                 names: tuple[str, ...] | None = None):
        super().__init__(message)
        self.section, self.name = section, name
        self.names = tuple(names) if names is not None else ((name,) if name else ())
