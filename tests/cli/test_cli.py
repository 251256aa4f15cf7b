"""The ``zoplan`` command line, run for real: what it prints, the files it writes, the pins it
honours and the one-line errors it gives for bad input.

Successful commands run in-process through ``typer.testing.CliRunner`` on ``zoplan.cli.app``.
Bad input goes through ``zoplan.cli.main()`` (the console-script entry point, which turns a
ZoplanError into "error: ..." on stderr and exit status 2): in-process with ``sys.argv`` set for
most cases, and as a real ``python -m zoplan.cli`` subprocess for a few, so the path a user
takes (no traceback, status 2) is covered end to end.
"""

from __future__ import annotations

import importlib.util
import json
import re
import math
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from zoplan import cli
from zoplan.errors import ZoplanError
from zoplan.planfile import load_plan
from zoplan.topology import bundled_names, resolve_topology_path

runner = CliRunner()

# A small, fast case (about 0.5 s of search) that still exercises NVSwitch, slicing and residency.
SMALL = ["--model", "opt-1.3b", "--topology", "dgx-a100", "--global-batch", "8", "--seq-len", "256"]
GLOBAL_BATCH, SEQ_LEN = 8, 256
# A tiny case (about 0.15 s) for tests that only need some valid plan or some search.
TINY = ["--model", "opt-125m", "--topology", "rtx4090-4x", "--global-batch", "4", "--seq-len", "128"]

SUMMARY_KEYS = {
    "perturbation",
    "data",
    "gpus",
    "slices_per_block",
    "wire_dtype",
    "micro_batch",
    "step_time_s",
    "tokens_per_s",
    "gpu_memory_bytes",
    "host_memory_bytes",
    "bottleneck",
    "bound_fraction",
}


# ----- helpers ------------------------------------------------------------------------------------
def invoke(*args: str) -> Any:
    """Run a command in-process; it must succeed."""
    result = runner.invoke(cli.app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"zoplan {' '.join(args)} raised {result.exception!r}\n{result.output}"
    )
    assert result.exit_code == 0, f"zoplan {' '.join(args)} exited {result.exit_code}\n{result.output}"
    return result


def plan_json(*args: str) -> dict:
    result = invoke("plan", "--json", *args)
    return json.loads(result.stdout)  # the whole stdout is one JSON object


def run_main(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str
) -> tuple[int | str | None, str, str]:
    """Run ``zoplan.cli.main()`` (the console script) in-process: (exit status, stdout, stderr).
    Any exception other than SystemExit escapes and fails the test, as a traceback would."""
    monkeypatch.setattr(sys, "argv", ["zoplan", *args])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def assert_one_error(code: int | str | None, err: str, *needles: str) -> str:
    """Exit status 2, exactly one "error:" message on stderr containing every needle, no traceback."""
    assert code == 2, f"exit status {code!r}, stderr: {err}"
    assert "Traceback" not in err
    assert err.startswith("error: "), err
    assert err.count("error:") == 1, err
    lines = [line for line in err.splitlines() if line.strip()]
    # the message itself, optionally followed by one "fix:" line
    assert len(lines) <= 2 and all(line.startswith("  fix: ") for line in lines[1:]), err
    for needle in needles:
        assert needle in err, f"{needle!r} not in: {err}"
    return err


def run_subprocess(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "zoplan.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def edited_yaml(src: Path, dst: Path, change: Callable[[dict], None]) -> Path:
    data = yaml.safe_load(src.read_text(encoding="utf-8"))
    change(data)
    dst.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return dst


def topology_copy(
    tmp_path: Path, change: Callable[[dict], None] = lambda d: None, name: str = "topo.yaml", base: str = "rtx4090-4x"
) -> Path:
    return edited_yaml(resolve_topology_path(base), tmp_path / name, change)


# ----- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def plain_consoles(monkeypatch: pytest.MonkeyPatch) -> None:
    """zoplan.cli builds its rich consoles at import time, from whether stdout/stderr were a
    terminal then; under ``pytest -s`` in a terminal they would emit colour codes into the
    captured text. Plain consoles (still writing to whatever sys.stdout/sys.stderr is) instead."""
    monkeypatch.setattr(cli, "out", Console(width=160, color_system=None, force_terminal=False))
    monkeypatch.setattr(cli, "err", Console(stderr=True, width=160, color_system=None, force_terminal=False))


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """``zoplan plan --json -o plan.yaml`` for the small case: its JSON report and the plan file."""
    path = tmp_path_factory.mktemp("planned") / "plan.yaml"
    result = invoke("plan", *SMALL, "--json", "-o", str(path))
    return json.loads(result.stdout), path


# ----- 1. plan --json -----------------------------------------------------------------------------
def test_plan_json_has_the_documented_keys(planned) -> None:
    report, _ = planned
    assert {"best", "baseline", "speedup_vs_baseline", "candidates", "search"} <= set(report)
    assert report["model"] == "opt-1.3b" and report["topology"] == "dgx-a100"
    assert report["global_batch"] == GLOBAL_BATCH and report["seq_len"] == SEQ_LEN
    for which in ("best", "baseline"):
        missing = SUMMARY_KEYS - set(report[which])
        assert not missing, f"{which} lacks {sorted(missing)}"
    assert report["candidates"], "no candidates listed"
    for cand in report["candidates"]:
        assert SUMMARY_KEYS <= set(cand)
    # the best layout's step with compute, then transfers, a quarter slower: never shorter, and
    # at most a quarter longer
    what_if = report["sensitivity"]
    assert what_if["factor"] == 1.25
    for key in ("compute_step_time_s", "transfers_step_time_s"):
        assert report["best"]["step_time_s"] <= what_if[key] <= 1.25 * report["best"]["step_time_s"] * 1.001


def test_plan_json_is_consistent(planned) -> None:
    report, _ = planned
    best, base = report["best"], report["baseline"]
    for summary in (best, base, *report["candidates"]):
        step = summary["step_time_s"]
        assert step > 0 and math.isfinite(step)
        assert summary["tokens_per_s"] == pytest.approx(GLOBAL_BATCH * SEQ_LEN / step, rel=1e-9)
        assert 0 < summary["bound_fraction"] <= 1 + 1e-9
        assert summary["gpu_memory_bytes"] > 0 and summary["host_memory_bytes"] > 0
        assert summary["bottleneck"]
        assert len(summary["gpus"]) >= summary["perturbation"] * summary["data"]
    assert report["speedup_vs_baseline"] == pytest.approx(base["step_time_s"] / best["step_time_s"], rel=1e-9)
    assert all(best["step_time_s"] <= c["step_time_s"] for c in report["candidates"])
    assert report["candidates"][0] == best  # the best is the first row shown
    # ZO2 (one GPU, whole blocks) is inside the search space, so the best cannot be slower
    assert best["step_time_s"] <= base["step_time_s"] * (1 + 1e-9)
    assert base["perturbation"] == 1 and base["data"] == 1 and len(base["gpus"]) == 1
    search = report["search"]
    assert search["evaluated"] >= 1
    assert search["considered"] >= search["evaluated"]


def test_plan_json_stdout_is_only_json() -> None:
    result = invoke("plan", "--json", *TINY)
    assert result.stdout.lstrip().startswith("{") and result.stdout.rstrip().endswith("}")
    json.loads(result.stdout)


def test_plan_json_keeps_the_footers_warnings() -> None:
    """The table's footer warns what a plan's figures rest on (no price for --objective cost, a
    GPU that charges nothing for launches): --json dropped them, exit 0 and nothing on stderr.
    They are the JSON's "warnings" now, and said on stderr too."""
    args = ("-m", "opt-1.3b", "-t", "rtx4090-4x", "--objective", "cost")
    footer = invoke("plan", *args).stdout
    result = invoke("plan", *args, "--json")
    said = json.loads(result.stdout)["warnings"]
    assert any(line.startswith("no price: topology 'rtx4090-4x'") for line in said), said
    for line in said:
        assert " ".join(line.split()) in " ".join(footer.split()), line  # the footer's words
        assert line.split(":")[0] in result.stderr
    assert json.loads(invoke("plan", "--json", "-m", "opt-13b", "-t", "dgx-a100").stdout)["warnings"] == []
    # a rotary model run past the positions it was trained for (OPT's learned ones are refused)
    said = json.loads(invoke("plan", "--json", "-m", "llama-2-7b", "-t", "dgx-a100", "-s", "8192").stdout)["warnings"]
    assert any("8192 positions a sequence, more than the 4096 of llama-2-7b" in line for line in said), said
    assert not json.loads(invoke("plan", "--json", "-m", "llama-2-7b", "-t", "dgx-a100", "-s", "4096").stdout)[
        "warnings"
    ]


# ----- 2. plan -o, timeline -----------------------------------------------------------------------
def test_plan_output_file_reads_back_and_matches_the_report(planned) -> None:
    report, path = planned
    assert path.exists()
    plan = load_plan(path)
    best = report["best"]
    assert plan.model.name == "opt-1.3b" and plan.topology.name == "dgx-a100"
    assert plan.batch.global_batch == GLOBAL_BATCH and plan.batch.seq_len == SEQ_LEN
    assert plan.layout.perturbation == best["perturbation"] and plan.layout.data == best["data"]
    assert plan.layout.compute_gpus == best["compute_gpus"]
    assert plan.transfer.slices_per_block == best["slices_per_block"]
    assert plan.batch.micro_batch == best["micro_batch"]
    assert len(plan.resident_blocks) == best["resident_blocks"]
    assert plan.prediction.step_time_s == pytest.approx(best["step_time_s"], rel=1e-12)
    assert plan.prediction.speedup_vs_baseline == pytest.approx(report["speedup_vs_baseline"], rel=1e-12)
    assert plan.layout.world_size == len(plan.layout.ranks) == len(best["gpus"])


def test_plan_table_mentions_the_written_file(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    result = invoke("plan", *TINY, "-o", str(path))
    assert path.exists() and load_plan(path).model.name == "opt-125m"
    assert f"wrote {path}" in result.stdout


def test_timeline_writes_a_chrome_trace(planned, tmp_path: Path) -> None:
    _, path = planned
    out = tmp_path / "trace.json"
    result = invoke("timeline", str(path), "-o", str(out))
    assert f"wrote {out}" in result.stdout
    trace = json.loads(out.read_text(encoding="utf-8"))
    assert isinstance(trace, dict) and isinstance(trace["traceEvents"], list)
    assert trace["traceEvents"], "the trace has no events"
    names = json.dumps(trace["traceEvents"])
    for gpu in load_plan(path).layout.compute_gpus:
        assert gpu in names


def test_timeline_show_draws_every_gpu(planned) -> None:
    _, path = planned
    result = invoke("timeline", str(path), "--show")
    plan = load_plan(path)
    for rank in plan.layout.ranks:
        assert rank.gpu in result.stdout
    assert "dgx-a100" in result.stdout
    # the same what-if as the plan's report, from the plan file alone
    report, _ = planned
    step, what_if = report["best"]["step_time_s"], report["sensitivity"]
    moved = [f"{what_if[k] / step - 1:+.0%}" for k in ("compute_step_time_s", "transfers_step_time_s")]
    assert (
        f"sensitivity: compute 25% slower (host work included) → step {moved[0]}; "
        f"transfers 25% slower → step {moved[1]}"
    ) in result.stdout


def test_timeline_show_on_a_terminal_wraps_its_sensitivity_line_at_words(planned, monkeypatch, capsys) -> None:
    """On an 80-column terminal the chart fits and so does the line under it, broken between
    words (the terminal would cut it mid-word); into a pipe it stays one line (above)."""
    _, path = planned
    monkeypatch.setattr(cli, "out", Console(width=80, color_system=None, force_terminal=False))
    monkeypatch.setattr(cli.sys.stdout, "isatty", lambda: True)
    code, out, err = run_main(monkeypatch, capsys, "timeline", str(path), "--show")
    assert code == 0, err
    assert all(len(line) <= 80 for line in out.splitlines()), out
    flat = " ".join(out.split())
    assert "sensitivity: compute 25% slower (host work included) → step" in flat
    at = out.index("sensitivity:")
    assert "\n" in out[at:].rstrip() and not out[at:].split("\n")[1][:1].isspace(), out[at:]


def test_timeline_without_options_shows_the_chart(planned) -> None:
    _, path = planned
    result = invoke("timeline", str(path))
    assert "gpu0" in result.stdout and "wrote" not in result.stdout


@pytest.mark.parametrize(
    "args,says",
    [
        (["--rank", "gpu0"], "--rank chooses the ranks --ops lists"),  # the chart shows them all
        (["-o", "step.png"], "-o writes a Chrome trace (JSON), not a picture"),  # --png draws one
        (["-o", "step.SVG"], "-o writes a Chrome trace (JSON), not a picture"),
        (["--png", "step.svg"], "--png draws a PNG: step.svg would not open as what its name says"),
        # everything is checked before the trace is written
        (["-o", "t.json", "--width", "50"], "--width sets the terminal chart's time columns, and no chart is drawn"),
        (["-o", "t.json", "--show", "--width", "0"], "gantt width must be from 10 to 1000 columns, got 0"),
        (["-o", "t.json", "--png", "missing/step.png"], "cannot write PNG missing/step.png"),
    ],
)
def test_timeline_refuses_options_that_would_not_do_what_they_say(
    planned, monkeypatch, capsys, tmp_path: Path, args: list[str], says: str
) -> None:
    _, path = planned
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(monkeypatch, capsys, "timeline", str(path), *args)
    assert_one_error(code, err, says)
    assert list(tmp_path.iterdir()) == [] and out == ""


@pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="matplotlib (the 'plot' extra) is not installed"
)
def test_timeline_png_draws_over_its_own_pictures_only(planned, monkeypatch, capsys, tmp_path: Path) -> None:
    """--png never writes over a file zoplan did not draw (the plan itself, someone's picture)."""
    _, path = planned
    monkeypatch.chdir(tmp_path)
    plan_copy, photo = tmp_path / "plan.png", tmp_path / "photo.png"
    plan_copy.write_bytes(path.read_bytes())
    photo.write_bytes(b"\x89PNG\r\n\x1a\n a picture of someone's")
    for theirs in (plan_copy, photo):
        before = theirs.read_bytes()
        code, _, err = run_main(monkeypatch, capsys, "timeline", str(path), "--png", theirs.name)
        assert_one_error(code, err, f"{theirs.name} exists and is not a PNG zoplan wrote: it is not overwritten")
        assert theirs.read_bytes() == before
    for _ in range(2):  # drawn, then drawn over
        code, out, _ = run_main(monkeypatch, capsys, "timeline", str(path), "--png", "step.png")
        assert code == 0 and "wrote step.png" in out
    assert (tmp_path / "step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_timeline_lists_a_rank_named_twice_once(planned) -> None:
    _, path = planned
    once = invoke("timeline", str(path), "--ops", "--rank", "gpu0")
    twice = invoke("timeline", str(path), "--ops", "--rank", "gpu0", "--rank", "gpu0")
    assert once.stdout.count("gpu0") > 0 and twice.stdout == once.stdout


# ----- 3. pins ------------------------------------------------------------------------------------
def test_pin_perturbation_and_data() -> None:
    best = plan_json(*SMALL, "--pertp", "2", "--ddp", "2")["best"]
    assert best["perturbation"] == 2 and best["data"] == 2
    assert len(best["compute_gpus"]) == 4


def test_pin_gpus_uses_exactly_those_compute_gpus() -> None:
    report = plan_json(*SMALL, "--gpus", "gpu0,gpu1", "--pertp", "2", "--ddp", "1")
    best = report["best"]
    assert best["compute_gpus"] == ["gpu0", "gpu1"]
    assert best["perturbation"] == 2 and best["data"] == 1
    for cand in report["candidates"]:
        assert cand["compute_gpus"] == ["gpu0", "gpu1"]


def test_pin_gpus_in_the_given_rank_order() -> None:
    best = plan_json(*TINY, "--gpus", "gpu3,gpu1", "--pertp", "1", "--ddp", "2")["best"]
    assert best["compute_gpus"] == ["gpu3", "gpu1"]


def test_pin_slices_with_sliced_uploads() -> None:
    report = plan_json(*SMALL, "--slices", "16", "--upload", "sliced")
    for cand in (report["best"], *report["candidates"]):
        assert cand["upload"] == "sliced" and cand["slices_per_block"] == 16


def test_pin_slices_alone_is_honoured() -> None:
    best = plan_json(*TINY, "--slices", "4")["best"]
    assert best["slices_per_block"] == 4


def test_pin_slices_not_dividing_every_mover_count_still_plans() -> None:
    result = runner.invoke(cli.app, ["plan", "--json", *SMALL, "--slices", "4"])
    assert result.exception is None, repr(result.exception)
    best = json.loads(result.stdout)["best"]
    assert best["slices_per_block"] == 4 and 4 % len(best["movers"]) == 0


def test_pin_micro_batch() -> None:
    report = plan_json(*SMALL, "--micro-batch", "2")
    for cand in (report["best"], *report["candidates"]):
        assert cand["micro_batch"] == 2


def test_pin_wire_dtype_narrower_than_compute_dtype(tmp_path: Path) -> None:
    path = tmp_path / "fp32.yaml"
    report = plan_json(*SMALL, "--dtype", "fp32", "--wire-dtype", "bf16", "-o", str(path))
    for cand in (report["best"], *report["candidates"]):
        assert cand["wire_dtype"] == "bf16"
    plan = load_plan(path)
    assert plan.transfer.param_dtype == "fp32" and plan.transfer.wire_dtype == "bf16"


def test_pin_upload_prefetch_and_resident() -> None:
    best = plan_json(*TINY, "--upload", "whole", "--prefetch", "2", "--resident", "3")["best"]
    assert best["upload"] == "whole" and best["slices_per_block"] == 1
    assert best["prefetch"] == 2 and best["resident_blocks"] == 3
    assert best["movers"] == best["compute_gpus"]


def test_pin_sliced_over_all_gpus_adds_relays() -> None:
    best = plan_json(*TINY, "--upload", "sliced", "--movers", "all", "--pertp", "1", "--ddp", "1")["best"]
    assert best["upload"] == "sliced" and len(best["compute_gpus"]) == 1
    assert sorted(best["movers"]) == ["gpu0", "gpu1", "gpu2", "gpu3"]


# ----- 4. compare, topo, models -------------------------------------------------------------------
def test_compare_json_lists_both_machines() -> None:
    result = invoke("compare", "-m", "opt-13b", "-t", "dgx-a100", "-t", "l40s-8x", "--json")
    report = json.loads(result.stdout)
    assert report["model"] == "opt-13b"
    machines = report["machines"]
    assert [m["topology"] for m in machines] == ["dgx-a100", "l40s-8x"]
    for m in machines:
        assert "error" not in m, m
        assert m["step_time_s"] > 0 and m["speedup_vs_baseline"] >= 1 - 1e-9
        assert m["price_per_hour_usd"] > 0


def test_compare_reports_a_machine_that_does_not_fit_beside_one_that_does() -> None:
    result = invoke("compare", "-m", "opt-13b", "-t", "cpu-local", "-t", "rtx4090-4x", "--json", "-b", "8")
    machines = {m["topology"]: m for m in json.loads(result.stdout)["machines"]}
    assert set(machines) == {"cpu-local", "rtx4090-4x"}
    assert "short by" in machines["cpu-local"]["error"]
    assert machines["rtx4090-4x"]["step_time_s"] > 0


def test_an_empty_model_or_topology_name_says_so() -> None:
    """From Python as from the command line (where an empty argument is refused first, below):
    Path("") is the current directory, so an empty name must not read as "cannot read topology
    file ." or "directory . has no config.json"."""
    from zoplan.errors import ZoplanError
    from zoplan.models import load_model_shape
    from zoplan.planner import plan
    from zoplan.topology import load_topology

    for call, needle in (
        (lambda: load_topology(""), "the topology name is empty"),
        (lambda: load_model_shape(" "), "the model name is empty"),
        (lambda: plan("opt-125m", " "), "the topology name is empty"),
    ):
        with pytest.raises(ZoplanError, match=needle):
            call()


@pytest.mark.parametrize(
    "args, needle",
    [
        (("run", "--steps", "1", "-o", ""), "-o is empty"),
        (
            (
                "plan",
                "-m",
                "tiny-opt",
                "--output=",
            ),
            "--output is empty",
        ),
        (("validate", " "), "an argument is empty"),
    ],
)
def test_an_empty_argument_is_an_error_before_anything_runs(monkeypatch, capsys, tmp_path, args, needle) -> None:
    """An unset shell variable (`-o "$OUT"`) gives an empty argument: as a path it would be the
    current directory, where `zoplan run` would have written its run. Nothing is written."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(monkeypatch, capsys, *args)
    assert_one_error(code, err, needle)
    assert list(tmp_path.iterdir()) == []


def test_compare_of_commas_alone_is_an_error_not_an_empty_table(monkeypatch, capsys) -> None:
    code, out, err = run_main(monkeypatch, capsys, "compare", "-m", "opt-125m", "-t", ",")
    assert_one_error(code, err, "no machine named", "-t dgx-a100,l40s-8x")
    assert "verdict" not in out


def test_compare_all_plans_every_bundled_gpu_machine_and_gives_a_verdict() -> None:
    """`-t all`, or no -t at all: every bundled GPU machine (not cpu-local), once each, then a
    verdict line naming the fastest and the cheapest per token."""
    from zoplan.planner import all_machines

    gpu_machines = [name for name in bundled_names() if name != "cpu-local"]
    assert all_machines(["all"]) == all_machines([]) == gpu_machines
    assert all_machines(["l40s-8x", "all"]) == ["l40s-8x", *(m for m in gpu_machines if m != "l40s-8x")]
    # comma-separated names, as users type lists: the same as repeating -t
    assert all_machines(["cpu-local,dgx-a100", "l40s-8x,"]) == ["cpu-local", "dgx-a100", "l40s-8x"]
    assert all_machines(["dgx-a100, all"]) == ["dgx-a100", *(m for m in gpu_machines if m != "dgx-a100")]
    workload = ("-m", "opt-125m", "-b", "4", "-s", "64")
    machines = json.loads(invoke("compare", *workload, "--json").stdout)["machines"]
    assert [m["topology"] for m in machines] == gpu_machines
    fastest = min(machines, key=lambda m: m["step_time_s"])["topology"]
    cheapest = min((m for m in machines if m["usd_per_mtok"] is not None), key=lambda m: m["usd_per_mtok"])
    table = invoke("compare", *workload, "-t", "all").stdout
    assert f"verdict: fastest {fastest} (" in table and f"cheapest per token {cheapest['topology']} (" in table


def test_the_verdict_gives_the_time_and_price_of_the_tokens_asked_for() -> None:
    workload = ("-m", "opt-125m", "-b", "4", "-s", "64", "-t", "dgx-a100", "-t", "l40s-8x")
    machines = {m["topology"]: m for m in json.loads(invoke("compare", *workload, "--json").stdout)["machines"]}
    verdict = invoke("compare", *workload, "--tokens", "1e9").stdout.strip().splitlines()[-1]
    fastest = min(machines.values(), key=lambda m: m["step_time_s"])
    hours = 1e9 / fastest["tokens_per_s"] / 3600
    price = fastest["usd_per_mtok"] * 1e3
    assert verdict.startswith(f"verdict: fastest {fastest['topology']} (")
    assert f"1e+09 tokens in {hours:,.1f} h, ${price:,.0f})" in verdict, verdict
    # --json says the same, with --tokens (it was left out: only the machines were printed)
    said = json.loads(invoke("compare", *workload, "--tokens", "1e9", "--json").stdout)["verdict"]
    assert said["tokens"] == 1e9 and said["cannot_run"] == 0
    assert said["fastest"]["topology"] == fastest["topology"]
    assert said["fastest"]["hours"] == pytest.approx(hours) and said["fastest"]["usd"] == pytest.approx(price)
    cheapest = min(machines.values(), key=lambda m: m["usd_per_mtok"])
    assert said["cheapest"]["topology"] == cheapest["topology"]
    assert said["cheapest"]["usd"] == pytest.approx(cheapest["usd_per_mtok"] * 1e3)
    # a count no training sees (inf gave "Infinity" in the JSON, which strict parsers refuse, with exit 0)
    for count in ("inf", "1e400", "1e19"):
        refused = runner.invoke(cli.app, ["compare", *workload, "--tokens", count, "--json"])
        assert refused.exit_code == 2 and not refused.stdout.strip(), refused.output
    most = invoke("compare", *workload, "--tokens", "1e18", "--json").stdout
    assert json.loads(most, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))["verdict"]["tokens"] == 1e18


def test_version_is_the_package_version() -> None:
    import re

    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, re.M)
    assert version is not None and invoke("--version").stdout.strip() == f"zoplan {version.group(1)}"
    # `python -m zoplan` is the command too
    module = subprocess.run([sys.executable, "-m", "zoplan", "--version"], capture_output=True, text=True)
    assert module.returncode == 0 and module.stdout.strip() == f"zoplan {version.group(1)}", module.stderr


@pytest.mark.parametrize(
    ("option", "typed", "meant"),
    [("-m", "opt-66B", "opt-66b"), ("-m", "llama2-70b", "llama-2-70b"), ("-t", "dgx_a100", "dgx-a100")],
)
def test_a_mistyped_name_is_answered_with_the_one_meant(monkeypatch, capsys, option, typed, meant) -> None:
    code, _, err = run_main(monkeypatch, capsys, "plan", option, typed)
    assert_one_error(code, err, f"did you mean '{meant}'?")


def test_topo_list_names_every_bundled_machine() -> None:
    result = invoke("topo", "list")
    for name in bundled_names():
        assert name in result.stdout


def test_topo_show_draws_the_tree() -> None:
    result = invoke("topo", "show", "dgx-a100")
    assert "gpu0" in result.stdout and "gpu7" in result.stdout
    assert "NVSwitch" in result.stdout


def test_models_list() -> None:
    result = invoke("models", "list")
    assert "opt-175b" in result.stdout and "llama-2-13b" in result.stdout


# ----- 5. defaults --------------------------------------------------------------------------------
def test_plan_without_arguments_uses_the_defaults() -> None:
    result = invoke("plan")
    assert "ZO2" in result.stdout  # the baseline row
    assert "opt-175b" in result.stdout and "dgx-a100" in result.stdout
    assert "speedup" in result.stdout
    assert "ZO2 baseline (1 GPU, dual forward" in result.stdout
    # the default best is compute-bound: a quarter more compute is a quarter more step, faster
    # transfers would not help
    assert (
        "sensitivity: compute 25% slower (host work included) → step +25%; transfers 25% slower → step +0%"
        in result.stdout
    )


def test_the_baseline_of_a_cpu_machine_is_named_for_its_ranks() -> None:
    result = invoke("plan", "--model", "opt-125m", "-t", "cpu-local", "-b", "4", "-s", "64")
    assert "ZO2 baseline (1 CPU rank, dual forward" in result.stdout
    assert "GPU, dual" not in result.stdout


# ----- 6. bad input: real subprocesses ------------------------------------------------------------
def test_subprocess_topology_yaml_syntax_error(tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("version: 1\nname: broken\n  gpus: [\n", encoding="utf-8")
    proc = run_subprocess("plan", "-t", str(bad), "-m", "opt-125m")
    assert proc.stdout == ""
    assert_one_error(proc.returncode, proc.stderr, "broken.yaml", "line 3", "invalid YAML")


def test_subprocess_unknown_model() -> None:
    proc = run_subprocess("plan", "-m", "opt-9000b", "-t", "rtx4090-4x")
    assert_one_error(proc.returncode, proc.stderr, "opt-9000b", "opt-125m")


def test_subprocess_batch_not_divisible_by_pinned_ddp() -> None:
    proc = run_subprocess("plan", "-m", "opt-125m", "-t", "dgx-a100", "--ddp", "3", "--global-batch", "16")
    err = assert_one_error(proc.returncode, proc.stderr, "16", "3")
    assert "divide" in err


# ----- 6. bad input: in-process through main() ----------------------------------------------------
@pytest.mark.parametrize(
    "change, needles",
    [
        pytest.param(lambda d: d["gpus"][0].update(color="red"), ["gpus.0.color", "unknown key"], id="unknown-key"),
        pytest.param(lambda d: d.update(vendor="acme"), ["'vendor'", "unknown key"], id="unknown-top-key"),
        pytest.param(
            lambda d: d["links"][0].update(gbps=0), ["links.0.gbps", "greater than or equal to 0.001"], id="zero-gbps"
        ),
        pytest.param(
            lambda d: d["links"][1].update(gbps_back=-5),
            ["links.1.gbps_back", "greater than or equal to 0.001"],
            id="negative-gbps",
        ),
        pytest.param(
            lambda d: d.update(links=[l for l in d["links"] if l["b"] != "gpu2"]),
            ["gpu2", "no PCIe path", "host memory"],
            id="no-host-path",
        ),
        pytest.param(lambda d: d.update(version=2), ["version 2", "not supported"], id="version"),
    ],
)
def test_bad_topology_file(tmp_path: Path, monkeypatch, capsys, change, needles) -> None:
    bad = topology_copy(tmp_path, change, name="bad-topo.yaml")
    code, out, err = run_main(monkeypatch, capsys, "plan", *TINY[:2], "-t", str(bad))
    assert_one_error(code, err, "bad-topo.yaml", *needles)
    assert out == ""


def test_bad_topology_also_fails_topo_show(tmp_path: Path, monkeypatch, capsys) -> None:
    bad = topology_copy(tmp_path, lambda d: d["links"][0].update(gbps=0), name="zero.yaml")
    code, _, err = run_main(monkeypatch, capsys, "topo", "show", str(bad))
    assert_one_error(code, err, "zero.yaml", "links.0.gbps")


def test_unknown_topology_name(monkeypatch, capsys) -> None:
    code, _, err = run_main(monkeypatch, capsys, "plan", "-m", "opt-125m", "-t", "dgx-z100")
    assert_one_error(code, err, "dgx-z100", "dgx-a100")  # names it and lists the real ones


def test_missing_topology_file(tmp_path: Path, monkeypatch, capsys) -> None:
    code, _, err = run_main(monkeypatch, capsys, "plan", "-m", "opt-125m", "-t", str(tmp_path / "nope.yaml"))
    assert_one_error(code, err, "nope.yaml", "does not exist")


def test_model_that_fits_nowhere_says_which_memory_is_short(monkeypatch, capsys) -> None:
    code, _, err = run_main(monkeypatch, capsys, "plan", "--model", "opt-175b", "--topology", "rtx4090-4x")
    assert_one_error(code, err, "opt-175b", "rtx4090-4x", "host memory", "short by", "GiB")
    # the host holds the parameters once: a smaller batch cannot help, a bigger machine can
    assert "more host memory" in err and "micro-batch" not in err
    code, _, err = run_main(
        monkeypatch,
        capsys,
        "plan",
        "--model",
        "opt-66b",
        "--topology",
        "rtx4090-4x",
        "--dtype",
        "fp32",
        "--wire-dtype",
        "fp32",
    )
    assert_one_error(code, err, "host memory", "--wire-dtype bf16 or fp16, not fp32")


def test_a_tiny_model_on_a_large_machine_shows_its_step_in_microseconds(monkeypatch, capsys) -> None:
    code, out, _ = run_main(monkeypatch, capsys, "plan", "--model", "tiny-opt", "--topology", "dgx-a100")
    assert code == 0 and " µs" in out and " 0.0 ms" not in out
    row = next(line for line in out.splitlines() if line.lstrip().startswith("1 "))
    assert re.search(r"\d\.\dM\b", row), row  # millions of tokens per second, not thousands of thousands
    assert " 0.00 " not in row  # a fraction of a cent per million tokens is not free
    assert re.search(r" (<0\.0001|0\.000\d+|0\.00\d\d?) ", row), row  # two significant digits, or under 0.0001


def test_a_step_shorter_than_its_launches_says_the_gpu_charges_none(monkeypatch, capsys, tmp_path: Path) -> None:
    """The GPU presets charge no host time per tensor op (op_us 0, not yet measured on a GPU): a
    tiny model's step of microseconds says that its launches alone would take longer; a large
    model's step, or a GPU model that charges them, says nothing."""
    code, out, _ = run_main(
        monkeypatch,
        capsys,
        "plan",
        "--model",
        "tiny-opt",
        "--topology",
        "h100-pcie-1x",
        "-o",
        str(tmp_path / "tiny.yaml"),
    )
    plan = load_plan(tmp_path / "tiny.yaml")
    # one GPU, both branches, the batch in micro-batches: tiny-opt's 4 blocks of 38 ops, 14 before and after
    micro_batches = plan.batch.global_batch // plan.batch.micro_batch
    ops = (14 + 4 * 38 + 14) * micro_batches * 2
    says = f"no launch cost: gpu model 'h100-pcie-80gb' gives no op_us, so the {ops} tensor ops a GPU issues"
    assert code == 0 and says in out.replace("\n", " "), out
    code, out, _ = run_main(monkeypatch, capsys, "timeline", str(tmp_path / "tiny.yaml"))  # and its chart
    assert code == 0 and says in out.replace("\n", " "), out
    code, out, _ = run_main(monkeypatch, capsys, "plan", "--model", "opt-13b", "--topology", "h100-pcie-1x")
    assert code == 0 and "no launch cost" not in out
    charged = topology_copy(
        tmp_path, lambda d: d["gpu_models"]["h100-pcie-80gb"].update(op_us=5.0), base="h100-pcie-1x"
    )
    code, out, _ = run_main(monkeypatch, capsys, "plan", "--model", "tiny-opt", "--topology", str(charged))
    assert code == 0 and "no launch cost" not in out


def test_cheap_layouts_rank_apart_by_their_price() -> None:
    """Below a dime per million tokens the price keeps two significant digits: a cost-ranked table
    of a small model read <0.01 on every row."""
    from zoplan.cli.render import _fmt_usd

    assert [_fmt_usd(x) for x in (2.345, 0.1, 0.0123, 0.0041, 0.00012, 0.00004, 0.0102, 0.09)] == [
        "2.35",
        "0.10",
        "0.012",
        "0.0041",
        "0.00012",
        "<0.0001",
        "0.010",  # (its second digit kept: "0.01" read as less precise than its neighbours)
        "0.090",
    ]


def test_the_search_line_counts_layouts_and_candidates_apart(monkeypatch, capsys) -> None:
    """Each layout that fits is weighed with and without resident blocks, so the search weighs
    more candidates than layouts: the summary says which count is which, and its counts add up."""
    monkeypatch.setattr(cli, "out", Console(width=400, color_system=None, force_terminal=False))
    code, out, err = run_main(monkeypatch, capsys, "plan", "-m", "opt-13b", "-t", "l40s-8x")
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.startswith("search: "))
    found = re.fullmatch(
        r"search: (\d+) layouts, (\d+) rejected for memory; (\d+) candidates with their resident-block "
        r"options: (\d+) simulated \((\d+) stopped early\), (\d+) pruned by the bound; [\d.]+ s",
        line,
    )
    assert found, line
    layouts, rejected, candidates, simulated, stopped, pruned = map(int, found.groups())
    assert candidates == simulated + pruned and stopped <= simulated
    assert layouts - rejected < candidates <= 2 * (layouts - rejected), line


@pytest.mark.parametrize("command", ["plan", "compare"])
def test_the_tables_fit_80_columns_and_wide_shows_every_column(monkeypatch, capsys, command) -> None:
    """The default columns of plan and compare fit an 80-column terminal (nothing cut to "…"), on
    the machines with the widest names and for a comparison of every GPU machine; --wide adds the
    rest."""
    from zoplan.cli.render import COMPARE_COLUMNS, PLAN_COLUMNS

    monkeypatch.setattr(cli, "out", Console(width=80, color_system=None, force_terminal=False))
    # the widest names: eight GPUs and NVLink (dgx-a100), shared PCIe uplinks (l40s-8x), CPU ranks
    cases = [["-t", name, "-m", "opt-125m", "-b", "4", "-s", "64"] for name in ("dgx-a100", "l40s-8x", "cpu-local")]
    for args in cases if command == "plan" else [["-m", "opt-125m", "-b", "4", "-s", "64"]]:
        code, out, err = run_main(monkeypatch, capsys, command, *args)
        assert code == 0, err
        table = [line for line in out.splitlines() if "──" in line or line.lstrip()[:1].isdigit()]
        assert table and all(len(line) <= 80 for line in out.splitlines()), out
        assert "…" not in out, out
    monkeypatch.setattr(cli, "out", Console(width=250, color_system=None, force_terminal=False))
    code, out, _ = run_main(monkeypatch, capsys, command, *cases[1], "--wide")
    headers = [h for h, *_ in (PLAN_COLUMNS if command == "plan" else COMPARE_COLUMNS)]
    assert code == 0 and all(h in out for h in headers), out


def test_compare_names_a_machine_that_cannot_run_the_model_and_says_why_under_the_table(monkeypatch, capsys) -> None:
    """The default comparison (OPT-175B on every bundled GPU machine) has machines it does not
    fit: their rows say so and the reasons follow the table, whole, so that in 80 columns the other
    machines keep every column and no name or figure is cut."""
    from zoplan.cli.render import COMPARE_COLUMNS

    monkeypatch.setattr(cli, "out", Console(width=80, color_system=None, force_terminal=False))
    code, out, err = run_main(monkeypatch, capsys, "compare")
    assert code == 0, err
    lines = out.splitlines()
    assert all(len(line) <= 80 for line in lines) and "…" not in out, out
    header = next(line for line in lines if " step " in line)
    assert all(h in header for h, default in COMPARE_COLUMNS if default), header
    unfit = [line.split()[0] for line in lines if "cannot run it  –" in line]  # the rows, not the verdict
    assert unfit, out  # opt-175b's host copy does not fit every bundled machine
    flat = " ".join(out.split())
    for name in unfit:
        assert f"{name}: opt-175b does not fit on '{name}'" in flat, out
    fits = [line for line in lines if re.match(r"^ \S+\s+\d+/\d+\s+[\d.]+ (s|ms)\b", line)]
    assert len(fits) + len(unfit) == 6, out


def test_at_80_columns_the_price_stays_and_a_machine_without_one_shows_no_price_columns(monkeypatch, capsys) -> None:
    """tok/s (the step again) leaves before $/Mtok, which a renter reads; on a machine without a
    price the price columns, all dashes, are not shown (--wide still shows every column)."""
    monkeypatch.setattr(cli, "out", Console(width=80, color_system=None, force_terminal=False))

    def header(*args: str) -> str:
        code, out, err = run_main(monkeypatch, capsys, *args)
        assert code == 0, err
        return next(line for line in out.splitlines() if " step " in f" {line} ")

    priced = header("plan", "-m", "opt-66b", "-t", "l40s-8x")
    assert "$/Mtok" in priced and "tok/s" not in priced, priced
    unpriced = header("plan", "-m", "opt-13b", "-t", "rtx4090-4x")
    assert "$/Mtok" not in unpriced and "tok/s" in unpriced, unpriced
    alone = header("compare", "-m", "opt-13b", "-t", "rtx4090-4x")
    assert "$/h" not in alone and "$/Mtok" not in alone, alone
    mixed = header("compare", "-m", "opt-13b", "-t", "rtx4090-4x", "-t", "l40s-8x")
    assert "$/h" in mixed and "$/Mtok" in mixed, mixed
    monkeypatch.setattr(cli, "out", Console(width=250, color_system=None, force_terminal=False))
    assert "$/Mtok" in header("plan", "-m", "opt-13b", "-t", "rtx4090-4x", "--wide")


def test_a_machine_of_cpu_ranks_names_its_ranks_memory_and_a_small_host_copy_keeps_its_digits(
    monkeypatch, capsys
) -> None:
    """cpu-local has no GPU: the wide table said "GPU GiB" and "resident on the GPUs", and a host
    copy under 0.05 GiB read 0.0."""
    monkeypatch.setattr(cli, "out", Console(width=250, color_system=None, force_terminal=False))
    code, out, err = run_main(monkeypatch, capsys, "plan", "-m", "opt-125m", "-t", "cpu-local", "--wide")
    assert code == 0, err
    header = next(line for line in out.splitlines() if " step " in f" {line} ")
    assert "rank GiB" in header and "GPU GiB" not in header, header
    assert "resident on the CPU ranks" in out and "resident on the GPUs" not in out
    row = next(line for line in out.splitlines() if line.strip(" │|").startswith("1 "))
    assert " 0.47 " in row, row  # opt-125m's host copy, 0.47 GiB
    code, out, err = run_main(monkeypatch, capsys, "plan", "-m", "opt-13b", "-t", "rtx4090-4x", "--wide")
    assert code == 0 and "GPU GiB" in out and "resident on the GPUs" in out, err


def test_compare_names_the_devices_of_the_machines_it_shows(monkeypatch, capsys) -> None:
    """compare's table said "GPUs" and "GPU GiB" over a machine of CPU ranks: its rank count and
    memory are a rank's; beside a GPU machine, both are a device's."""
    monkeypatch.setattr(cli, "out", Console(width=250, color_system=None, force_terminal=False))

    def header(*topologies: str) -> list[str]:
        args = [a for t in topologies for a in ("-t", t)]
        code, out, err = run_main(monkeypatch, capsys, "compare", "-m", "tiny-opt", *args, "--wide")
        assert code == 0, err
        return next(line for line in out.splitlines() if " step " in line).replace("┃", " ").split()

    cpu, gpu, both = header("cpu-local"), header("dgx-a100"), header("cpu-local", "dgx-a100")
    assert "ranks" in cpu and "rank" in cpu and "GPUs" not in cpu and "GPU" not in cpu, cpu
    assert "GPUs" in gpu and "GPU" in gpu, gpu
    assert "devices" in both and "device" in both and "GPU" not in both and "rank" not in both, both


@pytest.mark.parametrize("width", [64, 50])
@pytest.mark.parametrize("command", ["plan", "compare"])
def test_a_narrower_terminal_leaves_columns_out_instead_of_cutting_figures(monkeypatch, capsys, command, width) -> None:
    """Under 80 columns the least needed default columns leave, in a set order, so that every
    figure shown is whole ("…" nowhere) and the step stays."""
    from zoplan.cli.render import COMPARE_DROPPED, PLAN_DROPPED

    monkeypatch.setattr(cli, "out", Console(width=width, color_system=None, force_terminal=False))
    args = ["-m", "opt-66b"] + (["-t", "l40s-8x"] if command == "plan" else ["-t", "all"])
    code, out, err = run_main(monkeypatch, capsys, command, *args)
    assert code == 0, err
    lines = out.splitlines()
    header = next(line for line in lines if " step " in f" {line} ")
    assert all(len(line) <= width for line in lines) and "…" not in out, out
    dropped = PLAN_DROPPED if command == "plan" else COMPARE_DROPPED
    gone = [h for h in dropped if h not in header]
    assert gone == list(dropped[: len(gone)]), header  # the first ones in the order, only
    assert gone or width >= 60, header  # at 50 columns neither table fits whole
    assert "s " in out and "×" in out  # steps and speedups, whole


@pytest.mark.parametrize(
    "args, needles",
    [
        pytest.param(["--gpus", "gpu9"], ["gpu9", "gpu0"], id="unknown-gpu"),
        pytest.param(["--pertp", "3"], ["--pertp", "3"], id="pertp"),
        pytest.param(["--ddp", "0"], ["--ddp", "0"], id="ddp-zero"),
        pytest.param(["--micro-batch", "3"], ["micro-batch 3", "4"], id="micro-batch"),
        pytest.param(["--wire-dtype", "fp32"], ["fp32", "bf16"], id="wire-wider"),
        pytest.param(["--top", "0"], ["--top"], id="top"),
        pytest.param(["--eps", "-1"], ["eps"], id="eps"),
        pytest.param(["--ddp", "4", "--pertp", "2"], ["--ddp 4", "--pertp 2", "4"], id="too-many-gpus"),
    ],
)
def test_bad_pins(monkeypatch, capsys, args, needles) -> None:
    code, _, err = run_main(monkeypatch, capsys, "plan", *TINY, *args)
    assert_one_error(code, err, *needles)


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["--micro-batch", "0"], id="micro-batch-0"),
        pytest.param(["--slices", "-8"], id="slices-negative"),
        pytest.param(["--slices", "0"], id="slices-0"),
        pytest.param(["--prefetch", "0"], id="prefetch-0"),
    ],
)
def test_non_positive_pins_are_refused(monkeypatch, capsys, args) -> None:
    code, _, err = run_main(monkeypatch, capsys, "plan", *TINY, *args)
    assert_one_error(code, err, args[0])


def test_resident_pin_beyond_the_layers_is_named(monkeypatch, capsys) -> None:
    code, _, err = run_main(monkeypatch, capsys, "plan", *TINY, "--resident", "1000")
    assert_one_error(code, err, "resident")


@pytest.mark.parametrize("missing", [("torch",), ("transformers", "safetensors")])
@pytest.mark.parametrize("command", ["run", "run PLAN", "calibrate", "validate PLAN", "replay"])
def test_runtime_commands_name_the_missing_runtime(monkeypatch, capsys, planned, tmp_path, command, missing) -> None:
    """An install of the planner alone (``pip install -e .``): every command that runs the runtime
    says which of its packages are missing and how to install them, instead of a traceback."""
    import importlib.util

    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else found(name, *a))
    args = {
        "run": ["run"],
        "run PLAN": ["run", str(planned[1]), "--steps", "2"],
        "calibrate": ["calibrate", "-t", "cpu-local", "-o", str(tmp_path / "p.yaml")],
        "validate PLAN": ["validate", str(planned[1])],
        "replay": ["replay", str(tmp_path / "run"), "-o", str(tmp_path / "out")],
    }[command]
    code, _, err = run_main(monkeypatch, capsys, *args)
    verb = command.split()[0]
    assert_one_error(code, err, f"zoplan {verb} runs the runtime", " and ".join(missing), "pip install -e '.[runtime]'")
    assert not (tmp_path / "out").exists() and not (tmp_path / "p.yaml").exists()


def test_fine_tune_names_the_missing_runtime(monkeypatch) -> None:
    """``from zoplan.runtime import fine_tune`` without the runtime's packages: one ImportError
    that names them and the install, before anything fails deep inside a run."""
    import importlib.util

    import zoplan.runtime

    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else found(name, *a))
    with pytest.raises(ImportError, match=r"needs torch, not installed here: pip install -e '\.\[runtime\]'"):
        zoplan.runtime.fine_tune  # noqa: B018 (the attribute's lookup is what is tested)


def test_runtime_packages_are_the_runtime_extra() -> None:
    """The packages ``zoplan run`` checks for are those pyproject.toml's runtime extra installs."""
    import zoplan.runtime as runtime_packages  # torch-free: it names the packages, imports none

    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text(encoding="utf-8")
    extra = re.search(r"^runtime = \[(.*)\]$", text, re.MULTILINE)
    assert extra is not None, "no runtime extra in pyproject.toml"
    names = tuple(re.split(r"[<>=!~\[ ]", item.strip().strip('"'))[0] for item in extra.group(1).split(","))
    assert names == runtime_packages.PACKAGES


@pytest.mark.parametrize("name", ["my[bold]model", "my[/x]model"])
def test_error_message_prints_names_literally(monkeypatch, capsys, name) -> None:
    code, _, err = run_main(monkeypatch, capsys, "plan", "-m", name, "-t", "rtx4090-4x")
    assert_one_error(code, err, name)


# ----- 6. bad plan files --------------------------------------------------------------------------
def _bad_plan(planned, tmp_path: Path, change: Callable[[dict], None]) -> Path:
    _, path = planned
    return edited_yaml(path, tmp_path / "edited-plan.yaml", change)


def _swap_rank_gpus(d: dict) -> None:
    ranks = d["layout"]["ranks"]
    ranks[0]["gpu"], ranks[1]["gpu"] = ranks[1]["gpu"], ranks[0]["gpu"]


@pytest.mark.parametrize(
    "change, needles",
    [
        pytest.param(lambda d: d["transfer"].update(turbo=True), ["transfer.turbo", "unknown key"], id="unknown-key"),
        pytest.param(_swap_rank_gpus, ["layout.ranks", "does not follow"], id="ranks-swapped"),
        pytest.param(lambda d: d["layout"]["ranks"].pop(), ["layout.ranks"], id="rank-removed"),
        pytest.param(
            lambda d: d["model"].update(hash="sha256:0000000000000000"),
            ["model.hash", "sha256:0000000000000000"],
            id="model-hash",
        ),
        pytest.param(lambda d: d["model"]["shape"].update(layers=12), ["model.hash", "model.shape"], id="model-shape"),
        pytest.param(lambda d: d.update(version=7), ["version 7", "not supported"], id="version"),
        # names are what every message says a plan is for: an edited one is refused, not believed
        pytest.param(
            lambda d: d["model"].update(name="llama-2-70b"),
            ["field 'model.name' ('llama-2-70b') does not match 'model.shape' ('opt-1.3b')"],
            id="model-name",
        ),
        pytest.param(
            lambda d: d["topology"].update(name="dgx-h100"),
            ["field 'topology.name' ('dgx-h100') does not match the machine it was planned for, 'dgx-a100'"],
            id="topology-name",
        ),
        pytest.param(
            lambda d: d["topology"].update(source="dgx-h100"),
            ["planned for topology 'dgx-a100'", "its topology.source 'dgx-h100' is 'dgx-h100'", "another machine"],
            id="topology-source",
        ),
    ],
)
def test_bad_plan_file(planned, tmp_path: Path, monkeypatch, capsys, change, needles) -> None:
    bad = _bad_plan(planned, tmp_path, change)
    code, out, err = run_main(monkeypatch, capsys, "timeline", str(bad), "-o", str(tmp_path / "t.json"))
    assert_one_error(code, err, "edited-plan.yaml", *needles)
    assert not (tmp_path / "t.json").exists()


def test_missing_plan_file(tmp_path: Path, monkeypatch, capsys) -> None:
    code, _, err = run_main(monkeypatch, capsys, "timeline", str(tmp_path / "gone.yaml"))
    assert_one_error(code, err, "gone.yaml", "does not exist")


def test_timeline_refuses_a_plan_whose_topology_file_changed(tmp_path: Path, monkeypatch, capsys) -> None:
    topo = topology_copy(tmp_path, name="my-machine.yaml")
    plan_path = tmp_path / "plan.yaml"
    invoke("plan", *TINY[:2], "-b", "4", "-s", "128", "-t", str(topo), "-o", str(plan_path))
    assert load_plan(plan_path).topology.source == str(topo)

    edited_yaml(topo, topo, lambda d: d["links"][0].update(gbps=12.8))  # edit a bandwidth in place
    code, _, err = run_main(monkeypatch, capsys, "timeline", str(plan_path), "--show")
    assert_one_error(code, err, "plan.yaml", "my-machine.yaml", "changed since planning", "--topology")

    # the suggested fix works: the original description (same content as the bundled machine)
    out = tmp_path / "t.json"
    invoke("timeline", str(plan_path), "--topology", "rtx4090-4x", "-o", str(out))
    assert "traceEvents" in json.loads(out.read_text(encoding="utf-8"))
    # another machine named is not a change to this one; a file gone is not a machine unknown
    code, _, err = run_main(monkeypatch, capsys, "timeline", str(plan_path), "--topology", "dgx-a100")
    assert_one_error(code, err, "--topology dgx-a100 is 'dgx-a100'", "another machine", "leave --topology out")
    assert "changed since" not in err
    topo.unlink()
    code, _, err = run_main(monkeypatch, capsys, "timeline", str(plan_path))
    assert_one_error(code, err, f"planned for the topology file {topo}, which is not there", "--topology if it moved")


def test_timeline_finds_a_relative_topology_from_another_directory(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    topology_copy(tmp_path / "a", name="topo.yaml")
    monkeypatch.chdir(tmp_path / "a")
    invoke("plan", *TINY[:2], "-b", "4", "-s", "128", "-t", "topo.yaml", "-o", str(tmp_path / "plan.yaml"))
    monkeypatch.chdir(tmp_path / "b")
    result = runner.invoke(cli.app, ["timeline", str(tmp_path / "plan.yaml"), "-o", "t.json"])
    assert result.exception is None, repr(result.exception)
    assert (tmp_path / "b" / "t.json").exists()


def test_into_a_pipe_a_sentence_stays_on_one_line_however_long(tmp_path: Path) -> None:
    """Output to a pipe or a file (not a terminal) is not wrapped at a width: a long error
    message (here a long missing path) and compare's reasons under its table are one line each,
    where a terminal wraps them at its width instead."""
    deep = tmp_path.joinpath(*["a-rather-long-folder-name"] * 8) / "topology.yaml"
    proc = run_subprocess("plan", "-m", "opt-125m", "-t", str(deep))
    assert proc.returncode == 2, proc.stderr
    first = proc.stderr.splitlines()[0]
    assert len(str(deep)) > 160 and first.startswith("error:") and str(deep) in first, proc.stderr
    proc = run_subprocess("compare", "-m", "opt-175b", "-t", "h100-pcie-1x,rtx4090-4x")
    assert proc.returncode == 2, proc.stderr  # (it fits neither)
    reasons = [line for line in proc.stdout.splitlines() if "does not fit on" in line]
    assert len(reasons) == 2 and all(line.endswith("kept for the system)") for line in reasons), proc.stdout


@pytest.mark.parametrize("where", ["a-folder", "a-file/plan.yaml", "missing/plan.yaml"])
def test_a_plan_output_that_cannot_be_written_is_refused_before_the_search(
    monkeypatch, capsys, tmp_path: Path, where: str
) -> None:
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "a-file").write_text("")
    searched: list[object] = []
    monkeypatch.setattr("zoplan.planner.search", lambda *a, **k: searched.append(a))
    code, _, err = run_main(monkeypatch, capsys, "plan", "-m", "opt-125m", "-o", str(tmp_path / where))
    assert_one_error(code, err, str(tmp_path / where))
    assert searched == [] and sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "a-folder"]


def test_node_counts_and_prices_are_said_in_the_plans_words(tmp_path: Path, monkeypatch, capsys) -> None:
    """A pinned node count the batch does not split over, a plan over several nodes given to
    validate (which runs on this one machine, and has no --nnodes), and --objective cost on a
    machine with no price: each said as what it is."""
    topo = topology_copy(tmp_path, lambda d: d.update(nodes=4, network={"gbps": 25, "latency_us": 5}))
    code, _, err = run_main(monkeypatch, capsys, "plan", *TINY[:2], "-t", str(topo), "-b", "8", "--nodes", "3")
    assert_one_error(code, err, "global batch 8 does not divide among 3 nodes (--nodes 3)")
    plan_path = tmp_path / "four.yaml"
    invoke("plan", *TINY[:2], "-t", str(topo), "-b", "8", "-s", "128", "--nodes", "4", "-o", str(plan_path))
    code, _, err = run_main(monkeypatch, capsys, "validate", str(plan_path))
    assert_one_error(code, err, "spans 4 nodes, and validate runs a plan on this one machine", "--nodes 1")
    assert "--nnodes" not in err
    shown = invoke("topo", "show", str(topo)).output
    assert "4 nodes · network 25 GB/s, 5 µs ·" in shown  # no step_cv given: no variation said
    cv = topology_copy(tmp_path, lambda d: d.update(nodes=2, network={"gbps": 25, "step_cv": 0.02}), name="cv.yaml")
    assert "network 25 GB/s, 5 µs, a node's step varying by 2.0%" in invoke("topo", "show", str(cv)).output
    said = invoke("plan", *TINY, "--objective", "cost").output
    assert (
        "no price: topology 'rtx4090-4x' gives no price_per_hour_usd, so --objective cost ranked by step time" in said
    )
    assert "no price" not in invoke("plan", *TINY).output


def test_the_verdict_on_several_nodes_names_the_cheapest_layout_not_the_fastest_ones_price(tmp_path: Path) -> None:
    """On a priced cluster the fastest layout uses every node and the cheapest per token fewer:
    compare's verdict names each (the cheapest was the fastest layout's price, all nodes charged)."""
    cluster = topology_copy(
        tmp_path,
        lambda d: d.update(name="four", nodes=4, network={"gbps": 25, "latency_us": 5}, price_per_hour_usd=4 * 3.0),
        name="four.yaml",
        base="h100-pcie-1x",
    )
    single = topology_copy(
        tmp_path, lambda d: d.update(name="one", price_per_hour_usd=3.5), name="one.yaml", base="h100-pcie-1x"
    )
    workload = ("-m", "opt-1.3b", "-b", "64", "-s", "128", "-t", str(cluster), "-t", str(single))
    said = json.loads(invoke("compare", *workload, "--json").stdout)
    rows = {m["topology"]: m for m in said["machines"]}
    fastest, cheapest = said["verdict"]["fastest"], said["verdict"]["cheapest"]
    assert fastest["topology"] == cheapest["topology"] == "four" and fastest["nodes"] == 4
    assert cheapest["nodes"] < 4 and cheapest["usd_per_mtok"] < min(m["usd_per_mtok"] for m in rows.values())
    line = invoke("compare", *workload).stdout.strip().splitlines()[-1]
    assert f"cheapest per token four on {cheapest['nodes']} of its 4 nodes" in line, line
    # the table shows the fastest layout: the verdict gives the cheapest one's step, not in it
    assert cheapest["in_table"] is False and fastest.get("in_table") is None
    from zoplan.cli.render import _fmt_time

    assert f"$/Mtok, {_fmt_time(cheapest['step_time_s'])} a step)" in line, line
    alone = json.loads(invoke("compare", "-m", "opt-1.3b", "-b", "64", "-s", "128", "-t", str(single), "--json").stdout)
    assert alone["verdict"]["cheapest"]["in_table"] is True
    assert "$/Mtok, " not in invoke("compare", "-m", "opt-1.3b", "-b", "64", "-s", "128", "-t", str(single)).stdout


@pytest.mark.parametrize(
    "flags,said",
    [
        (["--lora-rank", "4"], "--lora-rank applies to --tuning lora, but the run trains every weight (--tuning full)"),
        (
            ["--tuning", "prefix", "--lora-alpha", "32"],
            "--lora-alpha applies to --tuning lora, but the run trains a prefix",
        ),
        (["--tuning", "lora", "--prefix-tokens", "3"], "--prefix-tokens applies to --tuning prefix"),
    ],
)
def test_an_adapters_setting_for_another_kind_of_training_is_refused(flags, said, monkeypatch, capsys) -> None:
    """It was ignored: the plan (and the run) trained what the user did not ask for."""
    code, _, err = run_main(monkeypatch, capsys, "plan", *TINY, *flags)
    assert_one_error(code, err, said)


def test_compare_where_the_model_fits_no_machine_exits_2(monkeypatch, capsys) -> None:
    """Each machine's reason and the verdict are said, and the exit status is bad input's, as
    zoplan plan's for a model that fits nowhere (a script checking it saw success)."""
    machines = ("-t", "rtx4090-4x", "-t", "h100-pcie-1x")
    code, out, _ = run_main(monkeypatch, capsys, "compare", "-m", "opt-175b", *machines)
    assert code == 2 and "verdict: the model fits none of these machines" in out
    code, out, _ = run_main(monkeypatch, capsys, "compare", "-m", "opt-175b", *machines, "--json")
    assert code == 2 and json.loads(out)["verdict"]["fastest"] is None
    code, _, _ = run_main(monkeypatch, capsys, "compare", "-m", "opt-125m", *machines)
    assert code in (0, None)


def test_an_output_file_that_zoplan_did_not_write_is_not_overwritten(tmp_path: Path, monkeypatch, capsys) -> None:
    """plan -o and timeline -o write over their own kind of file (a plan again, a trace again),
    not over a user's file that a mistyped path names."""
    notes = tmp_path / "notes.txt"
    notes.write_text("precious")
    code, _, err = run_main(monkeypatch, capsys, "plan", *TINY, "-o", str(notes))
    assert_one_error(code, err, f"{notes} exists and is not a plan zoplan wrote")
    plan_path = tmp_path / "plan.yaml"
    invoke("plan", *TINY, "-o", str(plan_path))
    invoke("plan", *TINY, "-o", str(plan_path))  # a plan written again
    code, _, err = run_main(monkeypatch, capsys, "timeline", str(plan_path), "-o", str(notes))
    assert_one_error(code, err, f"{notes} exists and is not a trace file zoplan wrote")
    invoke("timeline", str(plan_path), "-o", str(tmp_path / "t.json"))
    invoke("timeline", str(plan_path), "-o", str(tmp_path / "t.json"))
    assert notes.read_text() == "precious"
    # a file that merely holds zoplan's words is not one of its files: a topology whose comment
    # says "layout:", another tool's trace (a torch profiler's has traceEvents too) were replaced
    topology = tmp_path / "my-machine.yaml"
    topology.write_text("# PCIe layout: as the vendor documents it\n" + resolve_topology_path("l40s-8x").read_text())
    profiler = tmp_path / "torchprof.json"
    profiler.write_text(
        json.dumps({"traceEvents": [{"name": "aten::mm", "ph": "X", "ts": 1, "dur": 2}], "schemaVersion": 1})
    )
    for command in (("plan", *TINY, "-o", str(topology)), ("timeline", str(plan_path), "-o", str(profiler))):
        code, _, err = run_main(monkeypatch, capsys, *command)
        assert_one_error(code, err, "exists and is not a")
    assert topology.read_text().startswith("# PCIe layout") and "aten::mm" in profiler.read_text()
    # Chrome's array format, and JSON that is no object: another tool's (a traceback before)
    for text in ("[1, 2]", "null", '"x"'):
        other = tmp_path / "array.json"
        other.write_text(text)
        code, _, err = run_main(monkeypatch, capsys, "timeline", str(plan_path), "-o", str(other))
        assert_one_error(code, err, "exists and is not a trace file zoplan wrote")
    # a missing folder is named as such (the fix said to make it writable)
    code, _, err = run_main(monkeypatch, capsys, "plan", *TINY, "-o", str(tmp_path / "nodir" / "p.yaml"))
    assert_one_error(code, err, "cannot write plan")
    assert f"the folder {tmp_path / 'nodir'} does not exist" in err
    # a merged trace (zoplan validate --trace) is one of zoplan's
    merged = tmp_path / "merged.json"
    merged.write_text(json.dumps({"traceEvents": [], "otherData": {"measured.step_time_ms": 1.0}}))
    invoke("timeline", str(plan_path), "-o", str(merged))
    # topo import and topo detect wrote over anything (a plan, notes) without a word; over a
    # topology they write again
    smi = Path(__file__).resolve().parents[1] / "fixtures" / "nvidia-smi" / "dgx-a100-like.txt"
    imported = ("topo", "import", str(smi), "--gpu", "a100-sxm4-80gb", "--host-memory-gib", "1024", "-o")
    for command in ((*imported, str(notes)), ("topo", "detect", "--cpu", "-o", str(plan_path))):
        code, _, err = run_main(monkeypatch, capsys, *command)
        assert_one_error(code, err, "exists and is not a topology zoplan wrote")
    assert notes.read_text() == "precious" and load_plan(plan_path)
    machine_file = tmp_path / "machine.yaml"
    for _ in range(2):
        invoke(*imported, str(machine_file))
    invoke("topo", "detect", "--cpu", "-o", str(machine_file))
    # "-" is no standard output here (it made a file named '-')
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(monkeypatch, capsys, "timeline", str(plan_path), "-o", "-")
    assert_one_error(code, err, "-o - would write the trace file into a file named '-'")
    assert not (tmp_path / "-").exists()


def test_an_output_through_a_symbolic_link_writes_the_file_it_names(tmp_path: Path) -> None:
    """A plan, a trace or a PNG written through a link goes into the file the link names, and the
    link stays (each was written beside the link and put in its place: as root, `-o /dev/stdout`
    replaced the system's link to file descriptor 1 with a file of its own)."""
    real = tmp_path / "kept"
    real.mkdir()
    plan_path = tmp_path / "plan.yaml"
    invoke("plan", *TINY, "-o", str(plan_path))
    outputs = [("plan", real / "plan.yaml"), ("timeline", real / "trace.json")]
    if importlib.util.find_spec("matplotlib") is not None:
        outputs.append(("png", real / "step.png"))
    for kind, target in outputs:
        link = tmp_path / f"link-{target.name}"
        link.symlink_to(target)
        if kind == "plan":
            invoke("plan", *TINY, "-o", str(link))
        elif kind == "timeline":
            invoke("timeline", str(plan_path), "-o", str(link))
        else:
            invoke("timeline", str(plan_path), "--png", str(link))
        assert link.is_symlink() and link.resolve() == target and target.stat().st_size > 0, kind
    assert sorted(p.name for p in real.iterdir()) == sorted(t.name for _, t in outputs)  # no temporary file left
    # links that form a loop: a message, not a traceback (Path.resolve raised RuntimeError)
    (tmp_path / "loop-a").symlink_to(tmp_path / "loop-b")
    (tmp_path / "loop-b").symlink_to(tmp_path / "loop-a")
    result = runner.invoke(cli.app, ["plan", *TINY, "-o", str(tmp_path / "loop-a")])
    assert isinstance(result.exception, ZoplanError), result.exception
    assert "symbolic links form a loop" in str(result.exception.fix)


def test_an_output_whose_folder_takes_no_new_file_is_refused_before_the_work(tmp_path: Path, monkeypatch) -> None:
    """A trace, a plan or a profile is written beside its place and moved there: a folder that
    takes no new file (its file writable, itself not) passed the check, and `validate --trace`
    failed after its whole run. The check now makes a file there too."""
    from zoplan.fileio import check_writable

    target = tmp_path / "t.json"
    target.write_text(json.dumps({"traceEvents": [], "otherData": {"step_time_ms": 1.0}}))
    real_open = Path.open

    def no_new_files(self: Path, mode: str = "r", *args, **kwargs):
        if "x" in mode:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", no_new_files)
    with pytest.raises(ZoplanError, match="cannot write trace file .*Permission denied"):
        check_writable(target, "trace file")
    monkeypatch.undo()
    check_writable(target, "trace file")  # (a folder that takes one: fine)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]  # the probe gone


def test_an_output_that_is_the_commands_own_stdout_is_refused(tmp_path: Path) -> None:
    """-o /dev/stdout with the output redirected to a file: the trace and the command's own
    "wrote ..." line went into the same file, the JSON broken, with exit 0."""
    plan_path = tmp_path / "plan.yaml"
    invoke("plan", *TINY, "-o", str(plan_path))
    out = tmp_path / "out.json"
    with out.open("w") as stdout:
        proc = subprocess.run(
            [sys.executable, "-m", "zoplan.cli", "timeline", str(plan_path), "-o", "/dev/stdout"],
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 2 and "is this command's stdout" in proc.stderr, proc.stderr
    assert out.read_text() == ""


def test_recipes_list_names_every_recipe_with_what_it_sets() -> None:
    from zoplan.recipes import RECIPES

    said = invoke("recipes", "list").output
    for recipe in RECIPES.values():
        assert f" {recipe.name} " in said
        if recipe.label_words:
            assert ", ".join(recipe.label_words) in said
    assert "'{sentence} It was'" in said and "1e-06, 0.001, 16" in said


def test_a_gpu_model_without_a_rate_for_the_dtype_says_which_it_planned_with(tmp_path: Path) -> None:
    """The planner falls back to the model's fp32 rate (half the step's speed on a GPU whose bf16
    is twice as fast): said under the table, as topo show says it."""
    topo = topology_copy(tmp_path, lambda d: [m["tflops"].pop("bf16") for m in d["gpu_models"].values()])
    said = invoke("plan", *TINY[:2], "-t", str(topo), "-b", "4", "-s", "128", "--dtype", "bf16").output
    assert "no bf16 rate: gpu model 'rtx4090-24gb' gives none (tflops), so its fp32 rate was planned with" in said
    assert "no bf16 rate" not in invoke("plan", *TINY).output


def test_the_sensitivity_line_says_a_change_under_half_a_percent_as_plus_zero() -> None:
    """Fair sharing can make a step a hair shorter with slower figures: that is no change, not
    "-0%"; real changes keep their sign."""
    from zoplan.cli.render import sensitivity_line

    line = sensitivity_line(2.0, {"compute": 1.996, "transfers": 2.48})
    assert line.endswith("→ step +0%; transfers 25% slower → step +24%"), line
    assert "-0%" not in line
    assert "step -2%" in sensitivity_line(1.0, {"compute": 0.98, "transfers": 1.1})
    assert "step -10%" in sensitivity_line(1.0, {"compute": 0.9, "transfers": 1.1})


def test_replay_of_another_nodes_directory_points_to_node_0(monkeypatch, capsys, tmp_path) -> None:
    """`zoplan replay` of node 1's output directory said only that journal.jsonl does not exist:
    node 0 keeps a run's journal, and the message now says so."""
    from zoplan import runconfig

    node1 = tmp_path / "node1"
    node1.mkdir()
    cfg = runconfig.make(nnodes=2, node_rank=1, master_port=29000, master_addr="10.0.0.1", output=node1)
    runconfig.write(cfg, node1)
    for args in (["replay", str(node1)], ["replay", "tiny-opt", str(node1)]):
        code, _, err = run_main(monkeypatch, capsys, *args, "-o", str(tmp_path / "out"))
        assert_one_error(code, err, "node 1's output directory of a run over 2 machines", "replay node 0's")
    assert not (tmp_path / "out").exists()


def test_install_hints_fit_how_zoplan_was_installed(tmp_path) -> None:
    """From a wheel there is no checkout to `pip install -e` in: the hint names the packages."""
    from zoplan.errors import install_hint

    assert install_hint("plot", "matplotlib", root=tmp_path) == "pip install matplotlib (zoplan's plot extra)"
    (tmp_path / "pyproject.toml").write_text("")
    assert install_hint("plot", "matplotlib", root=tmp_path) == "pip install -e '.[plot]' in the zoplan checkout"
    assert install_hint("plot", "matplotlib").startswith("pip install -e")  # (these tests run from the checkout)


def test_a_ctrl_c_while_the_command_line_loads_says_interrupted_without_a_traceback(monkeypatch, capsys) -> None:
    """The console script imported the whole command line before its handler of Ctrl-C was in
    place: a Ctrl-C in its first tenths of a second printed a traceback through pydantic's imports."""
    import importlib.abc

    from zoplan import start

    class Interrupted(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "zoplan.cli":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "zoplan.cli")
    monkeypatch.setattr(sys, "meta_path", [Interrupted(), *sys.meta_path])
    with pytest.raises(SystemExit) as stopped:
        start.main()
    assert stopped.value.code == 130
    said = capsys.readouterr()
    assert said.err == "interrupted\n" and "Traceback" not in said.out + said.err


def test_a_ctrl_c_during_a_command_says_interrupted(monkeypatch) -> None:
    """typer ends a command stopped by Ctrl-C with status 130 and no word: the shell showed
    nothing but its prompt."""
    from fuzzkit import console
    from zoplan import planner

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(planner, "plan", stopped)
    code, said = console(["plan", "-m", "opt-125m", "-t", "cpu-local"])
    assert code == 130 and said.strip().endswith("interrupted") and "Traceback" not in said, said
    monkeypatch.undo()
    code, said = console(["plan", "-m", "opt-125m", "-t", "cpu-local", "--top", "0"])  # another exit: no such word
    assert code == 2 and "interrupted" not in said, said


def test_a_path_too_long_for_the_file_system_is_an_error_not_a_traceback(tmp_path) -> None:
    """`zoplan run -o <300 characters>` (and replay's paths) ended in OSError: [Errno 36] File name
    too long, with a traceback."""
    from fuzzkit import console

    long = str(tmp_path / ("x" * 300))
    runs = (["run", "--steps", "1", "-o", long], ["run", "--resume", long], ["replay", long, "-o", str(tmp_path / "o")])
    for args in runs:
        code, said = console(args)
        assert code == 2 and "the name is too long" in said and "Traceback" not in said, said
    assert list(tmp_path.iterdir()) == []


def test_a_stopped_validate_without_output_offers_no_resume_of_the_folder_it_removed(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """A validate run stopped by SIGTERM said "continue with `zoplan run --resume
    /tmp/zoplan-validate-.../run`", a folder validate had just removed."""
    from zoplan.errors import Refused

    plan_path = tmp_path / "plan.yaml"
    invoke("plan", "-m", "tiny-opt", "-t", "cpu-local", "-o", str(plan_path))
    seen: list[Path] = []

    def stopped(run_dir: Path, *args) -> None:
        seen.append(run_dir)
        raise Refused(
            f"stopped by SIGTERM after 3 completed step(s) of 20; the run in {run_dir} has stopped",
            fix=f"continue with `zoplan run --resume {run_dir} --steps 20`",
            status=143,
        )

    monkeypatch.setattr(cli, "_validate", stopped)
    code, _, err = run_main(monkeypatch, capsys, "validate", str(plan_path))
    assert code == 143 and seen and not seen[0].parent.exists()
    assert str(seen[0]) not in err and "--resume" not in err, err
    assert "fix: run the same command again; pass --output DIR to keep the run" in err, err


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="named pipes")
def test_a_named_pipe_given_as_a_file_is_read_or_refused_not_waited_on(tmp_path: Path) -> None:
    """`mkfifo f.yaml` given as a plan, topology, profile or model hung every command (opening a
    pipe waits for a writer); as -o, a plan or trace waited for a reader. A pipe being written
    (`<(cat plan.yaml)`) is read as the file it carries."""
    import os

    fifo = tmp_path / "f.yaml"
    os.mkfifo(fifo)
    good = tmp_path / "good.yaml"
    assert invoke("plan", "-m", "tiny-opt", "-t", "cpu-local", "-b", "4", "-s", "32", "-o", str(good)).exit_code == 0
    for args, words in (
        (["timeline", str(fifo)], "the plan file is empty"),
        (["plan", "-t", str(fifo)], "the topology file is empty"),
        (["plan", "-m", "tiny-opt", "-t", "cpu-local", "--profile", str(fifo)], "the profile file is empty"),
        (["topo", "show", str(fifo)], "the topology file is empty"),
        (["timeline", str(good), "-o", str(fifo)], "is not a regular file"),
        (
            ["plan", "-m", "tiny-opt", "-t", "cpu-local", "-b", "4", "-s", "32", "-o", str(fifo)],
            "is not a regular file",
        ),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "zoplan.cli", *args], capture_output=True, text=True, timeout=60, cwd=tmp_path
        )
        assert proc.returncode == 2 and words in proc.stderr, (args, proc.stderr)
    shell = f"{sys.executable} -m zoplan.cli topo show <(cat {resolve_topology_path('cpu-local')})"
    proc = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "cpu-local" in proc.stdout, proc.stderr


def test_names_from_users_files_reach_the_terminal_as_written(tmp_path: Path) -> None:
    """A topology named "[link=http://evil.example]click[/link]" printed as a clickable "click" in
    the plan's header (rich markup); an escape sequence in a name drove the terminal."""
    tree = yaml.safe_load(resolve_topology_path("cpu-local").read_text())
    tree["name"] = "[link=http://evil.example]click[/link]"
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(tree))
    result = runner.invoke(cli.app, ["plan", "-m", "tiny-opt", "-t", str(tmp_path / "t.yaml"), "-b", "4", "-s", "32"])
    assert result.exit_code == 0 and "on [link=http://evil.example]click[/link]:" in result.output, result.output
    tree["name"] = "red\x1b[31mtext"
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(tree))
    result = runner.invoke(cli.app, ["topo", "show", str(tmp_path / "t.yaml")])
    assert result.exit_code != 0 and "holds the control character '\\x1b'" in str(result.exception), result.output
