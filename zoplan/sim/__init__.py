"""Discrete-event simulation of ZO steps on one node: the step program, timed.

The order of a step is not written here: zoplan.program builds it, as per-rank lists of
operations, each on one of the rank's four in-order streams (``upload``, ``exchange``,
``compute``, ``offload``, like CUDA streams ordered by events) with the ops it waits for. This
module walks those lists, one process per stream of each rank (on the event loop of
zoplan.sim.events), and times each op:
- transfers (uploads, write-backs, all-gather rounds) cross the machine's links and each
  socket's memory bus, shared max-min fairly between the transfers crossing them (flownet), or
  take the calibrated all-gather time;
- compute ops take the cost model's time (zoplan.sim.costs): measured with a profile, from FLOPs and
  HBM bandwidth without;
- an op that takes a device buffer waits for one of the rank's ``prefetch + 1`` to be free;
- a collective starts once every member's stream has reached it;
- a CPU rank is one thread: its streams take turns on one core.

Three steps are simulated and the middle one is reported: it both receives the prefetch of its
first blocks from the step before and pays for the prefetch of the step after, like every step
of a long run. The last step would pay for no successor and look a little faster than reality.
Nothing after the middle step's end can change it, so unless a trace is recorded (``zoplan
timeline`` shows all three) the simulation stops there.
"""

from __future__ import annotations

import bisect
import functools
import gc
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, NamedTuple

from zoplan.sim.costs import StepCosts
from zoplan.sim.events import AllOf, Event, Loop, Process, Slots
from zoplan.sim.flownet import FlowNet
from zoplan.program import CATEGORY, END, Kind, Op, span_block
from zoplan.topology import Machine
from zoplan.vocab import Stream

STEPS = 3
_ID, _RANKS = itemgetter(0), itemgetter(3)  # an op's id and ranks (Op's fields 0 and 3)
REPORTED_STEP = 1
# the events of an op, by step: the step before the first, then the simulated ones
WIDE = STEPS + 1


class Span(NamedTuple):
    """One op's time on one rank; ``label`` is the op's id in the step program."""

    gpu: str
    stream: str
    category: str
    label: str
    step: int
    block: int
    start: float
    end: float


@dataclass
class SimResult:
    step_time_s: float  # the window, and on several nodes the wait for the slowest (straggler_s)
    window: tuple[float, float]
    step_ends: list[float]
    utilization: dict[str, float]  # busy fraction of each resource / stream in the reported step
    bottleneck: str
    spans: list[Span] = field(default_factory=list)
    link_samples: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    capacity: dict[str, float] = field(default_factory=dict)
    straggler_s: float = 0.0  # nodes > 1: the expected wait for the slowest node (StepCosts.straggler_s)
    # busy fraction of each sliced layout's exchange stream (its updates and all-gathers, one after
    # the other) in the reported step: a stream, not a resource, so never the bottleneck
    streams: dict[str, float] = field(default_factory=dict)

    def runner_up(self, within: float = 0.9) -> str | None:
        """The busiest resource of another kind than the bottleneck (PCIe when it is compute, and
        so on) when it is busy at least ``within`` of the bottleneck's share of the step: the
        step then leans on both, and making either faster alone gains less than it seems. Beside
        a compute bottleneck, an exchange stream counts too: its all-gathers may keep the links
        below the mark while the stream, updating and gathering by turns, is as busy as compute."""
        top = self.utilization.get(self.bottleneck, 0.0)
        kind = self.bottleneck.split(" ")[0]
        busy = dict(self.utilization)
        if kind == "compute":
            busy.update(self.streams)
        # the busiest; among equals (symmetric layouts) the first by name, as for the bottleneck
        others = sorted((-round(u, 6), name) for name, u in busy.items() if name.split(" ")[0] != kind)
        return others[0][1] if others and top > 0 and -others[0][0] >= within * top else None

    def bound_story(self) -> str:
        """``compute gpu0 (99% busy)``, and the runner-up when there is one: what the step is bound by."""
        said = f"{self.bottleneck} ({self.utilization.get(self.bottleneck, 0.0):.0%} busy)"
        second = self.runner_up()
        if second is not None:
            busy = self.utilization.get(second, self.streams.get(second, 0.0))
            said += f", then {second} ({busy:.0%})"
        return said


def link_label(resource: str, machine: Machine) -> str:
    if resource.startswith("mem:"):
        return f"host memory {resource[4:]}"
    kind = machine.directed[resource].kind
    return f"{'NVLink' if kind == 'nvlink' else 'PCIe' if kind == 'pcie' else 'socket link'} {resource}"


class Exceeded(Exception):
    """The reported step is already longer than the caller's limit (see ``simulate``)."""


class _Reported(Exception):
    """The reported step has ended: the rest of the simulation is only for a recorded trace."""


class _Mirror:
    """Whether the reported step has become the step before it, shifted in time.

    Every op runs once a step, so the op starts and ends of step ``s`` pair with those of step
    ``s - 1``. Once, for a while, every start and end has come exactly ``shift`` after its pair
    (the start of a step over), every op still running started within that while, and the
    starts and ends of the step before until ``now - shift`` are as many as this step's until
    now, the state of the simulation now is the state ``shift`` ago, one step on: the rest
    repeats, and the reported step lasts ``shift`` (to the float rounding of the times: ~1e-14 of
    the step). A limited simulation stops there when that is over its limit; its exact result is
    never needed.

    Not where CPU ranks' streams queue for their one core: the order of that queue is state the
    comparison does not see. There it stopped 4 of the 2313 early stops of the 147 bundled
    model-topology searches wrongly (the warm-up's slower step taken for the reported one); on
    the GPU machines, never (docs/results/planner.md)."""

    __slots__ = ("times", "starts", "ends", "running", "shift", "since", "count", "least")

    def __init__(self, ops: int, lanes: int) -> None:
        nan = float("nan")
        self.times: tuple[list[float], ...] = tuple([] for _ in range(STEPS))  # each step's, in order
        # by where the op's event of the step is (op * WIDE + 1 + step): its pair is just before
        self.starts = [nan] * (ops * WIDE)
        self.ends = [nan] * (ops * WIDE)
        self.running: dict[int, float] = {}  # the same index -> start
        self.shift, self.since, self.count = nan, 0.0, 0
        self.least = 2 * lanes  # matched starts and ends in a row before the state is compared

    # start and end: the same, on their own tables (written out: the lanes call them for every op)
    def start(self, at: int, step: int, now: float) -> None:
        self.running[at] = now
        self.starts[at] = now
        self.times[step].append(now)
        if step:
            shift = now - self.starts[at - 1]  # nan without a pair
            if abs(shift - self.shift) <= 1e-12 * now:
                self.count += 1
            else:
                self.shift, self.since, self.count = shift, now, 1

    def end(self, at: int, step: int, now: float) -> None:
        self.running.pop(at, None)
        self.ends[at] = now
        self.times[step].append(now)
        if step:
            shift = now - self.ends[at - 1]
            if abs(shift - self.shift) <= 1e-12 * now:
                self.count += 1
            else:
                self.shift, self.since, self.count = shift, now, 1

    def repeats(self, now: float) -> float | None:
        """The shift, if the state now repeats the state that long ago (else None)."""
        shift = self.shift
        if self.count < self.least or shift != shift:
            return None
        tol = 1e-12 * now
        if any(at % WIDE == 1 or t < self.since - tol for at, t in self.running.items()):  # of step 0, or before
            return None
        # what happened before this instant (events of this instant may still be on their way)
        for step in range(1, STEPS):
            here = bisect.bisect_left(self.times[step], now - tol)
            if here != bisect.bisect_left(self.times[step - 1], now - shift - tol):
                return None
        return shift


def simulate(costs: StepCosts, record: bool = False, limit_s: float | None = None) -> SimResult:
    """Simulate ``STEPS`` steps of ``costs.program`` and report the steady-state step.

    With ``limit_s``, stop early and raise :class:`Exceeded` as soon as the reported step is
    certain to take at least that long: the search does not need the exact time of a
    candidate that cannot win."""
    # A simulation allocates some 10^5 short-lived objects (ops, events, processes) and frees
    # them all at its end: Python's cycle collector would walk them over and over meanwhile (a
    # third of a search's time) to find nothing to free. It runs once the simulation is done.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _simulate(costs, record, limit_s)
    except Exceeded:
        # raised again from here, without the traceback into the simulation's frames: those
        # frames and the traceback refer to one another, which only the cycle collector frees
        pass
    finally:
        if collecting:
            gc.enable()
    raise Exceeded(f"step longer than {limit_s} s")


class _Timing(NamedTuple):
    """Every figure of a simulation besides the machine, the model and the layout's shape: what
    each op takes (the what-if factors applied) and each link carries."""

    update_s: tuple[tuple[str, float], ...]  # per rank: a whole block's or one slice's update
    block_s: tuple[tuple[str, float], ...]  # per compute rank
    head_s: tuple[tuple[str, float], ...]
    embed_s: tuple[tuple[str, float], ...]
    barrier_s: float
    scalar_latency: float
    loop_s: float
    measured_round_s: float | None
    collective_call_s: float
    transfer_scale: float


def _timing(costs: StepCosts) -> _Timing:
    L = costs.layout
    slower_compute, slower_transfers = costs.compute_scale, costs.transfer_scale
    whole = L.upload == "whole"
    measured_round_s = costs.allgather_round_s() if L.upload == "sliced" and len(L.movers) > 1 else None
    return _Timing(
        update_s=tuple(
            (g, (costs.whole_update_s(g) if whole else costs.update_slice_s(g)) * slower_compute) for g in L.gpus
        ),
        block_s=tuple((g, costs.block_forward_s(g) * slower_compute) for g in L.compute_gpus),
        head_s=tuple((g, costs.head_s(g) * slower_compute) for g in L.compute_gpus),
        embed_s=tuple((g, costs.embed_s(g) * slower_compute) for g in L.compute_gpus),
        barrier_s=costs.whole_barrier_s() * slower_compute,
        scalar_latency=costs.scalar_allreduce_s(),
        loop_s=costs.loop_s() * slower_compute,
        measured_round_s=None if measured_round_s is None else measured_round_s * slower_transfers,
        collective_call_s=costs.collective_call_s(L.movers),
        transfer_scale=slower_transfers,
    )


def inputs_key(costs: StepCosts) -> tuple[object, ...]:
    """Everything a simulation of ``costs`` reads but the machine and the workload, as one
    hashable value: on one machine and workload, two layouts with equal keys simulate to the same
    result (the search simulates such a pair once). The micro-batch and the placement's name are
    left out: the step program depends on the micro-batch only through its FLOPs, which the
    durations hold (two micro-batches that cost the same per block, as they do without a
    calibrated profile, simulate alike)."""
    shape = costs.layout.to_dict()
    for name in ("micro_batch", "placement"):
        shape.pop(name, None)
    return (repr(sorted(shape.items())), _timing(costs))


# what an op costs, as a lane acts on it: (TRANSFER, (bytes, route, latency)), (TIMEOUT, seconds),
# (RING, bytes each ring step moves) or (NOTHING, None)
_Action = tuple[int, Any]
# an op compiled for the lanes (which then need not read the op, a named tuple, whose fields cost
# a lookup each): its deps and frees (where their events are, for step 0), its action, the cores it
# holds, its span category and block, whether it is compute-stream work, whether it takes a buffer,
# its ranks, whether the early stop looks after it (a block), whether a trace shows it untimed (an
# unpacking), its id
_Compiled = tuple[
    tuple[int, ...],
    tuple[int, ...],
    _Action,
    tuple[str, ...],
    str,
    int,
    bool,
    bool,
    tuple[str, ...],
    bool,
    bool,
    str,
]


def _simulate(costs: StepCosts, record: bool, limit_s: float | None) -> SimResult:
    machine, L, model, program = costs.machine, costs.layout, costs.model, costs.program
    # what-if factors (zoplan.planner.sensitivity): every byte moved (the durations hold the rest)
    timing = _timing(costs)
    slower_transfers = timing.transfer_scale
    loop = Loop()
    capacity: dict[str, float] = {}
    for g in L.movers:
        for lid in machine.host_path(g, "h2d") + machine.host_path(g, "d2h"):
            capacity[lid] = machine.directed[lid].gbps * 1e9 / slower_transfers
        sock = machine.host_socket(g)
        capacity[f"mem:{sock}"] = machine.socket_memory_gbps(sock) * 1e9 / slower_transfers
    n_movers = len(L.movers)
    ring: list[tuple[list[str], float]] = []
    if L.upload == "sliced" and n_movers > 1:
        for i, g in enumerate(L.movers):
            path = machine.peer_path(g, L.movers[(i + 1) % n_movers])
            for lid in path:
                capacity[lid] = machine.directed[lid].gbps * 1e9 / slower_transfers
            ring.append((path, machine.path_latency_s(path)))
    net = FlowNet(loop, capacity, record=record)

    # ----- what each op costs (computed once: the lanes ask thousands of times) ----------------
    update_s, block_s = dict(timing.update_s), dict(timing.block_s)
    head_s, embed_s = dict(timing.head_s), dict(timing.embed_s)
    barrier_s, scalar_latency, loop_s = timing.barrier_s, timing.scalar_latency, timing.loop_s
    measured_round_s = timing.measured_round_s
    routes = {
        (g, d): (
            tuple(machine.host_path(g, d)) + (f"mem:{machine.host_socket(g)}",),
            machine.path_latency_s(machine.host_path(g, d)),
        )
        for g in L.movers
        for d in ("h2d", "d2h")
    }

    deadline: list[float] | None = [float("inf")] if limit_s is not None else None
    spans: list[Span] = []
    buffers = {g: Slots(loop, L.prefetch + 1) for g in L.gpus}
    # A CPU rank is one thread (the runtime on CPU copies, updates, all-gathers and computes one
    # after the other): its four streams share one core.
    cores = {g: Slots(loop, 1) for g in L.gpus if machine.gpu_model(g).kind == "cpu"}

    # ----- the program, compiled: each op's events by index, its cost as an action ---------------
    # an op's index is its place in the program (an id names one op of the ranks it names)
    ops = program.ops
    index = dict(zip(zip(map(_ID, ops), map(_RANKS, ops)), range(len(ops))))
    if len(index) != len(ops):  # a bug in zoplan.program
        raise RuntimeError(f"the step program names an op twice ({L})")
    index[END, ()] = len(index)
    # an op's event is made when something first waits for it; an op that ends before anyone
    # waits leaves ``done`` (most ops: a simulation makes half as many events)
    done = Event()  # also anything of a step before the first: nothing to wait for
    loop.call(done.fire)
    # op i's event of step s is at i * WIDE + 1 + s, from the step before the first (s = -1: done)
    events: list[Event | None] = [done, *[None] * STEPS] * len(index)

    def awaited(at: int) -> Event:
        e = events[at]
        if e is None:
            e = events[at] = Event()
        return e

    def finish(at: int) -> None:
        e = events[at]
        if e is None:
            events[at] = done
        else:
            loop.call(e.fire)

    TRANSFER, TIMEOUT, RING, NOTHING = range(4)
    # the hop latency per ring step, and the collective call's own cost
    ring_s = max((lat for _, lat in ring), default=0.0) * (n_movers - 1) + timing.collective_call_s

    # what a compute op takes: by its rank, or the same on every rank
    per_rank_s = {Kind.BLOCK: block_s, Kind.UPDATE: update_s, Kind.EMBED: embed_s, Kind.HEAD: head_s}
    constant_s = {Kind.ALLREDUCE: scalar_latency, Kind.HOST: loop_s, Kind.BARRIER: barrier_s}

    def action(op: Op) -> _Action:
        g = op.ranks[0]
        kind = op.kind
        if kind is Kind.H2D or kind is Kind.D2H:
            route, latency = routes[g, kind.value]
            return TRANSFER, (op.nbytes, route, latency)
        if kind is Kind.ALLGATHER:
            if measured_round_s is not None:
                return TIMEOUT, measured_round_s
            return RING, op.nbytes * (n_movers - 1) / n_movers
        per_rank = per_rank_s.get(kind)
        seconds = per_rank.get(g) if per_rank is not None else constant_s.get(kind)
        if seconds is None or (kind is Kind.HOST and seconds <= 0):
            return NOTHING, None  # UNPACK: a copy on the device, free next to the transfers
        return TIMEOUT, seconds

    compiled: list[_Compiled] = []  # by the op's index
    # actions by what they depend on, made once, and how many times a transfer's bytes count in ``must``
    acts: dict[tuple[Kind, str, float], list[Any]] = {}
    # what the lanes walk, by (rank, stream): each op's index and the step it is issued in (1: the
    # step before), and the ops a run's first uploads carry into the step before (Program.prologue)
    walks: dict[tuple[str, Stream], list[tuple[int, int]]] = defaultdict(list)
    prologue: dict[tuple[str, Stream], list[int]] = defaultdict(list)
    # The bytes each link and memory bus must carry before the reported step can end: the
    # uploads and all-gathers of that step and every one before it, and the write-backs of the
    # step before (an upload waits for its block's write-back of the step before). The early stop
    # bounds the reported step's end by what is left of them (what a link has moved in all
    # counts as done: the bound stays below the truth).
    # Up to the reported step (1), a lane issues each op of a step twice: for steps 0 and 1 (an op
    # carried into the step before, for step 0 in the prologue and for step 1 in step 0), and its
    # write-backs for step 0 once. Every figure is a whole number of bytes (a ring step moves
    # (n - 1)/n of a round that n movers split evenly), so the sums are exact in any order.
    must: dict[str, float] = defaultdict(float)
    last: list[int] = []  # the ops that end a step (the host work)
    # what the loop below asks of an op's kind, once per kind: its span category, whether it is a
    # block's compute (the early stop looks after it), an unpacking, work that holds no core (an
    # all-reduce of a few bytes is latency), an upload's or write-back's issues up to the reported
    # step (else 0), an all-gather, the host work
    per_kind = {
        k: (
            CATEGORY[k],
            k is Kind.BLOCK,
            k is Kind.UNPACK,
            k in (Kind.ALLREDUCE, Kind.UNPACK),
            REPORTED_STEP + 1 if k is Kind.H2D else REPORTED_STEP if k is Kind.D2H else 0,
            k is Kind.ALLGATHER,
            k is Kind.HOST,
        )
        for k in Kind
    }
    lanes_of: dict[tuple[tuple[str, ...], Stream], list[list[tuple[int, int]]]] = {}  # each rank's walk
    compute_stream, allreduce = Stream.COMPUTE, Kind.ALLREDUCE
    try:
        # (an op's fields, unpacked: quicker than by name, and this loop sees every op)
        for kb, (label, kind, stream, ranks, block, _, step, slot, frees, nbytes, _, deps) in enumerate(ops):
            category, is_block, unpack, coreless, issues, gather, host = per_kind[kind]
            what = (kind, ranks[0], nbytes)
            made = acts.get(what)
            if made is None:
                made = acts[what] = [action(ops[kb]), 0]
            cost = made[0]
            compiled.append(
                (
                    tuple([index[o, k] * WIDE + 1 + s for o, k, s in deps]) if deps else (),
                    tuple([index[o, k] * WIDE + 1 + s for o, k, s in frees]) if frees else (),
                    cost,
                    # the cores a CPU rank's op holds
                    () if not cores or coreless else tuple(g for g in sorted(ranks) if g in cores),
                    category,
                    block if block is not None else span_block(kind, None, model.layers),
                    # a compute rank's own compute-stream work (its utilization); the all-reduce is a wait
                    stream is compute_stream and kind is not allreduce and len(ranks) == 1,
                    slot,
                    ranks,
                    is_block,
                    unpack,
                    label,
                )
            )
            targets = lanes_of.get((ranks, stream))
            if targets is None:
                targets = lanes_of[ranks, stream] = [walks[g, stream] for g in ranks]
            issued = (kb, step)
            for walk in targets:
                walk.append(issued)
            if step == 1:
                for g in ranks:
                    prologue[g, stream].append(kb)
            if host:
                last.append(kb)
            if stream is compute_stream:  # moves nothing
                continue
            if issues:  # an upload or a write-back (of one rank): counted here, summed after the loop
                made[1] += issues
            elif gather and cost[0] == RING:
                made[1] += REPORTED_STEP + 1
    except KeyError:  # a bug in zoplan.program: it waits for an op it does not run
        missing = [r for op in ops for r in op.deps + op.frees if (r.op, r.ranks) not in index]
        if not missing:
            raise
        o, k, _ = missing[0]
        raise RuntimeError(
            f"the step program waits for '{o}' on {k or 'every rank'}, which it does not run ({L})"
        ) from None
    for (act, arg), times in acts.values():
        if not times:
            continue
        if act == TRANSFER:
            moved, route, _ = arg
            for r in route:
                must[r] += moved * times
        else:
            for path, _ in ring:
                for r in path:
                    must[r] += arg * times
    arrived = [0] * len(events)  # members of a collective that have reached it, by its event's index

    busy_spans: list[tuple[str, float, float]] = []  # compute-stream work: the utilization
    exchange_spans: list[tuple[tuple[str, ...], float, float]] = []  # the exchange streams' work

    def sequence(rank: str, stream: Stream, last: int = STEPS - 1) -> Iterator[tuple[int, int]]:
        """What a lane issues, in order, as (an op's index, the step it is for): a run's first
        uploads (the program's prologue), then the steps up to ``last``, each op in the step it
        is for (a carried upload of step s + 1 is issued during step s). A generator: a stopped
        simulation walks a third of it."""
        for kb in prologue[rank, stream]:
            yield kb, 0
        walk = walks[rank, stream]
        for s in range(last + 1):
            for kb, ahead in walk:
                step = s + ahead
                if step <= last:
                    yield kb, step

    # The early stop's bound on the rest of the reported step, by compute rank: a stream runs its
    # ops in order, so once an op of the step has ended, the compute stream's ops after it take
    # at least their own times before the step ends (it ends with the rank's host work).
    rest_after: dict[str, dict[int, float]] = {}
    if limit_s is not None:
        for g in L.compute_gpus:
            after, total = rest_after.setdefault(g, {}), 0.0
            for kb, step in reversed(list(sequence(g, Stream.COMPUTE, REPORTED_STEP))):
                if step == REPORTED_STEP:
                    after[kb] = total
                    act, arg = compiled[kb][2]
                    if act == TIMEOUT:
                        total += arg

    def hopeless() -> bool:
        """The reported step cannot end before the deadline: some link has more left to carry
        before then than it can carry by then."""
        assert deadline is not None
        now, moved = loop.now, net.moved_now()
        return any(now + (total - moved[r]) / capacity[r] >= deadline[0] for r, total in must.items())

    # a limited simulation watches for the reported step to repeat the step before (_Mirror)
    mirror = _Mirror(len(index), len(walks)) if deadline is not None and not cores else None

    def lane(rank: str, stream: Stream) -> Process:
        nonlocal mirror
        wake = yield
        where = stream.value
        exchange = stream is Stream.EXCHANGE
        for kb, step in sequence(rank, stream) if (rank, stream) in walks else ():
            (deps, frees, (act, arg), held, category, block, on_compute, slot, ranks, watched, unpack, label) = (
                compiled[kb]
            )
            here = kb * WIDE + 1 + step  # where its own event is
            waits = []
            for at in deps:
                e = events[at + step]  # awaited(at + step), inline: the lanes' most frequent call
                if e is None:
                    e = events[at + step] = Event()
                if e.callbacks is not None:  # not yet processed
                    waits.append(e)
            if waits:
                if len(waits) == 1:
                    waits[0].then(wake)
                else:
                    AllOf(loop, waits, wake)
                yield
            if slot:
                slots = buffers[rank]
                if not slots.take(wake):  # none free: wait for one
                    yield
                AllOf(loop, [awaited(at + step) for at in frees], slots.release)
            if len(ranks) > 1:
                # every member's stream has reached it: the last to arrive runs it for all
                arrived[here] += 1
                if arrived[here] < len(ranks):
                    e = awaited(here)
                    if e.callbacks is not None:
                        e.then(wake)
                        yield
                    continue
            if act == NOTHING:  # nothing to time: an unpacking (a copy on the device), or no host work
                if record and unpack:
                    spans.append(Span(rank, where, category, label, step, block, loop.now, loop.now))
                if mirror is not None:
                    mirror.start(here, step, loop.now)
                    mirror.end(here, step, loop.now)
                finish(here)
                continue
            if held:
                taken = [Event() for _ in held]
                for g, e in zip(held, taken):
                    if cores[g].take(e.fire):  # granted at once, processed as an event of its own
                        loop.call(e.fire)
                AllOf(loop, taken, wake)
                yield
            t0 = loop.now
            if mirror is not None:
                mirror.start(here, step, t0)
            if act == TIMEOUT:
                loop.after(arg, wake)
                yield
            elif act == TRANSFER:
                nbytes, route, latency = arg
                net.transfer(nbytes, route, latency, wake)
                yield
            elif act == RING and ring:
                parts = [Event() for _ in ring]
                for (path, _), e in zip(ring, parts):
                    net.transfer(arg, tuple(path), ring_s, e.fire)
                AllOf(loop, parts, wake)
                yield
            for g in held:
                cores[g].release()
            if on_compute:
                busy_spans.append((rank, t0, loop.now))
            elif exchange:
                exchange_spans.append((ranks, t0, loop.now))
            if record:
                for g in ranks:
                    spans.append(Span(g, where, category, label, step, block, t0, loop.now))
            if mirror is not None:
                mirror.end(here, step, loop.now)
            finish(here)
            if watched and deadline is not None and step == REPORTED_STEP:
                # the rest of this step's compute alone must still fit before the deadline
                if loop.now + rest_after[rank][kb] >= deadline[0] or hopeless():
                    loop.fail(Exceeded())
                    return
                shift = mirror.repeats(loop.now) if mirror is not None else None
                if shift is not None:
                    # the rest repeats the step before: the reported step lasts ``shift``
                    if step_ends[REPORTED_STEP - 1] + shift >= deadline[0] + 1e-9 * shift:
                        loop.fail(Exceeded())
                        return
                    mirror = None  # it ends before the limit: simulated to its end, exactly

    step_ends: list[float] = []
    snapshots: list[dict[str, float]] = []

    def step_end() -> Process:
        wake = yield
        for step in range(STEPS):
            AllOf(loop, [awaited(i * WIDE + 1 + step) for i in last], wake)
            yield
            step_ends.append(loop.now)
            snapshots.append(net.snapshot())
            finish(index[END, ()] * WIDE + 1 + step)
            if step == REPORTED_STEP and not record:
                # Nothing after this instant can change what is reported (the window, the links'
                # bytes at its ends, the compute spans inside it: every compute stream is idle,
                # waiting for the next step): only a recorded trace shows the step after.
                loop.fail(_Reported())
                return
            if deadline is not None and step == REPORTED_STEP - 1:
                assert limit_s is not None  # a deadline is kept only with a limit
                # the limit is on the step, which the wait for the slowest node stretches
                deadline[0] = loop.now + limit_s / (1 + costs.straggler_s(1.0))
                if hopeless():
                    loop.fail(Exceeded())
                    return
                loop.first(functools.partial(watchdog, deadline[0]))

    def watchdog(deadline: float) -> None:
        """Started as a process is (``Loop.first``): at the deadline, the reported step must have ended."""

        def check() -> None:
            if len(step_ends) <= REPORTED_STEP:
                loop.fail(Exceeded())

        loop.after(deadline - loop.now, check)

    processes = [lane(g, stream) for g in L.movers for stream in (Stream.UPLOAD, Stream.OFFLOAD)]
    processes += [lane(g, Stream.EXCHANGE) for g in L.movers] + [lane(g, Stream.COMPUTE) for g in L.gpus]
    processes.append(step_end())
    for process in processes:
        loop.start(process)
    try:
        loop.run()
    except _Reported:
        pass
    except BaseException:  # stopped early (Exceeded): what the spans would have told is not needed
        busy_spans.clear()
        exchange_spans.clear()
        raise
    finally:
        # The events, the processes waiting on them and the loop's queue refer to one another:
        # what the simulation built would be freed only by the cycle collector, which then walks
        # it all (a third of a search's time). Emptying the containers the cycles run through
        # frees nearly all of it at once.
        loop.clear()
        for process in processes:  # a simulation stopped early leaves them waiting
            process.close()
        for container in (events, compiled, prologue, walks, index, buffers, cores, net.flows, acts):
            container.clear()
        mirror = None

    expected = STEPS if record else REPORTED_STEP + 1
    if len(step_ends) != expected:  # a schedule that cannot finish is a bug in zoplan.program
        raise RuntimeError(f"simulation deadlocked after {len(step_ends)} of {expected} steps ({L})")
    start = step_ends[REPORTED_STEP - 1]
    end = step_ends[REPORTED_STEP]
    window = end - start
    util: dict[str, float] = {}
    for r, cap in capacity.items():
        moved = snapshots[REPORTED_STEP][r] - snapshots[REPORTED_STEP - 1][r]
        util[link_label(r, machine)] = moved / (cap * window)
    busy: dict[str, float] = defaultdict(float)
    for g, t0, t1 in busy_spans:  # copy streams wait on their links, which are reported instead
        lo, hi = max(t0, start), min(t1, end)
        if hi > lo:
            busy[f"compute {g}"] += hi - lo
    busy_spans.clear()  # (see the run's end)
    for key, t in sorted(busy.items()):
        util[key] = t / window
    streams: dict[str, float] = defaultdict(float)
    for ranks, t0, t1 in exchange_spans:  # updates and all-gathers, one after the other
        lo, hi = max(t0, start), min(t1, end)
        if hi > lo:
            for g in ranks:
                streams[f"exchange {g}"] += (hi - lo) / window
    exchange_spans.clear()
    # the busiest resource; among equals (symmetric layouts) the first by name
    bottleneck = max(sorted(util.items()), key=lambda kv: round(kv[1], 6))[0] if util else "none"
    wait = costs.straggler_s(window)  # several nodes: for the slowest
    return SimResult(
        step_time_s=window + wait,
        window=(start, end),
        step_ends=step_ends,
        utilization=util,
        bottleneck=bottleneck,
        spans=spans,
        link_samples=net.samples if record else {},
        capacity=capacity,
        straggler_s=wait,
        streams=dict(sorted(streams.items())),
    )
