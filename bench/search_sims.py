"""The simulations one search runs, timed by themselves in one process: this checkout against
another, interleaved (docs/results/planner.md).

A search of MODEL on TOPOLOGY is run once in one process to capture the simulations it asks for
(each candidate's costs and the limit it had); then each round simulates all of them again, one
after the other (program build, setup and event loop, without the search's decisions), and the
total is timed. With ``--other``, each round runs this checkout and the other one, each in its own
process (PYTHONPATH=<checkout>), alternating; the digest of every answer (the step, window and
utilization of a finished simulation, or that it stopped) must agree.

    git worktree add /tmp/zoplan-before <commit>
    python -m bench.search_sims [--model opt-175b] [--topology l40s-8x] [--rounds 4] [--other /tmp/zoplan-before]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def measure(model: str, topology: str) -> dict[str, object]:
    """In this process: capture the search's simulations, then time them all once."""
    os.environ["ZOPLAN_PLAN_WORKERS"] = "1"  # the search in this process, so its calls can be seen
    import zoplan.sim as sim
    import zoplan.sim.parallel as parallel
    from zoplan.planner import plan

    from zoplan.search import family

    calls = []
    simulate = parallel.simulate
    first: list[float] = []  # when the search first simulated

    def capture(costs, record=False, limit_s=None):  # type: ignore[no-untyped-def]
        first[:] = first or [time.perf_counter()]
        calls.append((costs, limit_s))
        return simulate(costs, record=record, limit_s=limit_s)

    parallel.simulate = capture
    try:
        t_plan = time.perf_counter()
        plan(model, topology)
        plan_s = time.perf_counter() - t_plan
    finally:
        parallel.simulate = simulate
    for costs, _ in calls:
        costs.release_program()
    gc.collect()
    digest = hashlib.sha256()
    families: dict[str, list[float]] = {}  # family -> [simulations, stopped early, seconds]
    t0 = time.perf_counter()
    build_s = 0.0  # of which building the step programs (each simulation's first read of it)
    for costs, limit_s in calls:
        t = time.perf_counter()
        costs.program  # noqa: B018 (built here, so that its time is told apart)
        build_s += time.perf_counter() - t
        stopped = 0
        try:
            r = sim.simulate(costs, limit_s=limit_s)
            digest.update(repr((r.step_time_s, r.window, sorted(r.utilization.items()))).encode())
        except sim.Exceeded:
            digest.update(b"stopped")
            stopped = 1
        costs.release_program()
        p, d, nodes, upload, movers = family(costs.layout)
        name = f"{p}x{d}" + (f"x{nodes}n" if nodes > 1 else "") + f" {upload} {movers}"
        row = families.setdefault(name, [0, 0, 0.0])
        row[0], row[1], row[2] = row[0] + 1, row[1] + stopped, row[2] + time.perf_counter() - t
    return {
        "seconds": time.perf_counter() - t0,
        "build_s": build_s,
        "simulations": len(calls),
        "digest": digest.hexdigest()[:16],
        "plan_s": plan_s,  # the search itself, in one process
        "before_s": first[0] - t_plan if first else plan_s,  # enumerating, fitting, bounding
        "families": families,
    }


def run_in(checkout: Path, model: str, topology: str) -> dict[str, object]:
    """``measure`` in a process of its own, with zoplan from ``checkout`` (this file run by path:
    the other checkout need not have it)."""
    env = dict(os.environ, PYTHONPATH=str(checkout))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", model, topology]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=checkout)
    if proc.returncode != 0:
        raise SystemExit(f"{checkout}: {proc.stderr[-2000:]}")
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="opt-175b")
    parser.add_argument("--topology", default="l40s-8x")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--other", type=Path, help="another checkout, timed in the same rounds")
    parser.add_argument("--measure", nargs=2, metavar=("MODEL", "TOPOLOGY"), help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.measure:  # one side of a round (run_in)
        print(json.dumps(measure(*opts.measure)))
        return
    sides = {"this": ROOT} | ({"other": opts.other.resolve()} if opts.other else {})
    times: dict[str, list[float]] = {name: [] for name in sides}
    digests: dict[str, set[object]] = {name: set() for name in sides}
    last: dict[str, Any] = {}  # this checkout's last answer
    print(f"{time.strftime('%Y-%m-%d %H:%M')} {opts.model} on {opts.topology}, {opts.rounds} rounds", flush=True)
    for r in range(opts.rounds):
        for name in list(sides) if r % 2 == 0 else list(sides)[::-1]:  # the sides take turns going first
            got = run_in(sides[name], opts.model, opts.topology)
            if name == "this":
                last = got
            times[name].append(float(got["seconds"]))  # type: ignore[arg-type]
            digests[name].add(got["digest"])
            print(f"round {r + 1} {name}: {got['simulations']} simulations in {got['seconds']:.3f} s", flush=True)
    for name, values in times.items():
        print(f"{name}: {min(values):.3f}-{max(values):.3f} s, median {statistics.median(values):.3f} s")
    print(
        f"this checkout, last round: the search in one process {last['plan_s']:.2f} s, of which "
        f"{last['before_s']:.2f} s before its first simulation; of the simulations' time, {last['build_s']:.2f} s "
        "built their step programs; by family (p x d[ x nodes], upload, movers):"
    )
    for name, (count, stopped, seconds) in sorted(last["families"].items(), key=lambda kv: -kv[1][2]):
        print(f"  {name:<16} {count:>4} simulations, {stopped:>4} stopped early, {seconds:.2f} s")
    if len(set().union(*digests.values())) != 1:
        raise SystemExit(f"the answers differ: {digests}")


if __name__ == "__main__":
    main()
