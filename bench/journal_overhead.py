"""Journal cost per step against the tiny model's step time (docs/results/reliability.md).

Appends 200 journal lines of the runtime's format with an fsync after each (the default
--journal-sync-every 1), and runs the default tiny model for 30 steps to get its step time.

Usage: python -m bench.journal_overhead
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # (no options: --help says so)
    from zoplan.runtime.journal import write_line  # the worker's own code

    work = Path(tempfile.mkdtemp(prefix="zoplan-journal-"))
    atexit.register(shutil.rmtree, work, True)  # the journal and the run: nothing left behind
    record = {
        "step": 12345,
        "seed": 4611686018427387903,
        "loss_plus": 7.123456789012345,
        "loss_minus": 7.123401234567891,
        "projected_grad": -0.027772222222,
        "lr": 0.001,
        "eps": 0.001,
        "weight_decay": 0.0,
        "skipped": False,
    }
    times = []
    with open(work / "journal.jsonl", "a", buffering=1) as f:
        for _ in range(200):
            t0 = time.perf_counter()
            write_line(f, record, sync=True)
            times.append(time.perf_counter() - t0)
    journal_s = statistics.median(times)
    run = work / "run"
    subprocess.run(
        [sys.executable, "-m", "zoplan.cli", "run", "--steps", "30", "-o", str(run)],
        check=True,
        capture_output=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    steps = [
        json.loads(l)["step_time_s"] for l in (run / "metrics.jsonl").read_text().splitlines() if "step_time_s" in l
    ][2:]
    step_s = statistics.median(steps)
    size = (run / "journal.jsonl").stat().st_size / 30
    print(
        f"journal line write + fsync: median {journal_s * 1e3:.3f} ms over 200; tiny-opt default run step: "
        f"median {step_s * 1e3:.1f} ms over steps 3-30; overhead {journal_s / step_s * 100:.2f}% of a step; "
        f"{size:.0f} bytes per step in the run's journal"
    )


if __name__ == "__main__":
    main()
