"""The one exception type a user can cause, and how it is worded."""

from __future__ import annotations


class ZoplanError(Exception):
    """Bad input or an impossible request.

    The CLI prints the message and exits with ``status`` (2), never a traceback. Messages name the
    file, the field path and what would fix it.
    """

    def __init__(self, message: str, *, fix: str | None = None, status: int = 2) -> None:
        self.message = message
        self.fix = fix
        self.status = status  # the CLI's exit status (2; a run stopped by a signal: 128 + its number)
        super().__init__(message if fix is None else f"{message}\n  fix: {fix}")
