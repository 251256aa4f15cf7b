"""Views of one simulated step: a Chrome trace, a terminal Gantt chart and a PNG.

Every view reads a :class:`~zoplan.sim.SimResult` simulated with ``record=True`` (its spans and
link samples); no number is recomputed here, so what a user sees is what the search ranked.

- :func:`chrome_trace` builds a Chrome trace event object (``{"traceEvents": [...]}``) that opens in
  Perfetto (ui.perfetto.dev) and chrome://tracing: one process per GPU with one thread per stream,
  a "host links" process with one counter track per link, and a "steps" thread marking the steps.
  ``pid_base`` and :func:`merge_traces` let a measured trace sit beside the simulated one.
- :func:`gantt` is a rich renderable of the reported (steady-state) step for the terminal.
- :func:`plot_png` draws the same step with matplotlib (the optional ``plot`` extra).

Output is deterministic: events are emitted in simulation / topology order and times are
rounded to the nanosecond, so the same result gives byte-identical JSON (diffable, cacheable).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from zoplan.errors import ZoplanError, install_hint
from zoplan.fileio import PNG_SOFTWARE, write_whole, write_whole_with
from zoplan.sim import REPORTED_STEP, SimResult, Span, link_label
from zoplan.topology import Machine

# Streams in pipeline order: a block goes up, is exchanged, computed, and its update goes down.
STREAMS = ("upload", "exchange", "compute", "offload")
# Categories in the order a step meets them (legend order).
# "loop": the training loop's own host work between two steps (the next batch, the journal line).
CATEGORIES = ("h2d", "update", "exchange", "embed", "compute", "head", "scalar", "loop", "d2h")
# Terminal colours: one family per stream (upload blue, exchange magenta, compute green,
# offload yellow) so a row reads at a glance, with shades for the short phases around it.
CATEGORY_STYLE = {
    "h2d": "blue",
    "update": "bright_magenta",
    "exchange": "magenta",
    "embed": "cyan",
    "compute": "green",
    "head": "bright_green",
    "scalar": "red",
    "loop": "bright_black",
    "d2h": "yellow",
}
# The same families for matplotlib (tab10-like, readable on white).
CATEGORY_COLOR = {
    "h2d": "#1f77b4",
    "update": "#e377c2",
    "exchange": "#9467bd",
    "embed": "#17becf",
    "compute": "#2ca02c",
    "head": "#98df8a",
    "scalar": "#d62728",
    "loop": "#7f7f7f",
    "d2h": "#ff7f0e",
}
IDLE = "·"
FULL = "█"  # the bin is busy at least half of its time
PARTIAL = "▄"  # busy, but less than half of the bin: short transfers must not vanish

_STEPS_TID = 0  # the "steps" thread on the host-links process, shown above the counters
_US = 1e6


# ----- helpers ---------------------------------------------------------------------------------
def _require_spans(result: SimResult) -> None:
    if not result.spans:
        raise ZoplanError(
            "this simulation result has no recorded spans to draw",
            fix="simulate with record=True (zoplan.search.evaluate(..., record=True))",
        )


# span categories of ops that belong to no block (the embedding, the head, the loss's all-reduce,
# the loop's host work): their spans carry no args.block
_PER_STEP = frozenset({"embed", "head", "scalar", "loop"})


def _us(seconds: float) -> float:
    """Seconds to microseconds, rounded to the nanosecond: float noise below that would make two
    equal runs differ in the last digit of the JSON for no information."""
    return round(seconds * _US, 3)


def _dur(start_us: float, end_us: float) -> float:
    """A span's duration from its start and end, each already rounded (``_us``): rounded on its
    own, a span could end a nanosecond after the next one on its stream starts."""
    return round(end_us - start_us, 3)


def _gpu_order(result: SimResult, machine: Machine) -> list[str]:
    """GPUs with spans, in the topology's order (not by name: gpu10 after gpu9); a GPU the
    topology does not list (a result from another machine file) follows in order of appearance."""
    seen: dict[str, None] = {}
    for span in result.spans:
        seen.setdefault(span[0], None)
    known = [g for g in machine.gpus if g in seen]
    listed = set(known)
    return known + [g for g in seen if g not in listed]


def _stream_order(stream: str) -> int:
    return STREAMS.index(stream) if stream in STREAMS else len(STREAMS)


def _fmt_duration(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.3g} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.4g} s"


# ----- Chrome trace ----------------------------------------------------------------------------
def chrome_trace(
    result: SimResult, machine: Machine, *, title: str = "simulated", pid_base: int = 0, window_only: bool = False
) -> dict[str, Any]:
    """The simulated steps as a Chrome trace event object (ts/dur in microseconds).

    Processes: ``pid_base + 1 + i`` is the i-th GPU (topology order) named "gpuN (title)", with
    threads 1..4 for the upload, exchange, compute and offload streams (only those it uses);
    ``pid_base + 1 + len(gpus)`` is "host links (title)", with a "steps" thread (tid 0: one span
    per simulated step, the reported one marked) and one counter track per directed link or
    memory bus (args: rate in GB/s and % of capacity).

    ``window_only`` keeps only the reported step: spans are clipped to it and time is shifted so
    the step starts at 0, which is how a measured step will be laid beside it."""
    _require_spans(result)
    start, end = result.window
    origin = start if window_only else 0.0
    gpus = _gpu_order(result, machine)
    gpu_pid = {g: pid_base + 1 + i for i, g in enumerate(gpus)}
    links_pid = pid_base + 1 + len(gpus)

    def ts(t: float) -> float:
        return _us(t - origin)

    events: list[dict[str, Any]] = []

    def meta(name: str, pid: int, args: dict[str, Any], tid: int | None = None) -> None:
        event: dict[str, Any] = {"name": name, "ph": "M", "pid": pid}
        if tid is not None:
            event["tid"] = tid
        event["args"] = args
        events.append(event)

    # metadata first: viewers name tracks from it, and tests check every event against it
    streams_of: dict[str, set[str]] = {g: set() for g in gpus}
    for g, stream, *_ in result.spans:
        streams_of[g].add(stream)
    extra_streams = sorted({s for ss in streams_of.values() for s in ss if s not in STREAMS})
    stream_tid = {s: i + 1 for i, s in enumerate(STREAMS + tuple(extra_streams))}
    for g in gpus:
        pid = gpu_pid[g]
        meta("process_name", pid, {"name": f"{g} ({title})"})
        meta("process_sort_index", pid, {"sort_index": pid})
        meta(
            "process_labels",
            pid,
            {"labels": f"{machine.gpu_model_name(g)}, {machine.name}" if g in machine.gpus else machine.name},
        )
        for stream in sorted(streams_of[g], key=lambda s: stream_tid[s]):
            meta("thread_name", pid, {"name": stream}, tid=stream_tid[stream])
            meta("thread_sort_index", pid, {"sort_index": stream_tid[stream]}, tid=stream_tid[stream])
    meta("process_name", links_pid, {"name": f"host links ({title})"})
    meta("process_sort_index", links_pid, {"sort_index": links_pid})
    meta("process_labels", links_pid, {"labels": machine.name})
    meta("thread_name", links_pid, {"name": "steps"}, tid=_STEPS_TID)
    meta("thread_sort_index", links_pid, {"sort_index": _STEPS_TID}, tid=_STEPS_TID)

    # steps: one span each, so the reported (steady-state) step is visible and measurable
    begin = 0.0
    for step, step_end in enumerate(result.step_ends):
        reported = step == REPORTED_STEP
        lo, hi = begin, step_end
        begin = step_end
        if window_only:
            if not reported:
                continue
            lo, hi = start, end
        events.append(
            {
                "name": f"step {step}" + (" (reported)" if reported else ""),
                "cat": "step",
                "ph": "X",
                "ts": ts(lo),
                "dur": _dur(ts(lo), ts(hi)),
                "pid": links_pid,
                "tid": _STEPS_TID,
                "args": {"step": step, "reported": reported, "step_time_ms": round((hi - lo) * 1e3, 6)},
            }
        )
    # global instants draw a line across every track at the edges of the reported step
    for name, t in (("reported step start", start), ("reported step end", end)):
        events.append(
            {
                "name": name,
                "cat": "step",
                "ph": "i",
                "s": "g",
                "ts": ts(t),
                "pid": links_pid,
                "tid": _STEPS_TID,
                "args": {"step": REPORTED_STEP},
            }
        )

    # spans, per thread in time order (the sim appends them as they end, interleaving GPUs)
    spans: list[tuple[int, int, float, Span]] = []
    for span in result.spans:
        g, stream, _cat, _label, _step, _block, t0, t1 = span
        if window_only:
            if t1 == t0:  # an op that takes no time (an unpacking): drawn if it is in the step
                if not start <= t0 < end:
                    continue
            else:
                t0, t1 = max(t0, start), min(t1, end)
                if t1 <= t0:
                    continue
        spans.append((gpu_pid[g], stream_tid[stream], t0, span))
    spans.sort(key=lambda x: (x[0], x[1], x[2]))  # stable: equal keys keep simulation order
    for pid, tid, t0, (g, stream, cat, label, step, block, s0, s1) in spans:
        t1 = min(s1, end) if window_only else s1
        # the op's id in the step program (zoplan.program), and where it ran
        args: dict[str, Any] = {"op": label, "rank": g, "stream": stream, "step": step}
        if cat not in _PER_STEP:  # (a per-step op's "block" is only where it sits among them: -1, layers, ...)
            args["block"] = block
        if window_only and (s0 < start or s1 > end):
            args["clipped"] = True  # the span crosses the step boundary (prefetch of the next step)
        events.append(
            {
                "name": label,
                "cat": cat,
                "ph": "X",
                "ts": ts(t0),
                "dur": _dur(ts(t0), ts(t1)),
                "pid": pid,
                "tid": tid,
                "args": args,
            }
        )

    # link rates: piecewise constant, so one counter event per change is exact
    for resource, capacity in result.capacity.items():
        samples = result.link_samples.get(resource, [])
        name = link_label(resource, machine)
        points: list[tuple[float, float]] = []
        if window_only:
            current = 0.0
            for t, rate in samples:
                if t <= start:
                    current = rate
            points.append((start, current))
            points += [(t, rate) for t, rate in samples if start < t < end]
            points.append((end, points[-1][1]))  # hold the last rate to the end of the step
        else:
            points = list(samples)
        for t, rate in points:
            events.append(
                {
                    "name": name,
                    "cat": "link",
                    "ph": "C",
                    "ts": ts(t),
                    "pid": links_pid,
                    "args": {"GB/s": round(rate / 1e9, 6), "% of capacity": round(100.0 * rate / capacity, 4)},
                }
            )

    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {
            "title": title,
            "machine": machine.name,
            "step_time_ms": round(result.step_time_s * 1e3, 6),
            "bottleneck": result.bottleneck,
            "reported_step": REPORTED_STEP,
            "window_start_us": _us(start),
            "window_end_us": _us(end),
            "time_origin_us": _us(origin),
        },
    }


def _pids(trace: dict[str, Any]) -> list[int]:
    seen: dict[int, None] = {}
    for event in trace.get("traceEvents", []):
        if "pid" in event:
            seen.setdefault(event["pid"], None)
    return list(seen)


def merge_traces(*traces: dict[str, Any]) -> dict[str, Any]:
    """One trace holding several (e.g. "simulated" and "measured" process groups).

    Pids stay distinct: a trace whose pids collide with an earlier one's is shifted past them
    as a whole (its sort indices too, so its processes stay grouped). Give each trace its own
    ``pid_base`` to choose the pids yourself. The inputs are not modified."""
    if not traces:
        raise ZoplanError("merge_traces needs at least one trace")
    used: set[int] = set()
    events: list[dict[str, Any]] = []
    other: dict[str, Any] = {}
    for i, trace in enumerate(traces):
        if "traceEvents" not in trace:
            raise ZoplanError(f"trace {i + 1} of {len(traces)} has no 'traceEvents'")
        pids = _pids(trace)
        offset = 0
        if used.intersection(pids):
            offset = max(used) + 1 - min(pids)
        for event in trace["traceEvents"]:
            if offset and "pid" in event:
                event = dict(event, pid=event["pid"] + offset)
                if event.get("name") == "process_sort_index" and event.get("ph") == "M":
                    event["args"] = dict(event["args"], sort_index=event["args"]["sort_index"] + offset)
            events.append(event)
        used.update(p + offset for p in pids)
        # flat keys: chrome://tracing shows otherData as a table of scalars
        data = trace.get("otherData", {})
        prefix = str(data.get("title", f"trace{i + 1}"))
        for key, value in data.items():
            other[f"{prefix}.{key}"] = value
    return {"traceEvents": events, "displayTimeUnit": traces[0].get("displayTimeUnit", "ms"), "otherData": other}


def write_trace(trace: dict[str, Any], path: Path) -> None:
    """Write compact JSON (traces of big models hold many thousand events)."""
    try:
        text = json.dumps(trace, separators=(",", ":"), allow_nan=False)
    except ValueError as e:  # NaN/inf: Perfetto rejects the file, so fail here instead
        raise ZoplanError(f"trace for {path} holds a non-finite number: {e}") from None
    # whole or not at all: a full disk left a cut trace, over a good one written before
    write_whole(Path(path), text + "\n")


# ----- terminal Gantt ---------------------------------------------------------------------------
def _rows(result: SimResult, machine: Machine) -> list[tuple[str, str, list[tuple[str, float, float]]]]:
    """(gpu, stream, [(category, start, end) clipped to the window]) per row with spans in the
    reported step, GPUs in topology order and streams in pipeline order."""
    start, end = result.window
    cells: dict[tuple[str, str], list[tuple[str, float, float]]] = {}
    for g, stream, cat, _label, _step, _block, t0, t1 in result.spans:
        lo, hi = max(t0, start), min(t1, end)
        if hi > lo:
            cells.setdefault((g, stream), []).append((cat, lo, hi))
    order = {g: i for i, g in enumerate(_gpu_order(result, machine))}
    keys = sorted(cells, key=lambda k: (order[k[0]], _stream_order(k[1]), k[1]))
    return [(g, s, cells[g, s]) for g, s in keys]


def _busy_s(intervals: Iterable[tuple[str, float, float]]) -> float:
    """Length of the union (streams are in order, but a union never double counts)."""
    total, reach = 0.0, float("-inf")
    for _cat, lo, hi in sorted(intervals, key=lambda x: (x[1], x[2])):
        if hi > reach:
            total += hi - max(lo, reach)
            reach = hi
    return total


def _bin_row(intervals: list[tuple[str, float, float]], start: float, span_s: float, width: int) -> Text:
    occupancy = [dict.fromkeys(CATEGORIES, 0.0) for _ in range(width)]
    bin_s = span_s / width
    for cat, lo, hi in intervals:
        first = min(width - 1, int((lo - start) / bin_s))
        last = min(width - 1, int((hi - start) / bin_s))
        for b in range(first, last + 1):
            b0 = start + b * bin_s
            overlap = min(hi, b0 + bin_s) - max(lo, b0)
            if overlap > 0:
                occupancy[b][cat] = occupancy[b].get(cat, 0.0) + overlap
    text = Text(no_wrap=True, overflow="crop")
    for occ in occupancy:
        busy = sum(occ.values())
        if busy <= 0:
            text.append(IDLE, style="dim")
            continue
        # dominant category; ties go to the earlier one in CATEGORIES (deterministic)
        cat = max(occ, key=lambda c: occ[c])
        text.append(FULL if busy >= 0.5 * bin_s else PARTIAL, style=CATEGORY_STYLE.get(cat, "white"))
    return text


def _nice_step(span: float, target_ticks: int) -> float:
    raw = span / max(1, target_ticks)
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    for m in (1, 2, 2.5, 5, 10):
        if m * mag >= raw:
            return m * mag
    return 10 * mag


def _axis(span_s: float, width: int) -> Text:
    """Two lines: tick labels over tick marks, time from the start of the reported step."""
    unit, scale = ("s", 1.0) if span_s >= 1 else ("ms", 1e3) if span_s >= 1e-3 else ("µs", 1e6)
    total = span_s * scale
    step = _nice_step(total, max(2, width // 16))
    labels = [" "] * width
    marks = ["─"] * width
    free_from = 0
    k = 0
    while k * step <= total * (1 + 1e-9):
        value = k * step
        col = min(width - 1, round(value / total * width)) if total > 0 else 0
        marks[col] = "┬"
        label = f"{value:.6g}" + (f" {unit}" if k == 0 else "")
        pos = col if col + len(label) <= width else width - len(label)
        if pos >= free_from and pos >= 0:
            labels[pos : pos + len(label)] = list(label)
            free_from = pos + len(label) + 1
        k += 1
    return Text("".join(labels) + "\n" + "".join(marks), style="dim")


MAX_GANTT_WIDTH = 1000


def check_gantt_width(width: int) -> None:
    """Refuse a terminal chart's width that cannot be drawn (each row is a string of ``width`` cells)."""
    if not 10 <= width <= MAX_GANTT_WIDTH:
        raise ZoplanError(
            f"gantt width must be from 10 to {MAX_GANTT_WIDTH} columns, got {width}",
            fix="--width 100 fits most terminals",
        )


def gantt(result: SimResult, machine: Machine, width: int | None = 100, fit: int = 100) -> RenderableType:
    """Terminal Gantt chart of the reported step: one row per (GPU, stream) busy in it, time in
    ``width`` columns, each cell coloured by the category that fills most of it ('█' busy at
    least half the cell, '▄' less, '·' idle), with a time axis, a legend and busy % per row.
    ``width`` None: as many time columns as leave the labels and busy % whole in ``fit``
    columns (a terminal's width)."""
    _require_spans(result)
    names: tuple[int | None, int | None] = (None, None)  # the GPU and stream columns' widths: their own
    if width is None:  # GPU and stream names, the busy column, a space after each column
        gpu_chars = max((len(g) for g in machine.gpus), default=4)
        labels = gpu_chars + 1 + len("exchange") + 1 + 1 + len("100%")
        width = max(10, min(MAX_GANTT_WIDTH, fit - labels))
        room = fit - width - len("100%") - 3  # (a space after each of the first three columns)
        if room < gpu_chars + len("exchange"):
            # a terminal too narrow for them: the names are cropped, never the busy %
            gpu_w = max(1, min(gpu_chars, room // 2))
            names = (gpu_w, max(1, room - gpu_w))
    check_gantt_width(width)
    start, end = result.window
    span_s = end - start
    rows = _rows(result, machine)

    # a space before each column but the first (a space after each, rich before 15 gave the last
    # column too, past the terminal's width: the busy % was cropped)
    table = Table(
        box=None, show_edge=False, pad_edge=False, padding=(0, 0, 0, 1), show_header=True, header_style="bold"
    )
    table.add_column("rank" if machine.cpu_ranks_only else "GPU", no_wrap=True, max_width=names[0])
    table.add_column("stream", no_wrap=True, max_width=names[1])
    table.add_column(_axis(span_s, width), no_wrap=True, min_width=width, max_width=width, overflow="crop")
    table.add_column("busy", justify="right", no_wrap=True, min_width=4)  # "100%" never truncated
    previous = None
    for g, stream, intervals in rows:
        busy = _busy_s(intervals) / span_s if span_s > 0 else 0.0
        # the GPU is named on its first row only: 32 rows read as 8 groups without rules between
        table.add_row(
            Text(g, style="bold") if g != previous else Text(""),
            stream,
            _bin_row(intervals, start, span_s, width),
            f"{100 * busy:.0f}%",
        )
        previous = g

    used = {cat for _g, _s, intervals in rows for cat, _lo, _hi in intervals}
    present = [c for c in CATEGORIES if c in used] + sorted(used - set(CATEGORIES))
    # packed into lines of ``fit`` columns by whole items: wrapped by the terminal, a colour block
    # was left at a line's end and its name on the next
    items = [
        *(Text.assemble((FULL, CATEGORY_STYLE.get(cat, "white")), f" {cat}") for cat in present),
        Text.assemble((IDLE, "dim"), " idle"),
        Text(f"{PARTIAL} busy < half the cell"),
    ]
    legend = Text("legend:", style="bold")
    line, indent = len(legend), len("legend:") + 2
    for item in items:
        if line + 2 + len(item) > fit and line > len("legend:"):
            # the next line under the first item, or from the margin where it would not fit so
            lead = indent if indent + len(item) <= fit else 0
            legend.append("\n" + " " * lead)
            legend.append_text(item)
            line = lead + len(item)
            continue
        legend.append("  ")
        legend.append_text(item)
        line += 2 + len(item)
    heading = Text.assemble(
        (f"{machine.name}", "bold"),
        f": reported step {REPORTED_STEP}, {_fmt_duration(span_s)}{_on_each_node(result)}, bound by ",
        (result.bound_story(), "bold red"),
        f" · one column = {_fmt_duration(span_s / width)}",
    )
    return Group(heading, table, legend)


# ----- PNG ---------------------------------------------------------------------------------------
def require_matplotlib() -> None:
    """Refuse a PNG before any work when matplotlib (the ``plot`` extra) is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ZoplanError(
            "drawing a PNG needs matplotlib, which is not installed",
            fix=install_hint("plot", "matplotlib"),
        ) from None


def png_title(result: SimResult, machine: Machine) -> str:
    """The PNG's title: the step as the terminal chart's heading gives it (on several nodes, one
    node's step and then the step with the wait for the slowest)."""
    start, end = result.window
    return f"{machine.name}: step {_fmt_duration(end - start)}{_on_each_node(result)}, bottleneck {result.bottleneck}"


def _on_each_node(result: SimResult) -> str:
    """After one node's step, on several whose steps vary: the step with the wait for the slowest."""
    if result.straggler_s <= 0:
        return ""
    return f" on each node, {_fmt_duration(result.step_time_s)} with the wait for the slowest"


def plot_png(result: SimResult, machine: Machine, path: Path) -> None:
    """The reported step as a Gantt chart in a PNG (needs matplotlib: the ``plot`` extra)."""
    _require_spans(result)
    require_matplotlib()
    # Figure + the Agg canvas directly, not pyplot: no global backend switch, no GUI window,
    # and nothing left open in the caller's process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    start, end = result.window
    rows = _rows(result, machine)
    fig = Figure(figsize=(12, 1.5 + 0.28 * max(1, len(rows))), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    present: list[str] = []
    for y, (_g, _stream, intervals) in enumerate(rows):
        by_cat: dict[str, list[tuple[float, float]]] = {}
        for cat, lo, hi in intervals:
            by_cat.setdefault(cat, []).append(((lo - start) * 1e3, (hi - lo) * 1e3))
        for cat, xranges in by_cat.items():
            ax.broken_barh(xranges, (y - 0.4, 0.8), facecolors=CATEGORY_COLOR.get(cat, "#7f7f7f"), linewidth=0)
            if cat not in present:
                present.append(cat)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{g} {s}" for g, s, _ in rows], fontsize=8)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # first GPU on top, like the terminal chart
    ax.set_xlim(0, (end - start) * 1e3)
    ax.set_xlabel("time in the reported step (ms)")
    ax.set_axisbelow(True)  # grid lines behind the bars, not striping them
    ax.grid(axis="x", alpha=0.3)
    order = [c for c in CATEGORIES if c in present] + [c for c in present if c not in CATEGORIES]
    ax.legend(
        handles=[Patch(color=CATEGORY_COLOR.get(c, "#7f7f7f"), label=c) for c in order],
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8,
        frameon=False,
    )
    ax.set_title(png_title(result, machine))
    fig.tight_layout()
    # drawn beside it, then put in its place: a full disk left an empty or cut PNG
    write_whole_with(Path(path), lambda tmp: fig.savefig(tmp, format="png", metadata={"Software": PNG_SOFTWARE}), "PNG")
