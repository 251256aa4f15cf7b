"""Calibration profiles: measured figures that replace a topology's nominal ones.

``zoplan calibrate`` runs the runtime's own code on this machine (runtime/calibrate.py) and writes
a profile: copy rates per device, alone and all at once; the exchange group's all-gather latency
and bandwidth; the loss all-reduce latency; and, for one model shape, micro-batch and sequence
length, the engine's block compute, deferred update, embedding and head times.

``zoplan plan --profile FILE`` plans with it (:func:`apply_profile`):
- each device's own host link takes its measured copy rates, and its socket's memory bus the
  rate all devices reached together (that is where shared links show up);
- the costs (zoplan.sim.costs) take the measured compute times: with ``b`` branches and ``m``
  micro-batches on a device, a block costs ``fixed_b + m * per_micro_batch_b``, both solved from
  the 1- and 2-micro-batch measurements (micro-batches of another size scale by tokens);
- the all-gather and the loss all-reduce take the measured latency and bandwidth;
- on CPU machines, layouts with several compute ranks (which meet before every block) scale their
  block compute, embedding and head by the lockstep figures' ratio to the independent ones
  (:meth:`Profile.lockstep_factor`): CPU ranks share cores.

A profile belongs to one machine description (its hash) and one model shape: anything else is
refused with a message, as a plan made for another machine is.
"""

from __future__ import annotations

import datetime
import platform
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, cast
from pathlib import Path

from pydantic import Field, PositiveInt, model_validator

from zoplan.errors import ZoplanError
from zoplan.fileio import Strict, check_version, content_hash, read_yaml, validate, write_yaml
from zoplan.models import ModelShape
from zoplan.topology import MAX_RATE_GBPS, Link, Machine, Rate, Socket
from zoplan.limits import MAX_GLOBAL_BATCH, MAX_SEQ_LEN, MIN_SEQ_LEN
from zoplan.vocab import Dtype

PROFILE_VERSIONS = (1,)
# a compute stage with a lockstep figure (StageTimes.lockstep_s, Profile.lockstep_factor)
Stage = Literal["block", "embed", "head"]


# one stage of one step, measured: no forward of a block, an embedding or a head takes under a
# microsecond (a single kernel launch takes several; 1e-300 s planned a step of 6.5e294 s)
StageSeconds = Annotated[float, Field(ge=1e-6, le=3600)]
# Every other measured figure is bounded too: a hand edit (a wait of 1e308 us) planned exit 0 a
# step of 300 digits. Bounds far outside any measurement: a time under an hour, a rate between
# 1 MB/s and 1 PB/s, a per-parameter time under 10 us (CPUs update a parameter in nanoseconds).
Seconds = Annotated[float, Field(ge=0, le=3600)]
Microseconds = Annotated[float, Field(ge=0, le=3.6e9)]
PerParameter = Annotated[float, Field(ge=0, le=1e-5)]  # seconds a parameter


class MachineRef(Strict):
    name: str
    hash: str
    # one of its nodes' (Machine.node_hash): the profile serves a machine of other node counts
    # (older profiles lack it)
    node_hash: str | None = None


class ShapeRef(Strict):
    name: str
    hash: str
    shape_hash: str | None = None  # without the name (ModelShape.shape_hash); older profiles lack it
    # what the compute times were measured at: the costs scale them by the tokens a plan's micro-batch
    # holds over these (a seq_len of 100000 edited in scaled every stage a thousandfold down)
    micro_batch: int = Field(ge=1, le=MAX_GLOBAL_BATCH)
    seq_len: int = Field(ge=MIN_SEQ_LEN, le=MAX_SEQ_LEN)
    dtype: Dtype


class DeviceFigures(Strict):
    h2d_gbps: Rate
    d2h_gbps: Rate
    h2d_gbps_together: Rate
    d2h_gbps_together: Rate
    # GPUs: a block uploaded and one written back at once (two streams), all devices together,
    # both directions' bytes per second summed; a PCIe link may not carry both directions at
    # full rate together. None on CPU ranks (a rank's copies run one after the other) and in
    # profiles written before it was measured.
    duplex_gbps: Rate | None = None
    # the lowest and highest of the samples whose median duplex_gbps is (one before the engine
    # steps, one after each of their rounds): how steady the link was. None where not sampled.
    duplex_range_gbps: tuple[Rate, Rate] | None = None


class Collective(Strict):
    """All-gather among ``ranks``: ``latency_us + bytes / gbps`` back to back, plus ``wait_us``
    inside real steps, where each all-gather waits for the slowest rank's work before it."""

    ranks: PositiveInt
    latency_us: Microseconds
    gbps: Rate
    wait_us: Microseconds = 0.0


class Meeting(Strict):
    """CPU ranks of one machine that meet through shared memory before every whole block
    (zoplan.runtime.dist.NodeMeeting), timed inside real steps: each rank's wait at a meeting
    (the mean: what the slower rank's noise adds to a step), and the loss sum after them."""

    wait_us: Microseconds
    scalar_us: Microseconds


class StageTimes(Strict):
    """Seconds on one device, keyed "<branches>x<micro-batches>" (1x1, 1x2, 2x1, 2x2)."""

    # a forward takes some time, and less than an hour (0 or 1e300, hand-written, made absurd plans)
    block_s: dict[str, StageSeconds]
    embed_s: dict[str, StageSeconds]
    head_s: dict[str, StageSeconds]
    update_s_per_param: PerParameter
    perturb_s_per_param: PerParameter = 0.0  # theta + eps z of one block, for the record
    # the training loop's host work between two steps: assembling the next batch, writing and
    # syncing the journal line (empty in profiles written before it was measured: none)
    loop_s: dict[str, Seconds] = Field(default_factory=dict)
    # for the record (CUDA): block_s is the longer of the two per setting; where the host's is,
    # the block is issue-bound in calibration (empty on the CPU and in older profiles)
    block_gpu_s: dict[str, Seconds] = Field(default_factory=dict)
    block_host_s: dict[str, Seconds] = Field(default_factory=dict)
    # the 1-branch, 2-micro-batch setting again, with every rank moving slices and all-gathering
    # them before each block as PertP and data-parallel layouts do: "block", "embed" and "head"
    # seconds (several ranks only; empty in older profiles). CPU ranks share cores and compute
    # slower in that lockstep than each on its own; the costs scale a CPU layout with several
    # compute ranks by the ratio to 1x2 (Profile.lockstep_factor)
    lockstep_s: dict[Literal["block", "embed", "head"], Seconds] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _lockstep_measured(self) -> StageTimes:
        # the costs scale a stage by lockstep / 1x2: ranks side by side slow each other a few-fold,
        # not a hundredfold, and never make each other ten times faster (a hand edit does)
        for stage, locked in self.lockstep_s.items():
            alone = {"block": self.block_s, "embed": self.embed_s, "head": self.head_s}[stage].get("1x2")
            if alone and not 0.1 <= locked / alone <= 100:
                raise ValueError(
                    f"lockstep_s.{stage} ({locked:g} s) is {locked / alone:.3g} times {stage}_s.1x2 ({alone:g} s): "
                    "ranks in lockstep compute between 0.1 and 100 times as long as one alone"
                )
        return self


class Profile(Strict):
    version: int
    machine: MachineRef
    model: ShapeRef
    measured_on: dict[str, str] = Field(default_factory=dict)
    devices: dict[str, DeviceFigures]
    allgather: Collective | None = None  # among all ranks
    # among the first k ranks, for each k from 2 to all but one (the groups a plan's movers can
    # form); their wait_us is the one measured among all ranks
    allgather_groups: list[Collective] = Field(default_factory=list)
    scalar_latency_us: Microseconds = 0.0
    compute: StageTimes
    meeting: Meeting | None = None  # several CPU ranks (None in older profiles, and on GPUs)

    @property
    def hash(self) -> str:
        data = self.model_dump(mode="json")
        if not data["compute"]["lockstep_s"]:  # profiles written before it was measured keep their hash
            del data["compute"]["lockstep_s"]
        if data["machine"]["node_hash"] is None:  # profiles written before it was recorded keep their hash
            del data["machine"]["node_hash"]
        _drop_unsampled(data)
        return content_hash(data)

    # ----- the figures the costs need --------------------------------------------------------
    def collective(self, ranks: int) -> Collective | None:
        """The all-gather measured among ``ranks`` ranks, if it was."""
        for c in ([self.allgather] if self.allgather is not None else []) + self.allgather_groups:
            if c.ranks == ranks:
                return c
        return None

    def _solve(self, table: dict[str, float], branches: int, micro_batches: int, tokens_scale: float) -> float:
        """Seconds for ``micro_batches`` micro-batches: piecewise linear through the measured
        counts (never falling), extended past the largest with the last piece's slope. The part
        below one micro-batch's worth is fixed (perturbation); the rest scales with the tokens
        of a micro-batch against the calibrated one."""
        points = timed_counts(table, branches)
        m_prev, v_prev = points[0]
        slope = 0.0
        value = v_prev
        for m, t in points[1:]:
            slope = max((t - v_prev) / (m - m_prev), 0.0)
            if micro_batches <= m:
                break
            m_prev, v_prev = m, v_prev + slope * (m - m_prev)
        value = v_prev + slope * (micro_batches - m_prev)
        first_slope = max((points[1][1] - points[0][1]) / (points[1][0] - points[0][0]), 0.0)
        fixed = max(points[0][1] - first_slope * points[0][0], 0.0)
        return fixed + (value - fixed) * tokens_scale

    def block_s(self, branches: int, micro_batches: int, tokens_scale: float = 1.0) -> float:
        return self._solve(self.compute.block_s, branches, micro_batches, tokens_scale)

    def embed_s(self, branches: int, micro_batches: int, tokens_scale: float = 1.0) -> float:
        return self._solve(self.compute.embed_s, branches, micro_batches, tokens_scale)

    def head_s(self, branches: int, micro_batches: int, tokens_scale: float = 1.0) -> float:
        return self._solve(self.compute.head_s, branches, micro_batches, tokens_scale)

    def lockstep_factor(self, stage: Literal["block", "embed", "head"]) -> float:
        """A stage's time with every rank all-gathering each block over its time with each rank
        on its own (both one branch, two micro-batches); 1 where not measured."""
        table = {"block": self.compute.block_s, "embed": self.compute.embed_s, "head": self.compute.head_s}[stage]
        locked, alone = self.compute.lockstep_s.get(stage), table.get("1x2")
        if not locked or not alone:
            return 1.0
        return locked / alone

    def loop_s(self, branches: int, micro_batches: int, tokens_scale: float = 1.0) -> float:
        table = self.compute.loop_s
        if f"{branches}x1" not in table or f"{branches}x2" not in table:
            return 0.0
        return self._solve(table, branches, micro_batches, tokens_scale)


def timed_counts(table: dict[str, float], branches: int) -> list[tuple[int, float]]:
    """The (micro-batch count, seconds) pairs a table measured for ``branches`` branches."""
    return sorted((int(key.split("x")[1]), t) for key, t in table.items() if key.split("x")[0] == str(branches))


SETTING = re.compile(r"[12]x[1-9][0-9]{0,2}")


def load_profile(path: str | Path) -> Profile:
    path = Path(path)
    data = read_yaml(path, "profile")
    check_version(data, path, "profile", PROFILE_VERSIONS)
    profile = validate(Profile, data, path, "profile")
    missing = [
        k
        for k in ("1x1", "1x2", "2x1", "2x2")
        for t in ("block_s", "embed_s", "head_s")
        if k not in getattr(profile.compute, t)
    ]
    if missing:
        raise ZoplanError(
            f"{path}: field 'compute' lacks the measurements {sorted(set(missing))}",
            fix="calibrate again with `zoplan calibrate`",
        )
    for table in ("block_s", "embed_s", "head_s", "loop_s"):
        bad = [k for k in getattr(profile.compute, table) if not SETTING.fullmatch(k)]
        if bad:
            raise ZoplanError(
                f"{path}: compute.{table} has the key {bad[0]!r}, not <branches>x<micro-batches> (1x1, 2x4, ...)",
                fix="calibrate again with `zoplan calibrate`",
            )
    return profile


HEADER = (
    "# zoplan calibration profile: written by `zoplan calibrate`, read by `zoplan plan --profile`.\n"
    "# Measured with the runtime's own code on the machine named below; valid for it only.\n"
)


def write_profile(profile: Profile, path: Path) -> None:
    data = profile.model_dump(mode="json")
    # block_gpu_s/block_host_s are measured on CUDA only, lockstep_s with several ranks only: no
    # empty tables elsewhere
    for key in ("block_gpu_s", "block_host_s", "lockstep_s"):
        if not data["compute"].get(key):
            data["compute"].pop(key, None)
    _drop_unsampled(data)
    write_yaml(path, data, header=HEADER)


def _drop_unsampled(data: dict[str, Any]) -> None:
    """Leave out the duplex range where it was not sampled (CPU ranks, older profiles), and the
    meeting where it was not timed (GPUs, one rank, older profiles)."""
    for figures in data["devices"].values():
        if figures.get("duplex_range_gbps") is None:
            figures.pop("duplex_range_gbps", None)
    if data.get("meeting") is None:
        data.pop("meeting", None)


def _range(samples: list[float] | None) -> tuple[float, float] | None:
    return (min(samples), max(samples)) if samples else None


def build_profile(
    rows: list[dict[str, Any]],
    machine: Machine,
    shape: ModelShape,
    *,
    micro_batch: int,
    seq_len: int,
    dtype: str,
    device: str,
) -> Profile:
    """A profile from runtime/calibrate.py's per-rank figures (rank r is the machine's r-th device)."""
    if len(rows) != len(machine.gpus):
        raise ZoplanError(f"calibration measured {len(rows)} device(s) but '{machine.name}' has {len(machine.gpus)}")
    devices = {
        machine.gpus[r["rank"]]: DeviceFigures(
            h2d_gbps=r["alone"]["h2d_gbps"],
            d2h_gbps=r["alone"]["d2h_gbps"],
            h2d_gbps_together=r["together"]["h2d_gbps"],
            d2h_gbps_together=r["together"]["d2h_gbps"],
            duplex_gbps=r["together"].get("duplex_gbps"),
            duplex_range_gbps=_range(r["together"].get("duplex_samples_gbps")),
        )
        for r in rows
    }
    keys = rows[0]["compute"].keys()
    # GPU and host seconds of block compute apart: measured on CUDA only (the CPU has no host split)
    device_is_cuda = all(
        str(r.get("device", "")).startswith("cuda") and all("compute_gpu" in r["compute"][k] for k in keys)
        for r in rows
    )

    def mean(cat: str) -> dict[str, float]:
        return {k: sum(r["compute"][k][cat] for r in rows) / len(rows) for k in keys}

    # the update runs on the whole block once per step in the 1-branch, 1-micro-batch setting
    update = sum(r["compute"]["1x1"]["update"] for r in rows) / len(rows) / rows[0]["block_params"]
    gather = dict(rows[0]["allgather"])
    if gather:
        from zoplan.vocab import DTYPE_BYTES

        ranks = gather["ranks"]
        nbytes = rows[0]["block_params"] * DTYPE_BYTES[dtype] * (ranks - 1) / ranks
        in_step = sum(r["allgather"].get("in_step_us", 0.0) for r in rows) / len(rows)
        gather["wait_us"] = max(0.0, in_step - gather["latency_us"] - nbytes / (gather["gbps"] * 1e3))
        gather.pop("in_step_us", None)
    groups = [Collective(**g, wait_us=gather["wait_us"]) for g in rows[0].get("allgather_groups", [])]
    lockstep: dict[Stage, float]
    lockstep = (
        {
            "block": sum(r["lockstep"]["compute"] for r in rows) / len(rows),
            **{cat: sum(r["lockstep"][cat] for r in rows) / len(rows) for cat in ("embed", "head")},
        }
        if all(r.get("lockstep") for r in rows)
        else {}
    )
    meetings = [r["meeting"] for r in rows if r.get("meeting")]
    meeting = (
        Meeting(
            wait_us=sum(m["wait_s"] for m in meetings) / len(rows) * 1e6,
            scalar_us=sum(m["scalar_s"] for m in meetings) / len(rows) * 1e6,
        )
        if len(meetings) == len(rows)
        else None
    )
    return Profile(
        version=PROFILE_VERSIONS[-1],
        machine=MachineRef(name=machine.name, hash=machine.hash, node_hash=machine.node_hash),
        model=ShapeRef(
            name=shape.name,
            hash=shape.hash,
            shape_hash=shape.shape_hash,
            micro_batch=micro_batch,
            seq_len=seq_len,
            dtype=Dtype(dtype),
        ),
        measured_on={
            "host": platform.node(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device,
            "python": platform.python_version(),
            # what the figures depend on besides the hardware: re-calibrate when these change
            **{k: str(rows[0][k]) for k in ("torch", "kernels") if k in rows[0]},
        },
        devices=devices,
        allgather=Collective(**gather) if gather else None,
        allgather_groups=groups,
        scalar_latency_us=sum(r["scalar_latency_us"] for r in rows) / len(rows),
        # the loop: the slowest rank's (rank 0 also writes the journal; the others wait for it)
        compute=StageTimes(
            block_s=mean("compute"),
            embed_s=mean("embed"),
            head_s=mean("head"),
            loop_s={k: max(r["compute"][k].get("loop", 0.0) for r in rows) for k in keys},
            update_s_per_param=update,
            perturb_s_per_param=sum(r["compute"]["1x1"].get("perturb_s_per_param", 0.0) for r in rows) / len(rows),
            lockstep_s=lockstep,
            **({"block_gpu_s": mean("compute_gpu"), "block_host_s": mean("compute_host")} if device_is_cuda else {}),
        ),
        meeting=meeting,
    )


@dataclass(frozen=True)
class Profiled:
    """What a machine carries when planned with a profile (``Machine.profile``)."""

    profile: Profile
    source: str


def check_profile(profile: Profile, machine: Machine, shape: ModelShape | None, path: str | Path) -> None:
    same_node = profile.machine.node_hash is not None and profile.machine.node_hash == machine.node_hash
    if profile.machine.hash != machine.hash and not same_node:
        if machine.spec.nodes > 1 and profile.machine.node_hash is None:
            since = ": the profile does not record its node's digest (written by an older zoplan), so it serves its own file only"
        elif profile.machine.name == machine.name:
            since = (
                ": a machine of that name, described otherwise since (a device, a link or a figure of its file changed)"
            )
        else:
            since = ""
        raise ZoplanError(
            f"{path} was measured on '{profile.machine.name}' ({profile.machine.hash}), "
            f"not on '{machine.name}' ({machine.hash}){since}",
            fix="calibrate one of its nodes, with its file without nodes:, network: and price_per_hour_usd: "
            "(zoplan calibrate --topology NODE.yaml -o PROFILE.yaml): that profile serves this file too"
            if machine.spec.nodes > 1
            else "calibrate this machine with `zoplan calibrate --topology ...`",
        )
    # calibrate measures every device of the machine: one missing (or one of no such device) is a
    # damaged or hand-edited profile, whose missing figures would be silently the topology's
    missing = [g for g in machine.gpus if g not in profile.devices]
    unknown = [g for g in profile.devices if g not in machine.gpus]
    if missing or unknown:
        said = f"no figures for {', '.join(missing)}" if missing else f"figures for {', '.join(unknown)}"
        raise ZoplanError(
            f"{path} has {said}, {'a device' if len(missing + unknown) == 1 else 'devices'} "
            f"{'of' if missing else 'not of'} '{machine.name}' ({', '.join(machine.gpus)}): calibrate measures every one",
            fix="calibrate again: zoplan calibrate --topology ... -o PROFILE.yaml",
        )
    # by shape when the profile records it: a checkpoint directory and the preset of its shape
    # share their figures, whatever their names
    same = (
        (
            profile.model.shape_hash == shape.shape_hash
            if profile.model.shape_hash is not None
            else profile.model.hash == shape.hash
        )
        if shape is not None
        else True
    )
    if same and shape is not None and profile.model.seq_len > shape.max_positions:
        raise ZoplanError(
            f"{path}: model.seq_len {profile.model.seq_len} is longer than the {shape.max_positions} positions of "
            f"'{shape.name}': no calibration measured that (a hand edit?)",
            fix="calibrate again: zoplan calibrate --model ... -o PROFILE.yaml",
        )
    groups = [c.ranks for c in ([profile.allgather] if profile.allgather else []) + profile.allgather_groups]
    if any(r > len(machine.gpus) for r in groups):
        raise ZoplanError(
            f"{path}: an all-gather among {max(groups)} ranks, on '{machine.name}' of {len(machine.gpus)} "
            "(a hand edit?)",
            fix="calibrate again: zoplan calibrate --topology ... -o PROFILE.yaml",
        )
    if not same:
        assert shape is not None  # without a shape, any profile's model is the same
        # the digests compared: the shapes' (the name left out), or, in older profiles, with the name
        theirs, ours = (
            (profile.model.shape_hash, shape.shape_hash)
            if profile.model.shape_hash is not None
            else (profile.model.hash, shape.hash)
        )
        raise ZoplanError(
            f"{path} holds compute times for model '{profile.model.name}' ({theirs}), not for '{shape.name}' "
            f"({ours})" + (" (its shape digest was edited?)" if profile.model.name == shape.name else ""),
            fix=f"give a profile of '{shape.name}', or measure one: zoplan calibrate --model ... -o "
            f"{Path(path).with_name(shape.name + '-profile.yaml')} (a file of its own: {path} is "
            f"{profile.model.name}'s)",
        )


def apply_profile(machine: Machine, profile: Profile, source: str | Path) -> Machine:
    """The machine with its measured copy rates; the costs read the rest from ``.profile``."""
    spec = machine.spec
    devices = profile.devices
    links = []
    for link in spec.links:
        if link.b in devices and link.kind in ("pcie", "memory"):
            d = devices[link.b]
            link = Link(**{**link.model_dump(), "gbps": d.h2d_gbps, "gbps_back": d.d2h_gbps})
        elif link.a in devices and link.kind in ("pcie", "memory"):
            d = devices[link.a]
            link = Link(**{**link.model_dump(), "gbps": d.d2h_gbps, "gbps_back": d.h2d_gbps})
        links.append(link)
    sockets = []
    for sock in spec.sockets:
        mine = [g for g in devices if machine.host_socket(g) == sock.id]
        if mine:
            # the socket's bus carries both directions at once: each measured with all devices,
            # and, where measured, no more than both directions reached together (max-min sharing
            # then splits that total between an upload and a write-back that overlap)
            together = sum(devices[g].h2d_gbps_together for g in mine) + sum(devices[g].d2h_gbps_together for g in mine)
            if all(devices[g].duplex_gbps is not None for g in mine):
                # not None: every one was just checked
                together = min(together, sum(cast(float, devices[g].duplex_gbps) for g in mine))
            # (each rank's rates are bounded, their sum is not: a memory bus carries at most a topology's
            # largest rate, 1 PB/s, far beyond any machine's)
            together = min(together, MAX_RATE_GBPS)
            sock = Socket(**{**sock.model_dump(), "memory_gbps": together})
        sockets.append(sock)
    measured = Machine(spec.model_copy(update={"links": links, "sockets": sockets}), machine.source)
    measured.identity = machine.hash  # plans and profiles still name the described machine
    measured.node_identity = machine.node_hash
    measured.profile = Profiled(profile, str(source))
    return measured
