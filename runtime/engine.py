"""The generic executor: one ZO step of any model family, blocks streamed from the host copy.

Per block, on each rank, as the plan says:
1. upload: a mover copies its slices of the block from the host copy (all of it with whole-block
   uploads), ``prefetch`` blocks ahead of the block being computed; a resident block comes from
   the device instead: with sliced uploads each mover keeps only its own slices of it (a shard),
   with whole-block uploads each compute rank keeps all of it;
2. deferred update: the previous step's update is applied to those slices;
3. write-back: the updated slices go back to the host copy (each rank its own share);
4. exchange: the movers all-gather the updated slices (sliced uploads), round by round: a round
   (one slice from every mover) is updated and all-gathered as soon as it has landed, while the
   block's later rounds still upload;
5. compute: for each branch this rank runs, the block's weights theta + s*eps*z are formed in a
   work buffer (theta itself is never perturbed, so no rounding drift and no restore) and every
   micro-batch's hidden state of that branch goes through the block.
The model's own forward computes embeddings, masks and position encodings: it is run up to the
first block and the arguments it passes to blocks are captured (adapters.py). On the CPU the same
schedule runs with plain copies; the loss scalars are all-reduced at the end of the step.
"""
from __future__ import annotations

from dataclasses import dataclass

import contextlib

import torch
from torch import nn

from zoplan.program import CATEGORY, Kind, Program, op_id, span_block, stream_of
from zoplan.runtime import dist as zdist
from zoplan.runtime.adapters import Adapter
from zoplan.runtime.hostcopy import DTYPES, BlockLayout, HostCopy, decays
from zoplan.runtime.perturb import fused_backend, normal, normal_parts_
from zoplan.runtime.spans import Spans
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
    def __init__(self, model: nn.Module, adapter: Adapter, host: HostCopy, ctx: zdist.RankContext, *,
                 upload: str, slices: int, param_dtype: str, resident_blocks: list[int],
                 eps: float, spans: Spans | None = None, prefetch: int = 1,
                 program: Program | None = None, rank: str | None = None) -> None:
        self.model = model
        self.spans = spans or Spans(ctx.device, None)
        self.adapter = adapter
        self.host = host
        self.ctx = ctx
        self.upload = upload
        self.slices = slices
        self.dtype = DTYPES[param_dtype]
        self.eps = eps
        self.blocks = adapter.blocks(model)
        self.resident_blocks = set(resident_blocks)
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, got {prefetch}")
        self.prefetch = prefetch  # blocks uploading while one computes (device buffers: prefetch + 1)
        self.device = ctx.device
        self.pending: Pending | None = None
        self.computes = bool(ctx.signs)
        # the ops this rank's step program holds (zoplan.program): every op the engine runs is
        # one of them, and its span carries the op's id, stream and category
        self.rounds = slices // ctx.movers if upload == "sliced" else 1
        self.program_ops: set[str] | None = None  # set below, after the resident blocks' first upload
        # resident parts: the master values, and the parameters the model's modules use
        self.resident_params = {n: p for n, p in model.named_parameters()
                                if not n.startswith(adapter.blocks_path + ".")}
        self.resident_master = {n: p.detach().clone() for n, p in self.resident_params.items()} if self.computes else {}
        self._resident_state: object = None  # what the parameters hold: None (the master) or (seed, sign)
        # streamed blocks: where each parameter lives in its module, and the per-branch buffers
        self._places: dict[int, list[tuple[dict, str]]] = {}
        self._views: dict[tuple[int, int], list[torch.Tensor]] = {}
        self._originals: dict[int, list] = {}
        self._weights: dict[int, torch.Tensor] = {}
        self.cuda = self.device.type == "cuda"
        fused = fused_backend(self.device)
        interpreted = fused is not None and getattr(fused, "_INTERPRET", False)
        self.kernels = ("torch" if fused is None else
                        "triton interpreter, one launch per block" if interpreted else "triton, one launch per block")
        if self.cuda:
            # page-locked host memory: asynchronous copies at full PCIe speed
            if not host.pin_for_cuda():  # still correct, only slower (pageable copies)
                print("warning: could not pin the host copy (cudaHostRegister failed)", flush=True)
            self.up_stream = torch.cuda.Stream(self.device)
            self.off_stream = torch.cuda.Stream(self.device)
        self.written: dict[int, torch.cuda.Event] = {}  # block -> its last write-back (CUDA)
        self.landed: dict[int, torch.cuda.Event] = {}  # block -> its upload has landed (CUDA)
        # the next step's first uploads, started as a training step's last block computes: they
        # overlap its head, loss and loop (as the simulator's steps do), not the next step's start
        self.carried: dict[int, torch.Tensor | None] = {}
        self.rounds_landed: dict[int, list] = {}  # block -> each round's slice has landed (CUDA, sliced)
        self.packed: dict[int, torch.cuda.Event] = {}  # resident block -> its shard was last packed (CUDA)
        # resident blocks, uploaded once: with sliced uploads this rank's slices only, packed (the
        # planner counts 1/movers of a block per GPU); with whole-block uploads the whole block
        self.kept: dict[int, torch.Tensor] = {}
        # a single mover's slices are the whole block: it keeps the block itself and updates it
        # in place, with no work buffer to fill
        self.sharded = upload == "sliced" and ctx.movers > 1
        for i in sorted(self.resident_blocks):
            layout, src = self.host.layouts[i], self.host.blocks[i]
            if self.sharded:
                self.kept[i] = torch.cat([src[lo:hi] for lo, hi in self._my_ranges(layout)]
                                         or [src[:0]]).to(self.device, self.dtype)
            else:
                self.kept[i] = self._device_copy(i)
        if self.cuda:  # the first step waits for them here
            torch.cuda.current_stream(self.device).wait_stream(self.up_stream)
            self.landed.clear()
            self.rounds_landed.clear()
        if program is not None:
            self.program_ops = {op.id for op in program.rank_ops(rank)}

    def op_span(self, kind: Kind, block: int | None = None, r: int = 0, cuda_stream=None):
        """Time one op of the step program (a span labelled with its id, stream and category)."""
        oid = op_id(kind, block, r, self.rounds)
        if self.program_ops is not None and oid not in self.program_ops:
            raise RuntimeError(f"the engine ran '{oid}', which is not in this rank's step program "
                               "(zoplan.program and the engine disagree)")
        return self.spans.span(stream_of(kind, self.upload).value, CATEGORY[kind], oid,
                               span_block(kind, block, len(self.blocks)), cuda_stream)

    # ----- block movement ------------------------------------------------------------------------
    def _my_ranges(self, layout: BlockLayout) -> list[tuple[int, int]]:
        """The flat ranges this rank uploads, updates and writes back."""
        ctx = self.ctx
        if self.upload == "sliced":
            if ctx.mover_index is None:
                return []
            return [layout.slice_range(k, self.slices) for k in range(ctx.mover_index, self.slices, ctx.movers)]
        if ctx.compute_index is None:
            return []
        # whole blocks: every compute rank holds the block; each writes back an equal share
        share = -(-layout.numel // ctx.computes)
        lo = ctx.compute_index * share
        return [(lo, min(layout.numel, lo + share))] if lo < layout.numel else []

    def _device_copy(self, i: int) -> torch.Tensor:
        layout = self.host.layouts[i]
        src = self.host.blocks[i]
        if self.cuda:
            # on the upload stream, after the previous write-back of this block has landed
            compute = torch.cuda.current_stream(self.device)
            with torch.cuda.stream(self.up_stream):
                if i in self.written:
                    self.up_stream.wait_event(self.written[i])
                buf = torch.empty(layout.padded, dtype=self.dtype, device=self.device)
                self.rounds_landed[i] = self._copy_ranges(i, buf, src, layout)
                buf.record_stream(compute)  # the buffer is used (and freed) on the compute stream
                # compute waits for this block only: the next block's upload, queued behind it
                # on the same stream, must overlap this block's compute
                self.landed[i] = self.up_stream.record_event()
            return buf
        buf = torch.empty(layout.padded, dtype=self.dtype, device=self.device)
        self._copy_ranges(i, buf, src, layout)
        return buf

    def _copy_ranges(self, i: int, buf: torch.Tensor, src: torch.Tensor, layout: BlockLayout) -> list:
        """Copy this rank's ranges of block i (one upload op each); on CUDA with sliced uploads, an
        event per range (per round) recorded on the upload stream, so each round can be used as
        soon as it lands."""
        ranges = [(0, layout.padded)] if self.upload == "whole" else self._my_ranges(layout)
        events = []
        for r, (lo, hi) in enumerate(ranges):
            with self.op_span(Kind.H2D, i, r, self.up_stream if self.cuda else None):
                buf[lo:hi].copy_(src[lo:hi], non_blocking=self.cuda)
            if self.cuda and self.upload == "sliced":
                events.append(self.up_stream.record_event())
        return events

    def _unpacked(self, i: int) -> torch.Tensor:
        """Resident block i, sliced over several movers: a work buffer holding this rank's slices
        from its shard (on CUDA on the upload stream, after the shard's last packing)."""
        layout = self.host.layouts[i]
        if not self.cuda:
            buf = torch.empty(layout.padded, dtype=self.dtype, device=self.device)
            with self.op_span(Kind.UNPACK, i):
                self._unpack_shard(i, buf)
            return buf
        with torch.cuda.stream(self.up_stream):
            if i in self.packed:
                self.up_stream.wait_event(self.packed[i])
            buf = torch.empty(layout.padded, dtype=self.dtype, device=self.device)
            with self.op_span(Kind.UNPACK, i, cuda_stream=self.up_stream):
                self._unpack_shard(i, buf)
            buf.record_stream(torch.cuda.current_stream(self.device))
            self.landed[i] = self.up_stream.record_event()
        return buf

    def _unpack_shard(self, i: int, buf: torch.Tensor) -> None:
        """Resident block i, sliced: this rank's slices from its shard into the work buffer."""
        at, shard = 0, self.kept[i]
        for lo, hi in self._my_ranges(self.host.layouts[i]):
            buf[lo:hi].copy_(shard[at:at + hi - lo])
            at += hi - lo

    def _pack_shard(self, i: int, buf: torch.Tensor) -> None:
        at, shard = 0, self.kept[i]
        for lo, hi in self._my_ranges(self.host.layouts[i]):
            shard[at:at + hi - lo].copy_(buf[lo:hi])
            at += hi - lo

    def _write_back(self, i: int, buf: torch.Tensor, lo: int, hi: int, r: int = 0) -> None:
        dst = self.host.blocks[i][lo:hi]
        if not self.cuda:
            with self.op_span(Kind.D2H, i, r):
                dst.copy_(buf[lo:hi])
            return
        # on the offload stream, once the update has been computed
        ready = torch.cuda.current_stream(self.device).record_event()
        with torch.cuda.stream(self.off_stream):
            self.off_stream.wait_event(ready)
            with self.op_span(Kind.D2H, i, r, self.off_stream):
                dst.copy_(buf[lo:hi], non_blocking=True)
            buf.record_stream(self.off_stream)
            self.written[i] = self.off_stream.record_event()

    def _prefetch(self, i: int) -> torch.Tensor | None:
        """Start block i's upload (CUDA: asynchronously, overlapping the compute before it); a
        resident block sliced over several movers is unpacked from this rank's shard instead."""
        if i >= len(self.blocks):
            return None
        if i in self.resident_blocks:
            return self._unpacked(i) if self.sharded else None
        if self.upload == "whole" and not self.computes:
            return None
        return self._device_copy(i)

    def _fetch(self, i: int, uploaded: torch.Tensor | None = None) -> torch.Tensor | None:
        """Steps 1-4 for block i: its current weights on this device (None on a rank that
        neither moves nor computes). ``uploaded``: the buffer ``_prefetch`` started."""
        layout = self.host.layouts[i]
        kept = i in self.resident_blocks
        if self.upload == "whole" and not self.computes:
            return None
        if kept and self.sharded:  # a work buffer, its own slices from the shard
            buf = uploaded if uploaded is not None else self._unpacked(i)
        else:
            buf = self.kept[i] if kept else (uploaded if uploaded is not None else self._device_copy(i))
        rounds = None  # sliced on CUDA: wait for each round's slice, not for the whole block
        if self.cuda and (not kept or self.sharded):
            landed, rounds = self.landed.pop(i), self.rounds_landed.pop(i, None)
            if self.upload == "whole" or not rounds:
                torch.cuda.current_stream(self.device).wait_event(landed)
        p = self.pending
        if self.upload == "whole":
            if p is not None:
                with self.op_span(Kind.UPDATE, i):
                    update_range(buf, layout, 0, layout.numel, p.seed, p.g, p.lr, p.wd)
            if not kept and p is not None:
                if self.ctx.computes > 1:
                    # every rank of this machine reads the whole block before anyone writes its
                    # share back: a share written early would be read, and updated, twice. And
                    # every share written back before (earlier blocks, the step before) has
                    # landed in the host copy: another rank's later read of it must see it
                    if self.cuda:
                        self.up_stream.synchronize()
                        self.off_stream.synchronize()
                    with self.op_span(Kind.BARRIER, i):
                        zdist.barrier(group=self.ctx.exchange_group)
                for lo, hi in self._my_ranges(layout):
                    self._write_back(i, buf, lo, hi)
            return buf
        # round by round, as the simulator schedules it: round r (one slice from every mover) is
        # updated, written back and all-gathered while the later rounds are still uploading
        n, size = self.ctx.movers, layout.padded // self.slices
        for r, (lo, hi) in enumerate(self._my_ranges(layout)):
            if rounds:
                torch.cuda.current_stream(self.device).wait_event(rounds[r])
            if p is not None:
                with self.op_span(Kind.UPDATE, i, r):
                    update_range(buf, layout, lo, min(hi, layout.numel), p.seed, p.g, p.lr, p.wd)
                if not kept:  # only this rank reads these slices back: no one else to wait for
                    self._write_back(i, buf, lo, hi, r)
            if n > 1:
                with self.op_span(Kind.ALLGATHER, i, r):
                    parts = [buf[(r * n + m) * size:(r * n + m + 1) * size] for m in range(n)]
                    mine = parts[self.ctx.mover_index].clone()
                    zdist.all_gather_into(parts, mine, group=self.ctx.exchange_group)
        if kept and self.sharded and p is not None:  # the shard keeps the updated slices
            self._pack_shard(i, buf)
            if self.cuda:  # its next unpacking, on the upload stream, reads it after this
                self.packed[i] = torch.cuda.current_stream(self.device).record_event()
        return buf

    # ----- resident parts --------------------------------------------------------------------------
    def _update_resident(self) -> None:
        p = self.pending
        if p is None or not self.computes:
            return
        for name, master in self.resident_master.items():
            fused = fused_kernels(master)
            if fused is not None:  # the same arithmetic in one kernel, z never materialised
                fused.update_(master, p.seed, name, 0, p.g, p.lr, p.wd, decays(name, master))
                continue
            z = normal(p.seed, name, 0, master.numel(), device=master.device).view(master.shape)
            apply_update(master, z, p.g, p.lr, p.wd, decays(name, master))
        self._resident_state = _STALE  # the parameters no longer follow from the master

    def _set_resident(self, seed: int | None, sign: int) -> None:
        """The model's resident parameters := master (+ sign * eps * z). Relays hold none.
        Nothing is recomputed when they already hold that (a branch's head follows its embedding
        with the same values: z of a 100M-parameter embedding is not free)."""
        if not self.computes:
            return
        state = (seed, sign) if seed is not None else None
        if state == self._resident_state:
            return
        self._resident_state = state
        with torch.no_grad():
            for name, param in self.resident_params.items():
                master = self.resident_master[name]
                fused = fused_kernels(master)
                if seed is None:
                    param.copy_(master)
                elif fused is not None:  # (master.float() + sign * eps * z).to(dtype) in one kernel
                    fused.perturbed_into(param, master, seed, name, 0, sign * self.eps)
                else:
                    z = normal(seed, name, 0, master.numel(), device=master.device).view(master.shape)
                    param.copy_(master.float() + (sign * self.eps) * z)

    def _embed(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """Run the model's forward up to its first block; return that block's inputs."""
        box: dict = {}

        def hook(module, args, kwargs):
            box["args"], box["kwargs"] = args, dict(kwargs)
            raise _StopAtFirstBlock

        handle = self.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.model(**{k: v.to(self.device) for k, v in inputs.items()}, use_cache=False)
        except _StopAtFirstBlock:
            pass
        finally:
            handle.remove()
        kwargs = box["kwargs"]
        hidden = box["args"][0] if box["args"] else kwargs.pop("hidden_states")
        return hidden, kwargs

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
            views = [torch.as_strided(flat, slot.shape, _row_major(slot.shape), base + slot.offset)
                     for slot in self.host.layouts[i].slots]
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
    def forward_losses(self, micro_batches: list, seed: int | None, metric_fns: list) -> dict[int, list[tuple[float, float]]]:
        """Per branch sign, per metric: (sum, count) over this rank's micro-batches. ``seed`` None
        runs the unperturbed model (evaluation, on one rank per replica); the pending update is
        applied on the way."""
        signs = self.ctx.signs if seed is not None else ((1,) if 1 in self.ctx.signs else ())
        hidden: dict[int, list[torch.Tensor]] = {s: [] for s in signs}
        kwargs: list[dict] = []
        with self.op_span(Kind.EMBED) if self.computes else contextlib.nullcontext():
            self._update_resident()
            for s in signs:
                self._set_resident(seed, s)
                for mb in micro_batches:
                    h, kw = self._embed(mb["inputs"])
                    hidden[s].append(h)
                    if len(kwargs) < len(micro_batches):
                        kwargs.append(kw)
        # blocks i+1 .. i+prefetch upload while block i computes
        ahead = self.carried or {j: self._prefetch(j) for j in range(self.prefetch)}
        self.carried = {}
        n, p = len(self.blocks), self.prefetch
        # a training step starts the next step's first uploads where the stream of blocks would
        # reach them: block j of the next step is "block n + j" of this one. Not with whole blocks
        # shared by several compute ranks: there a rank reads a block only once every rank has
        # reached it (the barrier in _fetch), which a read carried into the step before would skip
        carry = seed is not None and (self.upload == "sliced" or self.ctx.computes <= 1)
        for i in range(n):
            if i + p < n:
                ahead[i + p] = self._prefetch(i + p)
            theta = self._fetch(i, ahead.pop(i))
            j = i - max(0, n - p)
            if carry and 0 <= j < min(p, n):
                # after _fetch(j) (j <= i): the host copy holds this step's write-back of block j
                # (CPU), or the upload waits for it on its stream (CUDA)
                self.carried[j] = self._prefetch(j)
            if theta is None or not signs:
                continue
            with self.op_span(Kind.BLOCK, i):
                weights = (self._perturbed(i, theta, seed, signs) if seed is not None else {signs[0]: theta})
                block = self.blocks[i]
                for s in signs:
                    persistent = weights[s] is self._weights.get(s)
                    self._bind(i, weights[s], s if persistent else None)
                    for k in range(len(micro_batches)):
                        out = block(hidden[s][k], **kwargs[k])
                        hidden[s][k] = out[0] if isinstance(out, tuple) else out
                self._unbind(i)
        results: dict[int, list[tuple[float, float]]] = {}
        with self.op_span(Kind.HEAD) if self.computes else contextlib.nullcontext():
            for s in reversed(signs):  # the last branch embedded first: its parameters are in place
                self._set_resident(seed, s)
                sums = [[0.0, 0.0] for _ in metric_fns]
                for k, mb in enumerate(micro_batches):
                    logits = self.adapter.logits(self.model, hidden[s][k]).float()
                    for j, fn in enumerate(metric_fns):
                        value, n = fn(logits, mb)
                        sums[j][0] += float(value)
                        sums[j][1] += float(n)
                results[s] = [(v, n) for v, n in sums]
            self._set_resident(None, 1)
        self.pending = None
        return results

    def step(self, micro_batches: list, seed: int, lr: float, wd: float, loss_fn, step: int | None = None) -> StepResult:
        """One ZO step: both branches' losses on the global batch, the projected gradient, and
        the update deferred into the next step (or ``flush``). With ``step``, its stages are
        recorded as spans (without, they go to a step the caller has begun, if any)."""
        if step is not None:
            self.spans.begin(step)
        losses = self.forward_losses(micro_batches, seed, [loss_fn])
        plus = losses.get(1, [(0.0, 0.0)])[0]
        minus = losses.get(-1, [(0.0, 0.0)])[0]
        with self.op_span(Kind.ALLREDUCE):
            sp, cp, sm, cm = zdist.all_reduce_sum([plus[0], plus[1], minus[0], minus[1]])
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
        ls, lc, as_, ac = zdist.all_reduce_sum([ls, lc, as_, ac])
        return ls / max(lc, 1.0), as_ / max(ac, 1.0)

    @torch.no_grad()
    def flush(self) -> None:
        """Apply the pending update to every block and resident part now (before evaluation or
        saving): afterwards the host copy holds the trained weights."""
        if self.pending is None:
            return
        self._update_resident()
        self._set_resident(None, 1)
        carried, self.carried = self.carried, {}
        for i in range(len(self.blocks)):
            self._fetch(i, carried.get(i))  # an upload carried from the last step is this one
        self.pending = None
        if self.cuda:
            torch.cuda.synchronize(self.device)
        zdist.barrier()  # every share of the host copy is written before anyone reads it again

    def resident_state(self) -> dict[str, torch.Tensor]:
        return {n: m for n, m in self.resident_master.items()}

    def sync_resident_blocks_to_host(self) -> None:
        """Resident blocks are never offloaded while training; write them back for saving."""
        for i, buf in self.kept.items():
            at = 0
            for lo, hi in self._my_ranges(self.host.layouts[i]):
                if self.sharded:  # the shard holds this rank's slices, packed
                    self.host.blocks[i][lo:hi].copy_(buf[at:at + hi - lo])
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
