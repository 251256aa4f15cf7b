"""The one place that touches torch.distributed: process groups built from the plan.

Ranks come from torchrun (RANK, LOCAL_RANK, WORLD_SIZE, GROUP_RANK); their roles come from the
plan's rank table, which ``zoplan plan`` derived from the layout. Groups:
- the world, for the loss scalars (every rank needs the projected gradient, relays included);
- per machine, the movers of that machine, for the block all-gather.

CPU ranks of one machine meet before each whole block, and sum a step's loss scalars where they
are all the world, through shared memory instead (``NodeMeeting``): a gloo collective hands off
between threads and over the loopback, and cost about a millisecond a call on a 2-core machine,
a tiny model's block and more.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from zoplan.errors import ZoplanError
from zoplan.planfile import Plan
from zoplan.runtime.meeting import TIMEOUT, NodeMeeting
from zoplan.vocab import Meetings, run_meetings


@dataclass
class RankContext:
    rank: int
    world: int
    node: int
    local_rank: int
    device: torch.device
    role: str  # "compute" or "relay"
    signs: tuple[int, ...]  # branches this rank computes: (+1, -1), (+1,), (-1,) or ()
    replica: int | None
    replicas: int
    mover_index: int | None  # position among this machine's movers (sliced uploads)
    movers: int
    compute_index: int | None  # position among this machine's compute ranks
    computes: int
    exchange_group: object | None = field(default=None, repr=False)
    exchange_ranks: tuple[int, ...] = ()  # the global ranks of this rank's exchange group
    nodes: int = 1

    @property
    def is_loader(self) -> bool:
        """The rank that fills this machine's host copy."""
        return self.local_rank == 0


def _attempt_store(world: int):
    """The agent's store, under a prefix of this restart attempt (None outside torchrun).

    torchrun's agent keeps one store for all attempts of a static rendezvous, so after an elastic
    restart the new ranks would read the killed ranks' addresses and fail to connect. A prefix per
    attempt (TORCHELASTIC_RESTART_COUNT is the same on every rank of an attempt) keeps them apart.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=TIMEOUT
    )
    return dist.PrefixStore(f"zoplan/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def init(plan: Plan, device_kind: str) -> RankContext:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world != plan.layout.world_size:
        raise ZoplanError(
            f"the plan needs {plan.layout.world_size} ranks "
            f"({plan.layout.perturbation} x {plan.layout.data} x {plan.layout.nodes} node(s) "
            f"plus relays), but {world} were started",
            fix=f"start {plan.layout.world_size // plan.layout.nodes} processes per node "
            f"on {plan.layout.nodes} node(s)",
        )
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if not dist.is_initialized():
        store = _attempt_store(world)
        try:
            if store is None:
                dist.init_process_group(backend=backend, timeout=TIMEOUT)
            else:
                dist.init_process_group(backend=backend, timeout=TIMEOUT, store=store, rank=rank, world_size=world)
        except RuntimeError as exc:  # (torch's DistNetworkError is one)
            if "EADDRINUSE" not in str(exc) and "address already in use" not in str(exc).lower():
                raise
            port = os.environ.get("MASTER_PORT", "?")
            raise ZoplanError(
                f"rank {rank} could not listen on port {port}, the run's master port: another program took it "
                "after the launch had found it free",
                fix="run again: with --master-port, another one (the same on every machine); on a single "
                "machine without it, a free one is picked again",
            ) from None
    entry = plan.layout.ranks[rank]
    if device_kind == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    per_node = plan.layout.world_size // plan.layout.nodes
    node = rank // per_node
    node_ranks = [r for r in plan.layout.ranks if r.node == node]
    movers = plan.transfer.movers
    compute_local = [r for r in node_ranks if r.role == "compute"]
    # every rank creates every group, in the same order (torch.distributed requires it)
    exchange, exchange_ranks = None, ()
    for group_ranks in plan.layout.groups["block_exchange"]:
        group = dist.new_group(group_ranks) if len(group_ranks) > 1 else None
        if rank in group_ranks:
            exchange, exchange_ranks = group, tuple(group_ranks)
    branch = entry.branch or ""
    signs = tuple(s for s, c in ((1, "+"), (-1, "-")) if c in branch)
    return RankContext(
        rank=rank,
        world=world,
        node=node,
        local_rank=local_rank,
        device=device,
        role=entry.role,
        signs=signs,
        replica=entry.replica,
        replicas=plan.layout.data * plan.layout.nodes,
        mover_index=movers.index(entry.gpu) if plan.transfer.upload == "sliced" and entry.gpu in movers else None,
        movers=len(movers),
        compute_index=next((i for i, r in enumerate(compute_local) if r.rank == rank), None),
        computes=len(compute_local),
        exchange_group=exchange,
        exchange_ranks=exchange_ranks,
        nodes=plan.layout.nodes,
    )


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few float64 scalars over every rank (the only traffic between replicas)."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
    return t.cpu().tolist()


def barrier(group=None) -> None:
    """Wait for every rank (of ``group``: a group of this module's making)."""
    if group is not None:
        dist.barrier(group=group)
    elif dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _meeting(device: torch.device, rank: int, directory: Path, name: str, ranks: Sequence[int]) -> NodeMeeting | None:
    """A shared-memory meeting of ``ranks`` (CPU ranks of this machine, ``rank`` one of them) in
    ``directory``, or None where they meet through gloo (one rank, a GPU, not x86, or
    ``ZOPLAN_MEETINGS=gloo``)."""
    if device.type != "cpu" or len(ranks) < 2 or run_meetings(os.environ) is not Meetings.SHARED_MEMORY:
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return NodeMeeting(directory / f"{name}-{attempt}-{ranks[0]}", len(ranks), list(ranks).index(rank))


def exchange_barrier(ctx: RankContext, directory: Path) -> Callable[[], None]:
    """How this rank meets the rest of its exchange group before a whole block: through shared
    memory in ``directory`` (a folder of this machine's run that every local rank sees) where the
    group's ranks are CPU ranks of one machine, else a barrier of the group
    (``ZOPLAN_MEETINGS=gloo`` asks for the group's barrier on CPU ranks too)."""
    meeting = _meeting(ctx.device, ctx.rank, directory, "barrier", ctx.exchange_ranks)
    if meeting is not None:
        return meeting.wait
    group = ctx.exchange_group
    return lambda: barrier(group=group)


def world_sum(ctx: RankContext, directory: Path) -> Callable[[list[float]], list[float]]:
    """How this rank sums a step's loss scalars over every rank: through shared memory in
    ``directory`` where every rank is a CPU rank of this one machine, else ``all_reduce_sum``."""
    return node_sum(ctx.device, ctx.rank, ctx.world, directory) if ctx.nodes == 1 else all_reduce_sum


def node_barrier(device: torch.device, rank: int, world: int, directory: Path) -> Callable[[], None]:
    """A barrier of the ``world`` ranks of this one machine, as ``exchange_barrier`` meets (the
    calibration's whole-block setting)."""
    meeting = _meeting(device, rank, directory, "barrier", range(world))
    return meeting.wait if meeting is not None else barrier


def node_sum(device: torch.device, rank: int, world: int, directory: Path) -> Callable[[list[float]], list[float]]:
    """``world_sum`` where the ``world`` ranks all run on this machine (a run on one machine, a
    calibration)."""
    meeting = _meeting(device, rank, directory, "sum", range(world))
    return meeting.sum if meeting is not None else all_reduce_sum


def all_gather_into(parts: list[torch.Tensor], mine: torch.Tensor, group) -> None:
    """``parts[k]`` := rank k's ``mine``, for every rank k of ``group``. Parts of different sizes
    (uneven shares of a block) are broadcast one by one from their owners (an empty one is
    skipped: every rank knows the sizes)."""
    if len({p.numel() for p in parts}) == 1:
        dist.all_gather(parts, mine, group=group)
        return
    me = dist.get_rank(group)
    parts[me].copy_(mine)
    for k, part in enumerate(parts):
        if part.numel():
            dist.broadcast(part, src=dist.get_global_rank(group, k), group=group)


def broadcast_object(box: list, src: int = 0) -> None:
    """``box`` := rank ``src``'s ``box`` (a list of picklable objects), on every rank."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=src)


def gather_objects(obj) -> list:
    """Every rank's ``obj``, by rank, on every rank ([obj] outside a process group)."""
    if not dist.is_initialized():
        return [obj]
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, obj)
    return rows


def init_calibration(world: int, rank: int, device_kind: str) -> None:
    """The calibration's process group: every rank, no plan (it measures the machine)."""
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device_kind == "cuda" else "gloo",
            timeout=TIMEOUT,
            store=_attempt_store(world),
            rank=rank,
            world_size=world,
        )


def world_group():
    return dist.group.WORLD


def new_group(ranks: list[int]):
    """A group of ``ranks`` (every rank must take part in creating it, in the same order)."""
    return dist.new_group(ranks=ranks)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
