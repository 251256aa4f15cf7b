"""The generic executor: runs a rank's step program (zoplan.program) on any model family.

The program says what this rank does in a step, in order: upload slice k of block i (or a
resident block's shard) into a device buffer, apply the deferred update to a range of it, write
that range back to the host copy, all-gather a round of slices, wait at a barrier, compute a block
for every branch and micro-batch, embed, head, all-reduce. The engine holds one small handler per
kind of op and runs the ops in the program's order; which op comes when, on which stream and after
what, is written in zoplan.program only (and the simulator times the same ops). The handlers:
- upload: a mover copies its ranges of the block from the host copy (CUDA: on the upload stream,
  after the block's last write-back, an event per round so a round is used as soon as it lands);
- update: theta of this rank's range of the block := the pending update applied to it (none in a
  run's first step, which has no update yet);
- write-back: the updated range back to the host copy (CUDA: on the offload stream);
- all-gather: one round of slices, one from every mover, through zoplan.runtime.dist;
- block: for each branch this rank runs, the block's weights theta + s*eps*z are formed in a work
  buffer (theta itself is never perturbed, so no rounding drift and no restore) and every
  micro-batch's hidden state of that branch goes through the block.
The model's own forward computes embeddings, masks and position encodings: it is run up to the
first block and the arguments it passes to blocks are captured (adapters.py). On the CPU every op
runs in program order on one thread; on CUDA the update, all-gather and block ops are issued on
the compute stream.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from zoplan.models import ROWS_TABLE_MIN
from zoplan.program import CATEGORY, Kind, Op, Program, op_id, span_block, stream_of
from zoplan.runtime import dist as zdist
from zoplan.runtime.adapters import Adapter
from zoplan.runtime.graphs import BlockGraphs, hidden_of
from zoplan.runtime.graphs import wanted as graphs_wanted
from zoplan.runtime.hostcopy import DTYPES, BlockLayout, HostCopy, decays
from zoplan.runtime.perturb import kernels_label, normal, normal_parts_
from zoplan.runtime.spans import Spans
from zoplan.runtime.tuning import Tuned
from zoplan.runtime.zo import apply_update, fused_kernels, layout_table, update_range


class _StopAtFirstBlock(Exception):
    pass


_STALE = object()  # resident parameters that no longer equal anything _set_resident would write


@dataclass
class Pending:
    """The update of a step whose projected gradient is known but not yet applied everywhere."""

    seed: int
    g: float
    lr: float
    wd: float


@dataclass
class StepResult:
    loss_plus: float
    loss_minus: float
    projected_grad: float
    count: float
    finite: bool


class Engine:
    def __init__(
        self,
        model: nn.Module,
        adapter: Adapter,
        host: HostCopy,
        ctx: zdist.RankContext,
        *,
        program: Program,
        rank: str,
        eps: float,
        spans: Spans | None = None,
        tuned: Tuned | None = None,
        barrier: Callable[[], None] | None = None,
        world_sum: Callable[[list[float]], list[float]] | None = None,
        block_graphs: BlockGraphs | None = None,
    ) -> None:
        """``program``: the plan's step program; ``rank``: this rank's GPU in it; ``tuned``: the
        adapter trained on read-only blocks (zoplan.runtime.tuning), with a frozen program;
        ``barrier``: how this rank meets its exchange group before a whole block
        (``zdist.exchange_barrier``; by default a barrier of the group); ``world_sum``: how it sums
        the loss scalars over every rank (``zdist.world_sum``; by default ``all_reduce_sum``);
        ``block_graphs``: the blocks' forwards as CUDA graphs (zoplan.runtime.graphs; by default
        with ``ZOPLAN_CUDA_GRAPHS=1`` on CUDA, else none)."""
        layout = program.layout
        if program.layers != len(host.layouts):
            raise ValueError(f"the step program has {program.layers} blocks, the model {len(host.layouts)}")
        if program.frozen != (tuned is not None):
            raise ValueError("read-only blocks go with an adapter to train, and an adapter with read-only blocks")
        self.model = model
        self.tuned = tuned
        self.spans = spans or Spans(ctx.device, None)
        self.adapter = adapter
        self.host = host
        self.ctx = ctx
        group = ctx.exchange_group
        self._meet = barrier or (lambda: zdist.barrier(group=group))
        self._sum = world_sum or zdist.all_reduce_sum
        self.layout = layout
        self.upload = layout.upload
        self.slices = layout.slices_per_block
        self.dtype = DTYPES[layout.param_dtype]
        self.eps = eps
        self.blocks = adapter.blocks(model)
        self.resident_blocks = set(layout.resident)
        self.prefetch = layout.prefetch  # blocks uploading while one computes
        self.device = ctx.device
        self.pending: Pending | None = None
        self.computes = bool(ctx.signs)
        self.rounds = layout.rounds
        # this rank's ops in issue order, and after which of them each block's buffer is done with
        self.ops = program.rank_ops(rank)
        self.op_ids = {op.id for op in self.ops}
        self.prologue = program.prologue(rank)
        self.last_use: dict[int, int] = {}
        for k, op in enumerate(self.ops):
            if op.block is not None and op.step == 0:
                self.last_use[op.block] = k
        # resident parts: the master values, and the parameters the model's modules use
        self.resident_params = {
            n: p for n, p in model.named_parameters() if not n.startswith(adapter.blocks_path + ".")
        }
        # (an adapter is trained: they are only read, as loaded)
        trains_all = self.computes and tuned is None
        self.resident_master = {n: p.detach().clone() for n, p in self.resident_params.items()} if trains_all else {}
        # what each holds: None (the master), (seed, sign), or _STALE
        self._resident_state: dict[str, object] = dict.fromkeys(self.resident_params)
        # the token embedding, when a branch's embedding can read its looked-up rows perturbed
        # alone instead of the whole table (_embedding_rows): its name among the resident parts
        # (on a CPU, where z costs per element; a GPU perturbs a whole table in one fused kernel
        # for less than the rows' lookups would cost)
        embedding = model.get_input_embeddings() if trains_all and self.device.type == "cpu" else None
        self._table = next(
            (
                n
                for n, p in self.resident_params.items()
                if type(embedding) is nn.Embedding
                and embedding.max_norm is None
                and p is embedding.weight
                and p.numel() >= ROWS_TABLE_MIN
            ),
            None,
        )
        # What each stage reads of the largest resident parts: the embedding its table's rows
        # (_embedding_rows), the heads the output projection (the same tensor when tied), so that
        # each is perturbed once per branch. The small parts (norms, positions) are set for both.
        head = model.get_output_embeddings() if self._table is not None else None
        head_name = next((n for n, p in self.resident_params.items() if head is not None and p is head.weight), None)
        self._embed_skips = frozenset(n for n in (self._table, head_name) if n is not None)
        self._head_skips = frozenset(n for n in (self._table,) if n is not None and n != head_name)
        # streamed blocks: where each parameter lives in its module, and the per-branch buffers
        self._places: dict[int, list[tuple[dict, str]]] = {}
        self._views: dict[tuple[int, int], list[torch.Tensor]] = {}
        self._originals: dict[int, list] = {}
        self._weights: dict[int, torch.Tensor] = {}
        self.cuda = self.device.type == "cuda"
        self.graphs = (
            block_graphs if block_graphs is not None else BlockGraphs() if graphs_wanted(self.device) else None
        )
        self.kernels = kernels_label(self.device)  # perturb.fused_backend's kernels, in words
        if self.cuda:
            # page-locked host memory: asynchronous copies at full PCIe speed
            if not host.pin_for_cuda():  # still correct, only slower (pageable copies)
                print("warning: could not pin the host copy (cudaHostRegister failed)", flush=True)
        # the upload and offload streams (CUDA), and the compute stream: the one current when the
        # engine is made, on which updates, all-gathers and blocks are issued. On the CPU one
        # thread runs every op in order
        self.up_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.off_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.compute_stream = torch.cuda.current_stream(self.device) if self.cuda else None
        self.written: dict[int, torch.cuda.Event] = {}  # block -> its last write-back (CUDA)
        # the next step's first uploads, started as a training step's last block computes: they
        # overlap its head, loss and loop (as the simulator's steps do), not the next step's start
        self.carried: dict[int, torch.Tensor] = {}
        self.bufs: dict[int, torch.Tensor] = {}  # block -> its buffer in this step
        self.packed: dict[int, torch.cuda.Event] = {}  # resident block -> its shard was last packed (CUDA)
        # resident blocks, uploaded once: with sliced uploads this rank's slices only, packed (the
        # planner counts 1/movers of a block per GPU); with whole-block uploads the whole block
        self.kept: dict[int, torch.Tensor] = {}
        # a single mover's slices are the whole block: it keeps the block itself and updates it
        # in place, with no work buffer to fill
        self.sharded = self.upload == "sliced" and ctx.movers > 1
        for i in sorted(self.resident_blocks):
            layout, src = self.host.layouts[i], self.host.blocks[i]
            if self.sharded:
                self.kept[i] = torch.cat([src[lo:hi] for lo, hi in self._my_ranges(layout)] or [src[:0]]).to(
                    self.device, self.dtype
                )
            else:  # the whole block (a single mover's slices are all of it)
                self.kept[i] = torch.empty(layout.padded, dtype=self.dtype, device=self.device)
                self.kept[i].copy_(src, non_blocking=self.cuda)
        if self.cuda:  # the first step waits for them here
            torch.cuda.current_stream(self.device).wait_stream(self.up_stream)

    def op_span(self, kind: Kind, block: int | None = None, r: int = 0, cuda_stream=None):
        """Time one op of the step program (a span labelled with its id, stream and category)."""
        oid = op_id(kind, block, r, self.rounds)
        if oid not in self.op_ids:
            raise RuntimeError(
                f"the engine ran '{oid}', which is not in this rank's step program "
                "(zoplan.program and the engine disagree)"
            )
        return self.spans.span(
            stream_of(kind, self.upload).value,
            CATEGORY[kind],
            oid,
            span_block(kind, block, len(self.blocks)),
            cuda_stream,
        )

    # ----- block movement ------------------------------------------------------------------------
    def _my_ranges(self, layout: BlockLayout) -> list[tuple[int, int]]:
        """The flat ranges this rank uploads, updates and writes back."""
        ctx = self.ctx
        if self.upload == "sliced":
            if ctx.mover_index is None:
                return []
            # its part of every round: a slice, or its share of the round (zoplan.layout.Layout.parts)
            size = layout.padded // self.rounds
            lo, hi = self.layout.parts(size)[ctx.mover_index]
            return [(r * size + lo, r * size + hi) for r in range(self.rounds)]
        if ctx.compute_index is None:
            return []
        # whole blocks: every compute rank holds the block; each writes back an equal share
        share = -(-layout.numel // ctx.computes)
        lo = ctx.compute_index * share
        return [(lo, min(layout.numel, lo + share))] if lo < layout.numel else []

    def _unpack_shard(self, i: int, buf: torch.Tensor) -> None:
        """Resident block i, sliced: this rank's slices from its shard into the work buffer."""
        at, shard = 0, self.kept[i]
        for lo, hi in self._my_ranges(self.host.layouts[i]):
            buf[lo:hi].copy_(shard[at : at + hi - lo])
            at += hi - lo

    def _pack_shard(self, i: int, buf: torch.Tensor) -> None:
        at, shard = 0, self.kept[i]
        for lo, hi in self._my_ranges(self.host.layouts[i]):
            shard[at : at + hi - lo].copy_(buf[lo:hi])
            at += hi - lo

    # ----- the ops' handlers ------------------------------------------------------------------------
    def _ranges(self, i: int) -> list[tuple[int, int]]:
        """The ranges of block i one upload op each copies: the whole buffer with whole-block
        uploads, else this rank's slices (one per round)."""
        layout = self.host.layouts[i]
        return [(0, layout.padded)] if self.upload == "whole" else self._my_ranges(layout)

    def _h2d(self, op: Op) -> None:
        """Round r of block i from the host copy into its buffer (a new one at round 0)."""
        i, r = op.block, op.round or 0
        target = self.carried if op.step == 1 else self.bufs
        layout, src = self.host.layouts[i], self.host.blocks[i]
        lo, hi = self._ranges(i)[r]
        # on the upload stream, after the previous write-back of this block has landed; compute
        # waits for this block (or round) only: the next upload, queued behind it on the same
        # stream, must overlap this block's compute
        with self._on(self.up_stream):
            if r == 0:
                if i in self.written:
                    self.up_stream.wait_event(self.written[i])
                target[i] = torch.empty(layout.padded, dtype=self.dtype, device=self.device)
                target[i].zoplan_landed = []  # CUDA: an event per round, on the buffer itself
            buf = target[i]
            with self.op_span(Kind.H2D, i, r, self.up_stream):
                buf[lo:hi].copy_(src[lo:hi], non_blocking=self.cuda)
            if self.cuda:
                buf.zoplan_landed.append(self.up_stream.record_event())
                if r == len(self._ranges(i)) - 1:
                    buf.record_stream(self.compute_stream)  # used and freed there

    def _unpack(self, op: Op) -> None:
        """Resident block i, sliced over several movers: a work buffer holding this rank's slices
        from its shard (on CUDA on the upload stream, after the shard's last packing)."""
        i = op.block
        target = self.carried if op.step == 1 else self.bufs
        layout = self.host.layouts[i]
        with self._on(self.up_stream):
            if i in self.packed:
                self.up_stream.wait_event(self.packed[i])
            buf = target[i] = torch.empty(layout.padded, dtype=self.dtype, device=self.device)
            with self.op_span(Kind.UNPACK, i, cuda_stream=self.up_stream):
                self._unpack_shard(i, buf)
            if self.cuda:
                buf.record_stream(self.compute_stream)
                buf.zoplan_landed = [self.up_stream.record_event()]

    def _on(self, stream):
        """Work queued on ``stream`` (CUDA); on the CPU it runs here and now."""
        return torch.cuda.stream(stream) if self.cuda else contextlib.nullcontext()

    def _buffer(self, i: int, r: int = 0) -> torch.Tensor:
        """Block i's weights in this step, for use on the compute stream: on CUDA it first waits
        for the upload of round r (sliced) or of the whole block."""
        buf = self.bufs.get(i)
        if buf is None:  # kept whole on the device: updated in place
            return self.kept[i]
        if self.cuda:
            landed = buf.zoplan_landed  # one event per round (sliced), or one for the block
            if landed[min(r, len(landed) - 1)] is not None:
                self.compute_stream.wait_event(landed[min(r, len(landed) - 1)])
                for k in range(min(r, len(landed) - 1) + 1):  # the rounds before have landed too
                    landed[k] = None
        return buf

    def _update(self, op: Op) -> None:
        """The pending update on this rank's range of block i (round r): all of it with whole
        blocks. A step with no update pending (a run's first) only makes the block ready."""
        i, r = op.block, op.round or 0
        buf = self._buffer(i, r)
        p = self.pending
        if p is None:
            return
        layout = self.host.layouts[i]
        lo, hi = (0, layout.numel) if self.upload == "whole" else self._my_ranges(layout)[r]
        with self.op_span(Kind.UPDATE, i, r):
            update_range(buf, layout, lo, min(hi, layout.numel), p.seed, p.g, p.lr, p.wd)

    def _barrier(self, op: Op) -> None:
        """Whole blocks shared by several compute ranks: every rank of this machine reads the block
        before anyone writes its share back (a share written early would be read, and updated,
        twice), and every share written back before (earlier blocks, the step before) has landed
        in the host copy (another rank's later read of it must see it)."""
        if self.pending is None:
            return
        if self.cuda:
            self.up_stream.synchronize()
            self.off_stream.synchronize()
        with self.op_span(Kind.BARRIER, op.block):
            self._meet()

    def _d2h(self, op: Op) -> None:
        """This rank's updated range (round r) of block i back to the host copy (only this rank
        reads it back: no one else to wait for)."""
        if self.pending is None:
            return
        i, r = op.block, op.round or 0
        ranges = self._my_ranges(self.host.layouts[i])
        if r >= len(ranges):  # a block too small to give this rank a share
            return
        lo, hi = ranges[r]
        buf = self._buffer(i, r)
        # on the offload stream, once the update has been computed
        ready = self.compute_stream.record_event() if self.cuda else None
        with self._on(self.off_stream):
            if self.cuda:
                self.off_stream.wait_event(ready)
            with self.op_span(Kind.D2H, i, r, self.off_stream):
                self.host.blocks[i][lo:hi].copy_(buf[lo:hi], non_blocking=self.cuda)
            if self.cuda:
                buf.record_stream(self.off_stream)
                self.written[i] = self.off_stream.record_event()

    def _all_gather(self, op: Op) -> None:
        """Round r of block i: one slice from every mover, assembled on each; after the last
        round a resident block's shard keeps this rank's updated slices."""
        i, r = op.block, op.round or 0
        buf = self._buffer(i, r)
        layout = self.host.layouts[i]
        size = layout.padded // self.rounds
        with self.op_span(Kind.ALLGATHER, i, r):
            parts = [buf[r * size + lo : r * size + hi] for lo, hi in self.layout.parts(size)]
            mine = parts[self.ctx.mover_index].clone()
            zdist.all_gather_into(parts, mine, group=self.ctx.exchange_group)
        if i in self.kept and r == self.rounds - 1 and self.pending is not None:
            self._pack_shard(i, buf)
            if self.cuda:  # its next unpacking, on the upload stream, reads it after this
                self.packed[i] = self.compute_stream.record_event()

    # ----- resident parts --------------------------------------------------------------------------
    def _update_resident(self) -> None:
        p = self.pending
        if p is None or not self.computes:
            return
        if self.tuned is not None:  # the adapter is what is trained
            self.tuned.update(p.seed, p.g, p.lr, p.wd)
            self.pending = None  # applied: not again (an evaluation's pass, a flush)
            return
        for name, master in self.resident_master.items():
            fused = fused_kernels(master)
            if fused is not None:  # the same arithmetic in one kernel, z never materialised
                fused.update_(master, p.seed, name, 0, p.g, p.lr, p.wd, decays(name, master))
                continue
            z = normal(p.seed, name, 0, master.numel(), device=master.device).view(master.shape)
            apply_update(master, z, p.g, p.lr, p.wd, decays(name, master))
        for name in self._resident_state:  # the parameters no longer follow from the master
            self._resident_state[name] = _STALE

    def _set_resident(self, seed: int | None, sign: int, skip: frozenset[str] = frozenset()) -> None:
        """The model's resident parameters (but ``skip``) := master (+ sign * eps * z). Relays
        hold none. Nothing is recomputed where a parameter already holds that (a branch's head
        follows its embedding with the same values: z of a 100M-parameter embedding is not
        free). With an adapter they stay as loaded."""
        if not self.computes or self.tuned is not None:
            return
        state = (seed, sign) if seed is not None else None
        with torch.no_grad():
            for name, param in self.resident_params.items():
                if name in skip or self._resident_state[name] == state:
                    continue
                self._resident_state[name] = state
                master = self.resident_master[name]
                fused = fused_kernels(master)
                if seed is None:
                    param.copy_(master)
                elif fused is not None:  # (master.float() + sign * eps * z).to(dtype) in one kernel
                    fused.perturbed_into(param, master, seed, name, 0, sign * self.eps)
                else:
                    z = normal(seed, name, 0, master.numel(), device=master.device).view(master.shape)
                    param.copy_(master.float() + (sign * self.eps) * z)

    @contextlib.contextmanager
    def _embedding_rows(self, seed: int, sign: int):
        """The token embedding looks up master + sign * eps * z of the rows it reads, each
        computed as ``_set_resident`` computes the whole table (the same z by its flat index, the
        same arithmetic): the same values, bit for bit, for a few thousand rows instead of the
        whole vocabulary."""
        assert self._table is not None
        name, master = self._table, self.resident_master[self._table]
        width = master.shape[1]
        module = self.model.get_input_embeddings()

        def looked_up(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            ids = args[0]
            rows, where = torch.unique(ids, return_inverse=True)
            z = torch.empty(rows.numel() * width, dtype=torch.float32, device=master.device)
            normal_parts_(z, seed, [(name, r * width, width, k * width) for k, r in enumerate(rows.tolist())])
            values = (master[rows].float() + (sign * self.eps) * z.view(-1, width)).to(output.dtype)
            return values[where]

        handle = module.register_forward_hook(looked_up)
        try:
            yield
        finally:
            handle.remove()

    def _embed(self, inputs: dict, prefixed: bool = True) -> tuple[torch.Tensor, dict]:
        """Run the model's forward up to its first block; return that block's inputs (with an
        adapter's additions to them, unless not ``prefixed``)."""
        box: dict = {}
        inputs = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        if prefixed and self.tuned is not None:
            inputs = self.tuned.model_inputs(inputs)

        def hook(module, args, kwargs):
            box["args"], box["kwargs"] = args, dict(kwargs)
            raise _StopAtFirstBlock

        handle = self.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.model(**inputs, use_cache=False)
        except _StopAtFirstBlock:
            pass
        finally:
            handle.remove()
        kwargs = box["kwargs"]
        hidden = box["args"][0] if box["args"] else kwargs.pop("hidden_states")
        return hidden, kwargs

    @torch.no_grad()
    def base_forward(self, inputs: dict) -> None:
        """The base model's forward on ``inputs`` on this rank alone, each block read straight from
        the host copy (its weights as loaded: only for read-only blocks), outside the step program:
        the one pass that sets a prefix's initial values (zoplan.runtime.tuning.Prefix)."""
        assert self.tuned is not None, "the host copy holds the weights as loaded only for read-only blocks"
        hidden, kwargs = self._embed(inputs, prefixed=False)
        for i, block in enumerate(self.blocks):
            self._bind(i, self.host.blocks[i].to(self.device, self.dtype))
            out = block(hidden, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
            self._unbind(i)

    # ----- one step ------------------------------------------------------------------------------
    def _bind(self, i: int, flat: torch.Tensor, sign: int | None = None) -> None:
        """Point block i's parameters at their ranges of ``flat``. Cheaper than functional_call's
        swap and restore, which the host would pay per block and branch; the streamed blocks'
        own parameters are empty (meta) and nothing else reads them. With ``sign``, ``flat`` is
        that branch's persistent buffer and the views are built once."""
        places = self._places.get(i)
        if places is None:
            block = self.blocks[i]
            places = []
            for slot in self.host.layouts[i].slots:
                owner, _, attr = slot.local.rpartition(".")
                places.append((block.get_submodule(owner)._parameters if owner else block._parameters, attr))
            self._places[i] = places
            self._originals[i] = [params[attr] for params, attr in places]
        views = self._views.get((i, sign)) if sign is not None else None
        if views is None:
            base = flat.storage_offset()
            views = [
                torch.as_strided(flat, slot.shape, _row_major(slot.shape), base + slot.offset)
                for slot in self.host.layouts[i].slots
            ]
            if sign is not None:
                self._views[(i, sign)] = views
        for (params, attr), view in zip(places, views):
            params[attr] = view

    def _unbind(self, i: int) -> None:
        """Block i's own (empty, meta) parameters back in place, so the module is as loaded and no
        device buffer stays referenced by it (an uploaded block is freed once computed)."""
        for (params, attr), original in zip(self._places[i], self._originals[i]):
            params[attr] = original

    def _branch_buffer(self, sign: int) -> torch.Tensor:
        """The buffer that holds theta + sign * eps * z of the block being computed: one per
        branch, as large as the largest block, reused by every block (one compute stream)."""
        buf = self._weights.get(sign)
        if buf is None:
            size = max(layout.padded for layout in self.host.layouts)
            buf = self._weights[sign] = torch.empty(size, dtype=self.dtype, device=self.device)
        return buf

    def _perturbed(self, i: int, theta: torch.Tensor, seed: int, signs: tuple[int, ...]) -> dict[int, torch.Tensor]:
        layout = self.host.layouts[i]
        fused = fused_kernels(theta)
        if fused is not None:  # one launch for the block's parameters and both signs, z drawn once
            out = {s: self._branch_buffer(s) for s in signs}
            table = layout_table(fused, layout, 0, layout.numel, theta.device)
            fused.perturbed_block_into([out[s] for s in signs], theta, table, seed, [s * self.eps for s in signs])
            return out
        z = torch.zeros(layout.padded, dtype=torch.float32, device=self.device)
        normal_parts_(z, seed, [(slot.name, 0, slot.numel, slot.offset) for slot in layout.slots])
        base = theta.float()
        return {s: (base + (s * self.eps) * z).to(self.dtype) for s in signs}

    @torch.no_grad()
    def _run(
        self,
        micro_batches: list,
        seed: int | None,
        signs: tuple[int, ...],
        metric_fns: list,
        *,
        carry: bool,
        move_only: bool = False,
    ) -> dict[int, list[tuple[float, float]]]:
        """Run this rank's step program up to its loss scalars (the all-reduce is the caller's).
        ``carry``: also issue the next step's first uploads (a training step); ``move_only``:
        only move and update the blocks (a flush)."""
        results: dict[int, list[tuple[float, float]]] = {}
        hidden: dict[int, list[torch.Tensor]] = {s: [] for s in signs}
        kwargs: list[dict] = []
        if not self.carried:  # a run's first step, or the first after an evaluation or a flush
            for op in self.prologue:
                self._move(op)
        self.bufs, self.carried = self.carried or self.bufs, {}
        for k, op in enumerate(self.ops):
            kind = op.kind
            if op.step == 1:
                if carry:
                    self._move(op)
            elif kind in _MOVES:
                self._move(op)
            elif move_only or kind in (Kind.ALLREDUCE, Kind.HOST):
                pass
            elif kind is Kind.EMBED:
                with self.op_span(Kind.EMBED):
                    self._update_resident()
                    if self.tuned is not None and seed is not None:
                        self.tuned.perturb(seed, self.eps)
                    rows = self._table is not None and seed is not None
                    for s in signs:
                        # the token embedding's rows perturbed alone, the output projection left
                        # to the heads: each perturbed once per branch
                        self._set_resident(seed, s, skip=self._embed_skips if rows else frozenset())
                        with self._embedding_rows(seed, s) if rows else contextlib.nullcontext():
                            for mb in micro_batches:
                                h, kw = self._embed(mb["inputs"])
                                hidden[s].append(h)
                                if len(kwargs) < len(micro_batches):
                                    kwargs.append(kw)
            elif kind is Kind.BLOCK:
                if signs:
                    self._block(op.block, seed, signs, hidden, kwargs)
            elif kind is Kind.HEAD:
                with self.op_span(Kind.HEAD):
                    for s in reversed(signs):  # the last branch embedded first: its small parts are in place
                        self._set_resident(seed, s, skip=self._head_skips if seed is not None else frozenset())
                        if self.tuned is not None:
                            self.tuned.select(s if seed is not None else None)
                        sums = [[0.0, 0.0] for _ in metric_fns]
                        for m, mb in enumerate(micro_batches):
                            logits = self.adapter.logits(self.model, hidden[s][m]).float()
                            for j, fn in enumerate(metric_fns):
                                value, n = fn(logits, mb)
                                sums[j][0] += float(value)
                                sums[j][1] += float(n)
                        results[s] = [(v, n) for v, n in sums]
                    self._set_resident(None, 1)
            if op.step == 0 and op.block is not None and self.last_use.get(op.block) == k:
                self.bufs.pop(op.block, None)  # done with in this step: freed (CUDA: once its streams are)
        self.bufs = {}
        self.pending = None
        return results

    def _move(self, op: Op) -> None:
        _MOVES[op.kind](self, op)

    def _block(self, i: int, seed: int | None, signs: tuple[int, ...], hidden: dict, kwargs: list) -> None:
        theta = self._buffer(i, self.rounds - 1)
        with self.op_span(Kind.BLOCK, i):
            if seed is None or self.tuned is not None:  # unperturbed, or read-only (the adapter is)
                weights = {s: theta for s in signs}
            else:
                weights = self._perturbed(i, theta, seed, signs)
            block = self.blocks[i]
            for s in signs:
                if self.tuned is not None:
                    self.tuned.select(s if seed is not None else None)
                persistent = weights[s] is self._weights.get(s)
                self._bind(i, weights[s], s if persistent else None)
                # a graph reads the weights where it was captured reading them: a branch's own buffer
                graphs = self.graphs if persistent and seed is not None else None
                for k in range(len(hidden[s])):
                    if graphs is not None:
                        hidden[s][k] = graphs.forward(block, i, s, k, hidden[s][k], kwargs[k])
                    else:
                        hidden[s][k] = hidden_of(block(hidden[s][k], **kwargs[k]))
            self._unbind(i)

    def forward_losses(
        self, micro_batches: list, seed: int | None, metric_fns: list
    ) -> dict[int, list[tuple[float, float]]]:
        """Per branch sign, per metric: (sum, count) over this rank's micro-batches. ``seed`` None
        runs the unperturbed model (evaluation, on one rank per replica); the pending update is
        applied on the way."""
        signs = self.ctx.signs if seed is not None else ((1,) if 1 in self.ctx.signs else ())
        if self.graphs is not None and seed is not None:
            self.graphs.begin_training_step()
        return self._run(micro_batches, seed, signs, metric_fns, carry=seed is not None)

    def step(
        self, micro_batches: list, seed: int, lr: float, wd: float, loss_fn, step: int | None = None
    ) -> StepResult:
        """One ZO step: both branches' losses on the global batch, the projected gradient, and
        the update deferred into the next step (or ``flush``). With ``step``, its stages are
        recorded as spans (without, they go to a step the caller has begun, if any)."""
        if step is not None:
            self.spans.begin(step)
        losses = self.forward_losses(micro_batches, seed, [loss_fn])
        plus = losses.get(1, [(0.0, 0.0)])[0]
        minus = losses.get(-1, [(0.0, 0.0)])[0]
        with self.op_span(Kind.ALLREDUCE):
            sp, cp, sm, cm = self._sum([plus[0], plus[1], minus[0], minus[1]])
        if step is not None:
            self.spans.end()
        loss_plus, loss_minus = sp / max(cp, 1.0), sm / max(cm, 1.0)
        g = (loss_plus - loss_minus) / (2 * self.eps)
        finite = all(map(_finite, (loss_plus, loss_minus, g)))
        self.pending = Pending(seed, g if finite else 0.0, lr, wd) if finite else None
        return StepResult(loss_plus, loss_minus, g if finite else 0.0, cp, finite)

    def evaluate(self, micro_batches: list, loss_fn, accuracy_fn) -> tuple[float, float]:
        """Loss and accuracy of the current (flushed) weights on this rank's eval shard, combined
        over replicas."""
        stats = self.forward_losses(micro_batches, None, [loss_fn, accuracy_fn]).get(1, [(0.0, 0.0)] * 2)
        (ls, lc), (as_, ac) = stats
        ls, lc, as_, ac = self._sum([ls, lc, as_, ac])
        return ls / max(lc, 1.0), as_ / max(ac, 1.0)

    @torch.no_grad()
    def flush(self) -> None:
        """Apply the pending update to every block and resident part now (before evaluation or
        saving): afterwards the host copy holds the trained weights."""
        if self.pending is None:
            return
        self._update_resident()
        if self.tuned is not None:  # the blocks are as loaded: nothing to move
            return
        self._set_resident(None, 1)
        self._run([], None, (), [], carry=False, move_only=True)  # an upload carried from the last step is used
        if self.cuda:
            torch.cuda.synchronize(self.device)
        zdist.barrier()  # every share of the host copy is written before anyone reads it again

    def resident_state(self) -> dict[str, torch.Tensor]:
        return {n: m for n, m in self.resident_master.items()}

    def resident_as_saved(self) -> None:
        """The resident blocks as the run writes them: rounded to the host copy's dtype where it is
        narrower than the compute dtype (they are written from the host copy, rounded into it).
        Before the final evaluation, so that its figures are those of the saved weights; the run
        trains no more after it."""
        if self.tuned is not None:  # read-only: as loaded
            return
        for i, buf in self.kept.items():
            wire = self.host.blocks[i].dtype
            if wire != buf.dtype:
                buf.copy_(buf.to(wire))  # (what the copy into the host copy rounds, element by element)

    def sync_resident_blocks_to_host(self) -> None:
        """Resident blocks are never offloaded while training; write them back for saving."""
        if self.tuned is not None:  # read-only: the host copy holds them as they are
            return
        for i, buf in self.kept.items():
            at = 0
            for lo, hi in self._my_ranges(self.host.layouts[i]):
                if self.sharded:  # the shard holds this rank's slices, packed
                    self.host.blocks[i][lo:hi].copy_(buf[at : at + hi - lo])
                    at += hi - lo
                else:
                    self.host.blocks[i][lo:hi].copy_(buf[lo:hi])
        if self.cuda:
            torch.cuda.synchronize(self.device)


def _row_major(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _finite(x: float) -> bool:
    return x == x and x not in (float("inf"), float("-inf"))


# the handlers of the ops that move and update blocks
_MOVES = {
    Kind.H2D: Engine._h2d,
    Kind.UNPACK: Engine._unpack,
    Kind.UPDATE: Engine._update,
    Kind.BARRIER: Engine._barrier,
    Kind.D2H: Engine._d2h,
    Kind.ALLGATHER: Engine._all_gather,
}
