"""The one exception type a user can cause, and how it is worded."""

from __future__ import annotations

import difflib
from pathlib import Path
from collections.abc import Iterable


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


class Stopped(KeyboardInterrupt):
    """A run of the Python API (``fine_tune``) stopped by a signal: Ctrl-C, SIGTERM, SIGHUP. A
    KeyboardInterrupt, as Python's own Ctrl-C is, so that ``except Exception`` around a call (a
    sweep that goes on to its next setting when one fails) does not swallow it; with zoplan's
    account of it: what was done, and the call that continues (``fix``)."""

    def __init__(self, message: str, *, fix: str | None = None, status: int = 130) -> None:
        self.message = message
        self.fix = fix
        self.status = status  # 128 + the signal's number, as zoplan run exits
        super().__init__(message if fix is None else f"{message}\n  fix: {fix}")


class Refused(ZoplanError):
    """A command refused before it did anything worth keeping (a run before its first step): what
    it wrote for that may go, so that the same command, corrected, runs again."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """``": did you mean 'opt-66b'?"`` for the choice closest to a mistyped ``name`` (case, ``_``
    for ``-`` and small typos forgiven), else ``""``: appended to an "unknown ..." message."""
    options = list(choices)

    def norm(text: str) -> str:
        return text.lower().replace("_", "-").replace(" ", "-")

    by_norm = {norm(c): c for c in options}
    if norm(name) in by_norm:
        return f": did you mean {by_norm[norm(name)]!r}?"
    close = difflib.get_close_matches(norm(name), list(by_norm), n=1, cutoff=0.6)
    return f": did you mean {by_norm[close[0]]!r}?" if close else ""


def install_hint(extra: str, packages: str, root: Path | None = None) -> str:
    """How to install an extra of zoplan's: from the checkout zoplan runs from (an editable
    install: ``root``, the folder above the package, holds pyproject.toml), or, installed from a
    wheel, its packages by name."""
    if root is None:
        root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file():
        return f"pip install -e '.[{extra}]' in the zoplan checkout"
    return f"pip install {packages} (zoplan's {extra} extra)"
