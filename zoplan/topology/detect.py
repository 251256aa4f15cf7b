"""Build a topology file for the machine zoplan runs on (``zoplan topo detect``).

With a working ``nvidia-smi`` the file is what ``zoplan topo import`` would write from
``nvidia-smi topo -m``, with the two things the matrix does not say filled in from the machine:
the GPU preset (from the product name ``nvidia-smi --query-gpu=name`` reports) and the host memory
(``MemTotal`` in /proc/meminfo, divided among the sockets the matrix shows, so the total is kept).

Without ``nvidia-smi`` the machine is described like the bundled ``cpu-local``: one socket per NUMA
node, one CPU rank (a gloo worker process) per core this process may run on. How fast a core
multiplies and copies cannot be read from any file, so those figures are conservative defaults,
marked ASSUMED in the file, until ``zoplan calibrate`` measures them.

Every reader takes the text of a command or file as an argument, so the logic runs on fixtures
without a GPU; :func:`detect` gathers the real inputs.
"""

from __future__ import annotations


import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import yaml

from zoplan.errors import ZoplanError
from zoplan.fileio import load_yaml_text, validate
from zoplan.topology.presets import PRESETS, GpuPreset, preset_names
from zoplan.topology.importer import (
    check_positive,
    SOCKET_LINK_GBPS,
    SOCKET_LINK_LATENCY_US,
    SOCKET_LINK_SOURCE,
    _comment,
    _flow,
    _fmt,
    build_topology,
    parse_topo_matrix,
)
from zoplan.topology import Machine, TopologySpec
from zoplan.topology.container import Limits, read_limits
from zoplan.vocab import Meetings, local_meetings

NVIDIA_SMI_TIMEOUT_S = 60  # the first call on a machine without persistence mode can take seconds
MEMINFO = Path("/proc/meminfo")
NODE_ROOT = Path("/sys/devices/system/node")
CPU_ROOT = Path("/sys/devices/system/cpu")
KIB_PER_GIB = 2**20

# nvidia-smi product names (after dropping the NVIDIA / Tesla / GeForce prefixes, upper case) that
# are the GPU of a preset. Names of other variants (A100 PCIe, H100 NVL, H200 NVL) deliberately
# match nothing: their memory, clocks or links differ from every preset.
PRESET_NAMES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p), name)
    for p, name in (
        (r"A100-SXM4?-80GB", "a100-sxm4-80gb"),  # "NVIDIA A100-SXM4-80GB"
        (r"A100-SXM4?-40GB", "a100-sxm4-40gb"),
        (r"H100 80GB HBM3|H100[ -]SXM5?[ -]80GB", "h100-sxm5-80gb"),  # "NVIDIA H100 80GB HBM3"
        (r"H100 PCIE", "h100-pcie-80gb"),  # "NVIDIA H100 PCIe"
        (r"H200", "h200-sxm-141gb"),  # "NVIDIA H200" (the NVL card says "H200 NVL")
        (r"L40S", "l40s-48gb"),
        (r"RTX 4090", "rtx4090-24gb"),  # "NVIDIA GeForce RTX 4090"
    )
)
_PREFIXES = re.compile(r"^(NVIDIA\s+)?(TESLA\s+)?(GEFORCE\s+)?")
MEMORY_TOLERANCE = 0.10  # reported vs preset GPU memory beyond which the preset is doubted

# ----- CPU figures: ASSUMED, conservative, until `zoplan calibrate` measures the machine -----------
# About a third of what bench/cpu_figures.py measured for one core of an earlier development
# machine (2026-11-26, an Intel Xeon: fp32 0.155, bf16 0.083, fp16 0.158 TFLOP/s, copies 8.3 GB/s),
# so that a plan for an unmeasured CPU errs towards slow rather than fast.
CPU_TFLOPS = {"fp32": 0.05, "bf16": 0.025, "fp16": 0.025}
CPU_COPY_GBPS = 4.0  # one core's copy out of the shared host copy of the weights
CPU_MEMORY_BUS_GBPS = 40.0  # a socket's cap: two channels of DDR4-2666 (42.7 GB/s peak)
CPU_LINK_LATENCY_US = 5.0  # per copy call: Python and dispatcher overhead, as in cpu-local
# The runtime's own work on a CPU rank (zoplan.sim.costs): ASSUMED as measured for cpu-local's machine
# (bench/cpu_figures.py), rounded up
CPU_THREADS_EFFICIENCY = 0.8
CPU_RUNTIME = {
    "op_us": 20,
    "cold_op_us": 30,
    "z_call_us": 100,
    "z_cold_us": 150,
    "z_ns": 6,
    "collective_us": 1000,
    "loop_us": 1000,
    "lockstep": 1.3,
    "lockstep_wait_us": 50,
}
CPU_FIGURES_SOURCE = (
    "ASSUMED, not measured: conservative defaults, about a third of one core of an earlier "
    "development machine measured by bench/cpu_figures.py (an Intel Xeon: fp32 0.155, bf16 0.083, "
    "fp16 0.158 TFLOP/s achieved with 1 thread, copies 8.3 GB/s). `zoplan calibrate` measures "
    "this machine's figures."
)

Runner = Callable[[Sequence[str]], str]


@dataclass
class DetectedTopology:
    """A topology of the local machine: the validated spec, its YAML text (every figure's origin
    in comments), what had to be assumed, and a one-line summary for the terminal."""

    spec: TopologySpec
    text: str
    summary: str
    warnings: list[str] = field(default_factory=list)

    def write(self, path: Path | str) -> None:
        from zoplan.fileio import write_whole

        write_whole(Path(path), self.text)  # whole or not at all, through a link into the file it names


# ----- readers ---------------------------------------------------------------------------------------
def mem_total_kib(meminfo: str) -> int:
    """``MemTotal`` of /proc/meminfo, in KiB (the file says kB but counts 1024 bytes)."""
    m = re.search(r"^MemTotal:\s*(\d+)\s*kB", meminfo, re.M)
    if m is None or int(m.group(1)) <= 0:
        raise ZoplanError(
            "no 'MemTotal: N kB' line in /proc/meminfo: cannot tell the host memory",
            fix="write the file by hand or with `zoplan topo import --host-memory-gib`",
        )
    return int(m.group(1))


def parse_cpulist(text: str) -> frozenset[int]:
    """A kernel CPU list (``0-3,8-11``, empty for a node without CPUs) as a set of CPU numbers."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
    return frozenset(cpus)


def read_numa_nodes(root: Path = NODE_ROOT) -> dict[int, frozenset[int]]:
    """NUMA node -> its CPUs, from /sys/devices/system/node/node*/cpulist; ``{}`` without them."""
    nodes: dict[int, frozenset[int]] = {}
    for path in root.glob("node[0-9]*"):
        cpulist = path / "cpulist"
        nodes[int(path.name[4:])] = parse_cpulist(cpulist.read_text()) if cpulist.exists() else frozenset()
    return dict(sorted(nodes.items()))


def read_l2_kib(core: int, root: Path = CPU_ROOT) -> int | None:
    """The size of ``core``'s level-2 cache in KiB, from /sys/devices/system/cpu/cpuN/cache/index*
    (``level`` 2, ``type`` Unified or Data, ``size`` such as 2048K); None where it is not listed."""
    for index in sorted((root / f"cpu{core}" / "cache").glob("index[0-9]*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        m = re.fullmatch(r"(\d+)\s*([KMG]?)", size)
        if level == "2" and kind in ("Unified", "Data") and m:
            return int(m.group(1)) * {"": 1, "K": 1, "M": 1024, "G": 1024**2}[m.group(2)]
    return None


def parse_gpu_query(text: str) -> list[tuple[str, float | None]]:
    """``nvidia-smi --query-gpu=name,memory.total --format=csv,noheader``: (name, MiB) per GPU."""
    gpus: list[tuple[str, float | None]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        name, _, memory = line.rpartition(",")
        m = re.match(r"\s*([\d.]+)\s*MiB", memory)
        gpus.append(((name or memory).strip(), float(m.group(1)) if m else None))
    if not gpus:
        raise ZoplanError(
            "nvidia-smi lists no GPUs (`nvidia-smi --query-gpu=name` printed nothing)",
            fix="check the driver with `nvidia-smi`, or describe the CPU only: zoplan topo detect --cpu",
        )
    return gpus


def preset_matching(product: str) -> str | None:
    """The name of the preset whose GPU nvidia-smi calls ``product`` ("NVIDIA A100-SXM4-80GB"), if any."""
    key = " ".join(_PREFIXES.sub("", " ".join(product.upper().split())).split())
    return next((preset for pattern, preset in PRESET_NAMES if pattern.fullmatch(key)), None)


def gpu_preset_for(name: str, memory_mib: float | None = None) -> GpuPreset:
    """The preset of the GPU nvidia-smi calls ``name``; a ZoplanError naming it otherwise."""
    matched = preset_matching(name)
    if matched is not None:
        return PRESETS[matched]
    memory = f", {memory_mib:.0f} MiB" if memory_mib is not None else ""
    raise ZoplanError(
        f"no GPU preset matches '{name}'{memory} (reported by nvidia-smi); the presets are {', '.join(preset_names())}",
        fix="pick the closest preset yourself: nvidia-smi topo -m > topo.txt; zoplan topo "
        "import topo.txt --gpu PRESET --host-memory-gib G -o machine.yaml",
    )


def _check_host_gbps(host_gbps: float | None) -> None:
    """Checked before anything is built, so the message is about the option, not the matrix."""
    check_positive("--host-gbps", host_gbps)


# ----- nvidia-smi ------------------------------------------------------------------------------------
def run_nvidia_smi(args: Sequence[str]) -> str:
    """The stdout of ``nvidia-smi ARGS``; a failure (status, timeout) is a ZoplanError with what
    nvidia-smi said, since a broken driver must not silently turn a GPU machine into a CPU one."""
    command = ["nvidia-smi", *args]
    shown = " ".join(command)
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ZoplanError(
            f"`{shown}` did not answer within {NVIDIA_SMI_TIMEOUT_S} s",
            fix="check the driver, or describe the CPU only: zoplan topo detect --cpu",
        ) from None
    except OSError as exc:
        raise ZoplanError(f"cannot run `{shown}`: {exc}") from None
    if proc.returncode != 0:
        said = (proc.stderr.strip() or proc.stdout.strip() or "no output")[:500]
        raise ZoplanError(
            f"`{shown}` failed with exit status {proc.returncode}: {said}",
            fix="check the driver (`nvidia-smi` must work), or describe the CPU only: zoplan topo detect --cpu",
        )
    return proc.stdout


def gpu_topology(
    topo_text: str,
    query_text: str,
    meminfo: str,
    *,
    host_gbps: float | None = None,
    name: str = "machine",
    host: str = "this machine",
    limits: Limits = Limits(),
) -> DetectedTopology:
    """The topology ``zoplan topo import`` builds from ``topo_text`` (``nvidia-smi topo -m``), with
    the preset picked from ``query_text`` and the host memory from ``meminfo`` (or a container's
    lower memory limit, ``limits``)."""
    _check_host_gbps(host_gbps)
    gpus = parse_gpu_query(query_text)
    models = sorted({g for g, _ in gpus})
    if len(models) > 1:
        raise ZoplanError(
            f"nvidia-smi reports different GPU models ({', '.join(models)}); a topology has one model for all GPUs",
            fix="import with the preset of the GPUs you will use: nvidia-smi topo -m > "
            "topo.txt; zoplan topo import topo.txt --gpu PRESET ...",
        )
    gpu_name, gpu_mib = gpus[0]
    preset = gpu_preset_for(gpu_name, gpu_mib)
    named = preset
    smaller = gpu_mib is not None and preset.memory_gib - gpu_mib / 1024 > MEMORY_TOLERANCE * preset.memory_gib
    if smaller:
        # plan with the memory the GPUs have: a plan made for the preset's would not fit them
        assert gpu_mib is not None  # (smaller says so)
        reported_gib = float(_fmt(gpu_mib / 1024))
        preset = replace(
            preset,
            memory_gib=reported_gib,
            sources={
                **preset.sources,
                "memory_gib": f"nvidia-smi reports {gpu_mib:.0f} MiB per GPU, less than the "
                f"{_fmt(named.memory_gib)} GiB of preset {named.name}: planned with what it reports",
            },
        )
    kib = mem_total_kib(meminfo)
    total_gib, memory_said = _host_memory(kib, limits)
    source = f"the output of nvidia-smi on {host}"
    try:
        matrix = parse_topo_matrix(topo_text)
        if matrix.gpus != len(gpus):
            raise ZoplanError(f"it shows {matrix.gpus} GPUs but `nvidia-smi --query-gpu` lists {len(gpus)}")
        imported = build_topology(
            matrix, preset, host_memory_gib=total_gib, host_gbps=host_gbps, name=name, source=source
        )
        sockets = len(imported.spec.sockets)
        if sockets > 1:  # build_topology takes memory per socket; the matrix decides how many sockets
            imported = build_topology(
                matrix, preset, host_memory_gib=total_gib / sockets, host_gbps=host_gbps, name=name, source=source
            )
    except ZoplanError as exc:
        raise ZoplanError(
            f"`nvidia-smi topo -m` on {host}: {exc.message}",
            fix=exc.fix
            or "save its output (nvidia-smi topo -m > topo.txt) and try `zoplan topo import "
            "topo.txt`, or describe the CPU only: zoplan topo detect --cpu",
        ) from None
    warnings = list(imported.warnings)
    if smaller:
        warnings.append(
            f"nvidia-smi reports {gpu_mib:.0f} MiB per GPU but preset {named.name} has "
            f"{_fmt(named.memory_gib)} GiB: the file gives the GPUs the {_fmt(preset.memory_gib)} GiB "
            "reported, and the preset's compute and copy figures; check the GPU model (MIG or a variant?)"
        )
    elif gpu_mib is not None and gpu_mib / 1024 - preset.memory_gib > MEMORY_TOLERANCE * preset.memory_gib:
        warnings.append(
            f"nvidia-smi reports {gpu_mib:.0f} MiB per GPU but preset {preset.name} has "
            f"{_fmt(preset.memory_gib)} GiB: planned with the preset's; check the GPU model (a variant?)"
        )
    header = _comment(
        f"Written by `zoplan topo detect` on {host}. GPU model: nvidia-smi --query-gpu reports "
        f"{len(gpus)}x '{gpu_name}'"
        + (f" ({gpu_mib:.0f} MiB)" if gpu_mib is not None else "")
        + f", which is the preset {preset.name}. Host memory: {memory_said}, "
        + (f"divided evenly among the {sockets} sockets" if sockets > 1 else "all on the one socket")
        + " below."
        " Everything else was read from `nvidia-smi topo -m` as `zoplan topo import` reads it "
        "(the comments below are its own; --gpu and --host-memory-gib were filled in as said here)."
    )
    return DetectedTopology(
        spec=imported.spec,
        text="\n".join(header) + "\n#\n" + imported.text,
        summary=imported.summary(),
        warnings=warnings,
    )


def _cores(count: float | None) -> str:
    return f"{count:g} core{'s' if count != 1 else ''}"


def _host_memory(kib: int, limits: Limits) -> tuple[float, str]:
    """The host memory a topology gives, in GiB (MemTotal's ``kib``, or a container's lower
    limit), and where it comes from, for its comment."""
    total_gib = kib / KIB_PER_GIB
    said = f"MemTotal {kib} kB in /proc/meminfo = {_fmt(total_gib)} GiB"
    if limits.memory_bytes is not None and limits.memory_bytes < kib * 1024:
        limit_gib = limits.memory_bytes / 2**30
        return limit_gib, (
            f"{_fmt(limit_gib)} GiB, the memory limit of this process's container ({limits.memory_bytes} "
            f"bytes in {limits.memory_file}), below {said}"
        )
    return total_gib, said


# ----- CPU only --------------------------------------------------------------------------------------
def cpu_topology(
    meminfo: str,
    nodes: dict[int, frozenset[int]],
    cores: set[int] | frozenset[int],
    *,
    ranks: int | None = None,
    host_gbps: float | None = None,
    name: str = "machine",
    host: str = "this machine",
    why: str = "no nvidia-smi on PATH",
    meetings: Meetings | None = None,
    l2_kib: int | None = None,
    limits: Limits = Limits(),
) -> DetectedTopology:
    """A CPU-only topology like ``cpu-local``: a socket per NUMA node of ``nodes`` (one if empty),
    ``ranks`` CPU ranks (default one per core of ``cores``, the process's CPU affinity) spread
    over the cores in order, each copying from the host memory of its core's node, meeting as
    this machine's ranks do (``meetings``, default: zoplan.vocab.local_meetings); ``l2_kib``, a
    core's level-2 cache (``read_l2_kib``), becomes the ranks' ``cache_mib``. A container's
    ``limits`` (zoplan.topology.container) lower the memory and, under a CPU quota, the cores
    (and so the default ranks) below the machine's."""
    meetings = meetings or local_meetings()
    usable = sorted(cores)
    if not usable:
        raise ZoplanError("this process may run on no CPU core (os.sched_getaffinity is empty)")
    busy = limits.cores(len(usable))  # the cores' worth a CPU quota lets it keep busy
    n_ranks = busy if ranks is None else ranks
    if not 1 <= n_ranks <= busy:
        quota = f" (a CPU quota of {_cores(limits.cpus)} in {limits.cpu_file})" if busy < len(usable) else ""
        raise ZoplanError(
            f"--ranks must be between 1 and the {busy} cores this process may use{quota}, got {n_ranks}",
            fix="one rank per core at most: each rank is one process",
        )
    _check_host_gbps(host_gbps)
    node_ids = list(nodes) or [0]
    node_of = {cpu: node for node, cpus in nodes.items() for cpu in cpus}
    rank_node = [node_of.get(usable[r * len(usable) // n_ranks], node_ids[0]) for r in range(n_ranks)]
    kib = mem_total_kib(meminfo)
    total_gib, memory_said = _host_memory(kib, limits)
    per_node = total_gib / len(node_ids)
    per_rank = total_gib / n_ranks

    def bus(node: int) -> float:
        return (
            host_gbps
            if host_gbps is not None
            else min(max(1, rank_node.count(node)) * CPU_COPY_GBPS, CPU_MEMORY_BUS_GBPS)
        )

    # each node's cores; under a CPU quota, its share of the cores the quota lets be busy (largest
    # remainders: the shares add up to them, at least one a node)
    counts = {n: sum(1 for c in usable if node_of.get(c, node_ids[0]) == n) for n in node_ids}
    exact = {n: counts[n] * busy / len(usable) for n in node_ids}
    share = {n: int(exact[n]) for n in node_ids}
    for n in sorted(node_ids, key=lambda n: (int(exact[n]) - exact[n], n))[: busy - sum(share.values())]:
        share[n] += 1
    share = {n: max(1, share[n]) for n in node_ids}
    sockets = [
        {
            "id": f"cpu{n}",
            "memory_gib": _fmt(per_node),
            "memory_gbps": _fmt(bus(n)),
            "cores": share[n],
        }
        for n in node_ids
    ]
    links = [
        {
            "a": f"cpu{rank_node[r]}",
            "b": f"rank{r}",
            "kind": "memory",
            "gbps": _fmt(CPU_COPY_GBPS),
            "latency_us": _fmt(CPU_LINK_LATENCY_US),
        }
        for r in range(n_ranks)
    ]
    socket_links = [
        {
            "a": f"cpu{a}",
            "b": f"cpu{b}",
            "kind": "socket",
            "gbps": _fmt(SOCKET_LINK_GBPS),
            "latency_us": SOCKET_LINK_LATENCY_US,
        }
        for i, a in enumerate(node_ids)
        for b in node_ids[i + 1 :]
    ]
    plural = "s" if len(node_ids) != 1 else ""
    description = (
        f"CPU-only machine {host}: {len(usable)} cores, {len(node_ids)} NUMA node{plural}, "
        f"{_fmt(total_gib)} GiB memory, no GPU; {n_ranks} CPU rank{'s' if n_ranks != 1 else ''}"
    )

    out = _comment(
        f"Written by `zoplan topo detect` on {host}: {why}, so a CPU-only machine. The runtime "
        f'runs one gloo worker process ("CPU rank") per rank; the planner treats each rank as a compute '
        f'device whose "upload" is a copy out of the shared host copy of the weights (as the bundled '
        f"cpu-local). Ranks: {n_ranks} ("
        + ("--ranks" if ranks is not None else "one per core")
        + f") over the {len(usable)} cores os.sched_getaffinity allows this process"
        + (
            f", of which a CPU quota of {_cores(limits.cpus)} ({limits.cpu_file}) keeps {busy} busy."
            if busy < len(usable)
            else "."
        )
    )
    out.append("#")
    out += _comment(
        "ASSUMED: the compute and copy figures are conservative defaults, not measurements "
        "of this machine; run `zoplan calibrate` to measure them."
    )
    out.append(
        yaml.safe_dump(
            {"version": 1, "name": name, "description": description}, sort_keys=False, width=10**6, allow_unicode=True
        ).rstrip()
    )
    out += ["gpu_models:", "  cpu-rank:", "    kind: cpu"]
    out += _comment(
        f"A rank's working set lives in host memory: {_fmt(total_gib)} GiB / {n_ranks} "
        f"rank{'s' if n_ranks != 1 else ''}. The host copy of the weights is counted "
        f"separately, so planning is conservative about memory.",
        indent=4,
    )
    out.append(f"    memory_gib: {_fmt(per_rank)}")
    out += _comment(f"{CPU_FIGURES_SOURCE} Achieved rates, hence matmul_efficiency 1.0; CPUs have no tf32.", indent=4)
    out.append(f"    tflops: {_flow(CPU_TFLOPS)}")
    out += _comment(f"Elementwise passes read and write: 2 x {_fmt(CPU_COPY_GBPS)} GB/s (ASSUMED copy rate).", indent=4)
    out.append(f"    hbm_gbps: {_fmt(2 * CPU_COPY_GBPS)}")
    out.append("    matmul_efficiency: 1.0")
    out += _comment(
        "ASSUMED: a rank that has several cores (fewer ranks than cores) gains this share of one "
        "thread's rate per extra thread (0.92 measured for cpu-local's machine, rounded down).",
        indent=4,
    )
    out.append(f"    threads_efficiency: {CPU_THREADS_EFFICIENCY}")
    if l2_kib:
        out += _comment(
            f"A core's own cache, its L2 ({l2_kib} KiB in /sys/devices/system/cpu/cpu*/cache): a "
            f"head's logits that fit it are written and read there.",
            indent=4,
        )
        out.append(f"    cache_mib: {_fmt(l2_kib / 1024)}")
    out += _comment(
        "ASSUMED, as measured for cpu-local's machine and rounded up: the runtime's own work "
        "on a rank's one thread (tensor ops, z drawn into memory, collective calls, the "
        "loop's host work per step) and what ranks side by side lose in lockstep; "
        "`zoplan calibrate` measures what a run costs on this machine, and "
        "`python -m bench.cpu_figures` (in a zoplan checkout) these figures.",
        indent=4,
    )
    out += [f"    {key}: {value}" for key, value in CPU_RUNTIME.items()]
    out += _comment(
        f"How the ranks meet before a whole block and sum the loss: through shared memory on x86 "
        f"(only the wait costs), through gloo's collective calls elsewhere; this machine: "
        f"{platform.machine() or 'unknown'}.",
        indent=4,
    )
    out.append(f"    meetings: {meetings}")
    out.append("sockets:")
    out += _comment(
        f"One per NUMA node ({'/sys/devices/system/node' if nodes else 'none listed, so one'}). "
        f"memory_gib: {memory_said}"
        + (f", divided evenly among {len(node_ids)} nodes" if len(node_ids) > 1 else "")
        + ". cores: those of os.sched_getaffinity on the node"
        + (f", scaled by the CPU quota ({busy} of {len(usable)})" if busy < len(usable) else "")
        + ". memory_gbps: "
        + (
            "--host-gbps."
            if host_gbps is not None
            else f"ASSUMED: {_fmt(CPU_COPY_GBPS)} GB/s per rank on the node (each core, not the memory bus, "
            f"limits a copy, as measured for cpu-local), at most {_fmt(CPU_MEMORY_BUS_GBPS)} GB/s (two "
            f"channels of DDR4-2666); give --host-gbps or run `zoplan calibrate`."
        ),
        indent=2,
    )
    out += [f"  - {_flow(s)}" for s in sockets]
    out.append("gpus:")
    out += [f"  - {_flow({'id': f'rank{r}', 'model': 'cpu-rank'})}" for r in range(n_ranks)]
    out.append("links:")
    out += _comment(
        f"A rank's copy from (and back to) the host copy: ASSUMED {_fmt(CPU_COPY_GBPS)} GB/s, "
        f"one core's copy rate; latency {_fmt(CPU_LINK_LATENCY_US)} us per copy call (Python "
        f"and dispatcher overhead, as in cpu-local).",
        indent=2,
    )
    out += [f"  - {_flow(link)}" for link in links]
    if socket_links:
        out += _comment(SOCKET_LINK_SOURCE + ".", indent=2)
        out += [f"  - {_flow(link)}" for link in socket_links]
    text = "\n".join(out) + "\n"

    spec = validate(
        TopologySpec,
        load_yaml_text(text, f"zoplan topo detect ({host})"),
        f"zoplan topo detect ({host})",
        "detected topology",
    )
    Machine(spec, name)  # every rank reaches a socket
    limited = [
        f"{_fmt(total_gib)} GiB of memory" if limits.memory_bytes is not None and total_gib < kib / KIB_PER_GIB else "",
        f"{busy} busy core{'s' if busy != 1 else ''}" if busy < len(usable) else "",
    ]
    said_limits = " and ".join(x for x in limited if x)
    summary = (
        f"{why}: {n_ranks} CPU rank{'s' if n_ranks != 1 else ''} on {len(usable)} core{'s' if len(usable) != 1 else ''}, "
        f"{len(node_ids)} socket{plural} ({_fmt(total_gib)} GiB host memory in all"
        + (f"; this container allows {said_limits}" if said_limits else "")
        + "); compute and copy figures are ASSUMED conservative defaults: `zoplan calibrate` measures them"
    )
    return DetectedTopology(spec=spec, text=text, summary=summary)


# ----- the local machine -----------------------------------------------------------------------------
def detect(
    *,
    ranks: int | None = None,
    host_gbps: float | None = None,
    name: str = "machine",
    cpu_only: bool = False,
    run: Runner | None = None,
    which: Callable[[str], str | None] | None = None,
    meminfo_path: Path = MEMINFO,
    node_root: Path = NODE_ROOT,
    cpu_root: Path = CPU_ROOT,
    limits: Limits | None = None,
) -> DetectedTopology:
    """The topology of this machine: from nvidia-smi when it is on PATH (and not ``cpu_only``),
    CPU ranks otherwise. ``run`` and ``which`` default to the real nvidia-smi and PATH lookup,
    ``limits`` to this process's container's (zoplan.topology.container)."""
    limits = read_limits() if limits is None else limits
    host = platform.node() or "this machine"
    try:
        meminfo = meminfo_path.read_text()
    except OSError as exc:
        raise ZoplanError(
            f"cannot read {meminfo_path}: {exc}: cannot tell the host memory",
            fix="on a machine without /proc, use `zoplan topo import --host-memory-gib`",
        ) from None
    has_smi = not cpu_only and (which or shutil.which)("nvidia-smi") is not None
    if not has_smi:
        cores = os.sched_getaffinity(0)
        return cpu_topology(
            meminfo,
            read_numa_nodes(node_root),
            cores,
            ranks=ranks,
            host_gbps=host_gbps,
            name=name,
            host=host,
            why="--cpu given" if cpu_only else "no nvidia-smi on PATH",
            l2_kib=read_l2_kib(min(cores), cpu_root) if cores else None,
            limits=limits,
        )
    if ranks is not None:
        raise ZoplanError(
            "--ranks is for CPU-only machines: with GPUs, the GPUs are the ranks",
            fix="drop --ranks, or add --cpu to describe the CPU only",
        )
    run = run or run_nvidia_smi
    query = run(["--query-gpu=name,memory.total", "--format=csv,noheader"])
    return gpu_topology(run(["topo", "-m"]), query, meminfo, host_gbps=host_gbps, name=name, host=host, limits=limits)
