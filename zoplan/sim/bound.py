"""The machine's bound: for every resource, the work it must do per step over its capacity.

No schedule can beat the busiest resource, so ``machine_bound_s`` is a lower bound on the steady
step time, and ``bound_fraction = bound / simulated`` says how close a schedule comes to it.

The search prunes with a slightly looser figure, ``prune_bound_s``, that is provably below the
simulated step: the simulator reports one step of a pipelined run, and copy engines may do up
to ``prefetch + 1`` blocks of a step's transfers inside the step before it (prefetch) or after
it (offload still draining). Compute cannot: a step's first compute waits for the previous
step's projected gradient, and the step ends with its last compute.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import cast

from zoplan.sim.costs import StepCosts
from zoplan.sim import link_label
from zoplan.vocab import DTYPE_BYTES


@dataclass(frozen=True)
class Bound:
    machine_bound_s: float
    prune_bound_s: float
    binding: str  # the resource that sets machine_bound_s


def machine_bound(costs: StepCosts) -> Bound:
    machine, L, model = costs.machine, costs.layout, costs.model
    streamed = model.layers - len(L.resident)
    shift_blocks = min(L.prefetch + 1, streamed)
    work: dict[str, float] = defaultdict(float)  # seconds of work per resource per step
    slack: dict[str, float] = defaultdict(float)  # seconds that may fall outside the step

    def charge(resources: list[str], nbytes_per_block: float) -> None:
        for r in resources:
            gbps = machine.socket_memory_gbps(r[4:]) if r.startswith("mem:") else machine.directed[r].gbps
            per_block = nbytes_per_block / (gbps * 1e9)
            work[r] += streamed * per_block
            slack[r] += shift_blocks * per_block

    sliced = L.upload == "sliced"
    wire = DTYPE_BYTES[L.wire_dtype]
    # what each mover uploads (and writes back) of a block: its part of every round, or all of it
    up_bytes = {g: costs.part_params(g) * wire * L.rounds if sliced else costs.block_wire_bytes for g in L.movers}
    for g in L.movers:
        mem = f"mem:{machine.host_socket(g)}"
        charge(machine.host_path(g, "h2d") + [mem], up_bytes[g])
        if not costs.frozen:  # read-only blocks are not written back
            charge(machine.host_path(g, "d2h") + [mem], up_bytes[g] if sliced else up_bytes[g] / len(L.compute_gpus))
    n = len(L.movers)
    if sliced and n > 1 and costs.allgather_round_s() is None:  # measured: not on the links
        ring_bytes = costs.round_param_bytes * L.rounds * (n - 1) / n
        for i, g in enumerate(L.movers):
            path = machine.peer_path(g, L.movers[(i + 1) % n])
            for r in path:
                per_block = ring_bytes / (machine.directed[r].gbps * 1e9)
                work[r] += model.layers * per_block
                if costs.frozen:  # read-only blocks: the early ones' rounds may fall in the step before
                    slack[r] += min(L.prefetch + 1, model.layers) * per_block
    # the loss all-reduce and then the training loop's host work end every step on every compute rank
    scalar_s = costs.scalar_allreduce_s() + costs.loop_s()
    fill_s = 0.0
    compute: dict[str, float] = {}
    if sliced:
        # per round, the exchange stream updates the movers' slices, then all-gathers them
        ex_round_s = 0.0
        if n > 1 and costs.allgather_round_s() is not None:
            ex_round_s = cast(float, costs.allgather_round_s())  # not None: the same figure, just checked
        elif n > 1:
            hops = [machine.peer_path(g, L.movers[(i + 1) % n]) for i, g in enumerate(L.movers)]
            ex_round_s = max(costs.round_param_bytes * (n - 1) / n / (machine.path_gbps(p) * 1e9) for p in hops) + max(
                machine.path_latency_s(p) for p in hops
            ) * (n - 1)
        round_s = max(costs.update_slice_s(g) for g in L.movers) + ex_round_s
        # every exchange of the step follows the step before's end, and every compute rank computes
        # the last block once its last round is in, then the head and the step's end. Read-only
        # blocks (costs.frozen) wait for no update: the rounds of the next step's first blocks may
        # be gathered as soon as they have landed, before the step ends, as many blocks as have a
        # buffer (prefetch + 1: a buffer is freed by its block's compute, in the next step); nor
        # does the first block wait for its rounds inside the step.
        early = min(L.prefetch + 1, model.layers) if costs.frozen else 0
        last = model.layers - 1
        tail_s = max(costs.compute_block_s(g, resident=last in L.resident) + costs.head_s(g) for g in L.compute_gpus)
        compute["exchange stream"] = (model.layers - early) * L.rounds * round_s + tail_s + scalar_s
        first_ready_s = 0.0 if costs.frozen else L.rounds * round_s  # the first block after its last round
    for g in L.compute_gpus:
        if sliced:
            fill_s = max(0.0, first_ready_s - costs.embed_s(g))
        compute[f"compute {g}"] = (
            costs.embed_s(g)
            + fill_s
            + streamed * costs.compute_block_s(g)
            + len(L.resident) * costs.compute_block_s(g, resident=True)
            + costs.head_s(g)
            + scalar_s
        )
        if machine.gpu_model(g).kind == "cpu" and sliced and g in L.movers:
            # a CPU rank is one thread: its updates and all-gathers do not overlap its compute
            # (but for the early blocks' rounds of read-only blocks, which may fall in the step before)
            # (its own updates: another mover's may take longer, which the exchange stream waits for)
            own_round_s = costs.update_slice_s(g) + ex_round_s
            compute[f"core {g}"] = compute[f"compute {g}"] - fill_s + (model.layers - early) * L.rounds * own_round_s
        # Block buffers are a resource too: each of the prefetch + 1 buffers holds a block from
        # the start of its upload to the end of its compute, and those stages run one after the
        # other for one block, so buffers x step >= sum over blocks of that chain (Little's law).
        # Only the uploads may fall before the step (prefetch).
        h2d_round_s = (up_bytes.get(g, 0.0) / L.rounds) / (machine.path_gbps(machine.host_path(g, "h2d")) * 1e9)
        comp_s = costs.compute_block_s(g)
        if sliced:
            chain_streamed = max(L.rounds * h2d_round_s + round_s, h2d_round_s + L.rounds * round_s) + comp_s
            chain_resident = L.rounds * round_s + comp_s
        else:
            chain_streamed = L.rounds * h2d_round_s + comp_s
            chain_resident = 0.0  # whole-block residents need no buffer
        n_buf = L.prefetch + 1
        occupancy = streamed * chain_streamed + len(L.resident) * chain_resident
        compute[f"buffers {g}"] = occupancy / n_buf
        if costs.frozen:  # read-only blocks: their rounds may be gathered before the step too
            slack[f"buffers {g}"] = min(n_buf, model.layers) * (chain_streamed - comp_s) / n_buf
        else:
            slack[f"buffers {g}"] = min(n_buf, streamed) * L.rounds * h2d_round_s / n_buf

    best_name, best = "none", 0.0
    prune = 0.0
    for r, t in sorted(work.items()):
        if t > best:
            best_name, best = link_label(r, machine), t
        prune = max(prune, t - slack[r])
    for name, t in sorted(compute.items()):
        if t > best:
            best_name, best = name, t
        prune = max(prune, t - slack.get(name, 0.0))
    # on several nodes whose steps vary, the step waits for the slowest: every node's step is
    # stretched alike (StepCosts.straggler_s), so are its bounds (1.0 on one node: exact)
    stretch = 1 + costs.straggler_s(1.0)
    return Bound(machine_bound_s=best * stretch, prune_bound_s=prune * stretch, binding=best_name)
