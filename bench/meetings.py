"""CPU ranks' meetings: shared memory (the default) against gloo (``ZOPLAN_MEETINGS=gloo``), in one
interleaved run of the same plan (docs/results/runtime-cpu.md).

A 2x1 plan with whole-block uploads and no resident block, so the two ranks meet before every
block, and sum the loss scalars at the end of every step (``--layout 2x2``: four ranks on a copy
of cpu-local with four, more ranks than this machine's cores); the two settings take turns for
``--rounds`` rounds of ``zoplan run`` with ``--steps`` steps each. Per run: the step (the slower
rank's, steps after the first 5), its 10th-90th percentile, and the time a rank spends per step
in the meetings before blocks (span category ``exchange``) and in the loss sum (``scalar``), the
median and the 90th percentile.

Usage: python -m bench.meetings [--model tiny-opt] [--layout 2x1] [--steps 300] [--rounds 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from zoplan.topology import resolve_topology_path

SETTINGS = {"shared memory": {}, "gloo": {"ZOPLAN_MEETINGS": "gloo"}}
SKIP = 5  # steps left out at the start: warm-up


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(run: Path) -> dict[str, float]:
    ranks = sorted(run.glob("spans-rank*.jsonl"))
    rows = [[json.loads(line) for line in r.read_text().splitlines()][SKIP:] for r in ranks]
    steps = [max(r[i]["wall_s"] for r in rows) * 1e3 for i in range(min(len(r) for r in rows))]

    def per_step(category: str) -> list[float]:
        return [statistics.mean(r[i]["totals"].get(category, 0.0) for r in rows) * 1e3 for i in range(len(steps))]

    meetings, sums = per_step("exchange"), per_step("scalar")
    return {
        "step_ms": statistics.median(steps),
        "p10_ms": percentile(steps, 0.1),
        "p90_ms": percentile(steps, 0.9),
        "meetings_ms": statistics.median(meetings),
        "sum_ms": statistics.median(sums),
        "sum_p90_ms": percentile(sums, 0.9),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-opt")
    parser.add_argument("--layout", choices=("2x1", "2x2"), default="2x1")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    opts = parser.parse_args()
    if opts.steps <= SKIP:
        parser.error(f"--steps {opts.steps}: the first {SKIP} steps are left out (warm-up): give more")
    with tempfile.TemporaryDirectory() as tmp:
        out = opts.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        plan, topology = out / "plan.yaml", "cpu-local"
        ddp = int(opts.layout.split("x")[1])
        if ddp > 1:
            topology = str(out / "cpu-4.yaml")
            spec = yaml.safe_load(resolve_topology_path("cpu-local").read_text())
            spec["name"] = "cpu-local-4-ranks"
            spec["gpus"] = [{"id": f"rank{i}", "model": "cpu-rank"} for i in range(4)]
            spec["links"] = [dict(spec["links"][0], b=f"rank{i}") for i in range(4)]
            Path(topology).write_text(yaml.safe_dump(spec))
        subprocess.run(
            [sys.executable, "-m", "zoplan.cli", "plan", "-m", opts.model, "-t", topology]
            + ["--global-batch", str(4 * ddp), "--seq-len", "64", "--micro-batch", "2", "--pertp", "2"]
            + ["--ddp", str(ddp), "--upload", "whole", "--resident", "0", "-o", str(plan)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        print(
            f"{opts.model}, {opts.layout} whole blocks, batch {4 * ddp} x 64, micro-batch 2, {opts.steps} steps a run",
            flush=True,
        )
        for r in range(opts.rounds):
            for name, env in SETTINGS.items():
                run = out / f"run-{r}-{name.replace(' ', '-')}"
                subprocess.run(
                    [sys.executable, "-m", "zoplan.cli", "run", str(plan), "-m", opts.model, "-d", "long-text"]
                    + ["-n", str(opts.steps), "-o", str(run)],
                    check=True,
                    env={**os.environ, **env},
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                s = summarize(run)
                print(
                    f"round {r + 1} {name:>13}: step {s['step_ms']:6.2f} ms (p10-p90 {s['p10_ms']:.2f}-"
                    f"{s['p90_ms']:.2f}), before blocks {s['meetings_ms']:5.2f} ms a step, loss sum "
                    f"{s['sum_ms']:.2f} ms (p90 {s['sum_p90_ms']:.2f})",
                    flush=True,
                )


if __name__ == "__main__":
    main()
