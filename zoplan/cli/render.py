"""Rich renderings of planner results for the terminal (no logic: numbers come from planner)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from zoplan.errors import ZoplanError
from zoplan.models import preset_table_rows
from zoplan.planner import CandidateSummary, PlanReport, candidate_summary
from zoplan.limits import MAX_RANKS
from zoplan.sim.costs import StepCosts, Workload, rated_dtype
from zoplan.search import Candidate, node_counts, rented_per_hour
from zoplan.topology import Machine

if TYPE_CHECKING:
    from zoplan.profile import Profile
    from zoplan.validate import Validation

GiB = 2**30


def _fmt_time(seconds: float) -> str:
    if seconds < 1e-3:  # a tiny model on a large machine: 0.0 ms would say nothing
        return f"{seconds * 1e6:.1f} µs"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.3f} s"


def _fmt_rate(tokens_per_s: float) -> str:
    if tokens_per_s >= 1e6:
        return f"{tokens_per_s / 1e6:.1f}M"
    return f"{tokens_per_s / 1e3:.1f}k" if tokens_per_s >= 1e3 else f"{tokens_per_s:.0f}"


def _fmt_usd(usd: float | None) -> str:
    if usd is None:
        return "–"
    if usd >= 0.095:
        return f"{usd:.2f}"
    # two significant digits below a dime, so that cheap layouts still rank apart; not 0.00: not
    # free; kept when the second is a 0 (0.0102 read "0.01" beside "0.024")
    return f"{usd:#.2g}" if usd >= 0.0001 else "<0.0001"


def _fmt_gib(nbytes: float) -> str:
    gib = nbytes / GiB
    # (a small model's host copy, 0.047 GiB, read 0.0)
    return f"{gib:.2f}" if gib < 1 else f"{gib:.1f}" if gib < 100 else f"{gib:.0f}"


def _device_header(header: str, machine: Machine) -> str:
    """A column's header as this machine's devices are called (CPU ranks: no GPU)."""
    return header.replace("GPU GiB", "rank GiB") if machine.cpu_ranks_only else header


def _compare_header(header: str, machines: list[Machine]) -> str:
    """A compare column's header as the machines' devices are called: GPUs, CPU ranks (a machine
    of CPU ranks has no GPU), or devices where the table holds both."""
    if header not in ("GPUs", "GPU GiB") or not machines:
        return header
    cpu = {m.cpu_ranks_only for m in machines}
    word = "GPU" if cpu == {False} else "rank" if cpu == {True} else "device"
    return f"{word}s" if header == "GPUs" else f"{word} GiB"


def _movers(summary: CandidateSummary) -> str:
    if summary["upload"] == "whole":
        return "each its own"
    relays = len(summary["movers"]) - len(summary["compute_gpus"])
    how = "uneven" if summary["shares"] else "sliced"  # (uneven shares: the footer gives them)
    return f"{len(summary['movers'])}, {how}" + (f" ({relays} relay)" if relays else "")


# The plan table's columns: (header, justify, shown by default). The default ones fit an
# 80-column terminal; --wide shows every one.
PLAN_COLUMNS: list[tuple[str, str, bool]] = [
    ("#", "right", True),
    ("p×d", "left", True),
    ("moved by", "left", True),
    ("slices", "right", False),
    ("wire", "left", False),
    ("µb", "right", False),
    ("pf", "right", False),
    ("res", "right", False),
    ("step", "right", True),
    ("tok/s", "right", True),
    ("GPU GiB", "right", False),
    ("host GiB", "right", False),
    ("bottleneck", "left", True),
    ("bound", "right", False),
    ("$/Mtok", "right", True),
    ("vs ZO2", "right", True),
]


# Below 80 columns the default columns leave in this order (the least needed first: tokens per
# second say again what the step says, for the price a renter looks), so a table never folds a
# figure onto several lines; --wide keeps every one at any width. Price columns with no price in
# them (no machine priced) are left out at any width but with --wide.
PLAN_DROPPED = ("tok/s", "$/Mtok", "moved by", "vs ZO2")
COMPARE_DROPPED = ("tok/s", "$/h", "GPUs", "vs ZO2")


def _narrowed(make: Callable[[set[str]], Table], order: tuple[str, ...], width: int | None) -> Table:
    """``make(hidden)``'s table with the fewest of ``order``'s columns hidden that lets it fit
    ``width`` (None, as with --wide: every column)."""
    hidden: set[str] = set()
    table = make(hidden)
    if width is None:
        return table
    console = Console(width=10_000)  # room to measure the table's natural width
    for header in order:
        if console.measure(table).maximum <= width:
            break
        hidden.add(header)
        table = make(hidden)
    return table


class _Plain(Table):
    """A table whose title and text cells are shown as written: names come from users' files
    (a topology named "[link=http://...]click[/link]" became a link in the plan's header), so no
    string of it is read as rich markup."""

    def __init__(self, *args: Any, title: str | Text | None = None, **kwargs: Any) -> None:
        super().__init__(*args, title=Text(title) if isinstance(title, str) else title, **kwargs)

    def add_row(self, *cells: Any, **kwargs: Any) -> None:
        super().add_row(*(Text(c) if isinstance(c, str) else c for c in cells), **kwargs)


def _table(title: str, columns: list[tuple[str, str]], wide: bool) -> Table:
    """A table of (header, justify) columns: framed with --wide, else without column rules, to fit
    80 columns. A long bottleneck name folds onto a second line rather than losing its end."""
    table = _Plain(
        title=title,
        title_justify="left",
        header_style="bold",
        box=box.HEAVY_HEAD if wide else box.SIMPLE_HEAD,
        pad_edge=wide,
        collapse_padding=not wide,
    )
    for col, justify in columns:
        bottleneck = col == "bottleneck"
        table.add_column(col, justify=justify, no_wrap=not bottleneck, overflow="fold" if bottleneck else "ellipsis")  # type: ignore[arg-type]
    return table


def _row(summary: CandidateSummary, label: str, speedup: float | None) -> list[str]:
    cost = summary["usd_per_mtok"]
    return [
        label,
        f"{summary['perturbation']}×{summary['data']}" + (f"×{summary['nodes']}n" if summary["nodes"] > 1 else ""),
        _movers(summary),
        str(summary["slices_per_block"]),
        summary["wire_dtype"],
        str(summary["micro_batch"]),
        str(summary["prefetch"]),
        str(summary["resident_blocks"]),
        _fmt_time(summary["step_time_s"]),
        _fmt_rate(summary["tokens_per_s"]),
        _fmt_gib(summary["gpu_memory_bytes"]),
        _fmt_gib(summary["host_memory_bytes"]),
        summary["bottleneck"] or "",
        f"{summary['bound_fraction'] * 100:.0f}%",
        _fmt_usd(cost),
        f"{speedup:.2f}×" if speedup else "–",
    ]


def plan_table(report: PlanReport, wide: bool = False, width: int | None = None) -> Table:
    """The best layouts and the ZO2 baseline; the columns that fit 80 columns, or with ``wide``
    every one (slices, wire dtype, micro-batch, prefetch, resident blocks, memory, bound). With a
    ``width`` under 80, the default columns that do not fit are left out (PLAN_DROPPED)."""
    return _narrowed(lambda hidden: _plan_table(report, wide, hidden), PLAN_DROPPED, None if wide else width)


def _plan_table(report: PlanReport, wide: bool, hidden: set[str]) -> Table:
    s = report.search
    w = s.workload
    title = (
        f"{report.shape.name} on {report.machine.name}: global batch {w.global_batch} × "
        f"{w.seq_len} tokens, objective {s.objective}"
        + ("" if not w.tuning.frozen_base else f", {w.tuning.describe()} on read-only blocks")
    )
    base = s.baseline
    if all(report.summary(c)["usd_per_mtok"] is None for c in [*report.shown, *([base] if base else [])]):
        hidden = hidden | {"$/Mtok"}  # no price: a column of dashes
    shown = [i for i, (name, _, default) in enumerate(PLAN_COLUMNS) if wide or (default and name not in hidden)]
    # a machine of CPU ranks has no GPU: its ranks' memory, which is host memory too
    headers = [_device_header(PLAN_COLUMNS[i][0], report.machine) for i in shown]
    table = _table(title, [(h, PLAN_COLUMNS[i][1]) for h, i in zip(headers, shown)], wide)
    for n, cand in enumerate(report.shown, 1):
        speed = base.step_time_s / cand.step_time_s if base else None
        row = _row(report.summary(cand), str(n), speed)
        table.add_row(*(row[i] for i in shown), style="bold green" if n == 1 else None)
    if base:
        row = _row(report.summary(base), "ZO2", 1.0)
        table.add_row(*(row[i] for i in shown), style="dim")
    return table


def sensitivity_line(step_s: float, slower: dict[str, float]) -> str:
    """zoplan.planner.sensitivity's step times, as the step's change."""
    from zoplan.planner import SLOWER

    # a change under half a percent reads +0% (a step a hair shorter with slower figures, as
    # fair sharing can make it, read "-0%")
    moved = {k: f"{v / step_s - 1:+.0%}".replace("-0%", "+0%") for k, v in slower.items()}
    return (
        f"sensitivity: compute {SLOWER - 1:.0%} slower (host work included) → step {moved['compute']}; "
        f"transfers {SLOWER - 1:.0%} slower → step {moved['transfers']}"
    )


# a kernel launch (and the framework's dispatch before it) takes microseconds on any GPU: at least this
LAUNCH_FLOOR_S = 1e-6


def launch_note(machine: Machine, workload: Workload, best: Candidate) -> Text:
    """A warning where a step is so short that issuing its tensor ops would matter while the GPU
    model charges nothing for it (``op_us`` 0: every GPU preset, until measured on one)."""
    free = sorted(
        {
            machine.gpu_model_name(g)
            for g in best.layout.compute_gpus
            if machine.gpu_model(g).kind != "cpu" and machine.gpu_model(g).op_us == 0
        }
    )
    if not free or machine.profile is not None:  # a profile's measured stages include the launches
        return Text()
    ops = StepCosts(machine, workload, best.layout).tensor_ops_per_step()
    floor = ops * LAUNCH_FLOOR_S
    if floor < 0.1 * best.step_time_s:
        return Text()
    ratio = floor / best.step_time_s
    share = f"{ratio:.0%} of the step" if ratio < 1 else f"{ratio:.1f}x the step"
    return Text(
        f"no launch cost: gpu model '{free[0]}' gives no op_us, so the {ops} tensor ops a GPU issues in this "
        f"step cost nothing in it; at {LAUNCH_FLOOR_S * 1e6:g} µs each (a launch takes microseconds) they alone "
        f"take {_fmt_time(floor)}, {share}: a profile from `zoplan calibrate` on the machine times them\n",
        style="yellow",
    )


def plan_warnings(report: PlanReport) -> tuple[list[str], list[str]]:
    """What a plan's figures rest on that the user should know (a rate of another dtype, launches
    charged nothing, no price for --objective cost), then what its profile did not time: one line
    each, for the table's footer and ``plan --json``'s ``warnings``."""
    s = report.search
    warnings: list[str] = []
    dtype = s.best.layout.param_dtype
    for name in sorted({report.machine.gpu_model_name(g) for g in s.best.layout.compute_gpus}):
        other = rated_dtype(report.machine.spec.gpu_models[name], dtype)
        if other != dtype:
            warnings.append(
                f"no {dtype} rate: gpu model '{name}' gives none (tflops), so its {other} rate was planned with"
            )
    launch = launch_note(report.machine, s.workload, s.best).plain.strip()
    if launch:
        warnings.append(launch)
    shape, used = s.workload.model, s.workload.seq_len + s.workload.tuning.positions
    if used > shape.max_positions:  # (OPT's learned positions refuse it: only a rotary model gets here)
        warnings.append(
            f"{used} positions a sequence, more than the {shape.max_positions} of {shape.name} "
            "(max_position_embeddings): rotary positions run past them, but the model has seen no such lengths"
        )
    if s.objective == "cost" and report.summary(s.best)["usd_per_mtok"] is None:
        warnings.append(
            f"no price: topology '{report.machine.name}' gives no price_per_hour_usd, so --objective cost "
            "ranked by step time"
        )
    notes: list[str] = []
    profiled = report.machine.profile
    if profiled is not None:
        measured = profiled.profile.model
        mb, seq = report.plan.batch.micro_batch, report.plan.batch.seq_len
        if (mb, seq) != (measured.micro_batch, measured.seq_len):
            notes.append(
                f"note: the profile timed micro-batches of {measured.micro_batch} × {measured.seq_len} tokens; "
                f"this plan's are {mb} × {seq}, so its compute times are scaled by the token count "
                f"(attention grows faster than that): calibrate with --micro-batch {mb} --seq-len {seq} "
                f"for the closest prediction"
            )
        from zoplan.profile import timed_counts

        spec = report.plan.layout
        count = report.plan.batch.global_batch // (spec.data * spec.nodes) // mb
        branches = 2 if spec.perturbation == 1 else 1
        timed = [m for m, _ in timed_counts(profiled.profile.compute.block_s, branches)]
        if count > timed[-1]:
            notes.append(
                f"note: each rank runs {count} micro-batches a step, more than the profile timed "
                f"({', '.join(map(str, timed))}): its compute times are extrapolated; calibrate with "
                f"--micro-batches {','.join(map(str, timed))},{count} to time it"
            )
    return warnings, notes


def plan_footer(report: PlanReport, wide: bool = False) -> Text:
    s = report.search
    text = Text()
    best = report.summary(s.best)
    warnings, notes = plan_warnings(report)
    for line in warnings:
        text.append(line + "\n", style="yellow")
    text.append(f"best: {best['perturbation']}×{best['data']} on {','.join(best['compute_gpus'])}", style="bold")
    relays = [g for g in best["movers"] if g not in best["compute_gpus"]]
    if best["upload"] == "sliced":
        text.append(
            f", blocks sliced over {len(best['movers'])} devices"
            + (f" (relays {','.join(relays)})" if relays else "")
            + (f", each carrying {':'.join(map(str, best['shares']))} of a block" if best["shares"] else "")
        )
    bound = s.best.sim.bound_story() if s.best.sim is not None else best["bottleneck"]
    text.append(f"; step {_fmt_time(best['step_time_s'])}, bound by {bound}\n")
    if report.sensitivity:
        text.append(sensitivity_line(best["step_time_s"], report.sensitivity) + "\n")
    network, nodes = report.machine.spec.network, s.best.layout.nodes
    if nodes > 1 and network is not None and s.best.sim is not None:
        wait = s.best.sim.straggler_s
        text.append(
            f"{nodes} nodes: only the loss scalars cross the network ({network.latency_us:g} µs a hop); "
            + (
                f"waiting for the slowest node adds {_fmt_time(wait)} (+{wait / (best['step_time_s'] - wait):.1%}, "
                f"each node's step varying by {network.step_cv:.1%})\n"
                if wait > 0
                else "nodes taken as identical: set network.step_cv to how much a node's step varies "
                "(zoplan validate measures it) to add the wait for the slowest\n"
            )
        )
    every, batch = report.machine.spec.nodes, s.workload.global_batch
    if nodes < every and s.pins.nodes is None:
        gpus = len(report.machine.gpus)
        more = [n for n in node_counts(every, batch, gpus) if n > nodes]
        if more:
            why = (
                f"no layout over more of them is {'cheaper per token' if s.objective == 'cost' else 'faster'}; "
                f"--nodes {more[-1]} pins the most the global batch of {batch} splits over"
            )
        elif any(nodes < n <= every for n in node_counts(every, batch)):
            why = f"a plan spans at most {MAX_RANKS} GPUs, {MAX_RANKS // gpus} nodes of {gpus}"
        else:
            why = f"the global batch of {batch} splits evenly over no more of them (over all {every}: a batch that {every} divides)"
        text.append(f"{nodes} of the {every} nodes: {why}\n")
    elif nodes < every:
        text.append(f"{nodes} of the {every} nodes (--nodes {nodes})\n")
    device = "CPU rank" if report.machine.cpu_ranks_only else "GPU"
    if s.baseline:
        assert s.baseline.sim is not None  # zo2_baseline simulates the baseline it returns
        text.append(
            f"ZO2 baseline (1 {device}, dual forward, whole blocks): {_fmt_time(s.baseline.step_time_s)}, "
            f"bound by {s.baseline.sim.bound_story()}; speedup {report.speedup_vs_baseline:.2f}×\n"
        )
    else:
        text.append(f"ZO2 baseline: does not fit one {device} of this machine\n")
    for line in notes:
        text.append(line + "\n", style="yellow")
    text.append(
        "p×d: perturbation × data-parallel degree; µb: micro-batch; pf: blocks prefetched; "
        f"res: blocks resident on the {'CPU ranks' if report.machine.cpu_ranks_only else 'GPUs'}; "
        "bound: machine bound / step time\n"
        if wide
        else "p×d: perturbation × data-parallel degree; --wide: slices, wire dtype, micro-batch, prefetch, "
        "resident blocks, memory, bound\n",
        style="dim",
    )
    text.append(
        # each layout that fits is weighed with and without resident blocks: candidates, not layouts
        f"search: {s.considered} layouts, {s.rejected} rejected for memory; "
        f"{s.evaluated + s.pruned} candidates with their resident-block options: {s.evaluated} simulated "
        f"({s.aborted} stopped early"
        + (f"; {s.distinct} simulations, twins sharing one" if s.distinct < s.evaluated else "")
        + f"), {s.pruned} pruned by the bound; {s.seconds:.2f} s",
        style="dim",
    )
    return text


def compare_reasons(results: list[tuple[str, PlanReport | ZoplanError]]) -> list[str]:
    """Why each machine that cannot run the model cannot (one line each, under the table)."""
    return [f"{name}: {res.message}" for name, res in results if isinstance(res, ZoplanError)]


def verdict(results: list[tuple[str, PlanReport | ZoplanError]], tokens: float | None = None) -> dict[str, Any]:
    """The comparison's answer as data (``compare --json``'s ``verdict``): the fastest machine and
    the cheapest per token where the machines have prices (each machine's best layout), each with
    its step, $/Mtok and, with ``tokens``, the hours and dollars of that many tokens; how many
    machines cannot run the model."""
    fits = [(name, res) for name, res in results if not isinstance(res, ZoplanError)]
    # each machine's fastest layout and its cheapest (on several nodes they may differ)
    by = {
        objective: {
            name: candidate_summary(res.best_by(objective), res.machine, res.search.workload) for name, res in fits
        }
        for objective in ("time", "cost")
    }
    nodes = {name: res.machine.spec.nodes for name, res in fits}

    def machine(name: str, s: CandidateSummary) -> dict[str, Any]:
        said: dict[str, Any] = {
            "topology": name,
            "step_time_s": s["step_time_s"],
            "usd_per_mtok": s["usd_per_mtok"],
            "nodes": s["nodes"],
            "of_nodes": nodes[name],
        }
        if tokens:
            said["hours"] = tokens / s["tokens_per_s"] / 3600
            said["usd"] = s["usd_per_mtok"] * tokens / 1e6 if s["usd_per_mtok"] is not None else None
        return said

    out: dict[str, Any] = {"tokens": tokens, "cannot_run": len(results) - len(fits), "fastest": None, "cheapest": None}
    if fits:
        fastest = min(by["time"], key=lambda name: by["time"][name]["step_time_s"])
        out["fastest"] = machine(fastest, by["time"][fastest])
        priced = [(s["usd_per_mtok"], name) for name, s in by["cost"].items() if s["usd_per_mtok"] is not None]
        if priced:
            cheapest = min(priced)[1]
            out["cheapest"] = machine(cheapest, by["cost"][cheapest])
            # the table shows each machine's fastest layout; on a cluster the cheapest may be another
            out["cheapest"]["in_table"] = by["cost"][cheapest] == by["time"][cheapest]
    return out


def compare_verdict(results: list[tuple[str, PlanReport | ZoplanError]], tokens: float | None = None) -> str:
    """One line under the comparison: ``verdict`` in words."""
    v = verdict(results, tokens)
    if v["fastest"] is None:
        return "verdict: the model fits none of these machines"

    def cost_of(m: dict[str, Any]) -> str:
        if not tokens:
            return ""
        price = f", ${m['usd']:,.0f}" if m["usd"] is not None else ""
        return f"; {tokens:.3g} tokens in {m['hours']:,.1f} h{price}"

    def where(m: dict[str, Any]) -> str:
        name: str = m["topology"]
        return name + (f" on {m['nodes']} of its {m['of_nodes']} nodes" if m["nodes"] < m["of_nodes"] else "")

    fastest, cheapest = v["fastest"], v["cheapest"]
    said = f"verdict: fastest {where(fastest)} ({_fmt_time(fastest['step_time_s'])} a step{cost_of(fastest)})"
    if cheapest is not None:
        # a layout the table does not show (the fastest is): its step too
        step = "" if cheapest["in_table"] else f", {_fmt_time(cheapest['step_time_s'])} a step"
        said += (
            f"; cheapest per token {where(cheapest)} "
            f"({_fmt_usd(cheapest['usd_per_mtok'])} $/Mtok{step}{cost_of(cheapest)})"
        )
    left = v["cannot_run"]
    return said + (f"; {left} machine(s) cannot run it" if left else "")


# (header, shown by default): the default ones fit an 80-column terminal; --wide shows every one
COMPARE_COLUMNS: list[tuple[str, bool]] = [
    ("machine", True),
    ("GPUs", True),
    ("pert×data", False),
    ("movers", False),
    ("step", True),
    ("tok/s", True),
    ("GPU GiB", False),
    ("host GiB", False),
    ("bottleneck", False),
    ("$/h", True),
    ("$/Mtok", True),
    ("vs ZO2", True),
]


def compare_table(
    results: list[tuple[str, PlanReport | ZoplanError]], model: str, wide: bool = False, width: int | None = None
) -> Table:
    """Each machine's best layout, as plan_table's columns are chosen (COMPARE_DROPPED)."""
    return _narrowed(
        lambda hidden: _compare_table(results, model, wide, hidden), COMPARE_DROPPED, None if wide else width
    )


def _compare_table(
    results: list[tuple[str, PlanReport | ZoplanError]], model: str, wide: bool, hidden: set[str]
) -> Table:
    if not any(not isinstance(res, ZoplanError) and res.machine.spec.price_per_hour_usd for _, res in results):
        hidden = hidden | {"$/h", "$/Mtok"}  # no machine priced: columns of dashes
    shown = [i for i, (name, default) in enumerate(COMPARE_COLUMNS) if wide or (default and name not in hidden)]
    machines = [res.machine for _, res in results if not isinstance(res, ZoplanError)]
    headers = [_compare_header(COMPARE_COLUMNS[i][0], machines) for i in shown]
    table = _table(f"{model}: best layout per machine", [(h, "left") for h in headers], wide)
    for name, res in results:
        if isinstance(res, ZoplanError):  # the reason goes under the table (compare_reasons), not in a cell
            cells = [Text("cannot run it", style="red") if COMPARE_COLUMNS[i][0] == "step" else "–" for i in shown]
            table.add_row(name, *cells[1:])
            continue
        best = res.search.best
        summ = candidate_summary(best, res.machine, res.search.workload)
        price = rented_per_hour(res.machine, best.layout)  # the nodes it runs on
        row = [
            res.machine.name,
            # on several nodes, every node's GPUs: what is rented
            f"{len(best.layout.gpus) * best.layout.nodes}/{len(res.machine.gpus) * res.machine.spec.nodes}",
            f"{summ['perturbation']}×{summ['data']}",
            _movers(summ),
            _fmt_time(summ["step_time_s"]),
            _fmt_rate(summ["tokens_per_s"]),
            _fmt_gib(summ["gpu_memory_bytes"]),
            _fmt_gib(summ["host_memory_bytes"]),
            summ["bottleneck"],
            f"{price:.2f}" if price else "–",
            _fmt_usd(summ["usd_per_mtok"]),
            f"{res.speedup_vs_baseline:.2f}×" if res.speedup_vs_baseline else "–",
        ]
        table.add_row(*(row[i] for i in shown))
    return table


def models_table() -> Table:
    table = _Plain(title="model presets (or pass a path to a Hugging Face config.json)", title_justify="left")
    for col in ("name", "family", "layers", "hidden", "params", "block (16-bit)"):
        table.add_column(col)
    for row in preset_table_rows():
        table.add_row(*row)
    return table


def recipes_table() -> Table:
    """``zoplan recipes list``: each of MeZO's task recipes, what its records hold and what it sets."""
    from zoplan.recipes import RECIPES

    table = _Plain(title="MeZO's task recipes (zoplan run --recipe NAME)", title_justify="left")
    for col in ("name", "records", "prompt", "label words", "lr, eps, batch"):
        table.add_column(col, overflow="fold")
    for r in RECIPES.values():
        table.add_row(
            r.name,
            f"{r.kind}: {r.records}",
            repr(r.prompt) if r.prompt else "the records' own",
            ", ".join(r.label_words) if r.label_words else "–",
            f"{r.lr:g}, {r.eps:g}, {r.global_batch}",
        )
    return table


def validation_table(result: Validation, plan_path: str | Path) -> Table:
    """``zoplan validate``: predicted against measured, per stage, with the relative error and
    the difference in time (what a stage's miss weighs against the step's: a large error on a
    stage of microseconds moves the step by little)."""
    from zoplan.validate import STAGE_NAMES

    table = _Plain(title=f"{plan_path}: predicted vs measured, median of {len(result.measured_steps)} step(s)")
    host = any(row.measured_host_s is not None for row in result.rows)  # CUDA runs only
    names = ("stage", "predicted", "measured", "error", "off by") + (("host issue",) if host else ())
    for name in names:
        table.add_column(name, justify="left" if name == "stage" else "right")
    for row in result.rows:
        error = row.error
        off = None if row.predicted_s is None or row.measured_s is None else row.predicted_s - row.measured_s
        cells = [
            STAGE_NAMES.get(row.stage, row.stage) if row.stage != "step" else "step time",
            _fmt_time(row.predicted_s) if row.predicted_s is not None else "–",
            _fmt_time(row.measured_s) if row.measured_s is not None else "–",
            f"{error:+.1%}" if error is not None else "–",
            ("+" if off >= 0 else "-") + _fmt_time(abs(off)) if off is not None else "–",
        ]
        if host:
            cells.append(_fmt_time(row.measured_host_s) if row.measured_host_s is not None else "–")
        table.add_row(*cells, style="bold" if row.stage == "step" else None)
    return table


DRIFT = 0.10  # halves of a validation's steps further apart than this (of the median): say so
PADDING_NOTE = 0.01  # a validation whose batches held more padding than this (of the positions): say so


CALIBRATE_HINT = 0.15  # an uncalibrated prediction further off than this (of the measured step): say how to measure


def validation_notes(result: Validation, profiled: bool | None = None) -> list[str]:
    """``zoplan validate``: the spread of the measured steps, what the table's extra figures mean
    (CUDA runs), and, for a plan made without a calibration profile (``profiled`` False) whose
    step is off by more than ``CALIBRATE_HINT``, how to predict from this machine's own stages."""
    notes = []
    error = result.step.error
    if profiled is False and error is not None and abs(error) > CALIBRATE_HINT:
        notes.append(
            f"the plan predicts from the topology's figures alone (made without --profile), {abs(error):.0%} "
            f"{'over' if error > 0 else 'under'} this machine's step: `zoplan calibrate` measures its stages, "
            f"and a plan made with that profile (`zoplan plan --profile`) predicts from them (docs/calibration.md)"
        )
    if result.step_spread_s is not None:
        lo, hi = result.step_spread_s
        step_s = result.step.predicted_s
        inside = step_s is not None and lo <= step_s <= hi
        notes.append(
            f"measured step times: 10% of the steps took under {_fmt_time(lo)}, 10% over {_fmt_time(hi)}"
            + (
                "; the prediction lies within that spread"
                if inside
                else f"; the prediction ({_fmt_time(step_s)}) lies {'below' if step_s < lo else 'above'} that spread"
                if step_s is not None
                else ""
            )
        )
    if result.step_cv is not None:
        notes.append(
            f"the step times vary by {result.step_cv:.1%} (standard deviation / mean): in a topology of several "
            f"such nodes, network.step_cv: {result.step_cv:.3f} lets its plans add the wait for the slowest node"
        )
    if result.step_halves_s is not None and result.step.measured_s:
        first, last = result.step_halves_s
        if abs(first - last) > DRIFT * result.step.measured_s:
            halves = (
                f"the first half of the measured steps took a median {_fmt_time(first)}, "
                f"the second half {_fmt_time(last)}"
            )
            notes.append(
                f"the steps sped up during the run: {halves}; warm-up lasted past the skipped "
                f"step(s), or something slowed the machine early in the run (other load, a host "
                f"issuing kernels slower); more steps (--steps) or a larger --skip measure the "
                f"steady state"
                if last < first
                else f"the steps slowed down during the run: {halves}; something slowed the machine "
                f"(other load, throttling), and the error depends on when it was measured"
            )
    if result.padding_fraction is not None and result.padding_fraction > PADDING_NOTE:
        notes.append(
            f"{result.padding_fraction:.0%} of the batch positions were padding: a padded micro-batch "
            f"also builds an attention mask, which the calibration's full sequences do not time "
            f"(the default data, long-text, fill every sequence; docs/calibration.md)"
        )
    if any(row.measured_host_s is not None for row in result.rows):
        notes.append(
            "host issue: the host's time issuing each stage (Python, kernel launches); "
            "where it reaches the measured GPU time, the GPU waits for the host"
        )
    if result.peak_gpu_bytes is not None:
        from zoplan.sim.costs import GPU_RESERVE_BYTES

        predicted_gpu = (
            f"predicted {_fmt_gib(result.predicted_gpu_bytes)} GiB (with a {_fmt_gib(GPU_RESERVE_BYTES)} "
            f"GiB reserve for the "
            f"CUDA context, NCCL and allocator slack), "
            if result.predicted_gpu_bytes
            else ""
        )
        notes.append(
            f"GPU memory: {predicted_gpu}measured peak allocated by torch {_fmt_gib(result.peak_gpu_bytes)} GiB"
        )
    return notes


def profile_table(profile: Profile) -> Table:
    """``zoplan calibrate``: what was measured, per device and for the model shape."""
    from zoplan.profile import timed_counts

    table = _Plain(
        title=f"calibration of {profile.machine.name} for {profile.model.name} "
        f"(micro-batch {profile.model.micro_batch} x {profile.model.seq_len} tokens, {profile.model.dtype})"
    )
    for name in ("figure", "value"):
        table.add_column(name, justify="left" if name == "figure" else "right")
    for dev, d in profile.devices.items():
        table.add_row(f"{dev} host->device / device->host, alone", f"{d.h2d_gbps:.1f} / {d.d2h_gbps:.1f} GB/s")
        table.add_row(
            f"{dev} the same, all devices at once", f"{d.h2d_gbps_together:.1f} / {d.d2h_gbps_together:.1f} GB/s"
        )
        if d.duplex_gbps is not None:
            spread = (
                f" (median; samples {d.duplex_range_gbps[0]:.1f}-{d.duplex_range_gbps[1]:.1f})"
                if d.duplex_range_gbps is not None
                else ""
            )
            table.add_row(f"{dev} both directions at once, all devices", f"{d.duplex_gbps:.1f} GB/s in all{spread}")
    if profile.allgather is not None:
        for g in sorted(profile.allgather_groups + [profile.allgather], key=lambda c: c.ranks):
            # a one-slice all-gather no slower than a 256-element one: the rate is beyond what
            # the two sizes resolve (the calibration then records 1e6 GB/s: no byte cost)
            rate = f"{g.gbps:.2f} GB/s" if g.gbps < 1e5 else "bytes too cheap to time"
            table.add_row(f"all-gather among {g.ranks}", f"{g.latency_us:.0f} µs + {rate}")
        table.add_row("in-step wait per all-gather", f"{profile.allgather.wait_us:.0f} µs")
        table.add_row("loss all-reduce", f"{profile.scalar_latency_us:.0f} µs")
    if profile.meeting is not None:
        table.add_row("in-step wait per whole-block meeting (shared memory)", f"{profile.meeting.wait_us:.0f} µs")
        table.add_row("loss sum after such meetings", f"{profile.meeting.scalar_us:.0f} µs")
    for branches in (1, 2):
        for m, t in timed_counts(profile.compute.block_s, branches):
            key, c = f"{branches}x{m}", profile.compute
            # the longer of the GPU's time and the host's issue time (CUDA), both shown
            split = (
                f" (GPU {_fmt_time(c.block_gpu_s[key])}, host {_fmt_time(c.block_host_s[key])})"
                if key in c.block_gpu_s and key in c.block_host_s
                else ""
            )
            table.add_row(f"block compute, {branches} branch(es), {m} micro-batch(es)", _fmt_time(t) + split)
    if "block" in profile.compute.lockstep_s:
        # CPU plans with several compute ranks scale compute by this (zoplan.sim.costs)
        table.add_row(
            "block compute, 1 branch, 2 micro-batches, all ranks all-gathering each block",
            f"{_fmt_time(profile.compute.lockstep_s['block'])} (x{profile.lockstep_factor('block'):.2f})",
        )
    table.add_row("deferred update", f"{profile.compute.update_s_per_param * 1e9:.2f} ns/parameter")
    if profile.compute.loop_s:
        table.add_row(
            "training loop between steps (batch + journal), 1 micro-batch",
            _fmt_time(profile.compute.loop_s.get("1x1", 0.0)),
        )
    table.add_row("perturbation (theta + eps z)", f"{profile.compute.perturb_s_per_param * 1e9:.2f} ns/parameter")
    on = profile.measured_on
    if on.get("kernels") or on.get("torch"):
        table.add_row("measured with", f"torch {on.get('torch', '?')}, perturbation kernels: {on.get('kernels', '?')}")
    return table
