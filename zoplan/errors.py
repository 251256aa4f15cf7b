"""The one exception type a user can cause, and how it is worded."""
from __future__ import annotations


class ZoplanError(Exception):
    """Bad input or an impossible request.

    The CLI prints the message and exits with status 2, never a traceback. Messages name the
    file, the field path and what would fix it.
    """

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        self.message = message
        self.fix = fix
        super().__init__(message if fix is None else f"{message}\n  fix: {fix}")
