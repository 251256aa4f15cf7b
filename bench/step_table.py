"""Per-step stage totals of a finished run, from its spans file (runtime/spans.py): wall time and
the GPU (and, on CUDA, host) seconds of each stage category per step. Shows what changed between
steps where `zoplan validate` reports only medians and the spread.

Usage: python bench/step_table.py RUN_DIR/spans-rank0.jsonl
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = ("h2d", "d2h", "compute", "update", "embed", "head", "loop")


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    rows = [json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines() if line.strip()]
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


if __name__ == "__main__":
    main()
