"""Wall time of whole `zoplan plan` commands (interpreter start included) and the predicted
speedups over ZO2 that docs/results/planner.md reports.

Usage: python -m bench.plan_speed [--runs 5]
Prints, per case: wall-clock min / median / max over the runs, then the best layout, its
bottleneck, the ZO2 baseline and the speedup, from the command's own --json output.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

CASES = [
    ["--model", "opt-175b", "--topology", "dgx-a100", "--global-batch", "16", "--seq-len", "512"],
    ["--model", "opt-175b", "--topology", "dgx-a100", "--global-batch", "1", "--seq-len", "2048"],
    ["--model", "opt-175b", "--topology", "dgx-a100", "--global-batch", "16", "--seq-len", "512", "--resident", "0"],
    ["--model", "opt-175b", "--topology", "dgx-a100", "--global-batch", "1", "--seq-len", "2048", "--resident", "0"],
]


def run(args: list[str]) -> tuple[float, dict]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "zoplan.cli", "plan", *args, "--json"], capture_output=True, text=True, check=True
    )
    return time.perf_counter() - t0, json.loads(proc.stdout)


def describe(c: dict) -> str:
    moved = "whole blocks" if c["upload"] == "whole" else f"{len(c['movers'])} movers sliced"
    return (
        f"{c['perturbation']}x{c['data']} {moved}, {c['resident_blocks']} resident, "
        f"step {c['step_time_s']:.3f} s, bound by {c['bottleneck']} "
        f"({c['bound_fraction'] * 100:.0f}% of the machine bound)"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    opts = parser.parse_args()
    for args in CASES:
        times, out = [], {}
        for _ in range(opts.runs):
            wall, out = run(args)
            times.append(wall)
        print(f"zoplan plan {' '.join(args)} --json")
        print(
            f"  wall: min {min(times):.2f} s, median {statistics.median(times):.2f} s, "
            f"max {max(times):.2f} s over {opts.runs} runs; search {out['search']}"
        )
        print(f"  best:     {describe(out['best'])}")
        print(f"  ZO2:      {describe(out['baseline'])}")
        print(f"  speedup:  {out['speedup_vs_baseline']:.2f}x")


if __name__ == "__main__":
    main()
