"""zoplan.runtime: the torch runtime that executes a plan (see docs/architecture.md).

This is the only part of zoplan that imports torch. Its packages come with the ``runtime``
extra (``INSTALL``). From Python: ``from zoplan.runtime import fine_tune`` (runtime/api.py),
which does what ``zoplan run`` does. This module itself imports none of them.
"""

from __future__ import annotations

from typing import Any

from zoplan.errors import install_hint

__all__ = ["fine_tune"]

# The packages of the runtime extra (pyproject.toml, [project.optional-dependencies] runtime; a
# test keeps the two the same): each installs a module of its own name.
PACKAGES = ("torch", "transformers", "safetensors")
INSTALL = (
    install_hint("runtime", " ".join(PACKAGES))
    + " (on a machine without a GPU, pip install torch==2.13.0 first: the CPU build)"
)


def missing_packages() -> str | None:
    """The runtime's packages not installed here, as words ("torch and safetensors"), found
    without importing any; None when every one is."""
    import importlib.util

    missing = [name for name in PACKAGES if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return " and ".join([", ".join(missing[:-1]), missing[-1]] if len(missing) > 1 else missing)


def __getattr__(name: str) -> Any:
    # ``from zoplan.runtime import fine_tune`` without loading the launcher for every submodule
    if name == "fine_tune":
        missing = missing_packages()
        if missing is not None:  # an install of the planner alone
            raise ImportError(f"zoplan.runtime needs {missing}, not installed here: {INSTALL}")
        from zoplan.runtime.api import fine_tune

        return fine_tune
    raise AttributeError(f"module 'zoplan.runtime' has no attribute {name!r}")
