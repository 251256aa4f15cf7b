"""``zoplan validate``: a plan's predicted step against the measured one, stage by stage.

The runtime writes one ``spans-rank<R>.jsonl`` per rank (runtime/spans.py): per step, the busy
seconds of each stage category and, for the first steps, every span in the simulator's span
schema. This module reads them without torch and lays them beside the simulation of the same
plan (``zoplan.planner.timeline``):

- step time: the median over the measured steps of rank 0's wall time per step (what
  ``metrics.jsonl`` reports, data preparation included) against the simulated steady-state step;
- each stage: busy seconds per step, averaged over the devices that run that stage, median over
  steps, against the same figure from the simulated step's spans. Stages overlap (uploads run
  beside compute on a GPU), so stage times do not add up to the step time;
- the spread of the measured step times (10th and 90th percentile), so that an error can be read
  against the machine's own step-to-step variation; and the medians of the first and the second
  half of the measured steps, so that a warm-up that outlasted ``skip``, or a machine that slowed
  down during the run, shows as such;
- on CUDA, the peak of GPU memory torch allocated on any rank against the plan's prediction;
- on CUDA, also each stage's host time (the Python and kernel launches that issue it, measured the
  same way): a stage whose host time reaches its GPU time is issue-bound, and the GPU waits for the
  host; the planner's calibration takes the longer of the two (runtime/calibrate.py).

The first ``skip`` steps are left out: they pay one-time costs (allocator warm-up, lazy
initialisation, CUDA kernel compilation) that a long run does not.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from zoplan.errors import ZoplanError
from zoplan.records import SpanLine, TrainRow, read_metrics, read_spans
from zoplan.planfile import Plan
from zoplan.sim import SimResult, Span
from zoplan.topology import Machine
from zoplan.sim.trace import CATEGORIES, chrome_trace, merge_traces

STAGE_NAMES = {
    "h2d": "upload (h2d)",
    "update": "update",
    "exchange": "all-gather",
    "embed": "embed+perturb",
    "compute": "block compute",
    "head": "head+loss",
    "scalar": "scalar all-reduce",
    "loop": "batch+journal",
    "d2h": "offload (d2h)",
}


@dataclass
class Row:
    stage: str
    predicted_s: float | None
    measured_s: float | None
    measured_host_s: float | None = None  # CUDA: the host's time issuing the stage

    @property
    def error(self) -> float | None:
        """(predicted - measured) / measured: positive when the planner is pessimistic."""
        if self.predicted_s is None or not self.measured_s:
            return None
        return (self.predicted_s - self.measured_s) / self.measured_s

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "predicted_s": self.predicted_s,
            "measured_s": self.measured_s,
            "measured_host_s": self.measured_host_s,
            "error": self.error,
        }


@dataclass
class Validation:
    rows: list[Row]
    measured_steps: list[int]
    trace_step: int | None
    measured: SimResult | None  # the traced step, as a one-step result in the simulator's schema
    peak_gpu_bytes: int | None = None  # CUDA: the most memory torch allocated on any rank
    predicted_gpu_bytes: int | None = None  # the plan's prediction for its busiest GPU
    step_spread_s: tuple[float, float] | None = None  # 10th and 90th percentile of the step times
    step_halves_s: tuple[float, float] | None = None  # median of the first and of the second half
    # standard deviation / mean of the step times: a topology's network.step_cv for several such nodes
    step_cv: float | None = None
    # the mean share of rank 0's batch positions that held padding (None: not recorded)
    padding_fraction: float | None = None

    @property
    def step(self) -> Row:
        return self.rows[0]


def predicted_stages(result: SimResult) -> dict[str, float]:
    """Busy seconds per category in the reported step, averaged over the devices running it."""
    start, end = result.window
    busy: dict[tuple[str, str], float] = {}
    for g, _stream, cat, _label, _step, _block, t0, t1 in result.spans:
        lo, hi = max(t0, start), min(t1, end)
        if hi > lo:
            busy[g, cat] = busy.get((g, cat), 0.0) + hi - lo
    out: dict[str, float] = {}
    for cat in CATEGORIES:
        values = [v for (g, c), v in busy.items() if c == cat]
        if values:
            out[cat] = sum(values) / len(values)
    return out


def measure(out: Path, plan: Plan, skip: int = 1) -> Validation:
    """Read a finished run's metrics and spans (``out`` is its output directory)."""
    try:
        return _measure(out, plan, skip)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise ZoplanError(
            f"{out}: a line of metrics.jsonl or spans-rank*.jsonl is malformed "
            f"({type(exc).__name__}: {str(exc)[:200]})",
            fix="validate a run written by this version of zoplan",
        ) from None


def _measure(out: Path, plan: Plan, skip: int) -> Validation:
    metrics = out / "metrics.jsonl"
    files = sorted(out.glob("spans-rank*.jsonl"))
    if not metrics.exists() or not files:
        raise ZoplanError(
            f"{out} holds no measured steps (metrics.jsonl and spans-rank*.jsonl)",
            fix="run the plan first (zoplan validate runs it for you)",
        )
    # rows of another shape (a line cut by a crash, or damaged) are left out (zoplan.records)
    train = [r for r in read_metrics(metrics)[0] if isinstance(r, TrainRow)]
    step_time = {r.step: r.step_time_s for r in train}
    padding = {r.step: r.padding for r in train if r.padding is not None}
    per_rank = {int(f.stem.removeprefix("spans-rank")): {r.step: r for r in read_spans(f)} for f in files}
    for f in files:
        if not per_rank[int(f.stem.removeprefix("spans-rank"))]:
            raise ZoplanError(
                f"{f}: no line reads as a measured step (lines of another shape are left out)",
                fix="validate a run written by this version of zoplan",
            )
    steps = sorted(s for s in step_time if all(s in rows for rows in per_rank.values()))
    measured = [s for s in steps if s >= skip] or steps
    if not measured:
        raise ZoplanError(f"{out}: no step was recorded by every rank")
    gpu_of = {r.rank: r.gpu for r in plan.layout.ranks}
    stages = _stage_medians(per_rank, measured, "totals")
    host = _stage_medians(per_rank, measured, "host_totals")  # written on CUDA only
    rows = [Row("step", None, statistics.median(step_time[s] for s in measured))]
    rows += [Row(cat, None, stages[cat], host.get(cat)) for cat in CATEGORIES if cat in stages]
    # the trace shows the measured step whose time is the median of those with every span kept
    traced = [s for s in measured if all(rows_[s].spans is not None for rows_ in per_rank.values())]
    trace_step, result = None, None
    if traced:
        trace_step = sorted(traced, key=lambda s: step_time[s])[len(traced) // 2]
        spans: list[Span] = []
        for rank, rows_ in sorted(per_rank.items()):
            kept = rows_[trace_step].spans
            assert kept is not None  # trace_step is one of traced: every rank kept its spans
            for stream, cat, label, block, t0, t1 in kept:
                spans.append(Span(gpu_of.get(rank, f"rank{rank}"), stream, cat, label, 1, block, t0, t1))
        wall = max(rows_[trace_step].wall_s for rows_ in per_rank.values())
        # one step at index 1: the simulator's reported step, so chrome_trace draws it the same way
        result = SimResult(
            step_time_s=wall,
            window=(0.0, wall),
            step_ends=[0.0, wall],
            utilization={},
            bottleneck="measured",
            spans=spans,
        )
    peaks = [r.peak_bytes for rows_ in per_rank.values() for r in rows_.values() if r.peak_bytes is not None]
    return Validation(
        rows,
        measured,
        trace_step,
        result,
        peak_gpu_bytes=max(peaks) if peaks else None,
        step_spread_s=_spread([step_time[s] for s in measured]),
        step_halves_s=_halves([step_time[s] for s in measured]),
        step_cv=_cv([step_time[s] for s in measured]),
        padding_fraction=(
            statistics.mean(padding[s] for s in measured) if all(s in padding for s in measured) else None
        ),
    )


def _cv(times: list[float]) -> float | None:
    """Standard deviation over mean of at least 5 step times."""
    if len(times) < 5 or statistics.mean(times) <= 0:
        return None
    return statistics.stdev(times) / statistics.mean(times)


def _spread(times: list[float]) -> tuple[float, float] | None:
    """The 10th and 90th percentiles (inclusive method: within the data) of at least 5 times."""
    if len(times) < 5:
        return None
    deciles = statistics.quantiles(times, n=10, method="inclusive")
    return deciles[0], deciles[-1]


def _halves(times: list[float]) -> tuple[float, float] | None:
    """The medians of the first and of the last half of at least 6 step times, in step order (the
    middle one of an odd count in neither half)."""
    if len(times) < 6:
        return None
    half = len(times) // 2
    return statistics.median(times[:half]), statistics.median(times[-half:])


def _stage_medians(per_rank: dict[int, dict[int, SpanLine]], steps: list[int], key: str) -> dict[str, float]:
    """Per category: the median over ``steps`` of the mean over the ranks that ran it (every line
    may lack ``key``: host_totals are written on CUDA only); for the training loop the slowest rank's, as the
    planner counts it (rank 0 also writes the journal line, and the others wait for it)."""
    out: dict[str, float] = {}
    for cat in CATEGORIES:
        per_step = []
        for s in steps:
            totals = [getattr(rows[s], key) or {} for rows in per_rank.values()]
            values = [t[cat] for t in totals if cat in t]
            if values:
                per_step.append(max(values) if cat == "loop" else sum(values) / len(values))
        if per_step:
            out[cat] = statistics.median(per_step)
    return out


def compare(validation: Validation, simulated: SimResult, predicted_gpu_bytes: int | None = None) -> Validation:
    """Fill in the predicted column from the plan's simulation (and the plan's GPU memory)."""
    predicted = predicted_stages(simulated)
    # a validation of measure() holds a measurement in every row (compare fills in the predictions)
    measured = cast("dict[str, float]", {r.stage: r.measured_s for r in validation.rows})
    host = {r.stage: r.measured_host_s for r in validation.rows if r.measured_host_s is not None}
    if "update" in measured and "update" not in predicted and "compute" in measured:
        # whole-block uploads: the simulator counts the update inside the block's compute span
        measured["compute"] += measured.pop("update")
        if "update" in host:
            host["compute"] = host.get("compute", 0.0) + host.pop("update")
    rows = [Row("step", simulated.step_time_s, validation.step.measured_s)]
    for cat in CATEGORIES:
        if cat in measured or cat in predicted:
            rows.append(Row(cat, predicted.get(cat), measured.get(cat), host.get(cat)))
    return Validation(
        rows,
        validation.measured_steps,
        validation.trace_step,
        validation.measured,
        peak_gpu_bytes=validation.peak_gpu_bytes,
        predicted_gpu_bytes=predicted_gpu_bytes,
        step_spread_s=validation.step_spread_s,
        step_halves_s=validation.step_halves_s,
        step_cv=validation.step_cv,
        padding_fraction=validation.padding_fraction,
    )


def combined_trace(validation: Validation, simulated: SimResult, machine: Machine) -> dict[str, Any]:
    """One Chrome trace: the simulated step ("simulated" processes) above the measured one."""
    traces = [chrome_trace(simulated, machine, title="simulated", window_only=True)]
    if validation.measured is not None:
        measured = chrome_trace(validation.measured, machine, title="measured", pid_base=1000, window_only=True)
        # laid out as the simulator's reported step (its index, 1), it is this step of the run
        # (validate --json's trace_step): every span says so, and the step's own span by its name
        run_step = validation.trace_step
        measured["otherData"]["run_step"] = run_step
        for event in measured["traceEvents"]:
            if event["ph"] == "X":
                event["args"] = {**event.get("args", {}), "run_step": run_step}
                if event.get("cat") == "step":
                    event["name"] = f"step {run_step} of the run (measured)"
        traces.append(measured)
    return merge_traces(*traces)


def to_json(validation: Validation, plan_path: Path, out: Path | None, trace: Path | None) -> dict[str, Any]:
    """``zoplan validate --json``; ``out``: the run's directory where it is kept (--output), else None."""
    return {
        "plan": str(plan_path),
        "output": str(out) if out is not None else None,
        "measured_steps": validation.measured_steps,
        "trace": str(trace) if trace else None,
        "trace_step": validation.trace_step,
        "rows": [r.to_json() for r in validation.rows],
        "step_spread": (
            {"p10_s": validation.step_spread_s[0], "p90_s": validation.step_spread_s[1]}
            if validation.step_spread_s
            else None
        ),
        "step_halves": (
            {"first_s": validation.step_halves_s[0], "last_s": validation.step_halves_s[1]}
            if validation.step_halves_s
            else None
        ),
        "step_cv": validation.step_cv,
        "padding_fraction": validation.padding_fraction,
        # on CUDA only (a CPU plan's prediction holds the CUDA context's reserve, measured by nothing)
        "gpu_memory": (
            {"predicted_bytes": validation.predicted_gpu_bytes, "measured_peak_bytes": validation.peak_gpu_bytes}
            if validation.peak_gpu_bytes is not None
            else None
        ),
    }
