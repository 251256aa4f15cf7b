"""Simulated step times of every fitting layout, in this checkout and in another, side by side.

A change to the simulator, the cost model or the step program shows here as the layouts whose
step time moved, by how much, grouped by upload mode, mover count, residency and compute ranks:

    git worktree add /tmp/zoplan-before <commit>
    python -m bench.sim_ab --other /tmp/zoplan-before [--cases dgx-a100,cpu-local]

Each side runs in its own process (PYTHONPATH=<checkout>) and simulates every layout the search
enumerates and fits (the exhaustive search), so the two see the same candidates. Results:
docs/results/program.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# case -> (model, topology, global batch, sequence length, compute dtype)
CASES = {
    "dgx-a100": ("opt-66b", "dgx-a100", 16, 512, "bf16"),
    "dgx-a100-175b": ("opt-175b", "dgx-a100", 16, 512, "bf16"),
    "l40s-8x": ("llama-2-13b", "l40s-8x", 16, 512, "bf16"),
    "rtx4090-4x": ("opt-6.7b", "rtx4090-4x", 8, 512, "bf16"),
    "h100-pcie-1x": ("opt-13b", "h100-pcie-1x", 8, 512, "bf16"),
    "cpu-local": ("opt-125m", "cpu-local", 4, 128, "fp32"),
}

SIDE = """
import json, sys
from zoplan.sim.costs import Workload
from zoplan.models import load_model_shape
from zoplan.search import search
from zoplan.topology import load_topology
model, topo, batch, seq, dtype = json.loads(sys.argv[1])
result = search(load_topology(topo), Workload(load_model_shape(model), batch, seq), param_dtype=dtype,
                exhaustive=True)
rows = {json.dumps(c.layout.to_dict(), sort_keys=True): c.sim.step_time_s
        for c in result.ranked + ([result.baseline] if result.baseline else [])}
import zoplan
print(json.dumps({"where": zoplan.__file__, "rows": rows}))
"""


def side(checkout: Path, case: tuple) -> tuple[dict[str, float], float]:
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", SIDE, json.dumps(case)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(checkout)},
        cwd=checkout,
        check=True,
    ).stdout
    got = json.loads(out)
    if not got["where"].startswith(str(checkout.resolve())):  # an installed zoplan came first
        raise SystemExit(f"{checkout}: imported zoplan from {got['where']} instead")
    return got["rows"], time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other", type=Path, required=True, help="the other checkout (e.g. a git worktree)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    args = parser.parse_args()
    for name in args.cases.split(","):
        case = CASES[name]
        other, t_other = side(args.other, case)
        this, t_this = side(ROOT, case)
        groups: collections.Counter = collections.Counter()
        moved = []
        for key, before in other.items():
            if key not in this:
                groups["only in the other"] += 1
                continue
            layout = json.loads(key)
            rel = (this[key] - before) / before
            shape = (
                f"{layout['upload']}, {len(layout['movers'])} mover(s), "
                f"{'resident' if layout['resident'] else 'streamed'}, "
                f"{layout['perturbation'] * layout['data']} compute"
            )
            same = abs(rel) < 1e-9
            groups[("same " if same else "moved ") + shape] += 1
            if not same:
                moved.append(
                    (
                        rel,
                        layout["perturbation"],
                        layout["data"],
                        layout["upload"],
                        layout["prefetch"],
                        layout["micro_batch"],
                        len(layout["resident"]),
                    )
                )
        print(f"{name} ({case[0]}): {len(other)} layouts; search {t_other:.1f} s (other) / {t_this:.1f} s (this)")
        for group, count in sorted(groups.items()):
            print(f"  {count:5d}  {group}")
        if moved:
            rels = sorted(r[0] for r in moved)
            print(f"  moved: {len(moved)}, from {rels[0]:+.2%} to {rels[-1]:+.2%}")
            for rel, p, d, up, pf, mb, res in sorted(moved, key=lambda m: abs(m[0]), reverse=True)[:3]:
                print(f"    {rel:+.2%}  {p}x{d} {up}, prefetch {pf}, micro-batch {mb}, {res} resident")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
