"""What starting the ranks costs: fresh interpreters (as torchrun starts them) against children
forked from one process that has already imported what a rank needs (docs/results/suite.md).

Each rank here does what every zoplan rank does before its first step that does not depend on
the run: import torch, transformers' model class for OPT and zoplan's worker module, then one
small matrix product (so a forked child shows it can still compute: a parent that has used
torch's thread pool before forking may leave it unusable in the child; this parent never
computes). The two ways alternate, ROUNDS times; wall times until every rank has exited.

Usage: python -m bench.rank_start [--ranks 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

RANK = (
    "import torch\nfrom transformers.models.opt import modeling_opt\nimport zoplan.runtime.worker\n"
    "a = torch.ones(256, 256)\nassert float((a @ a)[0, 0]) == 256.0\n"
)


def fresh(ranks: int) -> float:
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", RANK]) for _ in range(ranks)]
    assert all(p.wait() == 0 for p in procs)
    return time.perf_counter() - t0


def forked(ranks: int) -> float:
    """Children of this process, which has imported the modules (``prepare``); each runs RANK's
    product only, its imports being there already."""
    t0 = time.perf_counter()
    pids = []
    for _ in range(ranks):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                exec(RANK, {})
            except BaseException:
                code = 1
            os._exit(code)
        pids.append(pid)
    assert all(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0 for pid in pids)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    t0 = time.perf_counter()
    exec(RANK.split("a = ")[0], {})  # the imports, once, in the would-be launcher (no computation)
    prepare = time.perf_counter() - t0
    rows: dict[str, list[float]] = {"fresh": [], "forked": []}
    for _ in range(args.rounds):
        rows["fresh"].append(fresh(args.ranks))
        rows["forked"].append(forked(args.ranks))
    print(
        f"{platform.node()} {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{args.ranks} ranks, {args.rounds} rounds"
    )
    print(f"imports once in the parent: {prepare:.2f} s")
    for name, times in rows.items():
        print(f"{name:7s} median {statistics.median(times):.2f} s  ({', '.join(f'{t:.2f}' for t in times)})")


if __name__ == "__main__":
    main()
