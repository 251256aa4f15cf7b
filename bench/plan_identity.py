"""Whether a change to the search or the simulator keeps every answer of the planner, bit for bit.

For every bundled model on every bundled topology (the cases of ``bench.plan_matrix``), plans at
the command's defaults in one process (``ZOPLAN_PLAN_WORKERS=1``: the answers do not depend on the
workers, tests/test_search.py) and hashes what the search found: every ranked candidate's layout,
step time, window, utilization and bottleneck (floats by their exact bits), the search's counts
(simulated, pruned, stopped early, rejected) and the ZO2 baseline's step. A refused case keeps
its message. Writes one hash per case; with ``--against`` a file written before (at another
commit), prints the cases whose hash differs and exits 1 if any does.

With ``--table``, only what the plan's table shows is hashed (the best of each of the top 5 parallel
shapes, each with its step, window, utilization and bottleneck, and the ZO2 baseline): a change
to the bounds prunes more or fewer candidates, and must answer the same.

Usage: python -m bench.plan_identity --out FILE [--against FILE] [--table] [--models ...] [--topologies ...]
(about a minute and a half on the 2-core development machine).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

os.environ["ZOPLAN_PLAN_WORKERS"] = "1"  # before the search reads it: one process, the same answers

from zoplan.errors import ZoplanError  # noqa: E402
from zoplan.models import PRESETS  # noqa: E402
from zoplan.planner import plan  # noqa: E402
from zoplan.search import top_families  # noqa: E402
from zoplan.topology import bundled_names  # noqa: E402


def answer_hash(model: str, topology: str, table: bool = False) -> str:
    """The hash of what the search finds for one case (or its refusal's message); ``table``: of
    what the plan shows alone (the best of each of the top 5 parallel shapes, the ZO2 baseline),
    for a change that prunes more or less but must find the same answer."""
    try:
        search = plan(model, topology).search
    except ZoplanError as exc:
        return f"refused: {exc.message}"
    h = hashlib.sha256(b"table" if table else b"")
    for c in top_families(search.ranked, 5) if table else search.ranked:
        assert c.sim is not None
        utilization = sorted((k, v.hex()) for k, v in c.sim.utilization.items())
        window = tuple(t.hex() for t in c.sim.window)
        h.update(repr((repr(c.layout), c.sim.step_time_s.hex(), window, utilization, c.sim.bottleneck)).encode())
    baseline = search.baseline.step_time_s.hex() if search.baseline is not None else None
    counts = () if table else (search.evaluated, search.pruned, search.aborted, search.rejected)
    h.update(repr((*counts, baseline)).encode())
    return h.hexdigest()[:16]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="write the hashes here (JSON)")
    parser.add_argument("--against", type=Path, default=None, help="hashes written before: report the differences")
    parser.add_argument("--models", default=",".join(PRESETS))
    parser.add_argument("--topologies", default=",".join(bundled_names()))
    parser.add_argument(
        "--table",
        action="store_true",
        help="hash only what the plan's table shows (not every candidate, nor the counts)",
    )
    args = parser.parse_args()
    t0 = time.perf_counter()
    hashes = {
        f"{model}/{topology}": answer_hash(model, topology, args.table)
        for topology in args.topologies.split(",")
        for model in args.models.split(",")
    }
    args.out.write_text(json.dumps(hashes, indent=0, sort_keys=True) + "\n")
    print(f"{len(hashes)} cases hashed in {time.perf_counter() - t0:.1f} s: {args.out}")
    if args.against is None:
        return 0
    before = json.loads(args.against.read_text())
    differ = sorted(case for case in hashes if case in before and before[case] != hashes[case])
    new = sorted(set(hashes) - set(before))
    for case in differ:
        print(f"differs: {case}")
    if new:
        print(f"not in {args.against}: {', '.join(new)}")
    print(f"{len(differ)} of {len(set(hashes) & set(before))} cases differ from {args.against}")
    searched = [case for case in hashes if case in before and not hashes[case].startswith("refused")]
    if searched and set(searched) <= set(differ):
        # (a --table hash and a full one never agree: the two files may have been written differently)
        print("every searched case differs: were both files written with --table, or both without it?")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
