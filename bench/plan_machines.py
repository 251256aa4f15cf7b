"""The planner on machines that are not one uniform box (issue 22; docs/results/planner.md).

1. Uneven machines (a GPU behind a slower PCIe link, two GPU models, NVLink among some GPUs
   only): the step of the plan
   found, against the best of every placement pinned by hand (every subset of the GPUs as compute
   GPUs, in both parallel shapes that fit it): the plan found must be no slower.
2. Uneven shares: dgx-h100 with one GPU's PCIe link at x4, OPT-66B streamed (``--resident 0``)
   over all eight GPUs as compute GPUs (2x4, every one a mover): the plan's step with shares in
   proportion to the links, the same layout with equal shares, and the healthy machine's plan.
3. Clusters: a bundled machine repeated over 2 to 64 nodes on a 25 GB/s, 5 us network, each
   node's step varying by 2%: the plan's wall time and its prediction (one node's step, the
   all-reduce's latency, the wait for the slowest node).

Usage: python -m bench.plan_machines [--out bench/results/plan_machines] [--only uneven,shares,clusters]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import tempfile
import time
from pathlib import Path

import yaml

from bench import machine
from zoplan.errors import ZoplanError
from zoplan.layout import Pins
from zoplan.planner import plan
from zoplan.search import evaluate
from zoplan.topology import load_topology, resolve_topology_path

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "topologies"
UNEVEN = [
    ("rtx4090-one-slow-first.yaml", "llama-2-13b", 2),
    ("rtx4090-one-slow-first.yaml", "opt-13b", 16),
    ("mixed-h100-l40s.yaml", "opt-13b", 16),
    ("mixed-h100-l40s.yaml", "llama-2-70b", 16),
    ("a100-half-nvlink.yaml", "llama-2-70b", 2),
    ("mixed-l40s-a100.yaml", "llama-2-70b", 2),
    ("mixed-l40s-a100.yaml", "llama-2-70b", 16),
]
SHARES = ("dgx-h100-one-slow-link.yaml", "dgx-h100", "opt-66b", 8, 256)
CLUSTERS = [("dgx-a100", "llama-2-70b"), ("l40s-8x", "llama-2-70b"), ("rtx4090-4x", "opt-13b")]


def best_pinned(path: Path, model: str, batch: int) -> tuple[float, str]:
    """The fastest plan over every set of compute GPUs pinned by hand."""
    gpus = load_topology(path).gpus
    best = (float("inf"), "")
    for count in range(1, len(gpus) + 1):
        for chosen in itertools.combinations(gpus, count):
            for p in (1, 2):
                if count % p:
                    continue
                try:
                    report = plan(
                        model, str(path), global_batch=batch, pins=Pins(gpus=chosen, perturbation=p, data=count // p)
                    )
                except ZoplanError:
                    continue  # the batch does not divide, or it does not fit
                step = report.search.best.step_time_s
                if step < best[0]:
                    best = (step, f"{report.search.best.layout.describe()} on {','.join(chosen)}")
    return best


def cluster_file(base: str, nodes: int, folder: Path) -> Path:
    data = yaml.safe_load(resolve_topology_path(base).read_text())
    data.update(nodes=nodes, network={"gbps": 25, "latency_us": 5, "step_cv": 0.02}, name=f"{base}-{nodes}n")
    path = folder / f"{base}-{nodes}n.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write plan_machines.json here")
    parser.add_argument(
        "--only", default="uneven,shares,clusters", help="the parts to run (a comma list: uneven, shares, clusters)"
    )
    args = parser.parse_args()
    parts = set(args.only.split(","))
    if not parts or parts - {"uneven", "shares", "clusters"}:
        parser.error(f"--only {args.only}: the parts are uneven, shares and clusters")
    uneven: list[dict[str, object]] = []
    clusters: list[dict[str, object]] = []
    shares: dict[str, object] | None = None
    if "uneven" in parts:
        print("uneven machines: the plan found against the best placement pinned by hand")
    for name, model, batch in UNEVEN if "uneven" in parts else []:
        path = FIXTURES / name
        t0 = time.perf_counter()
        report = plan(model, str(path), global_batch=batch)
        wall = time.perf_counter() - t0
        found = report.search.best
        pinned_s, pinned = best_pinned(path, model, batch)
        print(
            f"  {name} {model} batch {batch}: found {found.step_time_s:.4f} s "
            f"({found.layout.describe()} on {','.join(found.layout.compute_gpus)}; planned in {wall:.2f} s), "
            f"best pinned {pinned_s:.4f} s ({pinned})"
        )
        uneven.append(
            {"topology": name, "model": model, "batch": batch, "found_s": found.step_time_s, "pinned_s": pinned_s}
        )
    if "shares" in parts:
        slow, healthy, model, batch, seq = SHARES
        pins = Pins(perturbation=2, data=4, resident=0)
        found = plan(model, str(FIXTURES / slow), global_batch=batch, seq_len=seq, pins=pins).search
        equal = evaluate(found.machine, found.workload, dataclasses.replace(found.best.layout, shares=()))
        well = plan(model, healthy, global_batch=batch, seq_len=seq, pins=pins).search.best
        shares = {
            "shares": list(found.best.layout.shares),
            "movers": list(found.best.layout.movers),
            "found_s": found.best.step_time_s,
            "equal_s": equal.step_time_s,
            "healthy_s": well.step_time_s,
        }
        print(
            f"uneven shares: {slow} {model} batch {batch} x {seq}, 2x4 streamed: shares "
            f"{':'.join(map(str, found.best.layout.shares))} over {','.join(found.best.layout.movers)}: "
            f"{found.best.step_time_s:.4f} s; equal shares {equal.step_time_s:.4f} s; {healthy} {well.step_time_s:.4f} s"
        )
    if "clusters" in parts:
        print("clusters: 25 GB/s, 5 us network, each node's step varying by 2%")
    with tempfile.TemporaryDirectory() as tmp:
        for (base, model), nodes in itertools.product(CLUSTERS, (2, 8, 64)) if "clusters" in parts else []:
            batch = 8 * nodes
            path = cluster_file(base, nodes, Path(tmp))
            t0 = time.perf_counter()
            report = plan(model, str(path), global_batch=batch)
            wall = time.perf_counter() - t0
            best = report.search.best
            assert best.sim is not None
            print(
                f"  {base} x {nodes} nodes, {model}, batch {batch}: planned in {wall:.2f} s; step "
                f"{best.step_time_s:.4f} s ({best.layout.describe()}), of which waiting for the slowest node "
                f"{best.sim.straggler_s * 1e3:.1f} ms"
            )
            clusters.append(
                {
                    "base": base,
                    "nodes": nodes,
                    "model": model,
                    "batch": batch,
                    "plan_s": wall,
                    "step_s": best.step_time_s,
                    "straggler_s": best.sim.straggler_s,
                }
            )
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        info = {**machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        (args.out / "plan_machines.json").write_text(
            json.dumps({**info, "uneven": uneven, "shares": shares, "clusters": clusters}, indent=1)
        )


if __name__ == "__main__":
    main()
