"""Views of a simulated step: the Chrome trace must load in Perfetto / chrome://tracing (every
event on a declared track, times in microseconds, byte-identical across runs), the terminal
Gantt chart must show the reported step, and the PNG path must work or fail with a clear fix."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from zoplan.sim.costs import Workload
from zoplan.errors import ZoplanError
from zoplan.layout import Layout
from zoplan.models import load_model_shape
from zoplan.search import evaluate
from zoplan.sim import REPORTED_STEP, SimResult, link_label
from zoplan.topology import Machine, load_topology
from zoplan.sim.trace import STREAMS, chrome_trace, gantt, merge_traces, plot_png, write_trace

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
GPUS = ("gpu0", "gpu2", "gpu4", "gpu6", "gpu1", "gpu3", "gpu5", "gpu7")


# ----- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def machine() -> Machine:
    return load_topology("dgx-a100")


@pytest.fixture(scope="module")
def workload() -> Workload:
    return Workload(load_model_shape("opt-125m"), 8, 512)


def _sliced(resident: tuple[int, ...] = ()) -> Layout:
    """Eight sliced movers with nothing resident: every stream and link carries traffic."""
    return Layout(
        perturbation=2,
        data=4,
        compute_gpus=GPUS,
        upload="sliced",
        movers=GPUS,
        slices_per_block=16,
        wire_dtype="bf16",
        param_dtype="bf16",
        micro_batch=1,
        prefetch=1,
        resident=resident,
    )


def _whole() -> Layout:
    """Two GPUs uploading whole blocks over one shared PCIe switch: no exchange stream."""
    return Layout(
        perturbation=2,
        data=1,
        compute_gpus=("gpu0", "gpu1"),
        upload="whole",
        movers=("gpu0", "gpu1"),
        slices_per_block=1,
        wire_dtype="bf16",
        param_dtype="bf16",
        micro_batch=1,
        prefetch=1,
    )


@pytest.fixture(scope="module")
def sliced(machine: Machine, workload: Workload) -> tuple[Layout, SimResult]:
    layout = _sliced()
    return layout, evaluate(machine, workload, layout, record=True).sim


@pytest.fixture(scope="module")
def whole(machine: Machine, workload: Workload) -> tuple[Layout, SimResult]:
    layout = _whole()
    return layout, evaluate(machine, workload, layout, record=True).sim


def _events(trace: dict, ph: str) -> list[dict[str, Any]]:
    return [e for e in trace["traceEvents"] if e["ph"] == ph]


def _process_names(trace: dict) -> dict[int, str]:
    return {e["pid"]: e["args"]["name"] for e in _events(trace, "M") if e["name"] == "process_name"}


def _thread_names(trace: dict) -> dict[tuple[int, int], str]:
    return {(e["pid"], e["tid"]): e["args"]["name"] for e in _events(trace, "M") if e["name"] == "thread_name"}


# ----- Chrome trace -----------------------------------------------------------------------------
@pytest.mark.parametrize("window_only", [False, True])
def test_trace_is_plain_json_with_the_chrome_top_level_keys(sliced, machine, window_only, tmp_path) -> None:
    _, result = sliced
    trace = chrome_trace(result, machine, window_only=window_only)
    assert set(trace) == {"traceEvents", "displayTimeUnit", "otherData"}
    assert trace["displayTimeUnit"] == "ms"
    text = json.dumps(trace, allow_nan=False)  # NaN/inf would make Perfetto reject the file
    assert json.loads(text) == trace, "the trace holds values JSON does not round-trip"
    path = tmp_path / "trace.json"
    write_trace(trace, path)
    written = path.read_text(encoding="utf-8")
    assert json.loads(written) == trace
    # compact separators (no diff of a megabyte string on failure: compare lengths)
    assert len(written) == len(json.dumps(trace, separators=(",", ":"))) + 1
    for event in trace["traceEvents"]:
        assert event["ph"] in {"M", "X", "C", "i"}
        assert isinstance(event["pid"], int)


@pytest.mark.parametrize("fixture", ["sliced", "whole"])
def test_every_span_is_on_a_declared_thread_with_nonnegative_times(fixture, machine, request) -> None:
    _, result = request.getfixturevalue(fixture)
    trace = chrome_trace(result, machine)
    processes, threads = _process_names(trace), _thread_names(trace)
    spans = _events(trace, "X")
    assert len(spans) == len(result.spans) + len(result.step_ends)  # every sim span + step markers
    for event in spans:
        assert event["ts"] >= 0 and event["dur"] >= 0, event
        assert event["pid"] in processes, event
        assert (event["pid"], event["tid"]) in threads, event
        assert isinstance(event["name"], str) and isinstance(event["cat"], str)
    for event in _events(trace, "C") + _events(trace, "i"):
        assert event["pid"] in processes, event


@pytest.mark.parametrize("window_only", [False, True])
@pytest.mark.parametrize("fixture", ["sliced", "whole"])
def test_spans_of_one_thread_never_overlap(fixture, window_only, machine, request) -> None:
    """A stream runs its ops one after the other, and the trace-event format wants the slices of
    one thread nested or apart: a span's rounded end is never after the next one's start (it
    was, by a nanosecond, when start and duration were rounded each on its own)."""
    _, result = request.getfixturevalue(fixture)
    trace = chrome_trace(result, machine, window_only=window_only)
    by_thread: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for event in _events(trace, "X"):
        start = round(event["ts"] * 1000)  # whole nanoseconds: the trace's resolution
        by_thread.setdefault((event["pid"], event["tid"]), []).append((start, start + round(event["dur"] * 1000)))
    assert len(by_thread) > 2
    for thread, spans in by_thread.items():
        spans.sort()
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert end <= start, (thread, end, start)


def test_each_gpu_of_the_layout_gets_a_process_and_streams_in_pipeline_order(sliced, machine) -> None:
    layout, result = sliced
    trace = chrome_trace(result, machine)
    names = _process_names(trace)
    assert sorted(names.values()) == sorted([f"{g} (simulated)" for g in layout.gpus] + ["host links (simulated)"])
    assert len(set(names)) == len(names)
    # processes sort in topology order (gpu0, gpu1, ..., not the layout's rank order)
    sort_index = {e["pid"]: e["args"]["sort_index"] for e in _events(trace, "M") if e["name"] == "process_sort_index"}
    by_sort = [names[p] for p in sorted(sort_index, key=sort_index.__getitem__)]
    assert by_sort == [f"{g} (simulated)" for g in machine.gpus] + ["host links (simulated)"]
    gpu0 = next(p for p, n in names.items() if n == "gpu0 (simulated)")
    thread_sort = {
        e["args"]["sort_index"]: _thread_names(trace)[gpu0, e["tid"]]
        for e in _events(trace, "M")
        if e["name"] == "thread_sort_index" and e["pid"] == gpu0
    }
    assert [thread_sort[k] for k in sorted(thread_sort)] == list(STREAMS)


def test_whole_uploads_declare_no_exchange_thread(whole, machine) -> None:
    layout, result = whole
    trace = chrome_trace(result, machine)
    assert sorted(_process_names(trace).values()) == ["gpu0 (simulated)", "gpu1 (simulated)", "host links (simulated)"]
    gpu_threads = {n for (pid, _tid), n in _thread_names(trace).items() if n != "steps"}
    assert gpu_threads == {"upload", "compute", "offload"}


@pytest.mark.parametrize("window_only", [False, True])
def test_link_counters_stay_within_capacity_one_track_per_resource(sliced, machine, window_only) -> None:
    _, result = sliced
    trace = chrome_trace(result, machine, window_only=window_only)
    counters = _events(trace, "C")
    label_to_resource = {link_label(r, machine): r for r in result.capacity}
    assert {e["name"] for e in counters} == set(label_to_resource)
    busy = 0
    for event in counters:
        cap_gbps = result.capacity[label_to_resource[event["name"]]] / 1e9
        assert 0 <= event["args"]["GB/s"] <= cap_gbps + 1e-6, event
        assert 0 <= event["args"]["% of capacity"] <= 100 + 1e-6, event
        assert event["args"]["% of capacity"] == pytest.approx(100 * event["args"]["GB/s"] / cap_gbps, abs=1e-3)
        busy += event["args"]["GB/s"] > 0
    assert busy > 0  # nothing is resident: the PCIe links must show traffic


def test_counters_follow_the_recorded_samples(sliced, machine) -> None:
    _, result = sliced
    trace = chrome_trace(result, machine)
    resource = "cpu0->pcie0"
    series = [(e["ts"], e["args"]["GB/s"]) for e in _events(trace, "C") if e["name"] == link_label(resource, machine)]
    expected = result.link_samples[resource]
    assert len(series) == len(expected)
    for (ts, gbps), (t, rate) in zip(series, expected):
        assert ts == pytest.approx(t * 1e6, abs=1e-3)
        assert gbps == pytest.approx(rate / 1e9, abs=1e-6)


def test_same_input_gives_byte_identical_json(machine, workload, tmp_path) -> None:
    first = evaluate(machine, workload, _sliced(), record=True).sim
    second = evaluate(machine, workload, _sliced(), record=True).sim
    a = json.dumps(chrome_trace(first, machine))
    b = json.dumps(chrome_trace(second, machine))
    # digests, not the strings: a failing megabyte comparison takes pytest minutes to diff
    assert hashlib.sha256(a.encode()).hexdigest() == hashlib.sha256(b.encode()).hexdigest()
    write_trace(chrome_trace(first, machine), tmp_path / "a.json")
    write_trace(chrome_trace(second, machine), tmp_path / "b.json")
    digest = [hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in ("a.json", "b.json")]
    assert digest[0] == digest[1]


def test_compute_span_times_are_the_simulated_ones_in_microseconds(sliced, machine) -> None:
    _, result = sliced
    trace = chrome_trace(result, machine)
    pid_of = {n.split(" ")[0]: p for p, n in _process_names(trace).items()}
    for gpu in ("gpu0", "gpu7"):
        sim = sorted(
            (t0, t1, label) for g, _s, cat, label, _st, _b, t0, t1 in result.spans if g == gpu and cat == "compute"
        )
        got = sorted(
            (e["ts"], e["dur"], e["name"])
            for e in _events(trace, "X")
            if e["pid"] == pid_of[gpu] and e["cat"] == "compute"
        )
        assert len(got) == len(sim) > 0
        for (ts, dur, name), (t0, t1, label) in zip(got, sim):
            assert name == label
            assert ts == pytest.approx(t0 * 1e6, abs=1e-3)
            assert dur == pytest.approx((t1 - t0) * 1e6, abs=1e-3)


def test_span_args_carry_step_and_block(sliced, machine) -> None:
    _, result = sliced
    trace = chrome_trace(result, machine)
    spans = [e for e in _events(trace, "X") if e["cat"] != "step"]
    assert {e["args"]["step"] for e in spans} == set(range(len(result.step_ends)))
    # a block's op names its block; an op of the whole step (embedding, head, all-reduce) none
    # (it carried -1, the layer count and more, as if blocks)
    per_step = {"embed", "head", "scalar", "loop"}
    assert all(0 <= e["args"]["block"] < 12 for e in spans if e["cat"] not in per_step)
    assert all("block" not in e["args"] for e in spans if e["cat"] in per_step)
    assert {e["cat"] for e in spans} == {"h2d", "update", "exchange", "embed", "compute", "head", "scalar", "d2h"}


def test_reported_step_is_marked_on_the_steps_thread(sliced, machine) -> None:
    _, result = sliced
    trace = chrome_trace(result, machine)
    steps_tracks = [k for k, n in _thread_names(trace).items() if n == "steps"]
    assert len(steps_tracks) == 1
    steps = [e for e in _events(trace, "X") if (e["pid"], e["tid"]) == steps_tracks[0]]
    assert [e["name"] for e in steps] == [
        f"step {i}" + (" (reported)" if i == REPORTED_STEP else "") for i in range(len(result.step_ends))
    ]
    reported = [e for e in steps if e["args"]["reported"]]
    assert len(reported) == 1
    assert reported[0]["ts"] == pytest.approx(result.window[0] * 1e6, abs=1e-3)
    assert reported[0]["dur"] == pytest.approx(result.step_time_s * 1e6, abs=1e-3)
    instants = _events(trace, "i")
    assert sorted(e["ts"] for e in instants) == pytest.approx([w * 1e6 for w in result.window], abs=1e-3)


def test_window_only_keeps_the_reported_step_from_zero(sliced, machine) -> None:
    _, result = sliced
    trace = chrome_trace(result, machine, window_only=True)
    length_us = result.step_time_s * 1e6
    spans = _events(trace, "X")
    assert spans
    for event in spans:
        assert event["ts"] >= 0 and event["ts"] + event["dur"] <= length_us + 1e-2, event
    steps = [e for e in spans if e["cat"] == "step"]
    assert [e["name"] for e in steps] == [f"step {REPORTED_STEP} (reported)"]
    # clipping keeps exactly the busy time inside the window
    start, end = result.window
    inside = sum(max(0.0, min(t1, end) - max(t0, start)) for *_, t0, t1 in result.spans) * 1e6
    assert sum(e["dur"] for e in spans if e["cat"] != "step") == pytest.approx(inside, rel=1e-6)
    for event in _events(trace, "C"):
        assert 0 <= event["ts"] <= length_us + 1e-2


def test_no_recorded_spans_is_a_clear_error(machine, workload) -> None:
    result = evaluate(machine, workload, _sliced(), record=False).sim
    with pytest.raises(ZoplanError, match="record=True"):
        chrome_trace(result, machine)
    with pytest.raises(ZoplanError, match="record=True"):
        gantt(result, machine)


def test_write_trace_reports_an_unwritable_path(sliced, machine, tmp_path) -> None:
    _, result = sliced
    with pytest.raises(ZoplanError, match="cannot write .*trace.json"):
        write_trace(chrome_trace(result, machine), tmp_path / "missing" / "trace.json")


def test_a_trace_or_png_that_cannot_be_written_whole_leaves_the_earlier_one(
    sliced, machine, tmp_path, monkeypatch
) -> None:
    """A full disk left a cut trace over a good one written before, and an empty PNG: both are
    written beside their place and put there whole, or not at all."""
    import errno

    _, result = sliced
    trace = chrome_trace(result, machine)
    path = tmp_path / "trace.json"
    write_trace(trace, path)
    before = path.read_bytes()
    real_write = Path.write_text

    def full(self: Path, text: str, **kwargs) -> int:  # the disk fills after a few kilobytes
        real_write(self, text[:4096], **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(ZoplanError, match="No space left") as said:
        write_trace(trace, path)
    monkeypatch.undo()
    assert "free space" in said.value.fix
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["trace.json"]
    if not HAS_MATPLOTLIB:
        return
    png = tmp_path / "step.png"
    from matplotlib.figure import Figure

    def cut(self, fname, **kwargs) -> None:
        Path(fname).write_bytes(b"\x89PNG")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", cut)
    with pytest.raises(ZoplanError, match="No space left"):
        plot_png(result, machine, png)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace.json"]


# ----- merging ----------------------------------------------------------------------------------
def test_merge_keeps_pids_distinct_and_groups_named(sliced, whole, machine) -> None:
    _, result = sliced
    simulated = chrome_trace(result, machine)
    measured = chrome_trace(whole[1], machine, title="measured", window_only=True)
    before = copy.deepcopy(measured)
    merged = merge_traces(simulated, measured)
    assert json.dumps(measured) == json.dumps(before), "merge_traces modified its input"
    assert len(merged["traceEvents"]) == len(simulated["traceEvents"]) + len(measured["traceEvents"])
    names = _process_names(merged)
    assert len(names) == len(_process_names(simulated)) + len(_process_names(measured))
    sim_pids = {p for p, n in names.items() if n.endswith("(simulated)")}
    meas_pids = {p for p, n in names.items() if n.endswith("(measured)")}
    assert sim_pids and meas_pids and not sim_pids & meas_pids
    # every event still points at its own group's process
    for event in merged["traceEvents"][len(simulated["traceEvents"]) :]:
        assert event["pid"] in meas_pids
    # the measured group sorts after the simulated one
    sort_index = {e["pid"]: e["args"]["sort_index"] for e in _events(merged, "M") if e["name"] == "process_sort_index"}
    assert max(sort_index[p] for p in sim_pids) < min(sort_index[p] for p in meas_pids)
    assert merged["otherData"]["simulated.title"] == "simulated"
    assert merged["otherData"]["measured.title"] == "measured"
    json.dumps(merged, allow_nan=False)


def test_merge_keeps_explicit_pid_bases(sliced, machine) -> None:
    _, result = sliced
    a = chrome_trace(result, machine)
    b = chrome_trace(result, machine, title="measured", pid_base=100)
    assert min(_process_names(b)) == 101
    merged = merge_traces(a, b)
    assert set(_process_names(merged)) == set(_process_names(a)) | set(_process_names(b))
    # the same trace twice: the copy is shifted, not merged into the original's tracks
    twice = merge_traces(a, a)
    assert len(_process_names(twice)) == 2 * len(_process_names(a))
    with pytest.raises(ZoplanError):
        merge_traces()


# ----- terminal Gantt ---------------------------------------------------------------------------
def _render(renderable, width: int = 140) -> str:
    console = Console(record=True, width=width, color_system="truecolor", file=open("/dev/null", "w"))
    console.print(renderable)
    return console.export_text()


def test_gantt_shows_every_busy_row_gpu_names_and_legend(sliced, machine) -> None:
    layout, result = sliced
    text = _render(gantt(result, machine, width=100))
    for gpu in layout.gpus:
        assert gpu in text
    assert "legend" in text and "idle" in text
    for cat in ("h2d", "d2h", "compute", "exchange"):
        assert cat in text
    assert "ms" in text  # the axis unit of a millisecond step
    rows = [line for line in text.splitlines() if line.rstrip().endswith("%")]
    assert len(rows) == len(layout.gpus) * len(STREAMS)  # 8 GPUs x 4 streams, all busy
    for line in rows:
        # each timeline is exactly `width` cells of busy / partial / idle glyphs
        cells = [c for c in line if c in "█▄·"]
        assert len(cells) == 100, line


def test_gantt_busy_percent_matches_the_simulated_utilisation(whole, machine) -> None:
    _, result = whole
    text = _render(gantt(result, machine, width=60))
    compute_rows = [line for line in text.splitlines() if " compute " in line and line.rstrip().endswith("%")]
    assert len(compute_rows) == 2
    want = round(100 * result.utilization["compute gpu0"])
    assert all(line.rstrip().endswith(f"{want}%") for line in compute_rows), compute_rows
    assert "exchange" not in "\n".join(line for line in text.splitlines() if line.rstrip().endswith("%"))


def test_gantt_names_the_rows_by_gpu_or_by_cpu_rank(sliced, machine) -> None:
    from zoplan.planner import plan

    header = _render(gantt(sliced[1], machine, width=40)).splitlines()[2]  # under the axis labels
    assert header.split()[:2] == ["GPU", "stream"]
    report = plan("opt-125m", "cpu-local", global_batch=4, seq_len=64)
    cpu = load_topology("cpu-local")
    result = evaluate(cpu, Workload(report.shape, 4, 64), report.plan.to_layout(), record=True).sim
    header = _render(gantt(result, cpu, width=40)).splitlines()[2]
    assert header.split()[:2] == ["rank", "stream"]


@pytest.mark.parametrize("columns", [60, 80, 132])
def test_gantt_fits_the_terminal_with_its_labels(sliced, machine, columns: int) -> None:
    """No --width: as many time columns as leave every row's GPU, stream and busy % whole."""
    layout, result = sliced
    text = _render(gantt(result, machine, width=None, fit=columns), width=columns)
    rows = [line for line in text.splitlines() if line.rstrip().endswith("%")]
    assert len(rows) == len(layout.gpus) * len(STREAMS)
    assert all(len(line.rstrip()) <= columns for line in text.splitlines() if "█" in line or "·" in line)
    assert {line.split()[0] for line in rows if line[0] != " "} == set(layout.gpus)  # each GPU named
    streams = [line.split()[1] if line[0] != " " else line.split()[0] for line in rows]
    assert all(stream in STREAMS for stream in streams), streams  # each row's stream, whole


@pytest.mark.parametrize("columns", [20, 24, 27])
def test_gantt_in_a_very_narrow_terminal_crops_the_names_never_the_busy_share(sliced, whole, machine, columns) -> None:
    """Below ~30 columns the names give way (docs/timeline.md): the busy % stayed cut ("4" for
    42%, "10" for 100%) when the table shrank every column alike."""
    for _, result in (sliced, whole):
        text = _render(gantt(result, machine, width=None, fit=columns), width=columns)
        lines = text.splitlines()
        header = next(i for i, line in enumerate(lines) if "┬" in line)  # the axis, then a row per stream
        rows = lines[header + 1 : next(i for i, line in enumerate(lines) if line.startswith("legend"))]
        shares = [round(100 * v) for k, v in result.utilization.items() if k.startswith("compute")]
        assert rows and all(len(line.rstrip()) <= columns for line in rows)
        assert all(re.search(r" \d{1,3}%$", line.rstrip()) for line in rows), rows
        assert any(line.rstrip().endswith(f" {shares[0]}%") for line in rows), (shares, rows)
        # the legend wraps by whole items: never a colour block at a line's end, its name on the next
        legend = lines[next(i for i, line in enumerate(lines) if line.startswith("legend")) :]
        assert len(legend) > 1 and not [line for line in legend if re.search(r"[█▄·]\s*$", line)], legend
        if columns >= 24:  # (the longest item: 22 columns)
            assert any("▄ busy < half the cell" in line for line in legend), legend  # (its last word was wrapped)


def test_gantt_rejects_a_useless_width(sliced, machine) -> None:
    with pytest.raises(ZoplanError, match="width"):
        gantt(sliced[1], machine, width=3)


# ----- PNG --------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib (the 'plot' extra) is not installed")
def test_png_is_written(sliced, machine, tmp_path) -> None:
    _, result = sliced
    path = tmp_path / "step.png"
    plot_png(result, machine, path)
    data = path.read_bytes()
    assert len(data) > 1000
    assert data[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib (the 'plot' extra) is not installed")
def test_png_unwritable_path_is_a_zoplan_error(sliced, machine, tmp_path) -> None:
    with pytest.raises(ZoplanError, match="cannot write PNG"):
        plot_png(sliced[1], machine, tmp_path / "missing" / "step.png")


def test_png_without_matplotlib_names_the_extra(sliced, machine, tmp_path, monkeypatch) -> None:
    # a None entry in sys.modules makes `import matplotlib...` raise ImportError
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ZoplanError, match=r"pip install -e '\.\[plot\]' in the zoplan checkout"):
        plot_png(sliced[1], machine, tmp_path / "step.png")
    assert not (tmp_path / "step.png").exists()


def test_importing_trace_pulls_in_neither_matplotlib_nor_torch() -> None:
    code = (
        "import sys, zoplan.sim.trace; "
        "bad = [m for m in ('matplotlib', 'torch') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent)
