"""The step program: what every rank does in one ZO step, in order, written once, as data.

A plan's layout becomes, here and only here, the ordered operations of one steady-state step:
which rank uploads which slice of which block into a device buffer, when the deferred update,
the write-back and each all-gather round happen, when each block is computed, where the loss
scalars are reduced. The simulator (zoplan.sim) times these operations; the runtime
(zoplan.runtime.engine) executes them; both label what they record with the operation's id, so a
test compares the two op by op (tests/runtime/test_layouts.py, tests/test_program.py).

The words:
- an :class:`Op` runs on one rank, or on every member of a collective (``ranks``), on one of the
  rank's four in-order streams (:class:`Stream`). It starts once the op before it on each of its
  ranks' stream has finished and once its ``deps`` have;
- a :class:`Ref` names an op another waits for: its id, its ranks and its step relative to the
  waiting op's (0: the same step, -1: the step before, whose write-back a new upload must see);
- ``END`` is the end of a step on every rank (its scalars reduced, its host work done): the
  projected gradient of that step is known from then on;
- ``Program.ops`` is in issue order: a rank issues the ops that name it in this order (on a CPU
  rank, one thread runs them in this order). An op with ``step == 1`` is issued during a step for
  the next one: the next step's first uploads, started as this step's last blocks compute
  (``Program.prologue`` issues them before the first step of a run).

Torch-free, like the rest of the planner.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

from zoplan.errors import ZoplanError
from zoplan.layout import Layout
from zoplan.vocab import DTYPE_BYTES, Stream


class Kind(str, Enum):
    H2D = "h2d"  # a mover's slice (or a whole block) from the host copy into a device buffer
    UNPACK = "unpack"  # a resident block's shard into a work buffer (sliced, several movers)
    UPDATE = "update"  # the previous step's update applied to this rank's range of a block
    BARRIER = "barrier"  # whole blocks, several compute ranks: every rank has read the block
    D2H = "d2h"  # this rank's updated range written back to the host copy
    ALLGATHER = "all-gather"  # one round of slices (one from each mover) assembled on every mover
    EMBED = "embed"  # resident parts updated and perturbed, every micro-batch embedded
    BLOCK = "block"  # one block: every branch of this rank over every micro-batch
    HEAD = "head"  # LM head and loss of every branch and micro-batch
    ALLREDUCE = "all-reduce"  # the loss scalars, over every rank of the run
    HOST = "host"  # the training loop's host work: the journal line, the next batch


# the span category each kind is recorded under (the stages `zoplan validate` compares)
CATEGORY = {
    Kind.H2D: "h2d",
    Kind.UNPACK: "unpack",
    Kind.UPDATE: "update",
    Kind.BARRIER: "exchange",
    Kind.D2H: "d2h",
    Kind.ALLGATHER: "exchange",
    Kind.EMBED: "embed",
    Kind.BLOCK: "compute",
    Kind.HEAD: "head",
    Kind.ALLREDUCE: "scalar",
    Kind.HOST: "loop",
}

_STREAM = {
    Kind.H2D: Stream.UPLOAD,
    Kind.UNPACK: Stream.UPLOAD,
    Kind.D2H: Stream.OFFLOAD,
    Kind.ALLGATHER: Stream.EXCHANGE,
}


@functools.lru_cache(maxsize=None)
def stream_of(kind: Kind, upload: str) -> Stream:
    """The stream an op of ``kind`` runs on. Sliced uploads update each round on the exchange
    stream, as it lands; whole-block updates (and barriers) come between two blocks' compute."""
    if kind is Kind.UPDATE and upload == "sliced":
        return Stream.EXCHANGE
    return _STREAM.get(kind, Stream.COMPUTE)


def span_block(kind: Kind, block: int | None, layers: int) -> int:
    """The block index a span carries: the op's block, or where a per-step op sits among them."""
    if block is not None:
        return block
    return {Kind.EMBED: -1, Kind.HEAD: layers, Kind.ALLREDUCE: layers + 1}.get(kind, layers + 2)


END = "end"  # Ref(END, (), -1): the step before has ended on every rank

# Program.describe's columns: an op's line is indented, then its stream and id, padded to these
# widths, then what it moves and waits for (DESCRIPTION_COLUMN: where that starts)
OP_INDENT, STREAM_WIDTH, ID_WIDTH = 2, 8, 20
DESCRIPTION_COLUMN = OP_INDENT + STREAM_WIDTH + 1 + ID_WIDTH + 1


class Ref(NamedTuple):
    op: str
    ranks: tuple[str, ...]
    step: int = 0


class Op(NamedTuple):
    id: str  # unique among the ops of one step that name a rank: "h2d b3 r1", "block 3"
    kind: Kind
    stream: Stream
    ranks: tuple[str, ...]  # the rank that runs it, or every member of a collective
    block: int | None = None
    round: int | None = None
    step: int = 0  # 1: issued in this step for the next one (a carried upload)
    slot: bool = False  # takes one of the rank's prefetch + 1 device buffers
    frees: tuple[Ref, ...] = ()  # ... which is free again once these have finished
    nbytes: int = 0  # moved (h2d, d2h) or assembled on each member (all-gather)
    flops: float = 0.0  # block and head compute
    deps: tuple[Ref, ...] = ()  # besides the op before it on each of its ranks' stream

    @property
    def collective(self) -> bool:
        return len(self.ranks) > 1

    def describe(self) -> str:
        extra = []
        if self.step:
            extra.append("for the next step")
        if self.nbytes:
            extra.append(_size(self.nbytes))
        if self.flops:
            extra.append(f"{self.flops / 1e9:.3g} GFLOP")
        if self.slot:
            extra.append("takes a buffer")
        if self.collective:
            extra.append("with " + (",".join(self.ranks) if len(self.ranks) <= 4 else f"{len(self.ranks)} ranks"))
        deps = _refs(self.deps)
        if deps:
            extra.append("after " + ", ".join(deps))
        return f"{self.stream.value:<{STREAM_WIDTH}} {self.id:<{ID_WIDTH}} " + "; ".join(extra)


@dataclass(frozen=True)
class Program:
    layout: Layout
    layers: int
    ops: tuple[Op, ...]  # issue order
    frozen: bool = False  # the blocks are only read: no update, barrier or write-back

    def rank_ops(self, rank: str) -> list[Op]:
        """The ops ``rank`` issues in one steady-state step, in order."""
        return list(self._by_rank.get(rank, ()))

    @functools.cached_property
    def _by_rank(self) -> dict[str, tuple[Op, ...]]:
        out: dict[str, list[Op]] = {}
        for op in self.ops:
            for rank in op.ranks:
                out.setdefault(rank, []).append(op)
        return {rank: tuple(ops) for rank, ops in out.items()}

    def stream_ids(self, rank: str, stream: Stream | str) -> list[str]:
        """The ids of the ops ``rank`` runs on ``stream`` in one steady-state step, in order."""
        return [op.id for op in self.rank_ops(rank) if op.stream.value == Stream(stream).value]

    def prologue(self, rank: str) -> list[Op]:
        """What ``rank`` issues before a run's first step (or the first after a pass that carried
        nothing): the uploads a steady-state step carries from the step before, as ops of step 0."""
        return [op._replace(step=0) for op in self.rank_ops(rank) if op.step == 1]

    def describe(self, ranks: list[str] | None = None) -> str:
        """One section per rank: what it issues in a steady-state step, in order."""
        unknown = [r for r in ranks or () if r not in self.layout.gpus]
        if unknown:
            raise ZoplanError(
                f"the plan has no rank {', '.join(unknown)}", fix=f"name one of {', '.join(self.layout.gpus)}"
            )
        L = self.layout
        lines = [
            f"step program of {L.describe()}:",
            f"{self.layers} blocks, prefetch {L.prefetch}, {L.rounds} round(s) per block, {len(L.resident)} resident"
            + (", blocks read-only" if self.frozen else ""),
            "columns: stream, op id, then its size and what it waits for",
            "(besides the op before it on its stream)",
        ]
        for rank in ranks or self.layout.gpus:
            ops = self.rank_ops(rank)
            role = "compute" if rank in self.layout.compute_gpus else "relay"
            lines.append(f"{rank} ({role}, {len(ops)} ops)")
            lines += [" " * OP_INDENT + op.describe() for op in ops]
        return "\n".join(lines)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def _ref(r: Ref) -> str:
    if r.op == END:
        return "the step before"
    where = "" if len(r.ranks) != 1 else f"@{r.ranks[0]}"
    return r.op + where + (" (step before)" if r.step == -1 else "")


def _refs(refs: tuple[Ref, ...]) -> list[str]:
    """``refs`` in words, in order, one op's refs on several single ranks said once:
    ``d2h b0@gpu0,gpu1 (step before)``."""
    ranks: dict[tuple[str, int], list[str]] = {}
    said: list[Ref | tuple[str, int]] = []
    for r in refs:
        if r.op == END or len(r.ranks) != 1:
            said.append(r)
            continue
        key = (r.op, r.step)
        if key not in ranks:
            ranks[key] = []
            said.append(key)
        ranks[key].append(r.ranks[0])
    return [
        _ref(item)
        if isinstance(item, Ref)
        else f"{item[0]}@{','.join(ranks[item])}" + (" (step before)" if item[1] == -1 else "")
        for item in said
    ]


def _suffix(block: int | None, r: int, rounds: int) -> str:
    return f"b{block}" + (f" r{r}" if rounds > 1 else "")


@functools.lru_cache(maxsize=4096)
def op_id(kind: Kind, block: int | None = None, r: int = 0, rounds: int = 1) -> str:
    """The id of an op of ``kind`` (the runtime labels its spans with it)."""
    if kind in (Kind.H2D, Kind.UPDATE, Kind.D2H, Kind.ALLGATHER):
        return f"{kind.value} {_suffix(block, r, rounds)}"
    if kind in (Kind.UNPACK, Kind.BARRIER):
        return f"{kind.value} b{block}"
    if kind is Kind.BLOCK:
        return f"block {block}"
    value: str = kind.value  # mypy reads the value of a narrowed enum as Any
    return value


def build(
    layout: Layout,
    *,
    layers: int,
    block_params: int,
    micro_batches: int = 1,
    block_flops: float = 0.0,
    head_flops: float = 0.0,
    frozen: bool = False,
) -> Program:
    """The step program of ``layout`` for a model of ``layers`` blocks of ``block_params``
    parameters, each rank running ``micro_batches`` micro-batches per branch (FLOPs: one
    micro-batch of one branch). ``frozen``: the blocks are only read (an adapter is trained,
    zoplan.tuning): no update, barrier or write-back, and a block is computed once it has landed."""
    L, n, p = layout, layers, layout.prefetch
    # the kinds as names of their own: reading a member from its enum class costs a lookup each time
    H2D, UNPACK, UPDATE, BARRIER, D2H = Kind.H2D, Kind.UNPACK, Kind.UPDATE, Kind.BARRIER, Kind.D2H
    ALLGATHER, EMBED, BLOCK, HEAD, ALLREDUCE = Kind.ALLGATHER, Kind.EMBED, Kind.BLOCK, Kind.HEAD, Kind.ALLREDUCE
    HOST = Kind.HOST
    sliced = L.upload == "sliced"
    rounds = L.rounds
    resident = set(L.resident)
    computes, movers = tuple(L.compute_gpus), tuple(L.movers)
    sharded = sliced and len(movers) > 1
    wire = DTYPE_BYTES[L.wire_dtype]
    slice_params = math.ceil(block_params / L.slices_per_block)
    # whole blocks: every compute rank holds the block, each writes back an equal share
    # sliced: each mover's part of every round (equal, or in proportion to the layout's shares)
    part = {g: L.part_of(g, slice_params * len(movers)) * wire for g in movers} if sliced else {}
    h2d_bytes = part if sliced else dict.fromkeys(movers, block_params * wire)
    d2h_bytes = part if sliced else dict.fromkeys(movers, math.ceil(block_params * wire / len(computes)))
    gather_bytes = slice_params * len(movers) * DTYPE_BYTES[L.param_dtype]
    work = micro_batches * L.branches_per_gpu
    # a step carries the next step's first uploads into its last blocks' compute (docs/runtime.md),
    # except whole blocks shared by several compute ranks: a rank reads such a block only once every
    # rank has reached it (the barrier), which a read carried into the step before would skip
    carry = sliced or len(computes) <= 1 or frozen
    # the host copy must hold the previous step's write-back of a block before it is uploaded again
    writers = {g: () if frozen else (g,) if sliced else computes for g in movers}
    ops: list[Op] = []
    end_before = Ref(END, (), -1)
    # what the loops below ask for again and again, made once: the ids of every block's rounds,
    # each kind's stream, each rank alone
    per_round = (H2D, UPDATE, D2H, ALLGATHER)
    round_ids = {k: [[op_id(k, b, r, rounds) for r in range(rounds)] for b in range(n)] for k in per_round}
    block_ids = [op_id(BLOCK, b) for b in range(n)]
    stream = {k: stream_of(k, L.upload) for k in Kind}
    alone = {g: (g,) for g in L.gpus}

    def ids(kind: Kind, b: int, r: int = 0) -> str:
        return round_ids[kind][b][r]

    def upload(b: int, step: int) -> None:
        """Issue block b's upload (or, resident and sharded, its unpacking) on every mover."""
        if b in resident and not sharded:
            return  # kept whole on the device (or the only mover's slices are the whole block)
        for g in movers:
            frees: list[Ref] = []
            if g in computes:
                frees.append(Ref(block_ids[b], alone[g]))
            if sharded:
                frees.append(Ref(ids(ALLGATHER, b, rounds - 1), movers))
            elif sliced and not frozen:
                frees.append(Ref(ids(UPDATE, b, rounds - 1), (g,)))
            if b in resident:  # the shard holds the slices this step's update packed
                ops.append(
                    Op(
                        op_id(UNPACK, b),
                        UNPACK,
                        stream[UNPACK],
                        (g,),
                        b,
                        step=step,
                        slot=True,
                        frees=tuple(frees),
                        # the shard holds what the last step's update packed (frozen: never changes)
                        deps=() if frozen else (Ref(ids(ALLGATHER, b, rounds - 1), movers, -1),),
                    )
                )
                continue
            d2h_ids, h2d_ids = round_ids[D2H][b], round_ids[H2D][b]
            if not frozen:
                frees += [Ref(d2h_ids[r], alone[g]) for r in range(rounds)]
            first = not carry and b < p
            for r in range(rounds):
                deps = [Ref(d2h_ids[r], alone[w], -1) for w in writers[g]]
                if first:
                    deps.insert(0, end_before)
                # (positional: id, kind, stream, ranks, block, round, step, slot, frees, nbytes, flops, deps)
                ops.append(
                    Op(
                        h2d_ids[r],
                        H2D,
                        stream[H2D],
                        alone[g],
                        b,
                        r,
                        step,
                        r == 0,
                        tuple(frees) if r == 0 else (),
                        h2d_bytes[g],
                        0.0,
                        tuple(deps),
                    )
                )

    def gather(b: int, r: int, deps: tuple[Ref, ...] = ()) -> None:
        """Round r of block b assembled on every mover (after the op before it on the exchange
        stream, and ``deps``)."""
        kind = ALLGATHER
        ops.append(Op(ids(kind, b, r), kind, stream[kind], movers, b, r, 0, False, (), gather_bytes, 0.0, deps))

    def fetch(b: int) -> None:
        """Block b's deferred update, write-back and exchange, on the ranks that hold it."""
        kept = b in resident
        if frozen:  # only the exchange of the slices, once they have landed
            for r in range(rounds if sharded else 0):
                gather(b, r, tuple(Ref(op_id(UNPACK, b) if kept else ids(H2D, b, r), (g,)) for g in movers))
            return
        # what an update waits for: a whole block's, its upload (as deps); a slice's, one op or none
        if not sliced:
            for g in computes:
                upload = () if kept else (Ref(ids(H2D, b), (g,)),)
                ops.append(Op(ids(UPDATE, b), UPDATE, stream[UPDATE], (g,), b, deps=upload))
            if not kept and len(computes) > 1:
                ops.append(Op(op_id(BARRIER, b), BARRIER, stream[BARRIER], computes, b))
            if not kept:
                for g in computes:
                    ops.append(
                        Op(
                            ids(D2H, b),
                            D2H,
                            stream[D2H],
                            (g,),
                            b,
                            0,
                            nbytes=d2h_bytes[g],
                            deps=(
                                Ref(op_id(BARRIER, b), computes) if len(computes) > 1 else Ref(ids(UPDATE, b), (g,)),
                            ),
                        )
                    )
            return
        h2d_ids, update_ids, d2h_ids = round_ids[H2D][b], round_ids[UPDATE][b], round_ids[D2H][b]
        unpacked = op_id(UNPACK, b)
        for r in range(rounds):
            for g in movers:
                rank = alone[g]
                landed = Ref(unpacked, rank) if kept and sharded else None if kept else Ref(h2d_ids[r], rank)
                # (positional: id, kind, stream, ranks, block, round, step, slot, frees, nbytes, flops, deps)
                deps = (end_before, landed) if landed else (end_before,)
                ops.append(Op(update_ids[r], UPDATE, stream[UPDATE], rank, b, r, 0, False, (), 0, 0.0, deps))
                if not kept:
                    after = (Ref(update_ids[r], rank),)
                    ops.append(Op(d2h_ids[r], D2H, stream[D2H], rank, b, r, 0, False, (), d2h_bytes[g], 0.0, after))
            if sharded:
                gather(b, r)

    def compute(b: int) -> None:
        for g in computes:
            if sharded:  # its last round gathered on every mover
                ready: tuple[Ref, ...] = (Ref(ids(ALLGATHER, b, rounds - 1), movers),)
            elif frozen:  # read-only: once its last round has landed here (a kept block is here)
                ready = () if b in resident else (Ref(ids(H2D, b, rounds - 1), (g,)),)
            elif sliced:  # the single mover's last round updated
                ready = (Ref(ids(UPDATE, b, rounds - 1), movers),)
            else:
                ready = ()  # the update (and barrier) before it on the compute stream
            ops.append(
                Op(
                    block_ids[b],
                    BLOCK,
                    stream[BLOCK],
                    (g,),
                    b,
                    flops=block_flops * work,
                    deps=ready,
                )
            )

    for g in computes:
        ops.append(Op(op_id(EMBED), EMBED, stream[EMBED], (g,), deps=(end_before,)))
    if not carry:
        for b in range(min(p, n)):
            upload(b, 0)
    for i in range(n):
        if i + p < n:
            upload(i + p, 0)
        fetch(i)
        j = i - max(0, n - p)
        if carry and 0 <= j < min(p, n):  # the next step's block j, after this step's fetch of it
            upload(j, 1)
        compute(i)
    for g in computes:
        ops.append(Op(op_id(HEAD), HEAD, stream[HEAD], (g,), flops=head_flops * work))
    ops.append(Op(op_id(ALLREDUCE), ALLREDUCE, stream[ALLREDUCE], tuple(L.gpus)))
    for g in computes:
        ops.append(Op(op_id(HOST), HOST, stream[HOST], (g,)))
    return Program(layout=L, layers=n, ops=tuple(ops), frozen=frozen)
