"""Per-step stage totals of a finished run, from its spans file (runtime/spans.py): wall time and
the GPU (and, on CUDA, host) seconds of each stage category per step. Shows what changed between
steps where `zoplan validate` reports only medians and the spread.

Usage: python -m bench.step_table RUN_DIR/spans-rank0.jsonl [--blocks]

--blocks adds, per step that kept its spans, each block's compute time (ms), to see whether a
stage's total is spread evenly or sits in one block (the first, say). It reads `zoplan calibrate
--spans` files the same way.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = ("h2d", "d2h", "compute", "update", "embed", "head", "loop")


def main() -> None:
    args = sys.argv[1:]
    if "-h" in args or "--help" in args:
        print(__doc__)
        return
    blocks = "--blocks" in args
    args = [a for a in args if a != "--blocks"]
    if len(args) != 1:
        raise SystemExit(__doc__)
    rows = [json.loads(line) for line in Path(args[0]).read_text().splitlines() if line.strip()]
    present = [c for c in COLUMNS if any(c in r.get("totals", {}) for r in rows)]
    print("step  wall ms  " + "  ".join(f"{c:>9}" for c in present) + "   (ms; host ms in brackets)")
    for r in rows:
        cells = []
        for c in present:
            gpu = r.get("totals", {}).get(c)
            host = r.get("host_totals", {}).get(c)
            cell = "-" if gpu is None else f"{gpu * 1e3:.1f}"
            if host is not None:
                cell += f" [{host * 1e3:.1f}]"
            cells.append(f"{cell:>9}")
        print(f"{r['step']:>4}  {r['wall_s'] * 1e3:7.1f}  " + "  ".join(cells))
    if blocks:
        print("\nstep  compute ms per block (block 0 first)")
        for r in rows:
            per = [(b, t1 - t0) for _, cat, _, b, t0, t1 in r.get("spans", []) if cat == "compute"]
            if per:
                print(f"{r['step']:>4}  " + " ".join(f"{t * 1e3:.2f}" for _, t in sorted(per)))


if __name__ == "__main__":
    main()
