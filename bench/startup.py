"""How long `zoplan run` takes to refuse a bad argument and to finish a short tiny run
(docs/results/runtime-cpu.md): the launching process's imports, torchrun and the ranks' start-up
dominate both at this size.

Each command runs REPEAT times in a row; the median wall time is reported. It measures the
zoplan installed in this Python (`python -m zoplan.cli`), so two versions compare by installing
each in turn (pip install -e CHECKOUT --no-deps) and running this script after each.

Usage: python -m bench.startup [--repeat 5] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(args: list[str], cwd: Path) -> tuple[float, int]:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "zoplan.cli", *args], cwd=cwd, env=env, capture_output=True, text=True)
    return time.perf_counter() - t0, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="also write startup.json here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="zoplan-startup-"))
    try:
        report = measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "startup.json").write_text(json.dumps(report, indent=1))


def measure(args: argparse.Namespace, work: Path) -> dict:
    # the zoplan the commands run: the one installed in this Python, as seen from the work folder
    where = subprocess.run(
        [sys.executable, "-c", "import zoplan, pathlib; print(pathlib.Path(zoplan.__file__).parent.parent)"],
        cwd=work,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    timed(["run", "--steps", "1", "-o", str(work / "warm")], work)  # builds the tiny model once
    cases = {
        "bad argument (run --steps 0)": lambda i: ["run", "--steps", "0", "-o", str(work / f"bad{i}")],
        "tiny run, 3 steps, 2 CPU ranks": lambda i: ["run", "--steps", "3", "-o", str(work / f"run{i}")],
    }
    rows = {}
    for name, make in cases.items():
        walls = []
        for i in range(args.repeat):
            wall, code = timed(make(i), work)
            expected = 2 if "bad" in name else 0
            if code != expected:
                raise SystemExit(f"{name}: exit status {code}, expected {expected}")
            walls.append(wall)
        rows[name] = {"median_s": statistics.median(walls), "walls_s": walls}
        print(
            f"{name}: median {statistics.median(walls):.2f} s over {args.repeat} "
            f"({', '.join(f'{w:.2f}' for w in walls)})",
            flush=True,
        )
    return {
        "zoplan": where,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "cases": rows,
    }


if __name__ == "__main__":
    main()
