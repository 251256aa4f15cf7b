"""Build a topology file from the text of ``nvidia-smi topo -m`` (``zoplan topo import``).

``nvidia-smi topo -m`` prints a matrix: one row and one column per GPU (and per NIC), each entry
saying how two devices are connected, then the columns ``CPU Affinity``, ``NUMA Affinity`` and,
in newer drivers, ``GPU NUMA ID``; a Legend (and a "NIC Legend") follows. Entries:

    X     the device itself
    NV#   a bonded set of # NVLinks
    PIX   at most one PCIe bridge           (same PCIe switch)
    PXB   several bridges, no host bridge    (same switch tree, below one CPU root port)
    PHB   through a PCIe host bridge (the CPU)
    NODE  across host bridges within one NUMA node
    SYS   across the inter-socket link (older drivers: SOC)

How a topology is built from it (docs/topologies.md, "Importing a real machine"):

- GPUs ``gpu0..gpuN-1``, all of the ``--gpu`` preset (zoplan.topology.presets).
- Sockets: one per NUMA node of the ``NUMA Affinity`` column (id ``cpu<node>``). When the column
  is missing or says N/A, sockets are inferred: devices joined by PIX/PXB/PHB/NODE are on one
  socket, and groups are kept apart only when a SYS entry separates them (``cpu0, cpu1, ...``).
- PCIe switches: GPUs whose entry is PIX or PXB, to each other or to the same NIC, sit below one
  switch and share its one uplink to their socket (on an NVLink machine the GPU-GPU entry says
  NV#, so the NIC columns are what shows the pairs). Every other GPU has its own link to the
  socket. Link figures: the preset's pinned H2D / D2H copy rates.
- NVLink: when every GPU pair shows the same NV# and one GPU could not have that many links to
  each of the others directly (NV12 to 7 peers on an A100 with 12 links), the GPUs hang off one
  ``nvswitch`` node; otherwise each NV# pair gets a direct GPU-GPU link. Bandwidth = # links x the
  preset's per-link figure (the collective bus bandwidth measured for that NVLink generation).
- Sockets are joined pairwise by a 64 GB/s inter-socket link (the bundled machines' conservative
  figure).

Host memory size and bandwidth are not in the text: ``host_memory_gib`` must be given (a guess
would silently decide what fits), ``host_gbps`` defaults to the bundled DGX A100's 204.8 GB/s
(8-channel DDR4-3200) with a warning and an ASSUMED comment in the file.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import yaml

from zoplan.errors import ZoplanError
from zoplan.fileio import load_yaml_text, read_text, validate
from zoplan.topology.presets import GpuPreset, get_preset
from zoplan.topology import Machine, TopologySpec

# ----- figures that are not in the matrix -----------------------------------------------------------
DEFAULT_HOST_GBPS = 204.8
DEFAULT_HOST_GBPS_SOURCE = (
    "8 channels DDR4-3200 = 204.8 GB/s peak per socket (EPYC 7742, AMD spec; "
    "docs/hardware-sources.md), the figure of the bundled dgx-a100"
)
SOCKET_LINK_GBPS = 64.0
SOCKET_LINK_LATENCY_US = 0.05
SOCKET_LINK_SOURCE = (
    "inter-socket link (UPI / xGMI): 64 GB/s, two x16 links' worth at 32 GB/s per "
    "direction, CONSERVATIVE as in the bundled dgx-a100, dgx-h100 and l40s-8x; "
    "remote-access latency ~40-50 ns (lowlat-ms.pages.dev glossary 'QPI / UPI')"
)
PCIE_LATENCY_US = 0.5
NVLINK_SWITCH_LATENCY_US = 0.2
NVLINK_DIRECT_LATENCY_US = 0.4
LATENCY_SOURCE = (
    "NCCL's per-hop latency constants (NCCL src/graph/tuning.cc, hwLat, LL): ~1.0 us per "
    "PCI hop, ~0.4 us per NVLink hop between two GPUs; a route through a switch crosses "
    "two links, so each carries half (0.5 us PCIe, 0.2 us NVLink to the NVSwitch); a "
    "direct GPU-GPU NVLink is one hop (0.4 us); a GPU's own link to its socket 0.5 us, "
    "as in the bundled files"
)

# ----- the matrix ----------------------------------------------------------------------------------
LOCAL = frozenset({"PIX", "PXB", "PHB", "NODE"})  # same socket
SAME_SWITCH = frozenset({"PIX", "PXB"})  # below one CPU root port
KEYWORDS = ("X", "PIX", "PXB", "PHB", "NODE", "SYS", "SOC")
_NV = re.compile(r"^NV(\d+)$")
_GPU = re.compile(r"^GPU(\d+)$")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# the header's names of more than one word, joined so that whitespace splits the header cleanly
_MULTIWORD = [
    (re.compile(r"CPU\s+Affinity", re.I), "CPU_Affinity"),
    (re.compile(r"NUMA\s+Affinity", re.I), "NUMA_Affinity"),
    (re.compile(r"GPU\s+NUMA\s+ID", re.I), "GPU_NUMA_ID"),
]
AFFINITY_COLUMNS = {"CPU_Affinity": "CPU Affinity", "NUMA_Affinity": "NUMA Affinity", "GPU_NUMA_ID": "GPU NUMA ID"}
ENTRIES_HELP = "X, NV#, PIX, PXB, PHB, NODE, SYS or SOC"


@dataclass(frozen=True)
class TopoMatrix:
    """The parsed ``nvidia-smi topo -m`` text: GPU-GPU and GPU-NIC entries and affinities."""

    gpus: int
    nics: tuple[str, ...]  # device columns other than GPUs, in header order (mlx5_0, NIC0, ...)
    entries: dict[tuple[int, int], str]  # (i, j) -> entry between GPU i and GPU j (i != j); SOC -> SYS
    nic_entries: dict[tuple[int, str], str]  # (GPU i, NIC column) -> entry
    cpu_affinity: tuple[str | None, ...]
    numa_affinity: tuple[int | None, ...]  # None: N/A, missing or not one node
    gpu_numa_id: tuple[str | None, ...]
    columns: tuple[str, ...]  # the affinity columns the header has ("CPU Affinity", ...)
    row_lines: tuple[int, ...]  # line number of each GPU's row
    header_line: int

    @property
    def layout(self) -> str:
        return "newer (with GPU NUMA ID)" if "GPU NUMA ID" in self.columns else "older"

    def nvlinks(self, i: int, j: int) -> int:
        m = _NV.match(self.entries[(i, j)])
        return int(m.group(1)) if m else 0


def _tokens(line: str) -> list[str]:
    return line.split()


def _is_entry_like(token: str) -> bool:
    """A token in the link-entry position: letters first (X, NV12, PIX...), not an affinity
    value (CPU lists start with a digit; N/A)."""
    return bool(token) and token[0].isalpha() and token.upper() != "N/A"


def _check_entry(token: str, line_no: int, column: str) -> str:
    if token in KEYWORDS:
        return "SYS" if token == "SOC" else token
    m = _NV.match(token)
    if m and int(m.group(1)) > 0:
        return token
    raise ZoplanError(f"line {line_no}: unknown link entry '{token}' in column {column} (expected {ENTRIES_HELP})")


def _header_tokens(line: str) -> list[str]:
    for pattern, joined in _MULTIWORD:
        line = pattern.sub(joined, line)
    return _tokens(line)


def parse_topo_matrix(text: str) -> TopoMatrix:
    """Parse the text of ``nvidia-smi topo -m`` (either layout, tabs or spaces, with or without
    NICs; everything from the Legend on is ignored). Errors name the line and what was expected."""
    lines = [_ANSI.sub("", line).replace("\r", "") for line in text.split("\n")]
    # ----- header: the first line naming GPU columns or the affinity columns
    header_no = None
    first_text = None
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if first_text is None:
            first_text = (no, line.strip())
        toks = _header_tokens(line)
        if any(_GPU.match(t) for t in toks) or any(t in AFFINITY_COLUMNS for t in toks):
            header_no = no
            break
        if line.strip().lower().startswith("legend"):
            break
    if header_no is None:
        if first_text is None:
            raise ZoplanError("line 1: the text is empty: expected the output of `nvidia-smi topo -m`")
        no, shown = first_text
        raise ZoplanError(
            f"line {no}: no GPU columns: expected the header line of `nvidia-smi topo -m` "
            f"(GPU0 GPU1 ... CPU Affinity NUMA Affinity), found '{shown[:60]}'"
        )
    toks = _header_tokens(lines[header_no - 1])
    if toks and (toks[0] in KEYWORDS or (len(toks) > 1 and (toks[1] in KEYWORDS or _NV.match(toks[1])))):
        raise ZoplanError(
            f"line {header_no}: expected the header line (GPU0 GPU1 ... CPU Affinity), "
            f"found a row of the matrix ('{lines[header_no - 1].strip()[:60]}'): is the "
            f"first line of the output missing?"
        )
    devices: list[str] = []
    columns: list[str] = []
    for t in toks:
        if t in AFFINITY_COLUMNS:
            columns.append(AFFINITY_COLUMNS[t])
        elif columns:
            raise ZoplanError(
                f"line {header_no}: unexpected column '{t}' after '{columns[-1]}' (device columns come first)"
            )
        elif t in devices:
            raise ZoplanError(f"line {header_no}: column '{t}' appears twice")
        else:
            devices.append(t)
    gpu_cols = [d for d in devices if _GPU.match(d)]
    if not gpu_cols:
        raise ZoplanError(
            f"line {header_no}: no GPU columns in the header: expected GPU0, GPU1, ... "
            f"before {', '.join(repr(c) for c in columns) or 'the affinity columns'}"
        )
    n = len(gpu_cols)
    if devices[:n] != [f"GPU{i}" for i in range(n)]:
        raise ZoplanError(
            f"line {header_no}: expected the GPU columns GPU0..GPU{n - 1} first and in order, found {' '.join(devices)}"
        )
    nics = tuple(devices[n:])
    width = len(devices)
    what = "GPU column" if not nics else "GPU/NIC column"

    # ----- rows, until the Legend
    rows: dict[str, tuple[int, list[str], list[str]]] = {}
    for no in range(header_no + 1, len(lines) + 1):
        line = lines[no - 1]
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.lower().startswith(("legend", "nic legend")):
            break
        toks = _tokens(line)
        name = toks[0]
        if name not in devices:
            raise ZoplanError(
                f"line {no}: expected a row of the matrix starting with one of "
                f"{', '.join(devices[:3])}{', ...' if width > 3 else ''}, or the Legend; "
                f"found '{stripped[:60]}'"
            )
        if name in rows:
            raise ZoplanError(f"line {no}: a second row for {name} (the first is line {rows[name][0]})")
        rest = toks[1:]
        found = 0
        while found < len(rest) and _is_entry_like(rest[found]):
            found += 1
        if found != width:
            if found > width:
                raise ZoplanError(f"line {no}: expected one entry per {what} ({width}), found {found}")
            raise ZoplanError(
                f"line {no}: expected one entry per {what} ({width}), found {found}"
                + (f" (then '{rest[found]}')" if found < len(rest) else "")
            )
        row_entries = [_check_entry(tok, no, devices[k]) for k, tok in enumerate(rest[:width])]
        values = rest[width:]
        if len(values) > len(columns):
            raise ZoplanError(
                f"line {no}: expected at most {len(columns)} values after the link "
                f"entries ({', '.join(columns) or 'no affinity columns in the header'}), "
                f"found {len(values)}: {' '.join(values)}"
            )
        rows[name] = (no, row_entries, values)

    missing = [g for g in gpu_cols if g not in rows]
    if missing:
        raise ZoplanError(
            f"line {header_no}: the header names {', '.join(missing)} but no row for "
            f"{'it' if len(missing) == 1 else 'them'} follows (is the text cut short?)"
        )

    entries: dict[tuple[int, int], str] = {}
    nic_entries: dict[tuple[int, str], str] = {}
    cpu_aff: list[str | None] = []
    numa: list[int | None] = []
    gpu_numa: list[str | None] = []
    row_lines = tuple(rows[f"GPU{i}"][0] for i in range(n))
    for i in range(n):
        no, row, values = rows[f"GPU{i}"]
        for j in range(n):
            if (row[j] == "X") != (i == j):
                raise ZoplanError(
                    f"line {no}: GPU{i}'s entry for GPU{j} is '{row[j]}': expected "
                    f"{'X (the GPU itself)' if i == j else 'a link entry, not X'}"
                )
            if i != j:
                entries[(i, j)] = row[j]
        for k, nic in enumerate(nics):
            if row[n + k] == "X":
                raise ZoplanError(f"line {no}: GPU{i}'s entry for {nic} is 'X' (self), expected a link entry")
            nic_entries[(i, nic)] = row[n + k]
        by_col = dict(zip(columns, values))
        cpu_aff.append(by_col.get("CPU Affinity"))
        node = by_col.get("NUMA Affinity")
        numa.append(int(node) if node is not None and node.isdigit() else None)
        gpu_numa.append(by_col.get("GPU NUMA ID"))
    for i in range(n):
        for j in range(i + 1, n):
            if entries[(i, j)] != entries[(j, i)]:
                raise ZoplanError(
                    f"line {row_lines[j]}: GPU{j}-GPU{i} is '{entries[(j, i)]}' but "
                    f"GPU{i}-GPU{j} (line {row_lines[i]}) is '{entries[(i, j)]}': the "
                    f"matrix must be symmetric"
                )
    return TopoMatrix(
        gpus=n,
        nics=nics,
        entries=entries,
        nic_entries=nic_entries,
        cpu_affinity=tuple(cpu_aff),
        numa_affinity=tuple(numa),
        gpu_numa_id=tuple(gpu_numa),
        columns=tuple(columns),
        row_lines=row_lines,
        header_line=header_no,
    )


# ----- building the topology -----------------------------------------------------------------------
_Node = tuple[str, int | str]  # ("g", GPU index) or ("n", NIC column)


class _Union:
    def __init__(self) -> None:
        self.parent: dict[_Node, _Node] = {}

    def find(self, x: _Node) -> _Node:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: _Node, b: _Node) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb, key=str)] = min(ra, rb, key=str)


def _gpu_groups(m: TopoMatrix, kinds: frozenset[str]) -> tuple[list[list[int]], list[list[str]]]:
    """GPUs joined (directly or through a common NIC) by entries of ``kinds``: the groups, each
    sorted, ordered by their first GPU, and for each group the entries that joined it."""
    u = _Union()
    for i in range(m.gpus):
        u.find(("g", i))
        for j in range(i + 1, m.gpus):
            if m.entries[(i, j)] in kinds:
                u.union(("g", i), ("g", j))
        for nic in m.nics:
            if m.nic_entries[(i, nic)] in kinds:
                u.union(("g", i), ("n", nic))
    groups: dict[_Node, list[int]] = {}
    for i in range(m.gpus):
        groups.setdefault(u.find(("g", i)), []).append(i)
    ordered = sorted(groups.values(), key=lambda g: g[0])
    notes: list[list[str]] = []
    for g in ordered:
        why = [f"gpu{i}-gpu{j} {m.entries[(i, j)]}" for i in g for j in g if i < j and m.entries[(i, j)] in kinds]
        for nic in m.nics:
            linked = [i for i in g if m.nic_entries[(i, nic)] in kinds]
            if len(linked) > 1:
                why.append(
                    " and ".join(f"gpu{i}" for i in linked)
                    + " "
                    + "/".join(sorted({m.nic_entries[(i, nic)] for i in linked}))
                    + f" to {nic}"
                )
        notes.append(why)
    return ordered, notes


def _pcie_hidden(m: TopoMatrix) -> list[int]:
    """GPUs whose PCIe side the matrix does not show: every entry to another GPU is NV# and there
    are no NIC columns (NVLink takes precedence over the PCIe path in ``nvidia-smi topo -m``)."""
    if m.nics or m.gpus < 2:
        return []
    return [i for i in range(m.gpus) if all(_NV.match(m.entries[(i, j)]) for j in range(m.gpus) if j != i)]


def _infer_sockets(m: TopoMatrix) -> tuple[list[int], list[str]]:
    """Socket index of each GPU when NUMA Affinity is not given: devices joined by
    PIX/PXB/PHB/NODE share a socket; groups are kept apart only when SYS separates them."""
    groups, _ = _gpu_groups(m, LOCAL)
    warnings: list[str] = []

    def sys_between(a: list[int], b: list[int]) -> bool:
        if any(m.entries[(i, j)] == "SYS" for i in a for j in b):
            return True
        # a NIC local to one group and SYS to the other separates them too
        for nic in m.nics:
            if any(m.nic_entries[(i, nic)] in LOCAL for i in a) and any(m.nic_entries[(j, nic)] == "SYS" for j in b):
                return True
            if any(m.nic_entries[(j, nic)] in LOCAL for j in b) and any(m.nic_entries[(i, nic)] == "SYS" for i in a):
                return True
        return False

    sockets: list[list[list[int]]] = []
    for g in groups:
        for s in sockets:
            if not any(sys_between(g, other) for other in s):
                s.append(g)
                break
        else:
            sockets.append([g])
    hidden = _pcie_hidden(m)
    if hidden and len(sockets) == 1:
        warnings.append(
            f"NUMA Affinity is missing or N/A and NVLink hides which socket "
            f"{_gpu_list(hidden)} hang{'s' if len(hidden) == 1 else ''} off (NV# entries, no "
            f"NIC columns): all GPUs were put on one socket; edit the file if the machine "
            f"has more"
        )
    socket_of = [0] * m.gpus
    for k, s in enumerate(sockets):
        for g in s:
            for i in g:
                socket_of[i] = k
    return socket_of, warnings


def check_positive(flag: str, value: float | None) -> None:
    """An option's size or rate (None: not given): a positive, finite number."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ZoplanError(f"{flag} must be a positive number, got {value}")


def _fmt(x: float) -> float | int:
    x = round(float(x), 2)
    return int(x) if x == int(x) else x


def _flow(value: object) -> str:
    """One value as inline YAML: ``{a: cpu0, b: gpu0, ...}`` for a mapping, ``80`` for a number."""
    text: str = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6)
    return text.removesuffix("\n...\n").strip()


def _comment(text: str, indent: int = 0, width: int = 100) -> list[str]:
    """``text`` as YAML comment lines, wrapped at ``width``."""
    pad = " " * indent + "# "
    out: list[str] = []
    for para in text.split("\n"):
        words = para.split(" ")
        line = ""
        for w in words:
            if line and len(pad) + len(line) + 1 + len(w) > width:
                out.append(pad + line)
                line = w
            else:
                line = f"{line} {w}" if line else w
        out.append((pad + line).rstrip())
    return out


def _gpu_list(gpus: list[int]) -> str:
    return ", ".join(f"gpu{i}" for i in gpus)


@dataclass
class ImportedTopology:
    """A topology built from ``nvidia-smi topo -m``: the validated spec, the YAML text (with the
    provenance of every figure in comments) and warnings about what had to be assumed."""

    spec: TopologySpec
    text: str
    matrix: TopoMatrix
    preset: GpuPreset
    warnings: list[str] = field(default_factory=list)
    nvlink: str = "none"  # "nvswitch", "direct" or "none"
    uplinks: list[list[int]] = field(default_factory=list)  # GPUs below each shared uplink

    def summary(self) -> str:
        spec = self.spec
        n = len(spec.gpus)
        if self.nvlink == "nvswitch":
            gbps = next(l.gbps for l in spec.links if l.kind == "nvlink")
            nv = f"NVSwitch ({_fmt(gbps)} GB/s per GPU)"
        elif self.nvlink == "direct":
            pairs = sum(1 for l in spec.links if l.kind == "nvlink")
            nv = f"{pairs} direct NVLink pair{'s' if pairs != 1 else ''}"
        else:
            nv = "no NVLink"
        shared = [g for g in self.uplinks if len(g) > 1]
        pcie = (
            f"{len(shared)} shared PCIe uplink{'s' if len(shared) != 1 else ''} "
            f"({'; '.join('+'.join(f'gpu{i}' for i in g) for g in shared)})"
            if shared
            else "one PCIe link per GPU"
        )
        s = spec.sockets
        mem = sum(x.memory_gib for x in s)
        return (
            f"{n}x {self.preset.name}, {nv}, {pcie}, {len(s)} socket{'s' if len(s) != 1 else ''} "
            f"({', '.join(x.id for x in s)}; {_fmt(mem)} GiB host memory in all, "
            f"{_fmt(s[0].memory_gbps)} GB/s each)"
        )

    def write(self, path: Path | str) -> None:
        from zoplan.fileio import write_whole

        write_whole(Path(path), self.text)  # whole or not at all, through a link into the file it names


def build_topology(
    matrix: TopoMatrix,
    preset: GpuPreset,
    *,
    host_memory_gib: float | None,
    host_gbps: float | None = None,
    name: str = "imported",
    source: str = "nvidia-smi topo -m",
) -> ImportedTopology:
    """The topology of a parsed matrix with GPUs of ``preset``. ``host_memory_gib`` and
    ``host_gbps`` are per socket (NUMA node); ``host_gbps=None`` assumes DEFAULT_HOST_GBPS."""
    m = matrix
    n = m.gpus
    warnings: list[str] = []

    # ----- sockets
    numa_known = all(x is not None for x in m.numa_affinity)
    if numa_known:
        nodes = sorted(set(cast("tuple[int, ...]", m.numa_affinity)))  # numa_known: no entry is None
        socket_ids = [f"cpu{x}" for x in nodes]
        socket_of = [nodes.index(x) for x in cast("tuple[int, ...]", m.numa_affinity)]  # the same
        socket_note = "one socket per NUMA node of the 'NUMA Affinity' column (id cpu<node>)"
    else:
        socket_of, more = _infer_sockets(m)
        warnings += more
        socket_ids = [f"cpu{k}" for k in range(max(socket_of) + 1)]
        socket_note = (
            "'NUMA Affinity' is missing or N/A, so sockets were inferred: devices joined by "
            "PIX/PXB/PHB/NODE share a socket, groups separated by SYS do not"
        )
    n_sockets = len(socket_ids)
    if host_memory_gib is None:
        raise ZoplanError(
            f"host memory size is not in `nvidia-smi topo -m` output: pass --host-memory-gib, the "
            f"memory of each socket (NUMA node) in GiB; this machine has {n_sockets} "
            f"socket{'s' if n_sockets != 1 else ''} ({', '.join(socket_ids)})",
            fix=f"`numactl -H` lists each node's size; or take the total of `free -g` divided by {n_sockets}",
        )
    check_positive("--host-memory-gib", host_memory_gib)
    check_positive("--host-gbps", host_gbps)
    if host_gbps is None:
        warnings.append(
            f"--host-gbps not given: ASSUMED {DEFAULT_HOST_GBPS} GB/s of host memory "
            f"bandwidth per socket (8-channel DDR4-3200, the bundled dgx-a100 figure); "
            f"pass your machine's STREAM figure per socket"
        )
    gbps = DEFAULT_HOST_GBPS if host_gbps is None else host_gbps

    # ----- PCIe: switch groups
    uplinks, evidence = _gpu_groups(m, SAME_SWITCH)
    reason = {tuple(g): why for g, why in zip(uplinks, evidence)}
    switches: list[tuple[str, list[int], int]] = []  # (id, gpus, socket index)
    direct: list[int] = []
    for g in uplinks:
        if len(g) == 1:
            direct.append(g[0])
            continue
        homes = {socket_of[i] for i in g}
        if len(homes) > 1:
            warnings.append(
                f"{_gpu_list(g)} share a PCIe switch (PIX/PXB) but sit on different NUMA "
                f"nodes; the switch was put on {socket_ids[socket_of[g[0]]]}"
            )
        switches.append((f"pcie{len(switches)}", g, socket_of[g[0]]))
    hidden = _pcie_hidden(m)
    if hidden:
        warnings.append(
            f"NVLink hides whether {_gpu_list(hidden)} share a PCIe switch (NV# entries, "
            f"no NIC columns): {'each was' if len(hidden) > 1 else 'it was'} given its own "
            f"uplink (optimistic); edit the file if they share one"
        )

    # ----- NVLink
    nv_pairs = {(i, j): m.nvlinks(i, j) for i in range(n) for j in range(i + 1, n) if m.nvlinks(i, j)}
    for (i, j), k in nv_pairs.items():
        if not preset.has_nvlink:
            raise ZoplanError(
                f"line {m.row_lines[i]}: GPU{i}-GPU{j} is NV{k}, but --gpu {preset.name} has no NVLink",
                fix="check --gpu: the matrix is from GPUs with NVLink",
            )
        if k > preset.nvlink_links:
            raise ZoplanError(
                f"line {m.row_lines[i]}: GPU{i}-GPU{j} is NV{k}, but a {preset.name} has {preset.nvlink_links} NVLinks",
                fix="check --gpu",
            )
    ks = set(nv_pairs.values())
    all_pairs = n * (n - 1) // 2
    nvlink = "none"
    if nv_pairs:
        k = next(iter(ks))
        if len(nv_pairs) == all_pairs and len(ks) == 1 and (n - 1) * k > preset.nvlink_links:
            nvlink = "nvswitch"
            nv_note = (
                f"every GPU pair shows NV{k}, and {n - 1} peers x {k} links exceed the "
                f"{preset.nvlink_links} NVLinks one {preset.name} has: the links go to "
                f"NVSwitches, modelled as one non-blocking 'nvswitch' node, {k} links per GPU"
            )
        else:
            nvlink = "direct"
            nv_note = (
                "each GPU pair that shows NV# gets a direct GPU-GPU NVLink of # links (the "
                "pairs do not all show the same NV#, or one GPU has enough links for all of "
                "them, so no NVSwitch is implied)"
            )
            for i in range(n):
                total = sum(k for (a, b), k in nv_pairs.items() if i in (a, b))
                if total > preset.nvlink_links:
                    warnings.append(
                        f"gpu{i} shows {total} NVLinks in all, more than the "
                        f"{preset.nvlink_links} a {preset.name} has: modelled as direct "
                        f"links anyway; check --gpu"
                    )

    # ----- the spec as data
    gpu_ids = [f"gpu{i}" for i in range(n)]
    links: list[dict[str, Any]] = []
    pcie = {
        "kind": "pcie",
        "gbps": _fmt(preset.h2d_gbps),
        "gbps_back": _fmt(preset.d2h_gbps),
        "latency_us": PCIE_LATENCY_US,
    }
    for sid, g, home in switches:
        links.append({"a": socket_ids[home], "b": sid, **pcie})
    for sid, g, home in switches:
        for i in g:
            links.append({"a": sid, "b": gpu_ids[i], **pcie})
    for i in direct:
        links.append({"a": socket_ids[socket_of[i]], "b": gpu_ids[i], **pcie})
    n_pcie = len(links)
    if nvlink == "nvswitch":
        k = next(iter(ks))
        for i in range(n):
            links.append(
                {
                    "a": gpu_ids[i],
                    "b": "nvswitch",
                    "kind": "nvlink",
                    "gbps": _fmt(preset.nvlink_gbps(k)),
                    "latency_us": NVLINK_SWITCH_LATENCY_US,
                }
            )
    elif nvlink == "direct":
        for (i, j), k in sorted(nv_pairs.items()):
            links.append(
                {
                    "a": gpu_ids[i],
                    "b": gpu_ids[j],
                    "kind": "nvlink",
                    "gbps": _fmt(preset.nvlink_gbps(k)),
                    "latency_us": NVLINK_DIRECT_LATENCY_US,
                }
            )
    n_nvlink = len(links) - n_pcie
    for a in range(n_sockets):
        for b in range(a + 1, n_sockets):
            links.append(
                {
                    "a": socket_ids[a],
                    "b": socket_ids[b],
                    "kind": "socket",
                    "gbps": _fmt(SOCKET_LINK_GBPS),
                    "latency_us": SOCKET_LINK_LATENCY_US,
                }
            )

    sockets = [{"id": sid, "memory_gib": _fmt(host_memory_gib), "memory_gbps": _fmt(gbps)} for sid in socket_ids]
    switch_list = [{"id": sid, "kind": "pcie"} for sid, _, _ in switches]
    if nvlink == "nvswitch":
        switch_list.append({"id": "nvswitch", "kind": "nvswitch"})
    nv_desc = {
        "nvswitch": f"NVSwitch (NV{next(iter(ks)) if ks else 0})",
        "direct": "direct NVLink",
        "none": "no NVLink",
    }[nvlink]
    shared = (
        f"{len(switches)} switch uplink{'s' if len(switches) != 1 else ''} shared by "
        f"{'+'.join(str(len(g)) for _, g, _ in switches)} GPUs"
        if switches
        else "one link per GPU"
    )
    description = (
        f"Imported from nvidia-smi topo -m: {n}x {preset.title}, {nv_desc}, PCIe Gen"
        f"{preset.pcie_gen} ({shared}), {n_sockets} socket{'s' if n_sockets != 1 else ''}"
    )

    # ----- the text, with comments
    out: list[str] = []
    out += _comment(
        f"Imported by `zoplan topo import` from {source} (`nvidia-smi topo -m`, the {m.layout} layout, "
        f"{n} GPUs{', NICs ' + ', '.join(m.nics) if m.nics else ''}), GPU model {preset.title} "
        f"(--gpu {preset.name}; figures from zoplan/topology/presets.py)."
    )
    out.append("#")
    out += _comment("How the matrix was read:")
    per_socket = []
    for k, sid in enumerate(socket_ids):
        members = [i for i in range(n) if socket_of[i] == k]
        # the affinities given: a None is left out
        aff = sorted(cast("set[str]", {m.cpu_affinity[i] for i in members if m.cpu_affinity[i]}))
        per_socket.append(f"{sid}: {_gpu_list(members)}" + (f" (CPU affinity {', '.join(aff)})" if aff else ""))
    out += _comment(f"- sockets: {socket_note}. " + "; ".join(per_socket) + ".")
    sw_text = "; ".join(f"{sid} = {_gpu_list(g)} ({', '.join(reason[tuple(g)][:4])})" for sid, g, _ in switches)
    out += _comment(
        "- PCIe: GPUs whose entry is PIX or PXB, to each other or to the same NIC, share one "
        "switch and its one uplink to the socket"
        + (f": {sw_text}" if switches else " (none here)")
        + (
            f". {'Each of these GPUs has' if len(direct) > 1 else 'This GPU has'} its own "
            f"link to the socket (no PIX/PXB entry): {_gpu_list(direct)}."
            if direct
            else "."
        )
    )
    out += _comment(f"- NVLink: {nv_note}." if nvlink != "none" else "- NVLink: none (no NV# entries).")
    out.append("#")
    out += _comment("Not in the matrix, so given on the command line or assumed:")
    out += _comment(f"- host memory: {_fmt(host_memory_gib)} GiB per socket (--host-memory-gib).")
    out += _comment(
        f"- host memory bandwidth: {_fmt(gbps)} GB/s per socket "
        + (
            "(--host-gbps)."
            if host_gbps is not None
            else f"ASSUMED (--host-gbps not given): {DEFAULT_HOST_GBPS_SOURCE}. Replace it with "
            f"your machine's STREAM figure."
        )
    )
    out += _comment("- no price (price_per_hour_usd): add one to rank by $ per token.")
    out += _comment(
        "Units: GB/s = 1e9 bytes/s per direction. PCIe links are written host side first, "
        "so gbps = host-to-device and gbps_back = device-to-host. A calibration profile "
        "measured on the machine will replace these nominal figures (zoplan calibrate)."
    )
    out.append(
        yaml.safe_dump(
            {"version": 1, "name": name, "description": description}, sort_keys=False, width=10**6, allow_unicode=True
        ).rstrip()
    )
    out.append("gpu_models:")
    out.append(f"  {preset.name}:")
    model = preset.gpu_model()
    for key in ("memory_gib", "tflops", "hbm_gbps", "matmul_efficiency"):
        if key in preset.sources:
            out += _comment(preset.sources[key], indent=4)
        value = model[key]
        out.append(f"    {key}: {_flow(value)}")
    out.append("sockets:")
    out += _comment(
        f"{_fmt(host_memory_gib)} GiB (--host-memory-gib) and {_fmt(gbps)} GB/s "
        + ("(--host-gbps)" if host_gbps is not None else "(ASSUMED: --host-gbps not given)")
        + " per socket.",
        indent=2,
    )
    out += [f"  - {_flow(s)}" for s in sockets]
    if switch_list:
        out.append("switches:")
        for sw in switch_list:
            if sw["kind"] == "nvswitch":
                out += _comment(
                    "The NVSwitches act as one non-blocking crossbar; one node stands for all of them.", indent=2
                )
            out.append(f"  - {_flow(sw)}")
    else:
        out.append("switches: []")
    out.append("gpus:")
    out += [f"  - {_flow({'id': g, 'model': preset.name})}" for g in gpu_ids]
    out.append("links:")
    out += _comment(f"{preset.sources.get('pcie', f'PCIe Gen{preset.pcie_gen}')}. Latency: {LATENCY_SOURCE}.", indent=2)
    out += [f"  - {_flow(link)}" for link in links[:n_pcie]]
    if n_nvlink:
        out += _comment(
            f"{preset.sources.get('nvlink', '')}. NV# x {_fmt(preset.nvlink_gbps_per_link)} GB/s per link.", indent=2
        )
        out += [f"  - {_flow(link)}" for link in links[n_pcie : n_pcie + n_nvlink]]
    if n_sockets > 1:
        out += _comment(SOCKET_LINK_SOURCE + ".", indent=2)
        out += [f"  - {_flow(link)}" for link in links[n_pcie + n_nvlink :]]
    text = "\n".join(out) + "\n"

    data = load_yaml_text(text, source)
    spec = validate(TopologySpec, data, source, "imported topology")
    Machine(spec, source)  # every GPU reaches a socket
    return ImportedTopology(
        spec=spec,
        text=text,
        matrix=m,
        preset=preset,
        warnings=warnings,
        nvlink=nvlink,
        uplinks=[g for _, g, _ in switches] + [[i] for i in direct],
    )


def import_nvidia_smi(
    text: str,
    *,
    gpu: str,
    host_memory_gib: float | None,
    host_gbps: float | None = None,
    name: str = "imported",
    source: str = "nvidia-smi topo -m",
) -> ImportedTopology:
    """Parse the text of ``nvidia-smi topo -m`` and build a topology with GPUs of preset ``gpu``."""
    preset = get_preset(gpu)
    return build_topology(
        parse_topo_matrix(text), preset, host_memory_gib=host_memory_gib, host_gbps=host_gbps, name=name, source=source
    )


def import_topology_file(
    path: Path | str,
    *,
    gpu: str | None,
    host_memory_gib: float | None,
    host_gbps: float | None = None,
    name: str | None = None,
) -> ImportedTopology:
    """``import_nvidia_smi`` on a file (what ``zoplan topo import`` calls). Errors about the text
    start with the file name; ``name`` defaults to the file's stem."""
    path = Path(path)
    preset = get_preset(gpu)
    text = read_text(path, "nvidia-smi topo -m")
    try:
        matrix = parse_topo_matrix(text)
    except ZoplanError as exc:
        raise ZoplanError(
            f"{path}: {exc.message}",
            fix=exc.fix or "give the text `nvidia-smi topo -m` prints, e.g. nvidia-smi topo -m > topo.txt",
        ) from None
    try:
        return build_topology(
            matrix,
            preset,
            host_memory_gib=host_memory_gib,
            host_gbps=host_gbps,
            name=name or path.stem,
            source=path.name,
        )
    except ZoplanError as exc:
        if exc.message.startswith("line "):
            raise ZoplanError(f"{path}: {exc.message}", fix=exc.fix) from None
        raise
