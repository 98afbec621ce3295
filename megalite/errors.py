"""User-facing errors.

Raise :class:`MegaliteError` for bad input (a file, a line, a flag): the command-line entry
points print its message on one line and exit with status 2, never a traceback.
"""


class MegaliteError(Exception):
    """An error caused by the user's input; the message names the file, line or flag."""


class DataFormatError(MegaliteError):
    """A token file (.bin/.idx) or a dataset input is malformed."""
