"""Discrete-event simulation of ZO steps on one node (simpy).

Each GPU has four in-order streams, like CUDA streams ordered by events:
- ``upload``: host-to-device copy of this GPU's slices of each block;
- ``exchange`` (sliced uploads): per round of slices, the deferred update of this GPU's own slice
  (it needs the previous step's projected gradient), then the all-gather of the movers' updated
  slices over NVLink (a ring collective);
- ``compute``: the resident parts at the start of a step, then per block the perturbation and
  the forward pass of one or two branches over all micro-batches, then the LM head and loss;
- ``offload``: device-to-host copy of this GPU's updated slices.
A GPU holds ``prefetch + 1`` block buffers: an upload waits for a free one. Links and each
socket's memory bus are shared max-min fairly between the transfers crossing them (flownet).
At the end of a step the compute ranks all-reduce their loss scalars (alpha-beta: only
latency matters for a few bytes) and the projected gradient is known. With a calibration
profile, the training loop's host work (the journal line, the next batch) follows before the
next step's work is issued.

Three steps are simulated and the middle one is reported: it both receives the prefetch of its
first blocks from the step before and pays for the prefetch of the step after, like every step
of a long run. The last step would pay for no successor and look a little faster than reality.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import simpy

from zoplan.costs import StepCosts
from zoplan.flownet import FlowNet
from zoplan.topology import Machine

STEPS = 3
REPORTED_STEP = 1

Span = tuple[str, str, str, str, int, int, float, float]  # gpu, stream, category, label, step, block, start, end


@dataclass
class SimResult:
    step_time_s: float
    window: tuple[float, float]
    step_ends: list[float]
    utilization: dict[str, float]  # busy fraction of each resource / stream in the reported step
    bottleneck: str
    spans: list[Span] = field(default_factory=list)
    link_samples: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    capacity: dict[str, float] = field(default_factory=dict)


def link_label(resource: str, machine: Machine) -> str:
    if resource.startswith("mem:"):
        return f"host memory {resource[4:]}"
    kind = machine.directed[resource].kind
    return f"{'NVLink' if kind == 'nvlink' else 'PCIe' if kind == 'pcie' else 'socket link'} {resource}"


class Exceeded(Exception):
    """The reported step is already longer than the caller's limit (see ``simulate``)."""


def simulate(costs: StepCosts, record: bool = False, limit_s: float | None = None) -> SimResult:
    """Simulate ``STEPS`` steps of ``costs.layout`` and report the steady-state step.

    With ``limit_s``, stop early and raise :class:`Exceeded` as soon as the reported step is
    certain to take at least that long: the search does not need the exact time of a
    candidate that cannot win."""
    machine, L, model = costs.machine, costs.layout, costs.model
    # what-if factors (zoplan.planner.sensitivity): every compute stage, every byte moved
    slower_compute, slower_transfers = costs.compute_scale, costs.transfer_scale
    env = simpy.Environment()
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
    net = FlowNet(env, capacity, record=record)

    # per-GPU operation times, computed once (the streams ask for them thousands of times)
    compute_s = {g: costs.compute_block_s(g) * slower_compute for g in L.compute_gpus}
    update_s = {g: costs.update_slice_s(g) * slower_compute for g in L.movers}
    head_s = {g: costs.head_s(g) * slower_compute for g in L.compute_gpus}
    deadline: list[float] | None = [float("inf")] if limit_s is not None else None
    spans: list[Span] = []
    ev: dict[tuple, simpy.Event] = defaultdict(env.event)
    resident = set(L.resident)
    rounds = L.rounds
    sliced = L.upload == "sliced"
    # whole-block uploads: every compute GPU holds the full updated block; each writes back 1/k
    offload_bytes = (costs.slice_wire_bytes if sliced
                     else math.ceil(costs.block_wire_bytes / len(L.compute_gpus)))
    buffers = {g: simpy.Resource(env, capacity=L.prefetch + 1) for g in L.gpus}
    done_g = env.event().succeed()  # g of the step before the first: nothing to apply

    def g_ready(step: int) -> simpy.Event:
        return done_g if step < 0 else ev["g", step]

    def host_route(g: str, direction: str) -> tuple[tuple[str, ...], float]:
        path = machine.host_path(g, direction)
        return tuple(path) + (f"mem:{machine.host_socket(g)}",), machine.path_latency_s(path)

    # A CPU rank is one thread (the runtime on CPU copies, updates, all-gathers and computes one
    # after the other): its four streams share one core.
    cores = {g: simpy.Resource(env, capacity=1) for g in L.gpus if machine.gpu_model(g).kind == "cpu"}

    def take(gs) -> list[simpy.Request]:
        return [cores[g].request() for g in sorted(set(gs)) if g in cores]

    def give(reqs: list[simpy.Request]) -> None:
        for req in reqs:
            req.resource.release(req)

    def release_when(g: str, req: simpy.Request, needs: list[simpy.Event]) -> None:
        simpy.AllOf(env, needs).callbacks.append(lambda _: buffers[g].release(req))

    # ----- streams ---------------------------------------------------------------------------
    def upload_stream(g: str):
        route, latency = host_route(g, "h2d")
        # whole-block uploads: every compute GPU writes back part of the block, so the next
        # upload of it waits for all of them; sliced: a mover re-reads only its own slices
        writers = L.movers if not sliced else (g,)
        # the runtime uploads a step's first blocks during the step before (docs/runtime.md),
        # except whole blocks shared by several compute ranks of a machine: those wait for it
        carried = sliced or L.compute_ranks_per_node <= 1
        for step in range(STEPS):
            for b in range(model.layers):
                if b in resident and not sliced:
                    continue
                if not carried and step > 0 and b < L.prefetch:
                    yield g_ready(step - 1)
                req = buffers[g].request()
                yield req
                needs = []
                if g in L.compute_gpus:
                    needs.append(ev["comp", step, b, g])
                if sliced:
                    needs.append(ev["ex", step, b, rounds - 1])
                if b not in resident:
                    needs += [ev["off", step, b, g, r] for r in range(rounds)]
                release_when(g, req, needs)
                for r in range(rounds):
                    if b not in resident:
                        if step > 0:  # the host copy must hold the previous step's update
                            yield simpy.AllOf(env, [ev["off", step - 1, b, w, r] for w in writers])
                        held = take([g])
                        yield simpy.AllOf(env, held)
                        t0 = env.now
                        yield net.transfer(costs.slice_wire_bytes if sliced else costs.block_wire_bytes,
                                           route, latency)
                        give(held)
                        spans.append((g, "upload", "h2d", f"h2d b{b}" + (f" r{r}" if rounds > 1 else ""),
                                      step, b, t0, env.now))
                    ev["h2d", step, b, g, r].succeed()

    update_round_s = max(update_s.values()) if sliced else 0.0
    measured_round_s = costs.allgather_round_s() if ring else None
    if measured_round_s is not None:
        measured_round_s *= slower_transfers


    def exchange_stream():
        """Sliced uploads, per round: each mover applies the deferred update to its own slice
        (in parallel), then the movers all-gather the updated slices (one ring collective)."""
        for step in range(STEPS):
            for b in range(model.layers):
                for r in range(rounds):
                    yield simpy.AllOf(env, [ev["h2d", step, b, g, r] for g in L.movers])
                    yield g_ready(step - 1)
                    held = take(L.movers)
                    yield simpy.AllOf(env, held)
                    t0 = env.now
                    yield env.timeout(update_round_s)
                    t1 = env.now
                    ev["up", step, b, r].succeed()
                    if measured_round_s is not None:
                        yield env.timeout(measured_round_s)
                    elif ring:
                        nbytes = costs.round_param_bytes * (n_movers - 1) / n_movers
                        # a ring all-gather pays the hop latency once per ring step
                        hops_s = max(lat for _, lat in ring) * (n_movers - 1)
                        yield simpy.AllOf(env, [net.transfer(nbytes, tuple(p), hops_s) for p, _ in ring])
                    for g in L.movers:
                        spans.append((g, "exchange", "update", f"update b{b}", step, b, t0, t1))
                        spans.append((g, "exchange", "exchange", f"all-gather b{b}", step, b, t1, env.now))
                    give(held)
                    ev["ex", step, b, r].succeed()

    def compute_stream(g: str):
        for step in range(STEPS):
            yield g_ready(step - 1)
            held = take([g])
            yield simpy.AllOf(env, held)
            t0 = env.now
            yield env.timeout(costs.embed_s(g) * slower_compute)
            give(held)
            spans.append((g, "compute", "embed", "embed+perturb", step, -1, t0, env.now))
            for b in range(model.layers):
                if sliced:
                    yield ev["ex", step, b, rounds - 1]
                elif b not in resident:
                    yield ev["h2d", step, b, g, 0]
                held = take([g])
                yield simpy.AllOf(env, held)
                t0 = env.now
                yield env.timeout(compute_s[g])
                give(held)
                spans.append((g, "compute", "compute", f"block {b}", step, b, t0, env.now))
                ev["comp", step, b, g].succeed()
                if deadline is not None and step == REPORTED_STEP:
                    # the rest of this step's compute alone must still fit before the deadline
                    rest_s = (model.layers - 1 - b) * compute_s[g] + head_s[g] + scalar_latency
                    if env.now + rest_s >= deadline[0]:
                        raise Exceeded()
            held = take([g])
            yield simpy.AllOf(env, held)
            t0 = env.now
            yield env.timeout(head_s[g])
            give(held)
            spans.append((g, "compute", "head", "head+loss", step, model.layers, t0, env.now))
            ev["head", step, g].succeed()

    def offload_stream(g: str):
        route, latency = host_route(g, "d2h")
        for step in range(STEPS):
            for b in range(model.layers):
                if b in resident:
                    continue
                for r in range(rounds):
                    yield ev["up", step, b, r] if sliced else ev["comp", step, b, g]
                    held = take([g])
                    yield simpy.AllOf(env, held)
                    t0 = env.now
                    yield net.transfer(offload_bytes, route, latency)
                    give(held)
                    spans.append((g, "offload", "d2h", f"d2h b{b}" + (f" r{r}" if rounds > 1 else ""),
                                  step, b, t0, env.now))
                    ev["off", step, b, g, r].succeed()

    step_ends: list[float] = []
    snapshots: list[dict[str, float]] = []
    scalar_latency = _scalar_allreduce_s(costs)
    loop_s = costs.loop_s() * slower_compute

    def scalar_stream():
        for step in range(STEPS):
            yield simpy.AllOf(env, [ev["head", step, g] for g in L.compute_gpus])
            t0 = env.now
            yield env.timeout(scalar_latency)
            for g in L.compute_gpus:
                spans.append((g, "compute", "scalar", "loss all-reduce", step, model.layers + 1, t0, env.now))
            if loop_s > 0:
                # the training loop's host work before the next step can be issued: this step's
                # journal line, the next batch (on a GPU the host issues nothing meanwhile)
                held = take(L.compute_gpus)
                yield simpy.AllOf(env, held)
                t0 = env.now
                yield env.timeout(loop_s)
                give(held)
                for g in L.compute_gpus:
                    spans.append((g, "compute", "loop", "journal+next batch", step, model.layers + 2, t0, env.now))
            step_ends.append(env.now)
            snapshots.append(net.snapshot())
            ev["g", step].succeed()
            if deadline is not None and step == REPORTED_STEP - 1:
                deadline[0] = env.now + limit_s
                env.process(watchdog(deadline[0]))

    def watchdog(deadline: float):
        yield env.timeout(deadline - env.now)
        if len(step_ends) <= REPORTED_STEP:
            raise Exceeded()

    for g in L.movers:
        env.process(upload_stream(g))
        env.process(offload_stream(g))
    if sliced:
        env.process(exchange_stream())
    for g in L.compute_gpus:
        env.process(compute_stream(g))
    env.process(scalar_stream())
    try:
        env.run()
    except Exceeded:
        raise Exceeded(f"step longer than {limit_s} s") from None

    if len(step_ends) != STEPS:  # a schedule that cannot finish is a bug in this module
        raise RuntimeError(f"simulation deadlocked after {len(step_ends)} of {STEPS} steps ({L})")
    start = step_ends[REPORTED_STEP - 1]
    end = step_ends[REPORTED_STEP]
    window = end - start
    util: dict[str, float] = {}
    for r, cap in capacity.items():
        moved = snapshots[REPORTED_STEP][r] - snapshots[REPORTED_STEP - 1][r]
        util[link_label(r, machine)] = moved / (cap * window)
    busy: dict[str, float] = defaultdict(float)
    for g, stream, _cat, _label, _s, _b, t0, t1 in spans:
        lo, hi = max(t0, start), min(t1, end)
        if hi > lo:
            busy[f"{stream} {g}"] += hi - lo
    for key, t in sorted(busy.items()):
        # copy streams wait on their links, which are reported instead
        if key.startswith("compute"):
            util[key] = t / window
    # the busiest resource; among equals (symmetric layouts) the first by name
    bottleneck = max(sorted(util.items()), key=lambda kv: round(kv[1], 6))[0] if util else "none"
    return SimResult(step_time_s=window, window=(start, end), step_ends=step_ends,
                     utilization=util, bottleneck=bottleneck,
                     spans=spans if record else [], link_samples=net.samples if record else {},
                     capacity=capacity)


def _scalar_allreduce_s(costs: StepCosts) -> float:
    """Latency of the all-reduce of the loss scalars: 2 log2(p) hops (a few bytes, no beta), or
    the calibrated figure."""
    machine, L = costs.machine, costs.layout
    if costs.profile is not None and len(L.compute_gpus) * L.nodes > 1:
        return costs.profile.scalar_latency_us * 1e-6
    hops = 2 * math.ceil(math.log2(max(2, L.compute_ranks_per_node))) if L.compute_ranks_per_node > 1 else 0
    hop_s = 0.0
    if len(L.compute_gpus) > 1:
        hop_s = max(machine.path_latency_s(machine.peer_path(L.compute_gpus[0], g)) for g in L.compute_gpus[1:])
    total = hops * hop_s
    if L.nodes > 1 and machine.spec.network is not None:
        total += 2 * math.ceil(math.log2(L.nodes)) * machine.spec.network.latency_us * 1e-6
    return total
