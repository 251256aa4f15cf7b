"""How long `zoplan run` takes to refuse a bad argument and to finish a short tiny run, with its
own rank supervisor and with one forked by a rank server (docs/results/runtime-cpu.md,
docs/results/suite.md): the launching process's imports and the ranks' start-up dominate at this
size.

The commands run in REPEAT interleaved rounds (each case once a round); the median wall time is
reported. It measures the
zoplan installed in this Python (`python -m zoplan.cli`), so two versions compare by installing
each in turn (pip install -e CHECKOUT --no-deps) and running this script after each.

Usage: python -m bench.startup [--repeat 5] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import machine


def timed(args: list[str], cwd: Path, extra_env: dict[str, str] | None = None) -> tuple[float, int]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", **(extra_env or {}))
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
    from zoplan.runtime import rankserver
    from zoplan.runtime.launch import rank_env

    sock = work / "server.sock"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop(rankserver.SERVER_ENV, None)
    server = rankserver.start(sock, ("opt",), env=rank_env(env))
    served = {rankserver.SERVER_ENV: str(sock)}
    cases = {
        "bad argument (run --steps 0)": (lambda i: ["run", "--steps", "0", "-o", str(work / f"bad{i}")], None, 2),
        "tiny run, 3 steps, 2 CPU ranks": (lambda i: ["run", "--steps", "3", "-o", str(work / f"run{i}")], None, 0),
        "the same, its supervisor forked by a rank server": (
            lambda i: ["run", "--steps", "3", "-o", str(work / f"served{i}")],
            served,
            0,
        ),
    }
    walls: dict[str, list[float]] = {name: [] for name in cases}
    try:
        for i in range(args.repeat):
            for name, (make, extra, expected) in cases.items():
                wall, code = timed(make(i), work, extra)
                if code != expected:
                    raise SystemExit(f"{name}: exit status {code}, expected {expected}")
                walls[name].append(wall)
    finally:
        server.terminate()
        server.wait()
    rows = {}
    for name, w in walls.items():
        rows[name] = {"median_s": statistics.median(w), "walls_s": w}
        print(f"{name}: median {statistics.median(w):.2f} s over {args.repeat} ({', '.join(f'{x:.2f}' for x in w)})")
    return {
        "zoplan": where,
        **machine(),
        "cases": rows,
    }


if __name__ == "__main__":
    main()
