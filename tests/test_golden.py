"""Golden summaries of the plan for each bundled machine.

For every bundled topology one model that fits it is planned through ``zoplan.planner.plan``, and
a small summary of the result (the best layout's shape, its step time to 6 significant digits, its
bottleneck, and the ZO2 baseline's step time) is compared with ``tests/golden/<topology>.json``.
A change to the cost model, the simulator, the search or a bundled topology that moves any of
these shows up here as a readable diff.

When such a change is intended, regenerate the files and review the diff:

    ZOPLAN_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py
    git diff tests/golden/

With ``ZOPLAN_UPDATE_GOLDEN=1`` the test rewrites each file instead of comparing (and still checks
that what it wrote reads back). A bundled topology without a case below fails the test: add one.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from zoplan.planner import plan
from zoplan.topology import bundled_names

GOLDEN_DIR = Path(__file__).parent / "golden"
UPDATE = os.environ.get("ZOPLAN_UPDATE_GOLDEN") == "1"
if UPDATE and os.environ.get("CI"):  # a leftover variable must not turn the comparison off in CI
    raise RuntimeError("ZOPLAN_UPDATE_GOLDEN=1 rewrites the golden files: not in CI (CI is set)")

# topology -> (model, global batch, sequence length, compute dtype): a model that fits the machine
CASES: dict[str, tuple[str, int, int, str]] = {
    "dgx-a100": ("opt-66b", 16, 512, "bf16"),
    "dgx-h100": ("opt-66b", 16, 512, "bf16"),
    "hgx-h200": ("opt-175b", 16, 512, "bf16"),
    "l40s-8x": ("llama-2-13b", 16, 512, "bf16"),
    "rtx4090-4x": ("opt-6.7b", 8, 512, "bf16"),
    "h100-pcie-1x": ("opt-13b", 8, 512, "bf16"),
    "cpu-local": ("opt-125m", 4, 128, "fp32"),
}
FLOAT_REL = 1e-5  # the files hold 6 significant digits; allow the last one to flip


def sig6(x: float) -> float:
    return float(f"{x:.6g}")


def summarize(topology: str) -> dict[str, Any]:
    model, global_batch, seq_len, dtype = CASES[topology]
    report = plan(model, topology, global_batch=global_batch, seq_len=seq_len, dtype=dtype)
    best = report.search.best
    L = best.layout
    base = report.search.baseline
    # the plan written for the best layout is the one summarized
    assert report.plan.to_layout() == L
    assert report.plan.prediction.step_time_s == best.step_time_s
    return {
        "topology": topology,
        "model": model,
        "global_batch": global_batch,
        "seq_len": seq_len,
        "dtype": dtype,
        "best": {
            "perturbation": L.perturbation,
            "data": L.data,
            "upload": L.upload,
            "movers": len(L.movers),
            "slices_per_block": L.slices_per_block,
            "micro_batch": L.micro_batch,
            "prefetch": L.prefetch,
            "resident": len(L.resident),
            "step_time_s": sig6(best.step_time_s),
            "bottleneck": best.sim.bottleneck if best.sim else None,
        },
        "baseline_step_time_s": sig6(base.step_time_s) if base else None,
    }


def differences(got: Any, want: Any, where: str = "") -> list[str]:
    """Human-readable differences; floats compare to FLOAT_REL, everything else exactly."""
    if isinstance(got, dict) and isinstance(want, dict):
        out = []
        for key in sorted(set(got) | set(want)):
            path = f"{where}.{key}" if where else key
            if key not in want:
                out.append(f"{path}: new key (got {got[key]!r})")
            elif key not in got:
                out.append(f"{path}: missing (golden {want[key]!r})")
            else:
                out.extend(differences(got[key], want[key], path))
        return out
    if isinstance(got, float) and isinstance(want, (int, float)) and not isinstance(want, bool):
        return [] if math.isclose(got, want, rel_tol=FLOAT_REL) else [f"{where}: got {got!r}, golden {want!r}"]
    return [] if got == want and type(got) is type(want) else [f"{where}: got {got!r}, golden {want!r}"]


def test_every_bundled_topology_has_a_case() -> None:
    assert sorted(CASES) == bundled_names(), "add a golden case for each bundled topology"


@pytest.mark.parametrize("topology", sorted(CASES))
def test_golden_summary(topology: str) -> None:
    got = summarize(topology)
    path = GOLDEN_DIR / f"{topology}.json"
    if UPDATE:
        GOLDEN_DIR.mkdir(exist_ok=True)
        path.write_text(json.dumps(got, indent=2) + "\n", encoding="utf-8")
    if not path.exists():
        pytest.fail(f"{path} is missing: run `ZOPLAN_UPDATE_GOLDEN=1 python -m pytest {__file__}`")
    want = json.loads(path.read_text(encoding="utf-8"))
    diff = differences(got, want)
    assert not diff, (
        f"{topology}: the plan summary changed ({len(diff)} differences):\n  "
        + "\n  ".join(diff)
        + "\nIf intended: ZOPLAN_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py"
    )
    # sanity of the summary itself (not a golden value): the best beats or equals ZO2
    if got["baseline_step_time_s"] is not None:
        assert got["best"]["step_time_s"] <= got["baseline_step_time_s"] * (1 + FLOAT_REL)


def test_no_stale_golden_files() -> None:
    # after the parametrized test, so that ZOPLAN_UPDATE_GOLDEN=1 has written the files by now
    if not GOLDEN_DIR.exists():
        pytest.fail(f"{GOLDEN_DIR} is missing: run with ZOPLAN_UPDATE_GOLDEN=1 once")
    names = sorted(p.stem for p in GOLDEN_DIR.glob("*.json"))
    assert names == sorted(CASES), "golden files without a case (or cases without a file)"
