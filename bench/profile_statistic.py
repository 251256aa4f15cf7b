"""Median or mean: re-plan a finished `bench/fidelity.py` run with a profile whose compute figures
are the mean of the calibration's timed steps instead of their median, and compare both
predictions with the measured median and mean step (docs/results/fidelity.md).

The steps are those `zoplan calibrate --spans` kept (bench/fidelity.py keeps them under
WORK/<model>-calibration-spans). A step is a sum of stages, and means add up where medians do
not: with right-skewed stage times, the median step lies above the sum of the stage medians.

It also prints the block compute per step of the calibration's `exchange` setting (one branch, two
micro-batches, every rank moving slices and all-gathering them: the steps of a PertP 2x1 plan)
beside the independent one-branch setting the profile takes it from, and the run's.

Usage: python -m bench.profile_statistic OUT/work MODEL [LAYOUT ...]   (e.g. /tmp/f/work tiny-opt 1x1 2x1)
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

SETTINGS = ("1x1", "1x2", "2x1", "2x2")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def figures(kept: Path, average) -> dict[str, dict[str, float]]:
    """Per setting, what build_profile takes from each rank's steps after the first (the CPU's:
    no GPU/host split), with ``average`` in place of the median."""
    out = {}
    for setting in SETTINGS:
        per_rank = []
        for path in sorted((kept / setting).glob("spans-rank*.jsonl")):
            rows = _rows(path)
            blocks = len({s[3] for s in rows[0]["spans"] if s[1] == "compute"})
            per_rank.append(
                {
                    c: average([r["totals"].get(c, 0.0) for r in rows[1:]])
                    / (blocks if c in ("compute", "update") else 1)
                    for c in ("compute", "embed", "head", "loop", "update")
                }
            )
        out[setting] = {
            c: max(p[c] for p in per_rank) if c == "loop" else sum(p[c] for p in per_rank) / len(per_rank)
            for c in per_rank[0]
        }
    return out


def replan(work: Path, model: str, layout: str, profile: Path, out: Path) -> float:
    """The step time `zoplan plan` predicts for the run's pinned layout with another profile."""
    plan = yaml.safe_load((work / f"{model}-{layout}.yaml").read_text())
    p, d = layout.split("x")
    batch, transfer = plan["batch"], plan["transfer"]
    # as bench/fidelity.py names the model: a built-in tiny one, or the checkpoint it built in WORK
    model_arg = model if model.startswith("tiny-") else str(work / model / "config.json")
    subprocess.run(
        [
            "zoplan",
            "plan",
            "--model",
            model_arg,
            "--topology",
            plan["topology"]["source"],
            "--profile",
            str(profile),
            "--global-batch",
            str(batch["global_batch"]),
            "--seq-len",
            str(batch["seq_len"]),
            "--micro-batch",
            str(batch["micro_batch"]),
            "--dtype",
            transfer["param_dtype"],
            "--wire-dtype",
            transfer["wire_dtype"],
            "--pertp",
            p,
            "--ddp",
            d,
            "--resident",
            "0",
            "-o",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    return yaml.safe_load(out.read_text())["prediction"]["step_time_s"]


def measured_steps(work: Path, model: str, layout: str) -> list[float]:
    """The run's step times after the first (as `zoplan validate` takes them)."""
    return [
        r["step_time_s"]
        for r in _rows(work / f"{model}-{layout}-run" / "metrics.jsonl")
        if "step_time_s" in r and r["step"] >= 1
    ]


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    work, model, layouts = Path(sys.argv[1]), sys.argv[2], sys.argv[3:] or ["1x1", "2x1"]
    profile_path = work / f"{model}-profile.yaml"
    profile = yaml.safe_load(profile_path.read_text())
    kept = work / f"{model}-calibration-spans"
    median, mean = figures(kept, statistics.median), figures(kept, statistics.mean)
    if abs(median["1x1"]["compute"] / profile["compute"]["block_s"]["1x1"] - 1) > 1e-6:
        raise SystemExit(f"{kept} does not reproduce {profile_path}'s block time: not its calibration")
    c = profile["compute"]
    for k in SETTINGS:
        c["block_s"][k], c["embed_s"][k], c["head_s"][k], c["loop_s"][k] = (
            mean[k]["compute"],
            mean[k]["embed"],
            mean[k]["head"],
            mean[k]["loop"],
        )
    c["update_s_per_param"] *= mean["1x1"]["update"] / median["1x1"]["update"]
    header = "".join(line + "\n" for line in profile_path.read_text().splitlines() if line.startswith("#"))
    mean_profile = work / f"{model}-profile-mean.yaml"
    mean_profile.write_text(header + yaml.safe_dump(profile))

    def step_compute(paths) -> float:  # the ranks' mean of the median per-step compute total, after step 0
        per = [statistics.median(r["totals"].get("compute", 0.0) for r in _rows(path)[1:]) for path in paths]
        return sum(per) / len(per)

    print(
        f"{model}: block compute per step (all blocks), medians: calibration 1x2 "
        f"{step_compute(sorted((kept / '1x2').glob('spans-rank*.jsonl'))) * 1e3:.2f} ms, calibration exchange "
        f"{step_compute(sorted((kept / 'exchange').glob('spans-rank*.jsonl'))) * 1e3:.2f} ms"
        + "".join(
            f", run {layout} {step_compute(sorted((work / f'{model}-{layout}-run').glob('spans-rank*.jsonl'))) * 1e3:.2f} ms"
            for layout in layouts
            if layout.endswith("x1") and layout != "1x1"
        )
    )
    for layout in layouts:
        plan = yaml.safe_load((work / f"{model}-{layout}.yaml").read_text())
        by_median = plan["prediction"]["step_time_s"]
        by_mean = replan(work, model, layout, mean_profile, work / f"{model}-{layout}-mean.yaml")
        steps = measured_steps(work, model, layout)
        m_median, m_mean = statistics.median(steps), statistics.mean(steps)
        spans0 = _rows(work / f"{model}-{layout}-run" / "spans-rank0.jsonl")[1:]
        cats = sorted({c for r in spans0 for c in r["totals"]})
        sums = [
            sum(f([r["totals"].get(c, 0.0) for r in spans0]) for c in cats)
            for f in (statistics.median, statistics.mean)
        ]
        print(
            f"{model} {layout}: rank 0's stage medians add up to {sums[0] * 1e3:.2f} ms, its stage means to "
            f"{sums[1] * 1e3:.2f} ms"
        )
        print(
            f"{model} {layout}: predicted {by_median * 1e3:.2f} ms (median profile), {by_mean * 1e3:.2f} ms (mean "
            f"profile); measured median {m_median * 1e3:.2f} ms, mean {m_mean * 1e3:.2f} ms; errors: median/median "
            f"{by_median / m_median - 1:+.1%}, mean/median {by_mean / m_median - 1:+.1%}, mean/mean "
            f"{by_mean / m_mean - 1:+.1%}"
        )


if __name__ == "__main__":
    main()
