"""Cost model: seconds and bytes of each operation of a ZO step, from shapes and hardware figures.

Everything here is a closed form; the simulator (zoplan.sim) decides how the operations overlap
and share links. Figures come from the topology file (cited there) or a calibration profile.

Modelling choices, each worth knowing when reading a prediction:
- A forward pass over one block on a micro-batch takes the larger of its matrix FLOPs at the
  GPU's achieved matmul rate (peak x matmul_efficiency) and the bytes it must stream through
  HBM (the block's weights once per micro-batch plus its activations): small batches are bound
  by weight reads, large ones by arithmetic. A CPU rank's one thread does them one after
  another: the reading of its weights, its products (slower over few tokens:
  ``matmul_half_tokens``), its counted elementwise passes and attention scores, and its ops add
  up (``cpu_block_s``), with the writing of every product's output that outgrows its cache
  (``SPILL_BYTES``, ``cache_mib``); so do its LM head's weights, product and logits.
- Elementwise passes (the deferred update, +eps z, -2 eps z, restore) read and write every
  parameter once per pass at HBM bandwidth; z is generated in registers by a counter-based RNG.
- The runtime's own work: a device's ``op_us`` per tensor op of a forward pass (on a CPU rank it
  adds to the arithmetic, on a GPU the launches overlap it: the longer of the two), and where
  drawing z costs time of its own (a CPU rank: ``z_ns`` > 0, its fused C kernel) a fixed cost per
  call and a cost per element on top of each fused pass's memory traffic. Without these figures
  (the GPU presets) z is free next to memory traffic.
- The deferred update of step t-1 is applied by the mover to its own slice right after upload,
  so the updated slice can be offloaded without waiting for the forward pass, and the exchanged
  block is already up to date. ZO2's schedule (the baseline) applies it inside compute instead.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, TypeVar, cast

from zoplan.layout import Layout
from zoplan.vocab import DTYPE_BYTES, Meetings
from zoplan.models import ROWS_TABLE_MIN, RUNTIME_OPS, ModelShape
from zoplan.program import Program, build
from zoplan.topology import GpuModel, Machine
from zoplan.tuning import FULL, Tuning

if TYPE_CHECKING:
    from zoplan.profile import Profile, Profiled, Stage

GiB = 2**30


def gib(nbytes: float) -> str:
    """A memory figure for a message, never rounded to nothing: ``2.9 GiB``, ``0.47 GiB``,
    ``3 MiB``."""
    n = nbytes / GiB
    if abs(n) >= 1:
        return f"{n:.0f} GiB" if n == round(n) else f"{n:.1f} GiB"
    if abs(n) >= 0.01:
        return f"{n:.2f} GiB"
    return f"{max(nbytes / 2**20, 1):.0f} MiB" if nbytes > 0 else "0 MiB"


_Cost = TypeVar("_Cost", bound=Callable[..., float])
# Per-GPU memory the planner does not hand to parameters and activations: CUDA context
# (~0.5 GiB on Hopper), NCCL buffers and caching-allocator slack. An assumption, stated in
# docs/architecture.md; calibration measures times, not memory.
GPU_RESERVE_BYTES = 2 * GiB
# Host memory kept free for the OS, the Python processes and the data loader (assumption): 16 GiB,
# or an eighth of a smaller machine's memory (2 GiB of 16), which could otherwise plan nothing.
HOST_RESERVE_BYTES = 16 * GiB
HOST_RESERVE_SHARE = 8


def host_reserve_bytes(machine: Machine) -> int:
    """The host memory kept for the system on one node of ``machine`` (``HOST_RESERVE_BYTES``)."""
    return int(min(HOST_RESERVE_BYTES, machine.host_memory_bytes / HOST_RESERVE_SHARE))


def host_room_bytes(machine: Machine) -> int:
    """The host memory a plan may use on one node of ``machine``: all of it but the reserve."""
    return int(machine.host_memory_bytes) - host_reserve_bytes(machine)


# Bytes of memory traffic per logit of the next-token loss's log-softmax and NLL (read twice,
# write once: 12). A CPU rank's take longer: the runtime's loss over the fp32 logits of 128
# tokens of OPT's vocabulary took 1.10 ns a logit on one thread of cpu-local (python -m
# bench.cpu_figures, 2026-12-06 03:46 UTC; 1.18-1.21 ns in three more runs that hour): about 20
# bytes at its 16.6 GB/s. Logits that fit the caches take less (a tiny model's 64 x 1405: 0.67 ns).
LOSS_BYTES = {"gpu": 12, "cpu": 20}
# On a CPU rank, a matrix product whose fp32 output outgrows a core's cache takes longer than its
# FLOPs by about this many bytes an output element at the copy rate: one thread computes and writes
# it out one after the other. In a step (right after the blocks' forward), a tiny OPT model's LM head
# over 16 x 128 tokens took 1.48 ns a logit beyond its FLOPs on cpu-local (24.5 bytes; python -m
# bench.cpu_figures, 2026-12-06 11:31 UTC; 1.45-1.59 ns in three runs of a development script that
# hour). Outputs that fit the cache take far less (a tiny model's 2 x 64 tokens of logits, 720 KB:
# 0.3-0.5 ns): a rank whose topology gives its cache (``cache_mib``) does not pay it for them.
# The same figure serves a block's products: an OPT-125m block over 2048 tokens (6.3 MB of each
# 768-wide output, 25 MB of fc1's) measured 25.8 ms beyond the model without it, 23 ms at this
# figure; over 512 tokens (only fc1's 6.3 MB beyond the cache) 2.65 ms, 2.3 ms.
SPILL_BYTES = 24
# Elementwise passes of an update in torch ops (runtime/zo.py apply_update: z*g, step*lr, x - that,
# the copy back), as an adapter's is applied
UPDATE_PASSES = 4


@dataclass(frozen=True)
class Workload:
    model: ModelShape
    global_batch: int
    seq_len: int
    tuning: Tuning = FULL  # what is trained: every weight, or an adapter on read-only blocks

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len


def rated_dtype(gm: GpuModel, dtype: str) -> str:
    """The dtype whose ``tflops`` figure a compute dtype is planned at: its own, else fp32's, else
    the slowest given (``zoplan plan`` says so under its table)."""
    rates = cast("dict[str, float]", gm.tflops)
    if dtype in rates:
        return dtype
    return "fp32" if "fp32" in rates else min(rates, key=lambda k: rates[k])


def matmul_rate(gm: GpuModel, dtype: str, tokens: int = 0) -> float:
    """Achieved matmul FLOP/s for a compute dtype, over ``tokens`` rows where the device's
    products run slower on few rows (``matmul_half_tokens``: tokens / (tokens + half) of it)."""
    peak = cast("dict[str, float]", gm.tflops)[rated_dtype(gm, dtype)]
    rate = peak * 1e12 * gm.matmul_efficiency
    if tokens and gm.matmul_half_tokens:
        rate *= tokens / (tokens + gm.matmul_half_tokens)
    return rate


def elementwise_s(gm: GpuModel, params: int, dtype: str, passes: int) -> float:
    """``passes`` read+write sweeps over ``params`` parameters at HBM bandwidth."""
    return passes * 2 * params * DTYPE_BYTES[dtype] / (gm.hbm_gbps * 1e9)


def forward_s(
    gm: GpuModel,
    flops: float,
    bytes_moved: float,
    dtype: str,
    ops: int = 0,
    threads: int = 1,
    lockstep: bool = False,
    tokens: int = 0,
) -> float:
    """A forward pass of ``ops`` tensor ops: the longer of its arithmetic and its memory traffic,
    plus (CPU: one thread issues them) or overlapped with (GPU) the host's issue of its ops. A CPU
    rank with ``threads`` threads computes and streams memory faster by ``thread_speedup``; with
    ``lockstep`` (CPU ranks side by side that meet before every block) it issues each op
    ``gm.lockstep`` times slower. ``tokens``: the rows of its matrix products (``_rate``)."""
    speed = thread_speedup(gm, threads)
    device = max(flops / matmul_rate(gm, dtype, tokens), bytes_moved / (gm.hbm_gbps * 1e9)) / speed
    issue = _issue_s(gm, ops, lockstep)
    return device + issue if gm.kind == "cpu" else max(device, issue)


def _issue_s(gm: GpuModel, ops: int, lockstep: bool) -> float:
    """The host's issue of ``ops`` tensor ops (``gm.lockstep`` times slower for CPU ranks side by side)."""
    return ops * gm.op_us * 1e-6 * (gm.lockstep if lockstep else 1.0)


def cpu_block_s(
    gm: GpuModel,
    flops: float,
    weight_bytes: float,
    pass_bytes: float,
    dtype: str,
    ops: int,
    threads: int = 1,
    lockstep: bool = False,
    tokens: int = 0,
) -> float:
    """A block's forward on a CPU rank: one thread runs its ops one after another, so the reading
    of its products' weights (each product packs its weights out of memory first), their FLOPs
    over ``tokens`` rows (at the rate of products whose weights are hot), and its elementwise
    passes and attention scores (``pass_bytes``, read and written: zoplan.models.RUNTIME_PASSES)
    add up, rather than the larger of arithmetic and memory traffic counting (``forward_s``);
    plus the issue of its ops."""
    speed = thread_speedup(gm, threads)
    bandwidth = gm.hbm_gbps * 1e9
    device = (flops / matmul_rate(gm, dtype, tokens) + (weight_bytes + pass_bytes) / bandwidth) / speed
    return device + _issue_s(gm, ops, lockstep)


def thread_speedup(gm: GpuModel, threads: int) -> float:
    """How much faster a CPU rank's matrix products and memory passes run on ``threads`` threads
    than on one: each extra thread adds ``threads_efficiency`` of one."""
    return 1.0 + (max(1, threads) - 1) * gm.threads_efficiency


def z_draw_s(gm: GpuModel, sizes: Iterable[int]) -> float:
    """Drawing z, one kernel call per entry of ``sizes`` (elements): 0 where the device draws it
    for free next to its memory traffic (``z_ns`` 0, a GPU); on a CPU rank the fused kernel's time
    per element and per call (zoplan.runtime.perturb_cpu), on top of the pass's memory traffic."""
    if not gm.z_ns:
        return 0.0
    return sum(gm.z_call_us * 1e-6 + n * gm.z_ns * 1e-9 for n in sizes if n)


def z_cold_s(gm: GpuModel) -> float:
    """What an operation of a step that draws z (an update, a block's perturbation, the embedding's
    or the head's sets) pays once for its first call coming right after other work: the device's
    ``z_cold_us`` where drawing z costs time of its own (a CPU rank), else 0."""
    return gm.z_cold_us * 1e-6 if gm.z_ns else 0.0


def _calls(sizes: Iterable[int]) -> int:
    """The kernel calls of a pass over tensors of these sizes (one a tensor that has elements)."""
    return sum(1 for n in sizes if n)


def _per_device(method: _Cost) -> _Cost:
    """A per-device cost kept by the instance for each kind of device: a GPU's depends only on its
    model (the search asks for the same figure of eight alike GPUs over and over), a CPU rank's on
    the rank itself (its threads, the ranks beside it)."""
    name = method.__name__

    @functools.wraps(method)
    def kept(self: StepCosts, gpu: str, *args: bool, **kwargs: bool) -> float:
        key = (name, self._device_class(gpu), args, *kwargs.items())
        try:
            return self._kept[key]
        except KeyError:
            value = self._kept[key] = method(self, gpu, *args, **kwargs)
            return value

    return cast(_Cost, kept)


class StepCosts:
    """Per-operation costs of one layout on one machine for one workload."""

    # the simulator stretches every compute stage (host work included) and every transfer by
    # these: 1 for a plan, more for the planner's what-if (zoplan.planner.sensitivity)
    compute_scale = 1.0
    transfer_scale = 1.0

    def __init__(self, machine: Machine, workload: Workload, layout: Layout) -> None:
        self.machine = machine
        self.work = workload
        self.layout = layout
        self.model = workload.model
        replicas = layout.data * layout.nodes
        self.batch_per_replica = workload.global_batch // replicas
        self.micro_batches = self.batch_per_replica // layout.micro_batch
        self._kept: dict[tuple[object, ...], float] = {}  # _per_device's figures

    @cached_property
    def program(self) -> Program:
        """The step program of this layout and workload (zoplan.program)."""
        m, L = self.model, self.layout
        tokens = L.micro_batch * self.work.seq_len
        return build(
            L,
            layers=m.layers,
            block_params=self.block_params,
            micro_batches=self.micro_batches,
            block_flops=m.block_flops(tokens, self.work.seq_len) + self.work.tuning.block_flops(m, tokens),
            head_flops=m.head_flops(tokens),
            frozen=self.frozen,
        )

    @property
    def frozen(self) -> bool:
        """An adapter is trained: the blocks are only read (zoplan.tuning)."""
        return self.work.tuning.frozen_base

    def release_program(self) -> None:
        """Forget the step program (thousands of ops; built again if asked for): the search keeps
        every candidate's costs, but needs a program only while it simulates it."""
        self.__dict__.pop("program", None)

    # ----- sizes ---------------------------------------------------------------------------
    @cached_property
    def block_params(self) -> int:
        return self.model.block_params()

    @cached_property
    def slice_params(self) -> int:
        return math.ceil(self.block_params / self.layout.slices_per_block)

    @property
    def slice_wire_bytes(self) -> int:
        return self.slice_params * DTYPE_BYTES[self.layout.wire_dtype]

    def part_params(self, gpu: str) -> int:
        """Parameters of each round that ``gpu`` uploads, updates and writes back (sliced uploads:
        a slice, or its share of the round; 0 for a GPU that moves nothing)."""
        return self._parts.get(gpu, 0)

    @cached_property
    def _parts(self) -> dict[str, int]:
        """Each mover's ``part_params``, worked out once."""
        L = self.layout
        return {g: L.part_of(g, self.slice_params * len(L.movers)) for g in L.movers}

    @property
    def block_wire_bytes(self) -> int:
        return self.block_params * DTYPE_BYTES[self.layout.wire_dtype]

    @property
    def block_param_bytes(self) -> int:
        return self.block_params * DTYPE_BYTES[self.layout.param_dtype]

    @property
    def round_param_bytes(self) -> int:
        """Bytes one all-gather round assembles on every participant (one slice per mover)."""
        return self.slice_params * len(self.layout.movers) * DTYPE_BYTES[self.layout.param_dtype]

    # ----- measured figures (a calibration profile, zoplan.profile) -------------------------
    @cached_property
    def profile(self) -> Profile | None:
        profiled: Profiled | None = getattr(self.machine, "profile", None)
        return profiled.profile if profiled is not None else None

    @cached_property
    def _tokens_scale(self) -> float:
        """Tokens of this layout's micro-batch over those of the calibrated one."""
        assert self.profile is not None  # asked only where a profile's times are used
        p = self.profile.model
        return (self.layout.micro_batch * self.work.seq_len) / (p.micro_batch * p.seq_len)

    def _side_by_side(self, gpu: str) -> bool:
        """Several CPU compute ranks of a node that meet before every block (an all-gather of
        slices, or the whole-block barrier): they share the machine's cores."""
        return self._gm(gpu).kind == "cpu" and self.layout.compute_ranks_per_node >= 2

    def _lockstep(self, gpu: str, stage: Stage) -> float:
        """CPU ranks side by side compute slower than alone by the ratio the calibration measured
        in that lockstep (without a profile, the device's ``lockstep`` slows their ops' issue:
        ``forward_s``). GPUs compute on their own devices: 1."""
        if not self._side_by_side(gpu):
            return 1.0
        assert self.profile is not None  # asked only where a profile's times are used
        return self.profile.lockstep_factor(stage)

    def lockstep_wait_s(self) -> float:
        """Without a profile: what each meeting of a node's CPU compute ranks costs beyond the
        collective call (a profile's collectives include their wait)."""
        return 0.0 if self.profile is not None else self._meeting_wait_s()

    def _meeting_wait_s(self) -> float:
        """The devices' ``lockstep_wait_us`` where a node has several compute ranks: what each of
        their meetings costs waiting for the others' noise."""
        L = self.layout
        if L.compute_ranks_per_node < 2:
            return 0.0
        return max((self._gm(g).lockstep_wait_us for g in L.compute_gpus), default=0.0) * 1e-6

    @property
    def _cpu_ranks(self) -> bool:
        """The layout computes on CPU ranks."""
        return self._gm(self.layout.compute_gpus[0]).kind == "cpu"

    @property
    def _meets_in_memory(self) -> bool:
        """The layout computes on CPU ranks that meet through shared memory (the device's
        ``meetings``; x86): a meeting costs only the wait, no call."""
        gm = self._gm(self.layout.compute_gpus[0])
        return gm.kind == "cpu" and gm.meetings == Meetings.SHARED_MEMORY

    def whole_barrier_s(self) -> float:
        """Whole-block uploads with several compute ranks on a machine: every rank reads the block
        before anyone writes its share back, a barrier per block. GPU ranks: a small collective's
        latency plus the in-step wait (measured, or the device's collective call). CPU ranks meet
        as the calibration timed them in step (a profile's ``meeting``); else, through shared
        memory (zoplan.runtime.dist.NodeMeeting), with no call worth counting: only the wait for the
        other ranks (``lockstep_wait_us``); where they meet through collective calls (a CPU that is
        not x86), as GPU ranks do."""
        p, L = self.profile, self.layout
        if L.compute_ranks_per_node < 2 or self.frozen:
            return 0.0
        if self._cpu_ranks and p is not None and p.meeting is not None:
            return p.meeting.wait_us * 1e-6
        if self._meets_in_memory:
            return self._meeting_wait_s()
        if p is None:
            return self.collective_call_s(L.compute_gpus) + self.lockstep_wait_s()
        c = p.collective(L.compute_ranks_per_node)
        return (c.latency_us + c.wait_us) * 1e-6 if c is not None else 0.0

    def collective_call_s(self, gpus: Iterable[str]) -> float:
        """One collective call's own cost among ``gpus`` (the topology's collective_us), beside
        the link latencies and bytes the simulator times."""
        return max((self._gm(g).collective_us for g in gpus), default=0.0) * 1e-6

    def allgather_round_s(self) -> float | None:
        """One all-gather round of the movers: measured (a profile), or from the devices' own
        collective rate (CPU ranks: ``collective_gbps``, gloo over the loopback); None: simulate
        it on the links."""
        p = self.profile
        n = len(self.layout.movers)
        nbytes = self.round_param_bytes * (n - 1) / n
        c = p.collective(n) if p is not None else None
        if c is not None:
            return (c.latency_us + c.wait_us) * 1e-6 + nbytes / (c.gbps * 1e9)
        rates = [self._gm(g).collective_gbps for g in self.layout.movers]
        if n < 2 or not all(rates):
            return None
        return self.collective_call_s(self.layout.movers) + self.lockstep_wait_s() + nbytes / (min(rates) * 1e9)

    # ----- compute -------------------------------------------------------------------------
    def _device_class(self, gpu: str) -> str:
        """What a per-device cost depends on: a GPU's model, or the CPU rank itself."""
        if self._gm(gpu).kind == "cpu":
            return "rank " + gpu
        return "model " + self.machine.gpu_model_name(gpu)

    def _gm(self, gpu: str) -> GpuModel:
        return self.machine.gpu_model(gpu)

    def threads(self, gpu: str) -> int:
        """Threads of a CPU rank: its socket's cores shared by the layout's ranks on that socket
        (zoplan.runtime.worker.threads_per_rank does the same with the cores it finds); 1 for a
        GPU, or where the topology gives no core count."""
        if self._gm(gpu).kind != "cpu":
            return 1
        socket = self.machine.host_socket(gpu)
        cores = self.machine.socket_cores(socket)
        sharing = sum(1 for g in self.layout.gpus if self.machine.host_socket(g) == socket)
        return max(1, cores // sharing) if cores else 1

    def perturb_passes(self) -> int:
        """+eps z (and -2 eps z with dual forward), plus a restore when the buffer survives the
        forward (whole-block uploads offload from it; ZO2 restores before offloading). None
        when the blocks are only read (an adapter is perturbed instead)."""
        if self.frozen:
            return 0
        passes = 1 if self.layout.perturbation == 2 else 2
        if self.layout.upload == "whole":
            passes += 1
        return passes

    def tensor_ops_per_step(self) -> int:
        """The tensor ops a compute rank's forward passes issue in a step (RUNTIME_OPS): embedding,
        every block and the head, for each of its micro-batches and branches."""
        m, tuning = self.model, self.work.tuning
        ops = RUNTIME_OPS[m.family]
        one = ops["embed"] + tuning.embed_ops() + m.layers * (ops["block"] + tuning.block_ops(m.family)) + ops["head"]
        return one * self.micro_batches * self.layout.branches_per_gpu

    @_per_device
    def forward_block_s(self, gpu: str) -> float:
        """All micro-batches of all branches this GPU runs through one block."""
        m, L = self.model, self.layout
        tokens = L.micro_batch * self.work.seq_len
        gm = self._gm(gpu)
        flops = m.block_flops(tokens, self.work.seq_len)
        ops = RUNTIME_OPS[m.family]["block"] + self.work.tuning.block_ops(m.family)
        args = (L.param_dtype, ops, self.threads(gpu), self._side_by_side(gpu), tokens)
        if gm.kind == "cpu":
            # the products' outputs that outgrow the rank's cache are written out (SPILL_BYTES)
            spilled = sum(n for n in m.block_product_outputs() if self._spills(gpu, n * tokens))
            passes = m.block_pass_elements(tokens, self.work.seq_len) * DTYPE_BYTES[L.param_dtype]
            one = cpu_block_s(gm, flops, self.block_param_bytes, passes + spilled * tokens * SPILL_BYTES, *args)
        else:
            act_bytes = 2 * tokens * (m.hidden + m.ffn) * DTYPE_BYTES[L.param_dtype]
            one = forward_s(gm, flops, self.block_param_bytes + act_bytes, *args)
        return one * self.micro_batches * L.branches_per_gpu

    def _z_costs(self, gpu: str) -> bool:
        """Whether drawing z costs this device time of its own (a CPU rank's one thread draws it
        in the fused pass; a GPU hides it behind the pass's memory traffic)."""
        return bool(self._gm(gpu).z_ns)

    @_per_device
    def block_forward_s(self, gpu: str) -> float:
        """A block's perturbation and forward pass (every branch and micro-batch of this GPU):
        the step program's block op."""
        if self.profile is not None:
            return self.profile.block_s(
                self.layout.branches_per_gpu, self.micro_batches, self._tokens_scale
            ) * self._lockstep(gpu, "block")
        passes = self.perturb_passes()
        z = 0.0
        if self.frozen:  # the block as uploaded: the adapter was perturbed at the step's start
            return self.forward_block_s(gpu)
        if self._z_costs(gpu):  # one fused pass: z drawn once, theta read, each branch's buffer written
            passes = self.layout.branches_per_gpu
            z = z_draw_s(self._gm(gpu), (self.block_params,)) + z_cold_s(self._gm(gpu))
        return (
            elementwise_s(self._gm(gpu), self.block_params, self.layout.param_dtype, passes)
            + z
            + self.forward_block_s(gpu)
        )

    def _update_s(self, gpu: str, params: int) -> float:
        """The deferred update of ``params`` parameters of a block on this device."""
        if self.frozen:
            return 0.0
        # one fused pass over the range (on a CPU rank, z drawn in it, its first call cold)
        gm = self._gm(gpu)
        return elementwise_s(gm, params, self.layout.param_dtype, 1) + z_draw_s(gm, (params,)) + z_cold_s(gm)

    @_per_device
    def whole_update_s(self, gpu: str) -> float:
        """Whole-block uploads: a compute GPU applies the deferred update to the whole block."""
        if self.profile is not None:
            return self.profile.compute.update_s_per_param * self.block_params
        return self._update_s(gpu, self.block_params)

    @_per_device
    def compute_block_s(self, gpu: str, resident: bool = False) -> float:
        """Everything a compute GPU does per block: with whole-block uploads, the update and the
        barrier before the perturbation and forward pass (a resident block has no barrier: no
        rank writes it back)."""
        t = self.block_forward_s(gpu)
        if self.layout.upload == "whole":
            t += self.whole_update_s(gpu) + (0.0 if resident else self.whole_barrier_s())
        return t

    def update_slice_s(self, gpu: str) -> float:
        """The mover's deferred update of one slice (sliced uploads only)."""
        if self.profile is not None:
            return self.profile.compute.update_s_per_param * self.part_params(gpu)
        return self._update_s(gpu, self.part_params(gpu))

    @_per_device
    def embed_s(self, gpu: str) -> float:
        """Start of a step: update and perturb the resident parts (embeddings, final norm,
        head); the embedding lookup itself is negligible."""
        if self.profile is not None:
            return self.profile.embed_s(
                self.layout.branches_per_gpu, self.micro_batches, self._tokens_scale
            ) * self._lockstep(gpu, "embed")
        m, L = self.model, self.layout
        ops = (RUNTIME_OPS[m.family]["embed"] + self.work.tuning.embed_ops()) * self.micro_batches * L.branches_per_gpu
        lookup = forward_s(self._gm(gpu), 0.0, 0.0, L.param_dtype, ops, lockstep=self._side_by_side(gpu))
        if self.frozen:  # the adapter (fp32) updated, then one copy of it per branch perturbed
            return lookup + self.adapter_s(gpu) + self._cold_s(gpu, ops) + z_cold_s(self._gm(gpu))
        if not self._z_costs(gpu):
            passes = 1 + self.perturb_passes()
            return (
                elementwise_s(self._gm(gpu), m.resident_params(), L.param_dtype, passes)
                + lookup
                + self._cold_s(gpu, ops)
            )
        # the update (a fused pass per tensor), then for each branch the small parts set to its
        # perturbation and the token table's looked-up rows drawn alone (runtime/engine.py
        # _update_resident, _set_resident, _embedding_rows); the output projection is the heads'
        sets = L.branches_per_gpu
        table, _, small = self._resident_split()
        update = self._set_s(gpu, m.resident_tensors())  # the same pass as setting them
        tensors = _calls(m.resident_tensors())
        gm = self._gm(gpu)
        update += z_cold_s(gm)  # the stage's first z call comes cold
        if table < ROWS_TABLE_MIN:  # a small table: every part set whole for each branch
            return (
                update
                + sets * self._set_s(gpu, m.resident_tensors())
                + lookup
                + self._cold_s(gpu, ops + (1 + sets) * tensors)
            )
        branch = self._set_s(gpu, small)
        rows = min(table, L.micro_batch * self.work.seq_len * m.embed_dim)  # at most one row a token
        looked_up = self.micro_batches * (z_draw_s(gm, (rows,)) + elementwise_s(gm, rows, "fp32", 2))
        calls = ops + tensors + sets * (_calls(small) + self.micro_batches)
        return update + sets * (branch + looked_up) + lookup + self._cold_s(gpu, calls)

    @_per_device
    def head_s(self, gpu: str) -> float:
        if self.profile is not None:
            return self.profile.head_s(
                self.layout.branches_per_gpu, self.micro_batches, self._tokens_scale
            ) * self._lockstep(gpu, "head")
        m, L, gm = self.model, self.layout, self._gm(gpu)
        tokens = L.micro_batch * self.work.seq_len
        weight_bytes = m.embed_dim * m.vocab * DTYPE_BYTES[L.param_dtype]
        args = (L.param_dtype, RUNTIME_OPS[m.family]["head"], self.threads(gpu), self._side_by_side(gpu), tokens)
        if gm.kind == "cpu":  # one thread: the product, then its logits written (SPILL_BYTES)
            written = tokens * m.vocab * SPILL_BYTES if self._spills(gpu, tokens * m.vocab) else 0
            one = cpu_block_s(gm, m.head_flops(tokens), weight_bytes, written, *args)
        else:
            one = forward_s(gm, m.head_flops(tokens), weight_bytes + tokens * m.vocab * 4, *args)
        t = (one + self.loss_s(gpu)) * self.micro_batches * L.branches_per_gpu
        calls = RUNTIME_OPS[m.family]["head"] * self.micro_batches * L.branches_per_gpu
        if self._z_costs(gpu) and not self.frozen:
            # each branch's head sets the output projection to its perturbation (a fused pass),
            # all but the first the small parts again; then every resident parameter gets its
            # master back (a copy)
            sets = L.branches_per_gpu
            table, head, small = self._resident_split()
            tensors = _calls(m.resident_tensors())
            t += z_cold_s(gm)  # the stage's first z call comes cold
            if table < ROWS_TABLE_MIN:  # all set at the embedding: all but the last branch's again
                t += (sets - 1) * self._set_s(gpu, m.resident_tensors())
                calls += (sets - 1) * tensors
            else:
                t += sets * self._set_s(gpu, (head,))
                t += (sets - 1) * self._set_s(gpu, small)
                calls += sets + (sets - 1) * _calls(small)
            t += elementwise_s(self._gm(gpu), m.resident_params(), L.param_dtype, 1)
            calls += tensors  # the copies back
        return t + self._cold_s(gpu, calls)

    def _cold_s(self, gpu: str, calls: int) -> float:
        """What ``calls`` tensor ops and kernel calls of a once-a-step stage (embedding, head) cost
        beyond ``op_us``: the device's ``cold_op_us`` each (its code and data come back cold after
        the blocks' passes), as slow as the rest of its op issue beside other ranks."""
        gm = self._gm(gpu)
        return calls * gm.cold_op_us * 1e-6 * (gm.lockstep if self._side_by_side(gpu) else 1.0)

    def loss_s(self, gpu: str) -> float:
        """The next-token loss of one micro-batch of one branch, after its logits: memory passes
        over the logits (runtime/data.py loss_terms), which the head's matrix product does not
        overlap. Per logit: the log-softmax reads them twice and writes once and the NLL gathers
        (``LOSS_BYTES``, a CPU rank's exponentials slower than that); logits made in a 2-byte
        dtype are first made fp32 (read 2, write 4). The loss takes a few whole sequences at a
        time, in place, so the loss of a step costs the same however its micro-batches split it."""
        m, L, gm = self.model, self.layout, self._gm(gpu)
        per_logit = LOSS_BYTES[gm.kind] + (6 if DTYPE_BYTES[L.param_dtype] < 4 else 0)
        logits = L.micro_batch * self.work.seq_len * m.vocab
        return logits * per_logit / (gm.hbm_gbps * 1e9) / thread_speedup(gm, self.threads(gpu))

    def _spills(self, gpu: str, elements: int) -> bool:
        """Whether a product's fp32 output of ``elements`` (a block product's over a micro-batch,
        or its logits) outgrows this CPU rank's cache (``cache_mib``; 0: always): then it is
        written out (SPILL_BYTES); an output that fits is written and read in the cache."""
        return elements * 4 > self._gm(gpu).cache_mib * 2**20

    def _set_s(self, gpu: str, tensors: tuple[int, ...]) -> float:
        """Resident tensors of these sizes set to a perturbation (or updated): a fused pass each,
        z drawn in it (runtime/engine.py _set_resident)."""
        gm = self._gm(gpu)
        return elementwise_s(gm, sum(tensors), self.layout.param_dtype, 1) + z_draw_s(gm, tensors)

    def _resident_split(self) -> tuple[int, int, tuple[int, ...]]:
        """The resident parts as the runtime perturbs them: the token table's and the output
        projection's sizes (the same tensor when tied) and the small parts' (norms, positions)."""
        m = self.model
        sizes = list(m.resident_tensors())
        table = sizes.pop(0)  # the token table comes first, an untied head last
        head = sizes.pop() if not m.tied_head else table
        return table, head, tuple(sizes)

    def adapter_s(self, gpu: str) -> float:
        """A step's work on the adapter, every rank its whole copy: the update, and the branches'
        copies master + s*eps*z from one draw of z (zoplan.runtime.tuning)."""
        m, L, gm = self.model, self.layout, self._gm(gpu)
        params = self.work.tuning.params(m)
        sets = L.branches_per_gpu
        if not self._z_costs(gpu):
            return elementwise_s(gm, params, "fp32", 1 + sets)
        # z of the whole adapter in one call, twice (the update's, the branches'); the update's
        # arithmetic and each branch's add are torch passes
        return elementwise_s(gm, params, "fp32", UPDATE_PASSES + sets) + 2 * z_draw_s(gm, (params,))

    def scalar_allreduce_s(self) -> float:
        """Latency of the all-reduce of the loss scalars: 2 log2(p) hops (a few bytes, no beta), or
        the calibrated figure (after whole-block meetings of CPU ranks: the one timed after them).
        The CPU ranks of one machine that meet through shared memory sum them there
        (zoplan.runtime.dist.NodeMeeting): only the wait for the other ranks."""
        machine, L = self.machine, self.layout
        p = self.profile
        if p is not None and len(L.compute_gpus) * L.nodes > 1:
            whole_cpu = L.upload == "whole" and L.nodes == 1 and self._cpu_ranks
            return (p.meeting.scalar_us if whole_cpu and p.meeting is not None else p.scalar_latency_us) * 1e-6
        if L.nodes == 1 and self._meets_in_memory:
            return self.lockstep_wait_s()
        hops = 2 * math.ceil(math.log2(max(2, L.compute_ranks_per_node))) if L.compute_ranks_per_node > 1 else 0
        hop_s = 0.0
        if len(L.compute_gpus) > 1:
            hop_s = max(machine.path_latency_s(machine.peer_path(L.compute_gpus[0], g)) for g in L.compute_gpus[1:])
        total = hops * hop_s + (self.collective_call_s(L.compute_gpus) if len(L.compute_gpus) > 1 else 0.0)
        total += self.lockstep_wait_s()
        if L.nodes > 1 and machine.spec.network is not None:
            total += 2 * math.ceil(math.log2(L.nodes)) * machine.spec.network.latency_us * 1e-6
        return total

    def straggler_s(self, node_step_s: float) -> float:
        """How much longer a step is than one node's, waiting for the slowest of the nodes: each
        node's step varies independently around ``node_step_s`` with the network's ``step_cv``, so
        the step lasts the expected maximum of ``nodes`` of them (0 on one node, or with no
        variation). Replicas inside a node are simulated together, exactly."""
        network = self.machine.spec.network
        if self.layout.nodes < 2 or network is None or network.step_cv == 0:
            return 0.0
        return node_step_s * network.step_cv * expected_max_normal(self.layout.nodes)

    def loop_s(self) -> float:
        """The training loop's host work between two steps (next batch, journal line): measured,
        or the device's loop_us."""
        if self.profile is None:
            return max(self._gm(g).loop_us for g in self.layout.compute_gpus) * 1e-6
        return self.profile.loop_s(self.layout.branches_per_gpu, self.micro_batches, self._tokens_scale)

    # ----- memory --------------------------------------------------------------------------
    def gpu_memory_bytes(self, gpu: str) -> int:
        """Peak memory of one GPU of the layout (compute or relay)."""
        m, L = self.model, self.layout
        pbytes = DTYPE_BYTES[L.param_dtype]
        total = GPU_RESERVE_BYTES
        n_res = len(L.resident)
        if L.upload == "whole":
            total += n_res * self.block_param_bytes
        else:
            total += n_res * math.ceil(self.block_param_bytes / len(L.movers))
        buffers = L.prefetch + 1
        total += buffers * self.block_param_bytes
        if L.wire_dtype != L.param_dtype:
            total += buffers * L.rounds * max(self.part_params(g) for g in L.movers) * DTYPE_BYTES[L.wire_dtype]
        if gpu in L.compute_gpus and self.frozen:
            # the resident parameters as loaded, and the adapter: its master and one perturbed
            # copy per branch, in fp32 (runtime/tuning.py)
            total += m.resident_params() * pbytes
            total += (1 + L.branches_per_gpu) * self.work.tuning.params(m) * DTYPE_BYTES["fp32"]
        elif gpu in L.compute_gpus:
            # the model's resident parameters and their unperturbed master copy: a branch perturbs
            # the parameters in place and the master brings them back (runtime/engine.py)
            total += 2 * m.resident_params() * pbytes
            # one work buffer per branch this GPU runs, holding theta + s*eps*z of the block being
            # computed: theta itself is never perturbed (runtime/engine.py _branch_buffer)
            total += L.branches_per_gpu * self.block_param_bytes
        if gpu in L.compute_gpus:
            total += m.block_activation_bytes(L.micro_batch, self.work.seq_len, L.param_dtype, L.branches_per_gpu)
            total += m.head_activation_bytes(L.micro_batch, self.work.seq_len, L.param_dtype)
        return int(total)

    def host_memory_bytes(self) -> int:
        """One host copy of every parameter, per node: the blocks in the wire dtype, the rest
        (embeddings, final norm, head) in the compute dtype (runtime/hostcopy.py)."""
        m, L = self.model, self.layout
        return int(
            m.layers * m.block_params() * DTYPE_BYTES[L.wire_dtype] + m.resident_params() * DTYPE_BYTES[L.param_dtype]
        )

    def cpu_ranks(self) -> tuple[str, ...]:
        """The layout's CPU ranks: their working sets live in host memory, beside the host copy."""
        return tuple(g for g in self.layout.gpus if self.machine.gpu_model(g).kind == "cpu")

    def ram_need_bytes(self) -> int:
        """What one node's host memory holds: the host copy, and each CPU rank's working set
        (``gpu_memory_bytes``), which lives there too. Compared with ``host_room_bytes``."""
        return self.host_memory_bytes() + sum(self.gpu_memory_bytes(g) for g in self.cpu_ranks())

    def ram_short_bytes(self) -> int:
        """How much more host memory the layout needs than a node gives (<= 0: it fits)."""
        return self.ram_need_bytes() - host_room_bytes(self.machine)

    def max_resident_blocks(self) -> int:
        """How many blocks could stay on the GPUs given everything else this layout needs."""
        L = self.layout
        free = min(self.machine.gpu_model(g).memory_gib * GiB - self._without_resident(g) for g in L.gpus)
        per_block = self.block_param_bytes if L.upload == "whole" else math.ceil(self.block_param_bytes / len(L.movers))
        most = int(free // per_block)
        cpu = self.cpu_ranks()
        if cpu:  # each CPU rank's resident blocks are host memory too
            spare = host_room_bytes(self.machine) - (self.ram_need_bytes() - len(L.resident) * per_block * len(cpu))
            most = min(most, int(spare // (per_block * len(cpu))))
        return max(0, min(self.model.layers, most))

    def _without_resident(self, gpu: str) -> int:
        n_res = len(self.layout.resident)
        per_block = (
            self.block_param_bytes
            if self.layout.upload == "whole"
            else math.ceil(self.block_param_bytes / len(self.layout.movers))
        )
        return self.gpu_memory_bytes(gpu) - n_res * per_block


def spread_resident(layers: int, count: int) -> tuple[int, ...]:
    """Resident blocks spread evenly through the model, so the streamed blocks between two
    resident ones keep the pipeline fed instead of arriving in one long burst."""
    if count <= 0:
        return ()
    if count >= layers:
        return tuple(range(layers))
    return tuple(sorted({int((i + 0.5) * layers / count) for i in range(count)}))


@functools.lru_cache(maxsize=None)
def expected_max_normal(n: int) -> float:
    """E[max of n independent standard normal variables] (0 for one; 1/sqrt(pi) for two), by
    Simpson's rule over the density of the maximum, n phi(x) Phi(x)^(n-1), on [-12, 12]."""
    if n < 2:
        return 0.0
    unit = statistics.NormalDist()
    steps, lo, hi = 4800, -12.0, 12.0
    h = (hi - lo) / steps
    total = 0.0
    for i in range(steps + 1):
        x = lo + i * h
        weight = 1 if i in (0, steps) else 4 if i % 2 else 2
        total += weight * x * n * unit.pdf(x) * unit.cdf(x) ** (n - 1)
    return total * h / 3
