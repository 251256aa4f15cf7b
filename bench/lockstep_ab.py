"""Lockstep or independent compute: re-plan a finished CPU `bench/fidelity.py` run's layouts with
the calibration's profile less its lockstep figures (each rank's compute as timed on its own),
and print both predictions against the measured median step (docs/results/fidelity.md).

With several compute ranks on a CPU machine, the planner scales block compute, embedding and head
by what the calibration measured with every rank all-gathering each block (compute.lockstep_s);
without that table it takes the independent settings as they are.

Usage: python -m bench.lockstep_ab OUT/work MODEL [LAYOUT ...]   (e.g. /tmp/f/work tiny-opt 2x1)
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import yaml

from bench.profile_statistic import measured_steps, replan


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    work, model, layouts = Path(sys.argv[1]), sys.argv[2], sys.argv[3:] or ["2x1"]
    profile_path = work / f"{model}-profile.yaml"
    profile = yaml.safe_load(profile_path.read_text())
    locked = profile["compute"].pop("lockstep_s", None)
    if not locked:
        raise SystemExit(f"{profile_path} has no lockstep figures (one rank, or calibrated before they were measured)")
    independent = work / f"{model}-profile-independent.yaml"
    independent.write_text(yaml.safe_dump(profile))
    alone = profile["compute"]
    print(
        f"{model}: lockstep / independent (1 branch, 2 micro-batches): block "
        f"{locked['block'] / alone['block_s']['1x2']:.2f}, embed {locked['embed'] / alone['embed_s']['1x2']:.2f}, "
        f"head {locked['head'] / alone['head_s']['1x2']:.2f}"
    )
    for layout in layouts:
        with_lockstep = yaml.safe_load((work / f"{model}-{layout}.yaml").read_text())["prediction"]["step_time_s"]
        without = replan(work, model, layout, independent, work / f"{model}-{layout}-independent.yaml")
        measured = statistics.median(measured_steps(work, model, layout))
        print(
            f"{model} {layout}: measured {measured * 1e3:.2f} ms; predicted {with_lockstep * 1e3:.2f} ms with the "
            f"lockstep figures ({with_lockstep / measured - 1:+.1%}), {without * 1e3:.2f} ms without "
            f"({without / measured - 1:+.1%})"
        )


if __name__ == "__main__":
    main()
