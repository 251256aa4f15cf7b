"""zoplan.runtime: the torch runtime that executes a plan (see docs/architecture.md).

This is the only part of zoplan that imports torch. It is installed with the ``runtime``
extra (``pip install 'zoplan[runtime]'``).
"""

from __future__ import annotations

__all__: list[str] = []
