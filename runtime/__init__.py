"""zoplan.runtime: the torch runtime that executes a plan (see docs/architecture.md).

This is the only part of zoplan that imports torch. It is installed with the ``runtime``
extra (``pip install 'zoplan[runtime]'``). From Python: ``from zoplan.runtime import fine_tune``
(runtime/api.py), which does what ``zoplan run`` does.
"""

from __future__ import annotations

from typing import Any

__all__ = ["fine_tune"]


def __getattr__(name: str) -> Any:
    # ``from zoplan.runtime import fine_tune`` without loading the launcher for every submodule
    if name == "fine_tune":
        from zoplan.runtime.api import fine_tune

        return fine_tune
    raise AttributeError(f"module 'zoplan.runtime' has no attribute {name!r}")
