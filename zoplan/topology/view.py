"""Human-readable views of a topology: a rich tree for ``topo show`` and a table for ``topo list``.

Only presentation lives here; every number comes from :class:`~zoplan.topology.Machine`, so what
the user reads is exactly what the simulator uses (including the per-direction PCIe figures and the
NVLink bus bandwidth that stands in for the line rate).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from zoplan.topology import Machine, load_topology


# ----- number formatting ------------------------------------------------------------------------
def _num(x: float) -> str:
    """Compact number: 25 not 25.0, 204.8 stays 204.8 (YAML figures are rarely beyond 2 decimals)."""
    return f"{x:.2f}".rstrip("0").rstrip(".")


def _gib(gib: float) -> str:
    return f"{_num(gib / 1024)} TiB" if gib >= 1024 else f"{_num(gib)} GiB"


def _rate(out_gbps: float, back_gbps: float) -> str:
    """One figure for a symmetric link, 'out / back' when the two directions differ."""
    if out_gbps == back_gbps:
        return f"{_num(out_gbps)} GB/s"
    return f"{_num(out_gbps)} / {_num(back_gbps)} GB/s"


def _price(usd: float | None) -> str:
    return "—" if usd is None else f"${usd:,.2f}/h"


# ----- tree -------------------------------------------------------------------------------------
def _link_label(machine: Machine, parent: str, child: str) -> str:
    """Bandwidth of the link above ``child``. Links are stored host side first by convention, but a
    file may list them either way round, so read the two directed halves from the parent's side."""
    down = machine.directed[f"{parent}->{child}"].gbps
    up = machine.directed[f"{child}->{parent}"].gbps
    return f"H2D {_num(down)} / D2H {_num(up)} GB/s"


def _gpu_label(machine: Machine, gpu: str) -> str:
    model = machine.gpu_model(gpu)
    bf16 = model.tflops.get("bf16")
    compute = f"{_num(bf16)} TFLOP/s bf16" if bf16 is not None else "no bf16 figure"
    # "memory" rather than "HBM": L40S and RTX 4090 carry GDDR, the field is the same.
    return (
        f"[bold green]{escape(gpu)}[/] {escape(machine.gpu_model_name(gpu))} · "
        f"{_gib(model.memory_gib)} at {_num(model.hbm_gbps)} GB/s · {compute}"
    )


def _pcie_children(machine: Machine) -> dict[str, list[str]]:
    """PCIe neighbours of every node, in file order, so the tree reads like the YAML."""
    children: dict[str, list[str]] = {}
    for link in machine.spec.links:
        if link.kind in ("pcie", "memory"):
            children.setdefault(link.a, []).append(link.b)
            children.setdefault(link.b, []).append(link.a)
    return children


def _add_pcie_subtree(
    node: Tree, machine: Machine, parent: str, children: dict[str, list[str]], seen: set[str]
) -> None:
    roles = dict(machine.graph.nodes(data="role"))
    for child in children.get(parent, []):
        if child in seen or roles[child] == "socket":
            continue
        seen.add(child)
        above = _link_label(machine, parent, child)
        if roles[child] == "gpu" and machine.gpu_model(child).kind == "cpu":
            node.add(f"{_gpu_label(machine, child)} · CPU rank, copies {above}")
        elif roles[child] == "gpu":
            node.add(f"{_gpu_label(machine, child)} · link {above}")
        else:
            sub = node.add(f"[cyan]{escape(child)}[/] (PCIe switch) · uplink {above}")
            _add_pcie_subtree(sub, machine, child, children, seen)


def render_topology(machine: Machine) -> Tree:
    """A tree of one node: sockets, their PCIe switches and GPUs, NVLink, inter-socket links."""
    spec = machine.spec
    title = f"[bold]{escape(machine.name)}[/]"
    if spec.description:
        title += f" — {escape(spec.description)}"
    root = Tree(title)
    nodes = f"{spec.nodes} node" + ("s" if spec.nodes > 1 else "")
    if spec.nodes > 1 and spec.network is not None:
        nodes += f" · network {_num(spec.network.gbps)} GB/s, {_num(spec.network.latency_us)} µs"
        nodes += f", a node's step varying by {spec.network.step_cv:.1%}" if spec.network.step_cv else ""
    root.add(
        f"{nodes} · price {_price(spec.price_per_hour_usd)} · "
        f"host memory {_gib(sum(s.memory_gib for s in spec.sockets))} per node"
    )

    children = _pcie_children(machine)
    seen: set[str] = set()
    for socket in spec.sockets:
        sub = root.add(
            f"[bold magenta]{escape(socket.id)}[/] (socket) · "
            f"{_gib(socket.memory_gib)} host memory · {_num(socket.memory_gbps)} GB/s"
        )
        _add_pcie_subtree(sub, machine, socket.id, children, seen)
    # Validation guarantees every GPU a PCIe path to a socket; this only catches a future change.
    orphans = [g for g in machine.gpus if g not in seen]
    if orphans:
        sub = root.add("[red]GPUs without a PCIe path shown above[/]")
        for gpu in orphans:
            sub.add(_gpu_label(machine, gpu))

    nvlinks = [link for link in spec.links if link.kind == "nvlink"]
    if nvlinks:
        nv = root.add("[bold]NVLink[/]")
        kinds = {w.id: w.kind for w in spec.switches}
        for switch in (w.id for w in spec.switches if w.kind == "nvswitch"):
            rates: dict[str, str] = {}
            for link in nvlinks:
                if switch in (link.a, link.b):
                    gpu = link.b if link.a == switch else link.a
                    rates[gpu] = _rate(
                        machine.directed[f"{gpu}->{switch}"].gbps, machine.directed[f"{switch}->{gpu}"].gbps
                    )
            label = f"[cyan]{escape(switch)}[/] (NVSwitch)"
            if len(set(rates.values())) == 1:
                # The usual case (every GPU on the crossbar at the same rate): one line, not eight.
                nv.add(f"{label} · {', '.join(map(escape, rates))} · {next(iter(rates.values()))} each")
            else:
                sw = nv.add(label)
                for gpu, rate in rates.items():
                    sw.add(f"{escape(gpu)} ↔ {escape(switch)} · {rate}")
        for link in nvlinks:
            if kinds.get(link.a) != "nvswitch" and kinds.get(link.b) != "nvswitch":
                nv.add(
                    f"{escape(link.a)} ↔ {escape(link.b)} (direct) · {_rate(link.gbps, link.gbps_back or link.gbps)}"
                )
    elif machine.cpu_ranks_only:
        root.add("CPU ranks exchange through host memory (gloo)")
    elif len(machine.gpus) > 1:
        root.add("NVLink: none (GPU-to-GPU traffic crosses PCIe)")

    socket_links = [link for link in spec.links if link.kind == "socket"]
    if socket_links:
        inter = root.add("[bold]Inter-socket links[/]")
        for link in socket_links:
            back = link.gbps_back or link.gbps
            inter.add(
                f"{escape(link.a)} ↔ {escape(link.b)} · {_num(link.gbps)} / {_num(back)} GB/s · "
                f"{_num(link.latency_us)} µs"
            )
    return root


# ----- list table -------------------------------------------------------------------------------
@dataclass(frozen=True)
class TopologyRow:
    """One line of ``topo list``; plain strings so tests and other front ends can use it too."""

    name: str
    gpus: str
    nvlink: str
    host_memory: str
    price: str


def _gpu_summary(machine: Machine) -> str:
    counts = Counter(machine.gpu_model_name(g) for g in machine.gpus)  # insertion = file order
    if not counts:
        return "none (CPU only)"
    if machine.cpu_ranks_only:
        return f"none: {len(machine.gpus)} CPU ranks"
    per_node = ", ".join(f"{n}× {model}" for model, n in counts.items())
    return per_node if machine.spec.nodes == 1 else f"{machine.spec.nodes} nodes × ({per_node})"


def _nvlink_summary(machine: Machine) -> str:
    """'yes' when NVLink joins every GPU, 'partial' when only some (e.g. bridged pairs)."""
    if not any(link.kind == "nvlink" for link in machine.spec.links):
        return "no"
    return "yes" if len(machine.gpus) > 1 and machine.has_nvlink(machine.gpus) else "partial"


def topology_row(machine: Machine) -> TopologyRow:
    return TopologyRow(
        name=machine.name,
        gpus=_gpu_summary(machine),
        nvlink=_nvlink_summary(machine),
        host_memory=_gib(sum(s.memory_gib for s in machine.spec.sockets)),
        price=_price(machine.spec.price_per_hour_usd),
    )


def topology_rows(machines: list[Machine]) -> list[TopologyRow]:
    return [topology_row(m) for m in machines]


def topology_table(names: list[str]) -> Table:
    """The ``topo list`` table for bundled names or paths (loading raises ZoplanError on bad input)."""
    table = Table(title="Topologies")
    table.add_column("Name", style="bold")
    table.add_column("GPUs")
    table.add_column("NVLink")
    table.add_column("Host memory", justify="right")
    table.add_column("Price", justify="right")
    for row in topology_rows([load_topology(n) for n in names]):
        table.add_row(escape(row.name), escape(row.gpus), row.nvlink, row.host_memory, row.price)
    return table
