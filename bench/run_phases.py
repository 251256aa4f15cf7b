"""Where one short `zoplan run` spends its time, by when each of its outputs appears
(docs/results/suite.md).

Starts `zoplan run --steps 1 -o DIR` (tiny-opt, 2 CPU ranks, the installed zoplan) and polls DIR
every 10 ms: `run.json` is written when the launcher's checks and plan are done; rank 0's first
line in the worker log once the rank supervisor has imported torch, transformers and the worker,
forked the ranks, and rank 0 has loaded the model and the data; then the first metrics row, the
journal, the weights, and the launcher's exit.

Usage: python -m bench.run_phases [--runs 2]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def phases(out: Path) -> dict[str, float]:
    log = out / "worker-node0.log"
    checks = {
        "run.json written (launcher's checks and plan done)": lambda: (out / "run.json").exists(),
        "rank 0's first line (imports, fork, model and data loaded)": lambda: (
            log.exists() and b"rank 0:" in log.read_bytes()
        ),
        "first metrics row (evaluation before the first step)": lambda: (
            (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size > 0
        ),
        "first journal line (step done)": lambda: (
            (out / "journal.jsonl").exists() and (out / "journal.jsonl").stat().st_size > 0
        ),
        "weights written": lambda: (out / "model" / "model.safetensors").exists(),
    }
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "zoplan.cli", "run", "--steps", "1", "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    seen: dict[str, float] = {}
    while proc.poll() is None:
        for name, check in checks.items():
            if name not in seen and check():
                seen[name] = time.perf_counter() - t0
        time.sleep(0.01)
    seen["exit"] = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"zoplan run failed with status {proc.returncode}")
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="zoplan-phases-"))
    try:
        for run in range(args.runs):
            seen = phases(work / f"run{run}")
            print(
                f"run {run}: "
                + "; ".join(f"{name} {t:.2f} s" for name, t in sorted(seen.items(), key=lambda kv: kv[1]))
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
