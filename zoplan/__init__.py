"""zoplan: plan and run distributed, memory-offloaded zeroth-order fine-tuning.

The planner (this package) imports no torch: ``zoplan.plan(...)`` works on a laptop.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "plan", "compare", "timeline"]


def __getattr__(name: str) -> Any:
    # ``zoplan.plan(...)`` without paying for the planner's imports on ``import zoplan.errors``
    if name in ("plan", "compare", "timeline"):
        from zoplan import planner

        return getattr(planner, name)
    raise AttributeError(f"module 'zoplan' has no attribute {name!r}")
