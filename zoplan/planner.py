"""The commands as typed library functions: ``plan``, ``compare`` and ``timeline``.

The CLI (zoplan.cli) only parses, calls one of these and renders what it gets back.
"""

from __future__ import annotations

from collections.abc import Callable

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from zoplan.sim.costs import StepCosts, Workload
from zoplan.errors import ZoplanError
from zoplan.fileio import brief
from zoplan.models import ModelShape, load_model_shape
from zoplan.program import Program
from zoplan.planfile import Plan, Prediction, ZoSettings, build_plan, check_plan_gpus, load_plan
from zoplan.layout import Layout, Pins
from zoplan.sim import simulate
from zoplan.search import Candidate, SearchResult, check_workload, evaluate, search, top_families, usd_per_mtok
from zoplan.topology import Machine, load_topology
from zoplan.tuning import FULL, Tuning

DEFAULT_MODEL = "opt-175b"
DEFAULT_TOPOLOGY = "dgx-a100"
DEFAULT_GLOBAL_BATCH = 16
DEFAULT_SEQ_LEN = 512


class CandidateSummary(TypedDict):
    """One candidate as the tables and ``zoplan plan --json`` show it (:func:`candidate_summary`)."""

    perturbation: int
    data: int
    nodes: int
    gpus: list[str]
    compute_gpus: list[str]
    upload: str
    movers: list[str]
    shares: list[int]  # each mover's part of a round, as weights (empty: equal)
    slices_per_block: int
    wire_dtype: str
    micro_batch: int
    prefetch: int
    resident_blocks: int
    step_time_s: float
    tokens_per_s: float
    gpu_memory_bytes: int
    host_memory_bytes: int
    bottleneck: str | None  # None: not simulated
    runner_up: str | None  # nearly as busy, of another kind (SimResult.runner_up); None: none
    bound_s: float
    bound_fraction: float
    usd_per_mtok: float | None


@dataclass
class PlanReport:
    """What ``plan`` found: the search, the shape and machine it ran on, and the best plan."""

    search: SearchResult
    shape: ModelShape
    machine: Machine
    plan: Plan
    top: int
    # the best layout's step with compute, or transfers, SLOWER times as long (sensitivity())
    sensitivity: dict[str, float] = field(default_factory=dict)
    # compare, on a priced machine of several nodes: the search by the other objective
    other: PlanReport | None = None

    def best_by(self, objective: str) -> Candidate:
        """The best layout by ``objective`` ("time" or "cost"): this search's, or the other's."""
        if self.other is not None and self.search.objective != objective:
            return self.other.search.best
        return self.search.best

    @property
    def shown(self) -> list[Candidate]:
        return top_families(self.search.ranked, self.top)

    @property
    def speedup_vs_baseline(self) -> float | None:
        base = self.search.baseline
        return base.step_time_s / self.search.best.step_time_s if base else None

    def summary(self, cand: Candidate) -> CandidateSummary:
        return candidate_summary(cand, self.machine, self.search.workload)

    def to_json(self) -> dict[str, Any]:
        s = self.search
        return {
            "model": self.shape.name,
            "topology": self.machine.name,
            "global_batch": s.workload.global_batch,
            "seq_len": s.workload.seq_len,
            "objective": s.objective,
            "tuning": s.workload.tuning.method.value,
            "best": self.summary(s.best),
            "baseline": self.summary(s.baseline) if s.baseline else None,
            "speedup_vs_baseline": self.speedup_vs_baseline,
            "sensitivity": {"factor": SLOWER, **{f"{k}_step_time_s": v for k, v in self.sensitivity.items()}},
            "candidates": [self.summary(c) for c in self.shown],
            "search": {
                "considered": s.considered,
                "rejected_memory": s.rejected,
                "evaluated": s.evaluated,
                "distinct": s.distinct,
                "aborted": s.aborted,
                "pruned": s.pruned,
                "seconds": round(s.seconds, 4),
            },
        }


SLOWER = 1.25  # the what-if of sensitivity(): a quarter slower


def sensitivity(machine: Machine, workload: Workload, layout: Layout, factor: float = SLOWER) -> dict[str, float]:
    """The simulated step of ``layout`` with every compute stage (host work included), then every
    transfer (host links, memory bus, peer links, all-gathers), ``factor`` times as long. A
    prediction is only as good as the figures behind it: a step that barely moves when one of
    them is off is robust to it, one that moves by nearly ``factor`` is bound by it. Calibrated
    figures move too: on the H200 of docs/results/fidelity.md a host issued kernels 1.8x slower
    for most of a run than during its calibration a minute before."""
    out = {}
    for what in ("compute", "transfers"):
        costs = StepCosts(machine, workload, layout)
        setattr(costs, "compute_scale" if what == "compute" else "transfer_scale", factor)
        out[what] = simulate(costs).step_time_s
    return out


def candidate_summary(cand: Candidate, machine: Machine, workload: Workload) -> CandidateSummary:
    L = cand.layout
    step = cand.step_time_s
    return {
        "perturbation": L.perturbation,
        "data": L.data,
        "nodes": L.nodes,
        "gpus": list(L.gpus),
        "compute_gpus": list(L.compute_gpus),
        "upload": L.upload,
        "movers": list(L.movers),
        "shares": list(L.shares),
        "slices_per_block": L.slices_per_block,
        "wire_dtype": L.wire_dtype,
        "micro_batch": L.micro_batch,
        "prefetch": L.prefetch,
        "resident_blocks": len(L.resident),
        "step_time_s": step,
        "tokens_per_s": workload.tokens_per_step / step,
        "gpu_memory_bytes": cand.gpu_memory_bytes,
        "host_memory_bytes": cand.host_memory_bytes,
        "bottleneck": cand.sim.bottleneck if cand.sim else None,
        "runner_up": cand.sim.runner_up() if cand.sim else None,
        "bound_s": cand.bound.machine_bound_s,
        "bound_fraction": cand.bound.machine_bound_s / step,
        "usd_per_mtok": usd_per_mtok(machine, workload, L, step),
    }


def with_profile(machine: Machine, profile: str | Path | None, shape: ModelShape) -> Machine:
    """``machine`` with a calibration profile's measured figures (unchanged without one)."""
    if profile is None:
        return machine
    from zoplan.profile import apply_profile, check_profile, load_profile

    measured = load_profile(profile)
    check_profile(measured, machine, shape, profile)
    return apply_profile(machine, measured, Path(profile).resolve())


def compute_dtype(machine: Machine, dtype: str | None, profile: str | Path | None = None) -> str:
    """The compute dtype to plan with: the one asked for, which must be the one a profile's
    compute times were measured with; by default the profile's, else bf16 on GPUs and fp32 on
    CPU ranks (whose bf16 matrix products are slower: docs/results/cpu-figures.md)."""
    measured = machine.profile.profile.model.dtype if machine.profile is not None else None
    if dtype is None:
        return measured or ("fp32" if machine.cpu_ranks_only else "bf16")
    if measured is not None and measured != dtype:
        raise ZoplanError(
            f"{profile} holds compute times measured in {measured}, not {dtype}",
            fix=f"plan with --dtype {measured}, or calibrate again with --dtype {dtype}",
        )
    return dtype


def default_seq_len(shape: ModelShape, machine: Machine, before: int = 0) -> int:
    """Tokens per sequence when none is asked for: the profile's (its compute times were measured
    at that length), else 512, or fewer when the model has fewer positions (``before``: taken by
    a prefix)."""
    if machine.profile is not None:
        return machine.profile.profile.model.seq_len
    return min(DEFAULT_SEQ_LEN, shape.max_positions - before)


def plan(
    model: str = DEFAULT_MODEL,
    topology: str | Machine = DEFAULT_TOPOLOGY,
    *,
    global_batch: int = DEFAULT_GLOBAL_BATCH,
    seq_len: int | None = None,
    pins: Pins = Pins(),
    objective: str = "time",
    dtype: str | None = None,
    top: int = 5,
    zo: ZoSettings = ZoSettings(),
    profile: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    tuning: Tuning = FULL,
) -> PlanReport:
    """Search the layouts of ``model`` on ``topology`` and return the report with the best plan.
    With ``profile``, the calibrated figures replace the topology's nominal ones. ``dtype`` (the
    compute dtype) defaults to the profile's, else bf16 on GPUs and fp32 on CPU ranks. ``topology``:
    a bundled name, a file, or a machine already loaded from one. ``progress`` is called with the
    layouts weighed so far and the layouts that fit, as the search goes. ``tuning``: what is
    trained (zoplan.tuning): an adapter leaves the blocks read-only."""
    shape = load_model_shape(model)
    check_workload(shape, global_batch, seq_len, tuning.positions)  # before any work that grows with them
    loaded = topology if isinstance(topology, Machine) else load_topology(topology)
    machine = with_profile(loaded, profile, shape)
    dtype = compute_dtype(machine, dtype, profile)
    seq_len = default_seq_len(shape, machine, tuning.positions) if seq_len is None else seq_len
    workload = Workload(shape, global_batch, seq_len, tuning)
    result = search(machine, workload, pins=pins, objective=objective, param_dtype=dtype, top=top, progress=progress)
    best = result.best
    base = result.baseline
    summary = candidate_summary(best, machine, workload)
    assert summary["bottleneck"] is not None  # the search simulated every candidate it ranks
    prediction = Prediction(
        step_time_s=best.step_time_s,
        tokens_per_s=summary["tokens_per_s"],
        gpu_memory_bytes=best.gpu_memory_bytes,
        host_memory_bytes=best.host_memory_bytes,
        bottleneck=summary["bottleneck"],
        bound_s=best.bound.machine_bound_s,
        bound_fraction=summary["bound_fraction"],
        usd_per_mtok=summary["usd_per_mtok"],
        baseline_step_time_s=base.step_time_s if base else None,
        speedup_vs_baseline=base.step_time_s / best.step_time_s if base else None,
    )
    the_plan = build_plan(
        shape=shape,
        machine=machine,
        layout=best.layout,
        global_batch=global_batch,
        seq_len=seq_len,
        zo=zo,
        prediction=prediction,
        tuning=tuning,
    )
    return PlanReport(
        search=result,
        shape=shape,
        machine=machine,
        plan=the_plan,
        top=top,
        sensitivity=sensitivity(machine, workload, best.layout),
    )


def all_machines(topologies: list[str]) -> list[str]:
    """The machines named, with "all" (or none named) standing for every bundled GPU machine (not
    cpu-local: this computer's CPU ranks); a name with commas that is not a file names several
    (``-t dgx-a100,l40s-8x``)."""
    from zoplan.topology import bundled_names

    gpus = [name for name in bundled_names() if name != "cpu-local"]
    parts = [
        part
        for t in (topologies or ["all"])
        for part in ([t] if "," not in t or Path(t).exists() else [p.strip() for p in t.split(",") if p.strip()])
    ]
    if not parts:
        raise ZoplanError(
            f"no machine named in {', '.join(repr(t) for t in topologies)}",
            fix="name one or more: -t dgx-a100 -t l40s-8x, -t dgx-a100,l40s-8x, or -t all",
        )
    named = [name for topo in parts for name in (gpus if topo == "all" else [topo])]
    return list(dict.fromkeys(named))


def compare(
    model: str,
    topologies: list[str],
    *,
    global_batch: int = DEFAULT_GLOBAL_BATCH,
    seq_len: int | None = None,
    objective: str = "time",
    dtype: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[tuple[str, PlanReport | ZoplanError]]:
    """The best layout on each machine, by topology name ("all": every bundled GPU machine); a
    machine the model does not fit on (or that cannot run the batch) gives its error instead, so
    the others are still compared. ``progress(name, i, n)`` is told before machine i of n."""
    topologies = all_machines(topologies)
    # a bad model name or batch shape fails once, before any search
    check_workload(load_model_shape(model), global_batch, seq_len)
    out: list[tuple[str, PlanReport | ZoplanError]] = []
    for i, topo in enumerate(topologies):
        if progress is not None:
            progress(topo, i, len(topologies))
        machine = load_topology(topo)  # a bad topology file is the user's to fix: fail loudly
        try:
            report = plan(
                model, machine, global_batch=global_batch, seq_len=seq_len, objective=objective, dtype=dtype, top=1
            )
            if machine.spec.nodes > 1 and machine.spec.price_per_hour_usd is not None:
                # on several nodes the fastest layout and the cheapest may differ (the cheapest uses
                # fewer nodes): the verdict names both, so both are searched
                other = "cost" if objective == "time" else "time"
                report.other = plan(
                    model, machine, global_batch=global_batch, seq_len=seq_len, objective=other, dtype=dtype, top=1
                )
            out.append((machine.name, report))
        except ZoplanError as exc:
            out.append((machine.name, exc))
    return out


@dataclass
class Timeline:
    plan: Plan
    machine: Machine
    candidate: Candidate
    workload: Workload
    sensitivity: dict[str, float] = field(default_factory=dict)
    program: Program | None = None  # the step program the simulation timed


def check_fits(machine: Machine, workload: Workload, layout: Layout, plan_path: str | Path) -> None:
    """A plan file edited by hand (a larger micro-batch, more resident blocks, deeper prefetch) may
    no longer fit the machine's memory: refused here, as the planner would not have made it."""
    from zoplan.sim.costs import GiB, gib, host_reserve_bytes, host_room_bytes

    costs = StepCosts(machine, workload, layout)
    for g in layout.gpus:
        need, has = costs.gpu_memory_bytes(g), machine.gpu_model(g).memory_gib * GiB
        if need > has:
            raise ZoplanError(
                f"{plan_path}: the plan needs {gib(need)} on {g}, which has {gib(has)} "
                "(the micro-batch, the resident blocks and the prefetch depth set it)",
                fix="plan again (zoplan plan ... -o plan.yaml) instead of editing those fields",
            )
    need, has = costs.ram_need_bytes(), host_room_bytes(machine)
    if need > has:
        ranks = ", its CPU ranks' working sets included," if costs.cpu_ranks() else ""
        raise ZoplanError(
            f"{plan_path}: the plan needs {gib(need)} of host memory{ranks} the machine has "
            f"{gib(has)} to give ({gib(host_reserve_bytes(machine))} kept for the system)",
            fix="plan again (zoplan plan ... -o plan.yaml) instead of editing the plan",
        )


def planned_machine(the_plan: Plan, plan_path: str | Path, moved: bool = False) -> Machine:
    """The machine a plan was made for, from the topology it names (a bundled one, or the file
    it was planned with); ``moved``: the command takes ``--topology`` for a file that moved."""
    source = the_plan.topology.source
    if source.endswith((".yaml", ".yml")) and not Path(source).exists():
        raise ZoplanError(
            f"{plan_path} was planned for the topology file {source}, which is not there any more",
            fix=("pass the file with --topology if it moved" if moved else f"put the file back at {source}")
            + ", or plan again",
        )
    return load_topology(source)


def timeline(plan_path: str | Path, topology: str | None = None) -> Timeline:
    """Simulate a plan again with every span recorded, on the machine it was planned for."""
    the_plan = load_plan(plan_path)
    source = the_plan.topology.source
    machine = load_topology(topology) if topology is not None else planned_machine(the_plan, plan_path, moved=True)
    if machine.hash != the_plan.topology.hash:
        planned = f"{plan_path} was planned for topology '{the_plan.topology.name}' ({the_plan.topology.hash})"
        if topology is not None and machine.name != the_plan.topology.name:
            raise ZoplanError(
                f"{planned}, but --topology {topology} is '{machine.name}' ({machine.hash}), another machine",
                fix=f"leave --topology out for the file it was planned with ({source}), or plan again for "
                f"'{machine.name}' (zoplan plan --topology {topology} ...)",
            )
        if machine.name != the_plan.topology.name:  # the plan's topology.source was edited to name another
            raise ZoplanError(
                f"{planned}, but its topology.source '{source}' is '{machine.name}' ({machine.hash}), another machine",
                fix=f"put back the source it was planned with, or plan again for '{machine.name}' "
                f"(zoplan plan --topology {source} ...)",
            )
        raise ZoplanError(
            f"{planned}, but '{topology or source}' is now {machine.hash}: the machine description changed "
            "since planning",
            fix="plan again, or pass the original file with --topology",
        )
    if machine.name != the_plan.topology.name:  # the same machine: the plan's topology.name was edited
        raise ZoplanError(
            f"{plan_path}: field 'topology.name' ({brief(the_plan.topology.name)}) does not match the machine it "
            f"was planned for, '{machine.name}' ({machine.hash})",
            fix="the topology's name was edited: write the plan again with `zoplan plan`",
        )
    check_plan_gpus(the_plan, machine, plan_path)
    shape = the_plan.model_shape()
    if the_plan.profile is not None:
        if not Path(the_plan.profile.source).exists():  # (a new one would not be the one it was planned with)
            raise ZoplanError(
                f"{plan_path} was planned with the profile {the_plan.profile.source}, which is not there any more",
                fix="put the file back, or plan again (zoplan plan ... --profile FILE -o plan.yaml)",
            )
        machine = with_profile(machine, the_plan.profile.source, shape)
        assert machine.profile is not None  # with_profile applied the plan's profile
        if machine.profile.profile.hash != the_plan.profile.hash:
            raise ZoplanError(
                f"{plan_path} was planned with the profile {the_plan.profile.source} "
                f"({the_plan.profile.hash}), which has changed since",
                fix="plan again with `zoplan plan --profile ...`",
            )
    workload = Workload(shape, the_plan.batch.global_batch, the_plan.batch.seq_len, the_plan.tuning.to_tuning())
    check_fits(machine, workload, the_plan.to_layout(), plan_path)
    cand = evaluate(machine, workload, the_plan.to_layout(), record=True)
    return Timeline(
        plan=the_plan,
        machine=machine,
        candidate=cand,
        workload=workload,
        sensitivity=sensitivity(machine, workload, cand.layout),
        program=StepCosts(machine, workload, cand.layout).program,
    )
