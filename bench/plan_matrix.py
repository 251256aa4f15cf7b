"""How long the planner takes for every bundled model on every bundled topology (issue 22's
"every answer in two seconds"; docs/results/planner.md).

Each case is ``zoplan.planner.plan(model, topology)`` at the command's defaults (global batch 16,
512 tokens or the model's positions if fewer), in this process: the search and its simulations,
not the interpreter's start (``python -m bench.startup`` measures that: ~0.2 s). A model that
fits nowhere on a machine is answered with its error, timed too. RUNS rounds, the cases
interleaved; the median per case is reported.

Usage: python -m bench.plan_matrix [--runs 3] [--models opt-66b,llama-2-70b] [--topologies l40s-8x]
       [--out bench/results/plan_matrix]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

from bench import describe, machine
from zoplan.errors import ZoplanError
from zoplan.models import PRESETS
from zoplan.planner import plan
from zoplan.topology import bundled_names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--models", default=",".join(PRESETS))
    parser.add_argument("--topologies", default=",".join(bundled_names()))
    parser.add_argument("--out", type=Path, default=None, help="write plan_matrix.json here")
    args = parser.parse_args()
    models, topologies = args.models.split(","), args.topologies.split(",")
    info = machine()  # before the cases: an idle machine's figure
    print(describe(info))
    walls: dict[tuple[str, str], list[float]] = {(m, t): [] for m in models for t in topologies}
    answers: dict[tuple[str, str], str] = {}
    for _ in range(args.runs):
        for model, topology in walls:
            gc.collect()
            t0 = time.perf_counter()
            try:
                report = plan(model, topology)
                answers[model, topology] = f"{report.search.best.step_time_s:.6g} s"
            except ZoplanError as exc:
                answers[model, topology] = f"refused: {exc.message[:60]}"
            walls[model, topology].append(time.perf_counter() - t0)
    median = {k: statistics.median(v) for k, v in walls.items()}
    width = max(len(m) for m in models)
    print(f"{'model':<{width}} " + " ".join(f"{t[:12]:>12}" for t in topologies))
    for m in models:
        cells = " ".join(
            f"{median[m, t]:>11.2f}{'*' if answers[m, t].startswith('refused') else ' '}" for t in topologies
        )
        print(f"{m:<{width}} {cells}")
    over = sorted(((v, k) for k, v in median.items() if v > 2.0), reverse=True)
    refused = any(a.startswith("refused") for a in answers.values())
    print(
        ("(* refused: the model does not fit) " if refused else "")
        + f"{len(over)} of {len(median)} cases over 2 s; slowest:"
    )
    for v, (m, t) in over[:10]:
        print(f"  {m} on {t}: {v:.2f} s ({answers[m, t]})")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "plan_matrix.json").write_text(
            json.dumps(
                {
                    **info,
                    "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                    "runs": args.runs,
                    "cases": [
                        {
                            "model": m,
                            "topology": t,
                            "median_s": median[m, t],
                            "walls_s": walls[m, t],
                            "answer": answers[m, t],
                        }
                        for m, t in walls
                    ],
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
