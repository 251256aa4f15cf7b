"""The ``zoplan`` command's entry point (pyproject's console script, ``python -m zoplan``).

The command line's modules take a few tenths of a second to load: a Ctrl-C meanwhile ends the
command as one during a command does (status 130, "interrupted"), not with a traceback through
the imports."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from zoplan.cli import main as command
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    command(as_program=True)
