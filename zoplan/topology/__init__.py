"""Machine topology: the versioned YAML format and its networkx graph.

A topology file describes ONE node (sockets with host memory, PCIe switches, GPUs, NVLink /
NVSwitch and the links between them) and optionally how many identical nodes there are and the
network between them. Every link is full duplex: ``gbps`` is the bandwidth from ``a`` to ``b``,
``gbps_back`` from ``b`` to ``a`` (default: the same). Bandwidths are GB/s = 1e9 bytes/s.

The simulator never reads YAML: it asks a :class:`Machine` for paths made of directed links.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypedDict

import networkx as nx
from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from zoplan.limits import MAX_ID_CHARS, MAX_NODES

from zoplan.errors import ZoplanError, did_you_mean
from zoplan.fileio import Strict, check_version, content_hash, read_yaml, validate
from zoplan.vocab import Meetings

if TYPE_CHECKING:
    from zoplan.profile import Profiled

TOPOLOGY_VERSIONS = (1,)
DTYPES = ("fp32", "tf32", "bf16", "fp16")


# Bandwidths and peaks are bounded far outside any machine: a hand-written 1e-300 GB/s of memory
# bandwidth planned, exit 0, a step of 300 digits. A rate between 1 MB/s and 1 PB/s (GB/s), a peak
# between 1 MFLOP/s and 1 EFLOP/s (TFLOP/s).
MAX_RATE_GBPS = 1e6  # 1 PB/s: far beyond any link or memory bus
Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]
Rate = Annotated[float, Field(ge=1e-3, le=MAX_RATE_GBPS)]
Peak = Annotated[float, Field(ge=1e-6, le=1e6)]


class GpuModel(Strict):
    """A compute device model. On a CPU-only machine the devices are CPU worker ranks
    (``kind: cpu``): their memory is a share of host memory, their figures are measured ones."""

    kind: Literal["gpu", "cpu"] = "gpu"
    memory_gib: PositiveFloat = Field(le=1e7)  # bounded: GiB * 2**30 must stay a finite float
    tflops: dict[Literal["fp32", "tf32", "bf16", "fp16"], Peak] = Field(
        description="dense peak TFLOP/s per dtype", min_length=1
    )
    hbm_gbps: Rate
    matmul_efficiency: float = Field(0.8, gt=0, le=1, description="achieved fraction of peak for large matrix products")
    matmul_half_tokens: float = Field(
        0.0,
        ge=0,
        le=1e6,
        description="the rows (tokens of a micro-batch) at which the device's matrix products run at half "
        "their rate: over M tokens they run at M / (M + this) of it (a CPU rank); 0: whatever the rows (a GPU preset)",
    )
    # The runtime's own work, beyond arithmetic and memory traffic (zoplan.sim.costs). 0 where it is
    # negligible or hidden: a GPU's kernel launches overlap its execution, and its fused kernels
    # draw z in registers. A CPU rank pays each of these on its one thread (bench/cpu_figures.py).
    threads_efficiency: float = Field(
        1.0,
        gt=0,
        le=1,
        description="a CPU rank running several threads (its socket's cores shared among fewer ranks): "
        "the share of one thread's matmul and memory rate each extra thread adds",
    )
    op_us: float = Field(
        0.0,
        ge=0,
        le=1e6,
        description="host time per tensor op of a forward pass (dispatch, the modules' Python, a kernel launch)",
    )
    cold_op_us: float = Field(
        0.0,
        ge=0,
        le=1e6,
        description="host time a tensor op or kernel call of a once-a-step stage (the embedding, the "
        "resident parameters' update and perturbation, head and loss) adds to op_us: its code and data "
        "come back cold from the caches after the blocks' passes",
    )
    z_ns: float = Field(
        0.0,
        ge=0,
        le=1e6,
        description="nanoseconds per element that drawing z adds to a fused pass (a CPU rank's C "
        "kernel, zoplan.runtime.perturb_cpu); 0: free next to the pass's memory traffic (a GPU)",
    )
    z_call_us: float = Field(0.0, ge=0, le=1e6, description="fixed cost of one call of the z kernel")
    cache_mib: float = Field(
        0.0,
        ge=0,
        le=1e6,
        description="a CPU rank's core's own cache (its L2): a product's output (a block's, or the head's "
        "logits) that fits it is written and read there, so it does not pay the writing out of outputs beyond "
        "the cache (zoplan.sim.costs SPILL_BYTES); 0: every product pays it",
    )
    z_cold_us: float = Field(
        0.0,
        ge=0,
        le=1e6,
        description="what the first z call of a step's operation (an update, a block's perturbation, "
        "the embedding's or the head's sets) adds to z_call_us: it comes right after other work "
        "(a block's forward), its code and data cold in the caches",
    )
    z_first_ns: float = Field(
        0.0,
        ge=0,
        le=1e6,
        description="accepted and ignored: a figure of the pure-torch z that files written before "
        "the fused CPU kernel carry",
    )
    collective_us: float = Field(
        0.0,
        ge=0,
        le=1e6,
        description="one collective call among this "
        "machine's ranks (an all-gather round, a barrier, the loss all-reduce)",
    )
    collective_gbps: float = Field(
        0.0,
        ge=0,
        le=1e6,
        description="bytes a collective brings each rank per second, where the ranks' collectives do not "
        "run on the topology's links (CPU ranks: gloo over the loopback); 0: on the links",
    )
    loop_us: float = Field(
        0.0, ge=0, le=1e7, description="the training loop's host work per step (next batch, journal line)"
    )
    lockstep: float = Field(
        1.0,
        ge=1,
        le=100,
        description="CPU ranks of one machine that compute side by side and meet before every block: "
        "how much slower each computes than one rank alone (shared caches, memory and clocks)",
    )
    lockstep_wait_us: float = Field(
        0.0,
        ge=0,
        le=1e6,
        description="CPU ranks that meet before every block: what each meeting costs beyond the "
        "collective call, waiting for the other ranks' noise",
    )
    meetings: Meetings = Field(
        Meetings.SHARED_MEMORY,
        description="CPU ranks of one machine: how they meet before a whole block and sum the loss, "
        "through shared memory (x86, only the wait: lockstep_wait_us) or collective calls (other CPUs, "
        "or runs with ZOPLAN_MEETINGS=gloo: collective_us and the wait)",
    )


class Socket(Strict):
    id: Id
    memory_gib: PositiveFloat = Field(le=1e9)
    memory_gbps: Rate = Field(description="host memory bandwidth of this socket")
    cores: PositiveInt | None = Field(
        None,
        le=100_000,
        description="cores the CPU ranks on this socket share (a rank runs cores / ranks threads); absent: one each",
    )


class Switch(Strict):
    id: Id
    kind: Literal["pcie", "nvswitch"]


class Gpu(Strict):
    id: Id
    model: str


class Link(Strict):
    a: str
    b: str
    kind: Literal["pcie", "nvlink", "socket", "memory"]
    gbps: Rate
    gbps_back: Rate | None = None
    latency_us: float = Field(1.0, ge=0, le=1e6)  # (a second: far above any link's)


class Network(Strict):
    gbps: Rate
    latency_us: float = Field(5.0, ge=0, le=1e6)
    step_cv: float = Field(
        0.0,
        ge=0,
        le=1,
        description="how much one node's step time varies from step to step (standard deviation / mean); "
        "the step waits for the slowest node. `zoplan validate` measures it on one node",
    )


class TopologySpec(Strict):
    version: int
    name: str
    description: str = ""
    price_per_hour_usd: PositiveFloat | None = Field(None, le=1e7, description="price of all nodes together")
    nodes: int = Field(1, ge=1, le=MAX_NODES, strict=True)  # (strict: YAML's true is no count)
    network: Network | None = None
    gpu_models: dict[str, GpuModel]
    sockets: list[Socket] = Field(min_length=1)
    switches: list[Switch] = []
    gpus: list[Gpu] = []
    links: list[Link] = []

    @model_validator(mode="after")
    def _check_references(self) -> TopologySpec:
        parts: tuple[Socket | Switch | Gpu, ...] = (*self.sockets, *self.switches, *self.gpus)
        ids = [x.id for x in parts]
        seen: set[str] = set()
        for i in ids:
            if i in seen:
                raise ValueError(f"id '{i}' is used twice (sockets, switches and gpus share one namespace)")
            seen.add(i)
        for n, gpu in enumerate(self.gpus):
            if gpu.model not in self.gpu_models:
                raise ValueError(
                    f"gpus.{n}.model '{gpu.model}' is not in gpu_models "
                    f"({', '.join(sorted(self.gpu_models)) or 'none defined'})"
                )
        role = {s.id: "socket" for s in self.sockets}
        role.update({w.id: w.kind for w in self.switches})
        role.update({g.id: "gpu" for g in self.gpus})
        joined: dict[frozenset[str], int] = {}
        for n, link in enumerate(self.links):
            for end in (link.a, link.b):
                if end not in seen:
                    raise ValueError(f"links.{n} names '{end}', which is no socket, switch or gpu")
            if link.a == link.b:
                raise ValueError(f"links.{n} connects '{link.a}' to itself")
            # The graph keeps one edge per pair, so a second link between the same two ids would
            # silently replace the first (and its bandwidth) instead of adding to it.
            pair = frozenset((link.a, link.b))
            if pair in joined:
                raise ValueError(
                    f"links.{n} joins '{link.a}' and '{link.b}', already joined by "
                    f"links.{joined[pair]} (one full-duplex link per pair: "
                    f"give its two directions as gbps and gbps_back)"
                )
            joined[pair] = n
            # Host paths follow 'pcie' and 'socket' links and peer routes prefer 'nvlink': a kind on
            # the wrong ends would send host traffic through NVLink or between sockets over PCIe.
            ends = {role[link.a], role[link.b]}
            if link.kind == "socket" and ends != {"socket"}:
                raise ValueError(
                    f"links.{n}.kind 'socket' must join two sockets, not "
                    f"'{link.a}' ({role[link.a]}) and '{link.b}' ({role[link.b]})"
                )
            if link.kind == "nvlink" and not ends <= {"gpu", "nvswitch"}:
                raise ValueError(
                    f"links.{n}.kind 'nvlink' must join gpus or an nvswitch, not "
                    f"'{link.a}' ({role[link.a]}) and '{link.b}' ({role[link.b]})"
                )
            if link.kind == "memory" and ends != {"socket", "gpu"}:
                raise ValueError(
                    f"links.{n}.kind 'memory' joins a socket and a CPU rank, not "
                    f"'{link.a}' ({role[link.a]}) and '{link.b}' ({role[link.b]})"
                )
            if link.kind == "pcie" and ("nvswitch" in ends or ends == {"socket"}):
                raise ValueError(
                    f"links.{n}.kind 'pcie' cannot join '{link.a}' ({role[link.a]}) and "
                    f"'{link.b}' ({role[link.b]}): use 'nvlink' for an nvswitch, "
                    f"'socket' between sockets"
                )
        if self.nodes > 1 and self.network is None:
            raise ValueError(
                "nodes > 1 needs a 'network' between the nodes: {gbps: ..., latency_us: ...} (5 µs when left out)"
            )
        return self


class _EdgeData(TypedDict):
    """The attributes of an edge of ``Machine.graph`` (one full-duplex link)."""

    kind: str
    gbps: float
    gbps_back: float
    latency_s: float


@dataclass(frozen=True)
class DirectedLink:
    """One direction of a full-duplex link: the unit of bandwidth the simulator shares."""

    id: str  # "a->b"
    kind: str
    gbps: float
    latency_s: float


class Machine:
    """A validated topology plus the graph queries the simulator needs."""

    def __init__(self, spec: TopologySpec, source: str) -> None:
        self.spec = spec
        self.source = source
        # with a calibration profile applied (zoplan.profile.apply_profile): the measured figures
        # replace nominal ones in ``spec``, ``identity`` keeps the described machine's hash
        self.profile: Profiled | None = None
        self.identity: str | None = None
        self.node_identity: str | None = None
        self.graph = nx.Graph()
        for s in spec.sockets:
            self.graph.add_node(s.id, role="socket")
        for w in spec.switches:
            self.graph.add_node(w.id, role=w.kind)
        for g in spec.gpus:
            self.graph.add_node(g.id, role="gpu")
        self.directed: dict[str, DirectedLink] = {}
        for link in spec.links:
            self.graph.add_edge(
                link.a,
                link.b,
                kind=link.kind,
                gbps=link.gbps,
                gbps_back=link.gbps_back or link.gbps,
                latency_s=link.latency_us * 1e-6,
            )
            lat = link.latency_us * 1e-6
            self.directed[f"{link.a}->{link.b}"] = DirectedLink(f"{link.a}->{link.b}", link.kind, link.gbps, lat)
            self.directed[f"{link.b}->{link.a}"] = DirectedLink(
                f"{link.b}->{link.a}", link.kind, link.gbps_back or link.gbps, lat
            )
        self._check_host_paths()

    # ----- identity -----------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name

    def _dumped(self) -> dict[str, Any]:
        spec = self.spec.model_dump(mode="json")
        for model in spec["gpu_models"].values():  # a file that does not say keeps its hash of before
            if model["meetings"] == Meetings.SHARED_MEMORY:
                del model["meetings"]
        return spec

    @cached_property
    def spec_hash(self) -> str:
        return content_hash(self._dumped())

    @property
    def hash(self) -> str:
        return self.identity or self.spec_hash

    @cached_property
    def node_spec_hash(self) -> str:
        """The digest of one of its nodes: its devices, links and figures, without its name and
        free-text description, the node count, the network between the nodes and the price of them
        all. A calibration measures one node: its profile serves every machine of such nodes (a
        cluster's file and one node's alike)."""
        spec = self._dumped()
        for key in ("name", "description", "nodes", "network", "price_per_hour_usd"):
            spec.pop(key, None)
        return content_hash(spec)

    @property
    def node_hash(self) -> str:
        return self.node_identity or self.node_spec_hash

    @property
    def gpus(self) -> list[str]:
        return [g.id for g in self.spec.gpus]

    @cached_property
    def _model_names(self) -> dict[str, str]:
        """Each GPU's model name (the search asks a hundred thousand times; ``spec`` is never
        changed in place: a profile makes a new Machine)."""
        return {g.id: g.model for g in self.spec.gpus}

    def gpu_model(self, gpu: str) -> GpuModel:
        return self.spec.gpu_models[self._model_names[gpu]]

    def gpu_model_name(self, gpu: str) -> str:
        return self._model_names[gpu]

    @property
    def cpu_ranks_only(self) -> bool:
        """True when every device is a CPU rank (cpu-local, `zoplan topo detect` without a GPU)."""
        return bool(self.spec.gpus) and all(self.gpu_model(g).kind == "cpu" for g in self.gpus)

    @property
    def host_memory_bytes(self) -> float:
        return sum(s.memory_gib for s in self.spec.sockets) * 2**30

    def socket_memory_gbps(self, socket: str) -> float:
        return next(s.memory_gbps for s in self.spec.sockets if s.id == socket)

    def socket_cores(self, socket: str) -> int | None:
        return next(s.cores for s in self.spec.sockets if s.id == socket)

    # ----- paths ----------------------------------------------------------------------------
    def _pcie_graph(self) -> nx.Graph:
        return self.graph.edge_subgraph(
            [(u, v) for u, v, k in self.graph.edges(data="kind") if k in ("pcie", "socket", "memory")]
        )

    def _check_host_paths(self) -> None:
        for n, gpu in enumerate(self.gpus):
            if gpu not in self._host_routes:
                raise ZoplanError(
                    f"{self.source}: gpus.{n} ('{gpu}') has no PCIe path to any socket's host memory",
                    fix=f"add a 'pcie' link from '{gpu}' to a switch or socket",
                )

    @cached_property
    def _host_routes(self) -> dict[str, list[str]]:
        """For each GPU, the node path from its nearest socket (fewest hops, then file order),
        never through another GPU (a device is an end of PCIe, not a switch)."""
        whole = self._pcie_graph()
        others = set(self.gpus)
        routes: dict[str, list[str]] = {}
        for gpu in self.gpus:
            if gpu not in whole:
                continue
            pcie = whole.subgraph([n for n in whole if n == gpu or n not in others])
            best: list[str] | None = None
            for socket in (s.id for s in self.spec.sockets):
                if socket in pcie and nx.has_path(pcie, socket, gpu):
                    # the fewest hops; among those, by the names it goes through (not the file's order)
                    path = min(nx.all_shortest_paths(pcie, socket, gpu))
                    if best is None or len(path) < len(best):
                        best = path
            if best is not None:
                routes[gpu] = best
        return routes

    def host_socket(self, gpu: str) -> str:
        return self._host_routes[gpu][0]

    def host_path(self, gpu: str, direction: Literal["h2d", "d2h"] = "h2d") -> list[str]:
        """Directed link ids between the GPU's nearest socket and the GPU."""
        nodes = self._host_routes[gpu]
        if direction == "d2h":
            nodes = nodes[::-1]
        return [f"{u}->{v}" for u, v in zip(nodes, nodes[1:])]

    def uplink_group(self, gpu: str) -> str:
        """The first link below the socket on the GPU's host path: GPUs that share it share
        host bandwidth (two A100s per PCIe switch uplink on a DGX A100)."""
        return self.host_path(gpu)[0] if len(self._host_routes[gpu]) > 1 else gpu

    def peer_path(self, src: str, dst: str) -> list[str]:
        """Directed link ids of the fastest route between two GPUs (NVLink when there is one)."""
        key = (src, dst)
        if key not in self._peer_cache:

            def weight(u: str, v: str, d: _EdgeData) -> float:
                return 1.0 / d["gbps"]

            try:
                # among equally fast routes, the one of least latency, then fewest hops, then by the
                # names it goes through: never the file's order of links
                nodes = min(
                    nx.all_shortest_paths(self.graph, src, dst, weight=weight),
                    key=lambda route: (self._route_latency(route), len(route), route),
                )
            except nx.NetworkXNoPath:
                raise ZoplanError(f"{self.source}: no path between {src} and {dst}") from None
            self._peer_cache[key] = [f"{u}->{v}" for u, v in zip(nodes, nodes[1:])]
        return self._peer_cache[key]

    def _route_latency(self, nodes: list[str]) -> float:
        return self.path_latency_s([f"{u}->{v}" for u, v in zip(nodes, nodes[1:])])

    @cached_property
    def _peer_cache(self) -> dict[tuple[str, str], list[str]]:
        return {}

    @cached_property
    def _nvlink_graph(self) -> nx.Graph:
        return self.graph.edge_subgraph([(u, v) for u, v, k in self.graph.edges(data="kind") if k == "nvlink"])

    def has_nvlink(self, gpus: list[str] | tuple[str, ...]) -> bool:
        """True when every pair among ``gpus`` is joined by NVLink-only routes."""
        nv = self._nvlink_graph
        return all(g in nv for g in gpus) and all(nx.has_path(nv, gpus[0], g) for g in gpus[1:])

    @cached_property
    def _nvlink_islands(self) -> dict[str, tuple[str, ...]]:
        nv = self._nvlink_graph
        islands: dict[str, tuple[str, ...]] = {}
        for g in self.gpus:
            reach = nx.node_connected_component(nv, g) if g in nv else {g}
            islands[g] = tuple(x for x in self.gpus if x in reach)
        return islands

    @cached_property
    def _standing(self) -> dict[str, int]:
        """Each GPU's place in an order that only the machine decides, never its file's order of
        GPUs or links: GPUs the same to the last link (interchangeable) share one. Colour
        refinement: a node's colour is what it is, then, round after round, that with the
        colours of its neighbours and the links to them, until no round tells more apart."""
        g = self.graph
        sockets = {s.id: (s.memory_gib, s.memory_gbps) for s in self.spec.sockets}

        def own(n: str) -> tuple[object, ...]:
            role = g.nodes[n]["role"]
            if role == "gpu":
                return (role, self.gpu_model_name(n))
            return (role, *sockets.get(n, ()))

        def ranked(sig: dict[str, Any]) -> dict[str, int]:
            order = {v: i for i, v in enumerate(sorted(set(sig.values())))}
            return {n: order[v] for n, v in sig.items()}

        colour = ranked({n: own(n) for n in g.nodes})
        for _ in range(len(colour)):
            seen = {
                n: (
                    colour[n],
                    tuple(
                        sorted(
                            (
                                g.edges[n, m]["kind"],
                                self.directed[f"{n}->{m}"].gbps,
                                self.directed[f"{m}->{n}"].gbps,
                                g.edges[n, m]["latency_s"],
                                colour[m],
                            )
                            for m in g.neighbors(n)
                        )
                    ),
                )
                for n in g.nodes
            }
            finer = ranked(seen)
            if len(set(finer.values())) == len(set(colour.values())):
                break
            colour = finer
        return {gpu: colour[gpu] for gpu in self.gpus}

    def standing(self, gpu: str) -> int:
        """``gpu``'s place in the machine's own order (``_standing``): a tie-break that does not
        depend on how the file lists its GPUs and links."""
        return self._standing[gpu]

    def nvlink_island(self, gpu: str) -> tuple[str, ...]:
        """The GPUs ``gpu`` reaches over NVLink alone (through NVSwitches too), itself included,
        in file order: just itself without NVLink."""
        return self._nvlink_islands[gpu]

    def nvlink_gbps(self, gpu: str) -> float:
        """The NVLink bandwidth ``gpu`` has to others, all its links together (0 without NVLink)."""
        return float(sum(d["gbps"] for _, _, d in self.graph.edges(gpu, data=True) if d["kind"] == "nvlink"))

    def path_latency_s(self, path: list[str]) -> float:
        return sum(self.directed[l].latency_s for l in path)

    def path_gbps(self, path: list[str]) -> float:
        return min(self.directed[l].gbps for l in path)

    @staticmethod
    def shared_links(path_a: list[str], path_b: list[str]) -> list[str]:
        """Directed links two transfers both cross (they divide those links' bandwidth)."""
        b = set(path_b)
        return [l for l in path_a if l in b]


def bundled_names() -> list[str]:
    root = resources.files("zoplan.topologies")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def resolve_topology_path(name_or_path: str | Path) -> Path:
    if not str(name_or_path).strip():  # Path("") is the current directory: not what was meant
        raise ZoplanError(
            "the topology name is empty", fix="name a bundled topology (zoplan topo list) or a topology file"
        )
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        return candidate
    names = bundled_names()
    if str(name_or_path) not in names:
        raise ZoplanError(
            f"unknown topology '{name_or_path}'" + did_you_mean(str(name_or_path), names),
            fix=f"use a bundled one ({', '.join(names)}) or a path to a YAML file",
        )
    return Path(str(resources.files("zoplan.topologies") / f"{name_or_path}.yaml"))


def load_topology(name_or_path: str | Path) -> Machine:
    """Load a bundled topology by name or a topology file by path."""
    path = resolve_topology_path(name_or_path)
    data = read_yaml(path, "topology")
    check_version(data, path, "topology", TOPOLOGY_VERSIONS)
    spec = validate(TopologySpec, data, path, "topology")
    # a bundled machine is named by its name (messages and plans stay readable and portable);
    # a file by its absolute path, so a plan still finds it from another directory
    bundled = path != Path(name_or_path)
    return Machine(spec, str(name_or_path) if bundled else str(path.resolve()))
