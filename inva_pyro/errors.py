"""Errors that mean "the user gave us something wrong", as opposed to a bug."""

from __future__ import annotations

class InputError(Exception):
    """A user mistake: bad file, bad column, mismatched space, ...

    The message is one line naming the offending file (or column) and the problem,
    e.g. ``manifest.csv: duplicate subject id 'sub-003'``. The CLI prints it as
    ``inva: error: <message>`` and exits with status 2, without a traceback.
    """

    def __init__(self, message: str):
        # Messages often embed text from other libraries (nibabel, pandas) that may span
        # several lines; the CLI contract promises a single line, so fold them here once.
        one_line = " ".join(str(message).split())
        super().__init__(one_line)
