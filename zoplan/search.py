"""Configuration search: enumerate layouts, reject what does not fit, prune by the machine's
bound, simulate the rest, rank by step time or cost.

The user's ZO hyper-parameters never change between candidates, so every candidate trains the
same model; only time and memory differ. Pruning is exact: candidates are simulated in order of
their pruning bound, and a candidate whose bound cannot beat both its family's best and the
top-th best family's simulated objective is skipped (branch and bound), so the best candidate is
never dropped. Candidates the simulator cannot tell apart (equal ``zoplan.sim.inputs_key``) are
simulated once.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal, TypeGuard

from zoplan.sim.bound import Bound, machine_bound
from zoplan.sim.costs import GiB, StepCosts, Workload, gib, host_reserve_bytes, matmul_rate, spread_resident
from zoplan.errors import ZoplanError
from zoplan.fileio import brief
from zoplan.layout import Layout, Pins, capacity_shares, divisors
from zoplan.vocab import DTYPE_BYTES
from zoplan.limits import MAX_GLOBAL_BATCH, MAX_RANKS, MAX_SEQ_LEN, MAX_SLICES_PER_BLOCK, MIN_SEQ_LEN
from zoplan.models import ModelShape
from zoplan.sim import SimResult, inputs_key, simulate
from zoplan.sim import parallel
from zoplan.sim.parallel import AtLeast, Answer, Workers, answers, simulate_answer, workers_wanted
from zoplan.topology import Machine

DTYPES = tuple(DTYPE_BYTES)
PERTP_FIX = "--pertp 1 (both branches on each compute GPU) or 2 (each branch on its own GPUs), or leave it out"
OBJECTIVES = ("time", "cost")

# Range limits (zoplan.limits), checked before any search: the search tries every divisor of a
# replica's batch as a micro-batch, and the step program has one upload per slice, so both bound
# the work. Far above any ZO fine-tuning (MeZO: 16 to 64 sequences of at most 2048 tokens; the
# search itself tries at most 4 slices per mover); a 55440-sequence batch (120 divisors) still
# searches in about 80 s on a 2-core machine (docs/results/reliability.md).


def _whole(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def workload_problems(
    shape: ModelShape | None, global_batch: object, seq_len: object, before: int = 0
) -> list[tuple[str, str, str]]:
    """What is wrong with a batch shape, as (field, what is wrong with its value, fix); empty when
    it can be planned. ``seq_len`` None is left to its default; ``shape`` None: the model is not
    known yet (its positions are checked later); ``before``: positions a prefix takes first."""
    out = []
    if not _whole(global_batch) or not 1 <= global_batch <= MAX_GLOBAL_BATCH:
        out.append(
            (
                "global_batch",
                f"is not a whole number of sequences from 1 to {MAX_GLOBAL_BATCH}",
                "ZO fine-tuning takes 16 to 64 sequences per step",
            )
        )
    if seq_len is not None:
        if not _whole(seq_len) or not MIN_SEQ_LEN <= seq_len <= MAX_SEQ_LEN:
            # (one token: a language model's loss, each token predicted from those before it, has none)
            out.append(
                (
                    "seq_len",
                    f"is not a whole number of tokens from {MIN_SEQ_LEN} to {MAX_SEQ_LEN}",
                    f"use --seq-len {MIN_SEQ_LEN} to {min(MAX_SEQ_LEN, shape.max_positions) if shape else MAX_SEQ_LEN}",
                )
            )
        elif shape is not None and shape.family == "opt" and seq_len + before > shape.max_positions:
            # OPT learns one embedding per position: longer sequences have no position to look up
            left = shape.max_positions - before
            if left < 1:  # a prefix of every position: no sequence length fits
                room = shape.max_positions - seq_len
                example = f" (at most {room} prefix tokens with --seq-len {seq_len})" if room > 0 else ""
                out.append(
                    (
                        "seq_len",
                        f"has no position left: the {before} prefix tokens take all {shape.max_positions} positions "
                        f"{shape.name} was trained with",
                        f"keep --prefix-tokens + --seq-len within {shape.max_positions}{example}",
                    )
                )
            else:
                after = f" after the {before} prefix tokens" if before else ""
                out.append(
                    (
                        "seq_len",
                        f"is longer than the {left} positions{after} {shape.name} was trained with",
                        f"use --seq-len {left} or less",
                    )
                )
    return out


def check_pins_range(pins: Pins, global_batch: int) -> None:
    """The checks of pinned numbers that need neither model nor machine (``zoplan run`` makes them
    before it loads the runtime; the search checks every pin again, against both)."""
    for flag, value, least, most in (
        ("--slices", pins.slices, 1, MAX_SLICES_PER_BLOCK),
        ("--micro-batch", pins.micro_batch, 1, global_batch),
        ("--resident", pins.resident, 0, None),
        ("--ddp", pins.data, 1, None),
    ):
        if value is not None and (not _whole(value) or value < least):
            raise ZoplanError(f"{flag} must be at least {least}, got {brief(value)}", fix=f"use {flag} {least} or more")
        if value is not None and most is not None and value > most:
            raise ZoplanError(f"{flag} {value} is more than {most}", fix=f"use {flag} {most} or less")
    if pins.perturbation is not None and pins.perturbation not in (1, 2):
        raise ZoplanError(f"--pertp must be 1 or 2, got {pins.perturbation}", fix=PERTP_FIX)


def check_workload(shape: ModelShape | None, global_batch: object, seq_len: object, before: int = 0) -> None:
    """Refuse a batch shape out of range, in the command line's words (--global-batch, --seq-len);
    ``before``: positions a prefix takes first."""
    values = {"global_batch": global_batch, "seq_len": seq_len}
    for name, problem, fix in workload_problems(shape, global_batch, seq_len, before):
        flag = "--" + name.replace("_", "-")
        raise ZoplanError(f"{flag} {brief(values[name])} {problem}", fix=fix)


@dataclass
class Candidate:
    layout: Layout
    bound: Bound
    gpu_memory_bytes: int
    host_memory_bytes: int
    sim: SimResult | None = None

    @property
    def step_time_s(self) -> float:
        assert self.sim is not None
        return self.sim.step_time_s


@dataclass
class SearchResult:
    machine: Machine
    workload: Workload
    objective: str
    ranked: list[Candidate]  # simulated candidates, best first
    baseline: Candidate | None
    evaluated: int  # candidates simulated (to the end or until proven worse)
    pruned: int  # fitting candidates skipped by the bound
    aborted: int  # simulations stopped once they could no longer win
    rejected: int  # candidates that do not fit memory
    seconds: float
    considered: int = 0
    notes: list[str] = field(default_factory=list)
    pins: Pins = Pins()  # what the user fixed
    # of the ``evaluated``, how many the simulator can tell apart (zoplan.sim.inputs_key): the
    # simulations the search needed; the others took a twin's answer (without a profile, most
    # often the micro-batches whose blocks cost the same)
    distinct: int = 0

    @property
    def best(self) -> Candidate:
        return self.ranked[0]


def gpus_used(layout: Layout) -> int:
    return len(layout.gpus) * layout.nodes


def rented_per_hour(machine: Machine, layout: Layout) -> float | None:
    """$ an hour for the whole machines the layout runs on: the price of its nodes (the
    topology's price is for all of them), every GPU of them, whether the layout uses it or not (a
    GPU left idle is paid for all the same)."""
    price = machine.spec.price_per_hour_usd
    if price is None or not machine.gpus:
        return None
    return price * layout.nodes / machine.spec.nodes


def usd_per_mtok(machine: Machine, workload: Workload, layout: Layout, step_time_s: float) -> float | None:
    """$ per million tokens, charging the whole machines rented for the step (rented_per_hour)."""
    price = rented_per_hour(machine, layout)
    if price is None:
        return None
    return price / 3600 * step_time_s / workload.tokens_per_step * 1e6


def _objective(machine: Machine, workload: Workload, layout: Layout, step_s: float, objective: str) -> float:
    if objective == "cost":
        cost = usd_per_mtok(machine, workload, layout, step_s)
        if cost is not None:
            return cost
    return step_s


def _limit_s(machine: Machine, workload: Workload, layout: Layout, limit: float, objective: str) -> float | None:
    """The step time at which a candidate's objective reaches ``limit`` (None: no limit yet)."""
    if limit == float("inf"):
        return None
    per_second = _objective(machine, workload, layout, 1.0, objective)  # objectives are linear in time
    return limit / per_second * (1 + 1e-9)


def _host_gbps(machine: Machine, gpu: str) -> float:
    """What a GPU's host path carries, the slower direction."""
    return min(machine.path_gbps(machine.host_path(gpu, d)) for d in ("h2d", "d2h"))


def _peer_gbps(machine: Machine, a: str, b: str) -> float:
    """What the fastest route between two GPUs carries (its slowest link)."""
    return machine.path_gbps(machine.peer_path(a, b))


def capacity_order(machine: Machine, dtype: str, *, compute_first: bool = False) -> list[str]:
    """The machine's GPUs, the most capable first: by the bandwidth of their host path (the slower
    direction), then their compute at ``dtype`` (as the cost model plans it: the rate of that dtype
    or of the figure standing in for it, times the matmul efficiency), then their memory (``compute_first``: compute,
    then bandwidth), then how many GPUs they reach over NVLink and with what bandwidth, then how
    few share their host path's first link and their socket, then its latency, then the
    machine's own order of its GPUs (``Machine.standing``: what tells apart GPUs equal in all of
    these, never the file's order). GPUs equal in that too are interchangeable (the same to the
    last link) and keep the file's order: a uniform machine keeps it (tests/test_search.py
    reorders random machines)."""

    def key(item: tuple[int, str]) -> tuple[float, ...]:
        i, g = item
        host = _host_gbps(machine, g)
        model = machine.gpu_model(g)
        flops = matmul_rate(model, dtype)  # what the cost model plans it at
        first, second = (flops, host) if compute_first else (host, flops)
        peers = (-len(machine.nvlink_island(g)), -machine.nvlink_gbps(g))
        latency = machine.path_latency_s(machine.host_path(g, "h2d"))  # a switch more is a hop more
        # GPUs whose host path starts on the same link, then that copy from the same socket's memory
        sharing = (uplinks[machine.uplink_group(g)], sockets[machine.host_socket(g)])
        return (-first, -second, -model.memory_gib, *peers, *sharing, latency, machine.standing(g), i)

    uplinks = collections.Counter(machine.uplink_group(g) for g in machine.gpus)
    sockets = collections.Counter(machine.host_socket(g) for g in machine.gpus)

    return [g for _, g in sorted(enumerate(machine.gpus), key=key)]


def placements(machine: Machine, count: int, dtype: str = "bf16") -> dict[str, tuple[str, ...]]:
    """Which GPUs compute, chosen by what each can carry and compute, never by where it sits in
    the topology file. ``spread`` takes one GPU per PCIe uplink before reusing an uplink, so
    replicas and pair members do not share host bandwidth; ``packed`` fills the best uplinks
    first; ``compute`` (on machines that mix GPU models) takes the fastest compute first. Each
    takes the most capable GPUs of an uplink first (``capacity_order``). Where GPUs differ in
    model or NVLink, the GPUs of one model (named after it) and those of one NVLink island
    (``nvlink`` and its first GPU) are tried on their own too, spread and packed: four A100s
    joined by NVLink can beat any set that mixes in faster-computing L40S without it. ``peers``
    takes, from the most capable, the GPU best joined to those taken (the slowest route to any
    of them): a pair on one NVLink, not two GPUs a hop of NVLink apart."""
    if count > len(machine.gpus):
        return {}
    order = capacity_order(machine, dtype)
    groups_of: list[tuple[str, list[str]]] = [("spread", order)]
    groups_of.append(("compute", capacity_order(machine, dtype, compute_first=True)))
    models = sorted({machine.gpu_model_name(g) for g in order})
    if len(models) > 1:
        groups_of += [(m, [g for g in order if machine.gpu_model_name(g) == m]) for m in models]
    islands = {machine.nvlink_island(g) for g in order}
    if len(islands) > 1:
        firsts = {island: next(g for g in order if g in island) for island in islands}
        for island in sorted(islands, key=lambda i: order.index(firsts[i])):
            if len(island) > 1:
                groups_of.append((f"nvlink {firsts[island]}", [g for g in order if g in island]))
    options: dict[str, tuple[str, ...]] = {}
    for name, members in groups_of:
        if len(members) < count:
            continue
        by_uplink: dict[str, list[str]] = {}  # the uplink of the most capable GPU first
        for g in members:
            by_uplink.setdefault(machine.uplink_group(g), []).append(g)
        spread = [g for layer in itertools.zip_longest(*by_uplink.values()) for g in layer if g is not None]
        packed = [g for group in by_uplink.values() for g in group]
        packed_name = "packed" if name in ("spread", "compute") else f"{name} packed"
        for option, gpus in ((name, spread), (packed_name, packed)):
            chosen = tuple(gpus[:count])
            if option not in options and all(set(chosen) != set(seen) for seen in options.values()):
                options[option] = chosen
    if count > 1:
        # the GPUs best joined to those already taken (the slowest route to any of them), from
        # the most capable: a pair on one NVLink, not two GPUs a hop of NVLink apart
        rank = {g: i for i, g in enumerate(order)}
        joined = [order[0]]
        while len(joined) < count:
            joined.append(
                min(
                    (g for g in order if g not in joined),
                    key=lambda g: (
                        -min(_peer_gbps(machine, g, c) for c in joined),
                        max(machine.path_latency_s(machine.peer_path(g, c)) for c in joined),
                        rank[g],
                    ),
                )
            )
        if all(set(joined) != set(seen) for seen in options.values()):
            options["peers"] = tuple(joined)
    return options


def node_counts(nodes: int, global_batch: int, gpus: int = 1) -> list[int]:
    """How many of a topology's ``nodes`` (of ``gpus`` each) a layout may run on: every count the
    global batch splits evenly over (each node's replicas take equal shares), up to all of them,
    and at most ``MAX_RANKS`` GPUs in all (a plan file's rank table holds them). Only loss
    scalars cross between nodes, so each node streams the whole model every step whatever its
    share of the batch: where the transfers bound the step, more nodes make it no shorter (the
    wait for the slowest node makes it longer) and cost more."""
    return [n for n in divisors(global_batch) if n <= nodes and n * gpus <= MAX_RANKS]


def enumerate_layouts(machine: Machine, workload: Workload, pins: Pins, param_dtype: str) -> Iterator[Layout]:
    """Every layout the search considers, before memory checks (generator, deterministic)."""
    ordered = capacity_order(machine, param_dtype)  # relays: the most capable first
    n_gpus = len(machine.gpus)
    batch = workload.global_batch
    for nodes, p in itertools.product(
        [pins.nodes] if pins.nodes is not None else node_counts(machine.spec.nodes, batch, n_gpus),
        [pins.perturbation] if pins.perturbation is not None else [1, 2],
    ):
        for d in [pins.data] if pins.data is not None else range(1, n_gpus // p + 1):
            if batch % (d * nodes):
                continue
            per_replica = batch // (d * nodes)
            if pins.gpus:
                if len(pins.gpus) != p * d:
                    continue
                places = {"pinned": tuple(pins.gpus)}
            else:
                places = placements(machine, p * d, param_dtype)
            for place, compute in places.items():
                mover_sets: list[tuple[str, tuple[str, ...]]] = []
                # a pinned slice count above 1 implies sliced uploads (whole blocks are 1 slice)
                if pins.upload in (None, "whole") and pins.slices in (None, 1):
                    mover_sets.append(("whole", compute))
                if pins.upload in (None, "sliced"):
                    rest = tuple(g for g in ordered if g not in compute)
                    if pins.movers in (None, "compute") and len(compute) > 1:
                        mover_sets.append(("sliced", compute))
                    if pins.movers in (None, "all") and rest:
                        mover_sets.append(("sliced", compute + rest))
                        # and without the relays whose host path is slower than every compute
                        # GPU's (on an uneven machine, an even share through one slows them all)
                        slowest = min(_host_gbps(machine, g) for g in compute)
                        fast = tuple(g for g in rest if _host_gbps(machine, g) >= slowest)
                        if pins.movers is None and fast and len(fast) < len(rest):
                            mover_sets.append(("sliced", compute + fast))
                for upload, movers in mover_sets:
                    n = len(movers)
                    if upload == "whole":
                        slice_opts = [1]
                    elif pins.slices is not None:
                        if pins.slices % n:  # this mover count cannot split the pinned slices
                            continue
                        slice_opts = [pins.slices]
                    else:
                        slice_opts = [n, 2 * n, 4 * n]
                    wires = (
                        [pins.wire_dtype]
                        if pins.wire_dtype is not None
                        else [
                            w
                            for w in DTYPES
                            if DTYPE_BYTES[w] <= DTYPE_BYTES[param_dtype]
                            and (w == param_dtype or DTYPE_BYTES[w] < DTYPE_BYTES[param_dtype])
                        ]
                    )
                    mbs = (
                        [pins.micro_batch]
                        if pins.micro_batch is not None
                        else sorted(divisors(per_replica), reverse=True)
                    )
                    prefetches = [pins.prefetch] if pins.prefetch is not None else [1, 2]
                    # movers whose host paths differ also carry parts in proportion to them
                    share_opts: list[tuple[int, ...]] = [()]
                    if upload == "sliced":
                        weights = capacity_shares([_host_gbps(machine, g) for g in movers])
                        if len(set(weights)) > 1:
                            share_opts.append(weights)
                    for s, wire, mb, pf, shares in itertools.product(slice_opts, wires, mbs, prefetches, share_opts):
                        if per_replica % mb:
                            continue
                        yield Layout(
                            perturbation=p,
                            data=d,
                            compute_gpus=compute,
                            upload=upload,
                            movers=movers,
                            slices_per_block=s,
                            wire_dtype=wire,
                            param_dtype=param_dtype,
                            micro_batch=mb,
                            prefetch=pf,
                            nodes=nodes,
                            placement=place,
                            shares=shares,
                        )


def _with_resident(layout: Layout, count: int, layers: int) -> Layout:
    return dataclasses.replace(layout, resident=tuple(spread_resident(layers, count)))


def fit(machine: Machine, workload: Workload, layout: Layout, resident: int | None) -> tuple[list[Layout], float]:
    """Layouts with the residency options that fit memory, and the worst memory shortfall."""
    costs = StepCosts(machine, workload, layout)
    short = 0.0
    if not layout.gpus:
        return [], short
    for g in layout.gpus:
        cap = machine.gpu_model(g).memory_gib * GiB
        short = max(short, costs.gpu_memory_bytes(g) - cap)
    host_short = costs.ram_short_bytes()
    if short > 0 or host_short > 0:
        return [], max(short, host_short)
    most = costs.max_resident_blocks()
    counts = [resident] if resident is not None else sorted({0, most})
    out = [layout if c == 0 else _with_resident(layout, c, workload.model.layers) for c in counts if c <= most]
    if resident is not None and resident > most:
        return [], (resident - most) * costs.block_param_bytes
    return out, short


def search(
    machine: Machine,
    workload: Workload,
    *,
    pins: Pins = Pins(),
    objective: str = "time",
    param_dtype: str = "bf16",
    top: int = 10,
    exhaustive: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> SearchResult:
    """Find the best layouts of ``workload`` on ``machine``.

    ``exhaustive`` simulates every fitting candidate (for tests of the pruning). ``progress`` is
    called with the candidates weighed so far (simulated or pruned) and the candidates that fit."""
    if top < 1:
        raise ZoplanError(f"--top must be at least 1, got {top}", fix="use --top 1 or more (the families shown)")
    if objective not in OBJECTIVES:
        raise ZoplanError(f"unknown objective '{objective}'", fix="use 'time' or 'cost'")
    if param_dtype not in DTYPES:
        raise ZoplanError(f"unknown dtype '{param_dtype}'", fix=f"use one of {', '.join(DTYPES)}")
    _check_pins(machine, workload, pins)
    t0 = time.perf_counter()
    fitting: list[tuple[Layout, Bound, StepCosts]] = []
    considered = rejected = 0
    worst_gpu_short = worst_host_short = None
    most_resident = -1  # with --resident: the most blocks any layout could keep (-1: none fits at all)
    for base in enumerate_layouts(machine, workload, pins, param_dtype):
        considered += 1
        layouts, _ = fit(machine, workload, base, pins.resident)
        if not layouts:
            rejected += 1
            costs = StepCosts(machine, workload, base)
            gshort = max(costs.gpu_memory_bytes(g) - machine.gpu_model(g).memory_gib * GiB for g in base.gpus)
            hshort = costs.ram_short_bytes()
            worst_gpu_short = gshort if worst_gpu_short is None else min(worst_gpu_short, gshort)
            worst_host_short = hshort if worst_host_short is None else min(worst_host_short, hshort)
            if pins.resident is not None and gshort <= 0 and hshort <= 0:
                most_resident = max(most_resident, costs.max_resident_blocks())
            continue
        for layout in layouts:
            costs = StepCosts(machine, workload, layout)
            fitting.append((layout, machine_bound(costs), costs))
    if not fitting:
        if most_resident >= 0:  # the layouts fit, but not with that many resident blocks
            raise ZoplanError(
                f"--resident {pins.resident} does not fit on '{machine.name}': at most {most_resident} of "
                f"{workload.model.name}'s blocks fit beside the rest of a layout's memory",
                fix=f"use --resident {most_resident} or fewer, or leave it out (the search then tries them)",
            )
        raise _nothing_fits(machine, workload, considered, worst_gpu_short, worst_host_short, pins)

    def rank(layout: Layout, step_s: float, memory: int) -> tuple[float, int, int, str]:
        # equal objectives (to rounding: 10 significant digits) prefer fewer GPUs, then less GPU
        # memory. To 9 decimals, a step of 100 us tied with any within 5e-10 s, 5e-6 of itself: far
        # coarser than the pruning's 1e-9, which then dropped a family the exhaustive order showed
        return (
            float(f"{_objective(machine, workload, layout, step_s, objective):.9e}"),
            gpus_used(layout),
            memory,
            repr(layout),
        )

    fitting.sort(key=lambda item: rank(item[0], item[1].prune_bound_s, _peak_memory(item[2])))
    # Branch and bound for the best candidate of each of the ``top`` best families (a family is
    # one parallel shape: perturbation x data and how blocks are moved). A candidate is simulated
    # only if its bound beats both its family's best and the top-th best family, so every
    # family shown is exact and the overall best is never pruned.
    simulated: list[Candidate] = []
    family_best: dict[tuple[int, int, int, str, int], float] = {}
    pruned = aborted = 0

    def limit_of(index: int) -> float | None | Literal["pruned"]:
        """The step time a candidate must beat as things stand (None: any): ``pruned`` when its
        bound cannot beat it. Limits only tighten as results come in."""
        layout, bound, _ = fitting[index]
        if exhaustive:
            return None
        lower = _objective(machine, workload, layout, bound.prune_bound_s, objective)
        bests = sorted(family_best.values())
        threshold = bests[top - 1] if len(bests) >= top else float("inf")
        limit = min(threshold, family_best.get(family(layout), float("inf")))
        # the relative 1e-9 absorbs float rounding between the bound and the simulation
        if lower >= limit * (1 - 1e-9):
            return "pruned"
        return _limit_s(machine, workload, layout, limit, objective)

    # what each simulation found is kept by what it read (zoplan.sim.inputs_key): layouts that
    # differ only in what the simulation does not read (most often the micro-batch) are
    # simulated once, and a twin proven slower than a limit is not simulated again
    sims = _Simulations(fitting, limit_of)
    asked: set[tuple[object, ...]] = set()  # what the simulations the search asked for read
    try:
        for weighed, (layout, bound, costs) in enumerate(fitting):
            if progress is not None:
                progress(weighed, len(fitting))
            limit_s = limit_of(weighed)
            if limit_s == "pruned":
                pruned += 1
                continue
            asked.add(sims.key(weighed))
            result = sims.answer(weighed, limit_s)
            if isinstance(result, AtLeast):
                aborted += 1  # proven no better than the limit, by its simulation or a twin's
                continue
            simulated.append(Candidate(layout, bound, _peak_memory(costs), costs.host_memory_bytes(), result))
            obj = _objective(machine, workload, layout, result.step_time_s, objective)
            family_best[family(layout)] = min(obj, family_best.get(family(layout), float("inf")))
    finally:
        sims.close()
    simulated.sort(key=lambda c: rank(c.layout, c.step_time_s, c.gpu_memory_bytes))
    baseline = zo2_baseline(machine, workload, param_dtype)
    return SearchResult(
        machine=machine,
        workload=workload,
        objective=objective,
        ranked=simulated,
        baseline=baseline,
        evaluated=len(simulated) + aborted,
        pruned=pruned,
        aborted=aborted,
        rejected=rejected,
        seconds=time.perf_counter() - t0,
        considered=considered,
        pins=pins,
        distinct=len(asked),
    )


class _Simulations:
    """The simulations a search asks for, run in its own process or, once it has run for
    ``parallel.START_AFTER_S``, on forked workers (zoplan.sim.parallel) that simulate ahead of it
    the candidates it will reach next, each with the limit ``limit_of`` gives it now. Answers are
    kept by what the simulation reads, so a twin's answer serves every twin."""

    def __init__(
        self,
        fitting: list[tuple[Layout, Bound, StepCosts]],
        limit_of: Callable[[int], float | None | Literal["pruned"]],
    ) -> None:
        self.fitting = fitting
        self.limit_of = limit_of
        self.keys: dict[int, tuple[object, ...]] = {}
        self.found: dict[tuple[object, ...], Answer | Exception] = {}
        self.flying: dict[tuple[object, ...], int] = {}  # key -> candidates in flight with it
        self.workers: Workers | None = None
        self.wanted = workers_wanted()
        self.spent_s = 0.0  # simulating in this process
        self.next = 0  # the first candidate not yet looked at for a worker

    def key(self, index: int) -> tuple[object, ...]:
        key = self.keys.get(index)
        if key is None:
            key = self.keys[index] = inputs_key(self.fitting[index][2])
        return key

    def answer(self, index: int, limit_s: float | None) -> Answer:
        """What ``simulate`` of candidate ``index`` with ``limit_s`` gives: the result, or
        ``AtLeast(limit_s)`` where it would raise Exceeded."""
        key = self.key(index)
        while True:
            found = self.found.get(key)
            if isinstance(found, Exception):
                raise found
            told = None if found is None else answers(found, limit_s)
            if told is not None:
                return told
            if self.workers is None and key not in self.flying:
                if self.wanted > 1 and self.spent_s >= parallel.START_AFTER_S:
                    self.workers = Workers([c for _, _, c in self.fitting], self.wanted)
                else:
                    return self._here(index, key, limit_s)
            assert self.workers is not None
            if key not in self.flying and self.workers.idle:
                self._submit(index, key, limit_s)
            self._fill(index + 1)
            self._collect()  # the answer wanted, or a worker free for it

    def _here(self, index: int, key: tuple[object, ...], limit_s: float | None) -> Answer:
        t0 = time.perf_counter()
        try:
            answer = simulate_answer(self.fitting[index][2], limit_s)
        finally:
            self.spent_s += time.perf_counter() - t0
        self._keep(key, answer)
        return answer

    def _keep(self, key: tuple[object, ...], answer: Answer | Exception) -> None:
        old = self.found.get(key)
        if isinstance(old, SimResult) or (
            isinstance(old, AtLeast) and isinstance(answer, AtLeast) and old.limit_s >= answer.limit_s
        ):
            return
        self.found[key] = answer

    def _submit(self, index: int, key: tuple[object, ...], limit_s: float | None) -> None:
        assert self.workers is not None
        self.workers.submit(index, limit_s)
        self.flying[key] = self.flying.get(key, 0) + 1

    def _fill(self, start: int) -> None:
        """Give every idle worker a candidate the search will need next. A candidate passed over
        stays so: its limit only tightens, so what rules it out now still will."""
        assert self.workers is not None
        self.next = max(self.next, start)
        while self.workers.idle and self.next < len(self.fitting):
            index = self.next
            self.next += 1
            limit_s = self.limit_of(index)
            if limit_s == "pruned":
                continue
            key = self.key(index)
            found = self.found.get(key)
            if key in self.flying or isinstance(found, Exception):
                continue
            if found is not None and answers(found, limit_s) is not None:
                continue
            self._submit(index, key, limit_s)

    def _collect(self) -> None:
        assert self.workers is not None
        for index, reply in self.workers.collect():
            key = self.key(index)
            self.flying[key] -= 1
            if not self.flying[key]:
                del self.flying[key]
            self._keep(key, reply)

    def close(self) -> None:
        if self.workers is not None:
            self.workers.close()
            self.workers = None


def family(layout: Layout) -> tuple[int, int, int, str, int]:
    """The parallel shape of a layout: what the results table shows one row of."""
    return (layout.perturbation, layout.data, layout.nodes, layout.upload, len(layout.movers))


def top_families(ranked: list[Candidate], top: int) -> list[Candidate]:
    """The best candidate of each of the ``top`` best families, best first."""
    seen: set[tuple[int, int, int, str, int]] = set()
    out: list[Candidate] = []
    for cand in ranked:
        fam = family(cand.layout)
        if fam not in seen:
            seen.add(fam)
            out.append(cand)
        if len(out) == top:
            break
    return out


def _peak_memory(costs: StepCosts) -> int:
    return max(costs.gpu_memory_bytes(g) for g in costs.layout.gpus)


def zo2_baseline(machine: Machine, workload: Workload, param_dtype: str) -> Candidate | None:
    """ZO2 on the same machine, on its best single GPU: dual forward, whole-block transfers, no
    residency, the largest micro-batch that fits. Prefetch 2 gives ZO2's three-stage pipeline:
    block i+1 uploading, block i computing and block i-1 offloading are on the GPU at once. Each
    kind of GPU the machine has (its model and its host path) is tried; the fastest is the
    baseline (equals: the most capable, ``capacity_order``)."""
    best: Candidate | None = None
    tried: set[tuple[object, ...]] = set()
    for gpu in capacity_order(machine, param_dtype):
        paths = [machine.host_path(gpu, d) for d in ("h2d", "d2h")]
        kind = (
            machine.gpu_model_name(gpu),
            tuple(tuple(machine.directed[lid].gbps for lid in path) for path in paths),
            tuple(machine.path_latency_s(path) for path in paths),
            machine.socket_memory_gbps(machine.host_socket(gpu)),
        )
        if kind in tried:
            continue
        tried.add(kind)
        cand = _zo2_on(machine, workload, param_dtype, gpu)
        if cand is not None and (best is None or cand.step_time_s < best.step_time_s):
            best = cand
    return best


def _zo2_on(machine: Machine, workload: Workload, param_dtype: str, gpu: str) -> Candidate | None:
    for mb in sorted(divisors(workload.global_batch), reverse=True):
        layout = Layout(
            perturbation=1,
            data=1,
            compute_gpus=(gpu,),
            upload="whole",
            movers=(gpu,),
            slices_per_block=1,
            wire_dtype=param_dtype,
            param_dtype=param_dtype,
            micro_batch=mb,
            prefetch=2,
            nodes=1,
            placement="zo2",
        )
        costs = StepCosts(machine, workload, layout)
        if costs.gpu_memory_bytes(gpu) > machine.gpu_model(gpu).memory_gib * GiB:
            continue
        if costs.ram_short_bytes() > 0:
            return None
        return Candidate(
            layout, machine_bound(costs), costs.gpu_memory_bytes(gpu), costs.host_memory_bytes(), simulate(costs)
        )
    return None


def evaluate(machine: Machine, workload: Workload, layout: Layout, record: bool = False) -> Candidate:
    """Simulate one given layout (used by ``zoplan timeline``)."""
    costs = StepCosts(machine, workload, layout)
    return Candidate(
        layout,
        machine_bound(costs),
        max(costs.gpu_memory_bytes(g) for g in layout.gpus),
        costs.host_memory_bytes(),
        simulate(costs, record=record),
    )


def _listed(values: list[int], most: int = 12) -> str:
    """Whole numbers for a message: all of them, or the first and last few of many."""
    shown = [str(v) for v in values]
    if len(shown) > most:
        shown = shown[: most - 3] + ["...", *shown[-2:]]
    return ", ".join(shown)


def _check_pins(machine: Machine, workload: Workload, pins: Pins) -> None:
    if not machine.gpus:
        raise ZoplanError(
            f"topology '{machine.name}' has no GPUs to plan for",
            fix="describe its devices in the topology file (zoplan topo detect writes one), or plan on a bundled one: zoplan topo list",
        )
    check_workload(workload.model, workload.global_batch, workload.seq_len, workload.tuning.positions)
    layers, gpus = workload.model.layers, len(machine.gpus)
    for flag, value, least, most, why in (
        (
            "--slices",
            pins.slices,
            1,
            min(MAX_SLICES_PER_BLOCK, workload.model.block_params()),
            "the slices a block can be cut into",
        ),
        ("--micro-batch", pins.micro_batch, 1, workload.global_batch, "the global batch"),
        ("--prefetch", pins.prefetch, 1, layers, f"the blocks of {workload.model.name}"),
        ("--resident", pins.resident, 0, layers, f"the blocks of {workload.model.name}"),
        ("--ddp", pins.data, 1, gpus, f"the GPUs per node of '{machine.name}'"),
        ("--nodes", pins.nodes, 1, machine.spec.nodes, f"the nodes of '{machine.name}'"),
    ):
        if value is None:
            continue
        if not _whole(value) or value < least:
            raise ZoplanError(f"{flag} must be at least {least}, got {brief(value)}", fix=f"use {flag} {least} or more")
        if value > most:
            raise ZoplanError(f"{flag} {value} is more than {why} ({most})", fix=f"use {flag} {most} or less")
    if pins.gpus is not None:
        if not pins.gpus:
            raise ZoplanError("--gpus names no GPU", fix=f"list compute GPUs, e.g. {','.join(machine.gpus[:2])}")
        if len(set(pins.gpus)) != len(pins.gpus):
            raise ZoplanError(
                f"--gpus names a GPU twice: {','.join(pins.gpus)}",
                fix=f"name each once: --gpus {','.join(dict.fromkeys(pins.gpus))}",
            )
        want = (pins.perturbation or 1) * (pins.data or 1)
        if pins.perturbation is not None and pins.data is not None and len(pins.gpus) != want:
            raise ZoplanError(
                f"--gpus lists {len(pins.gpus)} GPUs, but --pertp {pins.perturbation} x "
                f"--ddp {pins.data} = {want} compute GPUs",
                fix=f"list {want} GPUs, or leave --pertp or --ddp out",
            )
        unknown = [g for g in pins.gpus if g not in machine.gpus]
        if unknown:
            raise ZoplanError(
                f"--gpus names {', '.join(unknown)}, not in topology '{machine.name}'",
                fix=f"choose among {', '.join(machine.gpus)}",
            )
    if pins.perturbation is not None and pins.perturbation not in (1, 2):
        raise ZoplanError(f"--pertp must be 1 or 2, got {pins.perturbation}", fix=PERTP_FIX)
    if pins.perturbation is not None and pins.perturbation > len(machine.gpus):
        raise ZoplanError(
            f"--pertp {pins.perturbation} needs {pins.perturbation} GPUs, and '{machine.name}' has {len(machine.gpus)}",
            fix="leave --pertp out (or --pertp 1: both branches on one GPU, one after the other)",
        )
    if pins.nodes is not None and pins.nodes * len(machine.gpus) > MAX_RANKS:
        most = MAX_RANKS // len(machine.gpus)
        raise ZoplanError(
            f"--nodes {pins.nodes} of {len(machine.gpus)} GPUs each is {pins.nodes * len(machine.gpus)} GPUs, more "
            f"than a plan spans ({MAX_RANKS})",
            fix=f"use --nodes {most} or less",
        )
    if pins.nodes is not None and workload.global_batch % pins.nodes:
        raise ZoplanError(
            f"global batch {workload.global_batch} does not divide among {pins.nodes} nodes (--nodes {pins.nodes})",
            fix=f"use a global batch that is a multiple of {pins.nodes}, or another --nodes",
        )
    if pins.data is not None:
        if pins.data < 1:
            raise ZoplanError(f"--ddp must be at least 1, got {pins.data}", fix="use --ddp 1 or more")
        nodes = pins.nodes or 1  # (unpinned, the search tries one node too)
        replicas = pins.data * nodes
        if workload.global_batch % replicas:
            raise ZoplanError(
                f"global batch {workload.global_batch} does not divide among {replicas} replicas "
                f"(--ddp {pins.data} x {nodes} node(s))",
                fix=f"use a global batch that is a multiple of {replicas}",
            )
        if pins.micro_batch is not None and (workload.global_batch // replicas) % pins.micro_batch:
            raise ZoplanError(
                f"micro-batch {pins.micro_batch} does not divide the per-replica batch "
                f"{workload.global_batch // replicas}",
                fix=f"use a micro-batch among {_listed(divisors(workload.global_batch // replicas))}, "
                "or leave --micro-batch out",
            )
        if pins.data * (pins.perturbation or 1) > len(machine.gpus):
            raise ZoplanError(
                f"--ddp {pins.data} x --pertp {pins.perturbation or 1} needs more GPUs "
                f"than the {len(machine.gpus)} of '{machine.name}'",
                fix=f"use --ddp {max(1, len(machine.gpus) // (pins.perturbation or 1))} or less",
            )
    if pins.wire_dtype is not None and pins.wire_dtype not in DTYPES:
        raise ZoplanError(f"unknown wire dtype '{pins.wire_dtype}'", fix=f"use one of {', '.join(DTYPES)}")
    if pins.micro_batch is not None and workload.global_batch % pins.micro_batch:
        raise ZoplanError(
            f"micro-batch {pins.micro_batch} does not divide the global batch {workload.global_batch}",
            fix=f"use a micro-batch among {_listed(divisors(workload.global_batch))}, or leave --micro-batch out",
        )
    # pins that contradict one another: named, rather than "no layout matches" (or one dropped)
    if pins.upload == "whole" and pins.slices is not None and pins.slices > 1:
        raise ZoplanError(
            f"--upload whole moves each block whole, but --slices {pins.slices} cuts it into slices",
            fix="leave one of them out (--slices implies --upload sliced)",
        )
    if pins.upload == "whole" and pins.movers == "all":
        raise ZoplanError(
            "--movers all shares a block's slices among every GPU, but --upload whole has each compute GPU "
            "move its own blocks whole",
            fix="leave one of them out (--movers applies to sliced uploads)",
        )
    if pins.slices is not None and pins.perturbation is not None and pins.data is not None:
        computes = pins.perturbation * pins.data
        # sliced: each mover (the compute GPUs, and relays with --movers all) carries as many slices
        if pins.slices > 1 and pins.movers == "compute" and pins.slices % computes:
            raise ZoplanError(
                f"--slices {pins.slices} does not divide among the {computes} compute GPUs of --pertp "
                f"{pins.perturbation} x --ddp {pins.data} that move them (--movers compute)",
                fix=f"use a multiple of {computes} for --slices",
            )


def _nothing_fits(
    machine: Machine,
    workload: Workload,
    considered: int,
    gpu_short: float | None,
    host_short: float | None,
    pins: Pins | None = None,
) -> ZoplanError:
    if considered == 0:
        why = ""
        if pins is not None and pins.slices is not None and pins.slices > 1:
            # every mover carries as many slices of a block: the count must divide among them
            why = f": --slices {pins.slices} divides evenly among none of the sets of GPUs that could move them"
        return ZoplanError(
            f"no layout of '{machine.name}' matches the pinned options{why}",
            fix="pin fewer decisions, or check that --gpus has --pertp x --ddp entries",
        )
    parts = []
    if gpu_short is not None and gpu_short > 0:
        device = "CPU rank" if machine.cpu_ranks_only else "GPU"  # (a CPU rank's memory_gib: its share of RAM)
        parts.append(f"{device} memory is short by {gib(gpu_short)} per {device} even in the smallest layout")
    if host_short is not None and host_short > 0:
        ranks = " and the CPU ranks' working sets" if machine.cpu_ranks_only else ""
        parts.append(
            f"host memory is short by {gib(host_short)} for one copy of the parameters{ranks} "
            f"({gib(machine.host_memory_bytes)} installed, {gib(host_reserve_bytes(machine))} kept for the system)"
        )
    what = "; ".join(parts) or "no candidate fits memory"
    gpu_is_short = gpu_short is not None and gpu_short > 0
    if host_short is not None and host_short > 0 and not gpu_is_short and not machine.cpu_ranks_only:
        # the host holds the parameters once, whatever the batch: the batch cannot help, and the
        # search already tried the narrowest host-copy dtype it was allowed
        fix = "a machine with more host memory (zoplan compare --model ... -t ... -t ...)"
        if (
            pins is not None
            and pins.wire_dtype is not None
            and DTYPE_BYTES[pins.wire_dtype] > min(DTYPE_BYTES.values())
        ):
            fix = f"a 2-byte host copy (--wire-dtype bf16 or fp16, not {pins.wire_dtype}), or " + fix
    else:
        fix = "use a smaller micro-batch or sequence length, a narrower --dtype, or a machine with more memory"
    return ZoplanError(f"{workload.model.name} does not fit on '{machine.name}': {what}", fix=fix)
