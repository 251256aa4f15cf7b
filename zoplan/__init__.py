"""zoplan: plan and run distributed, memory-offloaded zeroth-order fine-tuning.

The planner (this package) imports no torch: ``zoplan.plan(...)`` works on a laptop.
"""
from __future__ import annotations

__version__ = "0.1.0"
