"""zoplan.validate without torch: measured figures read from synthetic span files."""

from __future__ import annotations

import statistics

import json
from pathlib import Path

import pytest

from zoplan.errors import ZoplanError
from zoplan.planner import plan
from zoplan.records import TrainRow
from zoplan.search import Pins
from zoplan.sim import SimResult
from zoplan.validate import compare, measure, predicted_stages, to_json

CONFIG = {
    "model_type": "opt",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "ffn_dim": 128,
    "num_attention_heads": 4,
    "vocab_size": 1000,
    "max_position_embeddings": 128,
    "word_embed_proj_dim": 64,
}


@pytest.fixture()
def two_rank_plan(tmp_path: Path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(CONFIG))
    return plan(
        str(config),
        "cpu-local",
        global_batch=4,
        seq_len=16,
        dtype="fp32",
        pins=Pins(perturbation=2, data=1, upload="sliced"),
    ).plan


def write_run(out: Path, step_times: list[float], compute: dict[int, list[float]], torn: bool = False) -> None:
    out.mkdir(exist_ok=True)
    (out / "metrics.jsonl").write_text(
        "".join(
            TrainRow(
                step=s,
                loss=1.0,
                projected_grad=0.5,
                step_time_s=t,
                tokens_per_s=64 / t,
                elapsed_s=sum(step_times[: s + 1]),
                nonfinite_total=0,
            ).line()
            for s, t in enumerate(step_times)
        )
    )
    for rank, values in compute.items():
        lines = []
        for s, c in enumerate(values):
            row = {"step": s, "wall_s": step_times[s], "totals": {"compute": c, "h2d": 0.001}}
            row["spans"] = [["compute", "compute", "block 0", 0, 0.0, c], ["upload", "h2d", "h2d b0", 0, 0.0, 0.001]]
            lines.append(json.dumps(row) + "\n")
        text = "".join(lines) + ('{"step": 9, "wall' if torn else "")
        (out / f"spans-rank{rank}.jsonl").write_text(text)


def test_measure_takes_medians_after_the_warm_up_step(two_rank_plan, tmp_path: Path) -> None:
    write_run(
        tmp_path / "run", [5.0, 0.10, 0.30, 0.20], {0: [4.0, 0.02, 0.06, 0.04], 1: [4.0, 0.04, 0.08, 0.06]}, torn=True
    )
    v = measure(tmp_path / "run", two_rank_plan)
    assert v.measured_steps == [1, 2, 3]
    assert v.step.measured_s == pytest.approx(0.20)  # median of 0.10, 0.30, 0.20; step 0 left out
    rows = {r.stage: r for r in v.rows}
    assert rows["compute"].measured_s == pytest.approx(0.05)  # per-step rank means 0.03, 0.07, 0.05
    assert v.trace_step == 3  # the step with the median time
    gpus = {span[0] for span in v.measured.spans}
    assert gpus == {r.gpu for r in two_rank_plan.layout.ranks}


def test_compare_fills_the_prediction_and_the_signed_error(two_rank_plan, tmp_path: Path) -> None:
    write_run(tmp_path / "run", [1.0, 0.2, 0.2], {0: [1.0, 0.1, 0.1], 1: [1.0, 0.1, 0.1]})
    sim = SimResult(
        step_time_s=0.25,
        window=(1.0, 1.25),
        step_ends=[1.0, 1.25],
        utilization={},
        bottleneck="x",
        spans=[
            ("rank0", "compute", "compute", "block 0", 1, 0, 1.0, 1.08),
            ("rank1", "compute", "compute", "block 0", 1, 0, 1.0, 1.12),
            ("rank0", "compute", "compute", "block 1", 0, 1, 0.5, 0.9),
        ],
    )  # outside the window
    assert predicted_stages(sim) == {"compute": pytest.approx(0.10)}
    rows = {r.stage: r for r in compare(measure(tmp_path / "run", two_rank_plan), sim).rows}
    assert rows["step"].error == pytest.approx((0.25 - 0.2) / 0.2)
    assert rows["compute"].error == pytest.approx(0.0)
    assert rows["h2d"].predicted_s is None and rows["h2d"].error is None


def test_a_directory_without_spans_is_an_error(two_rank_plan, tmp_path: Path) -> None:
    with pytest.raises(ZoplanError, match="holds no measured steps"):
        measure(tmp_path, two_rank_plan)


def test_whole_block_updates_count_as_compute_like_the_simulator(two_rank_plan, tmp_path: Path) -> None:
    write_run(tmp_path / "run", [1.0, 0.2], {0: [1.0, 0.1], 1: [1.0, 0.1]})
    for f in (tmp_path / "run").glob("spans-rank*.jsonl"):
        f.write_text(f.read_text().replace('"h2d": 0.001}', '"h2d": 0.001, "update": 0.02}'))
    sim = SimResult(
        step_time_s=0.2,
        window=(0.0, 0.2),
        step_ends=[0.0, 0.2],
        utilization={},
        bottleneck="x",
        spans=[("rank0", "compute", "compute", "block 0", 1, 0, 0.0, 0.12)],
    )
    rows = {r.stage: r for r in compare(measure(tmp_path / "run", two_rank_plan, skip=1), sim).rows}
    assert "update" not in rows and rows["compute"].measured_s == pytest.approx(0.12)


def test_a_malformed_spans_line_is_a_message(two_rank_plan, tmp_path: Path) -> None:
    write_run(tmp_path / "run", [1.0, 0.2], {0: [1.0, 0.1], 1: [1.0, 0.1]})
    (tmp_path / "run" / "spans-rank1.jsonl").write_text('{"step": 0, "totals": [1, 2]}\n{"step": 1}\n')
    with pytest.raises(ZoplanError, match="spans-rank"):
        measure(tmp_path / "run", two_rank_plan)


def add_host_totals(out: Path, host: dict[int, list[dict[str, float]]]) -> None:
    """What a CUDA run adds to each spans line: the host's seconds per category."""
    for rank, per_step in host.items():
        f = out / f"spans-rank{rank}.jsonl"
        rows = [json.loads(line) for line in f.read_text().splitlines()]
        for row, totals in zip(rows, per_step):
            row["host_totals"] = totals
        f.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_cuda_host_times_are_read_beside_the_gpu_times(two_rank_plan, tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_run(run, [1.0, 0.2, 0.2, 0.2], {0: [1.0, 0.1, 0.1, 0.1], 1: [1.0, 0.1, 0.1, 0.1]})
    add_host_totals(
        run,
        {
            0: [{"compute": 9.0}, {"compute": 0.10}, {"compute": 0.30}, {"compute": 0.20}],
            1: [{"compute": 9.0}, {"compute": 0.30}, {"compute": 0.50}, {"compute": 0.40}],
        },
    )
    rows = {r.stage: r for r in measure(run, two_rank_plan).rows}
    # per-step rank means 0.2, 0.4, 0.3 after the warm-up step: median 0.3
    assert rows["compute"].measured_host_s == pytest.approx(0.3)
    assert rows["compute"].measured_s == pytest.approx(0.1)
    assert rows["h2d"].measured_host_s is None  # no host time recorded for it
    assert rows["step"].measured_host_s is None


def test_cpu_runs_have_no_host_column(two_rank_plan, tmp_path: Path) -> None:
    from rich.console import Console

    from zoplan.cli.render import validation_notes, validation_table

    write_run(tmp_path / "cpu", [1.0, 0.2], {0: [1.0, 0.1], 1: [1.0, 0.1]})
    sim = SimResult(
        step_time_s=0.2,
        window=(0.0, 0.2),
        step_ends=[0.0, 0.2],
        utilization={},
        bottleneck="x",
        spans=[("rank0", "compute", "compute", "block 0", 1, 0, 0.0, 0.12)],
    )
    cpu = compare(measure(tmp_path / "cpu", two_rank_plan), sim)
    assert all(r.measured_host_s is None for r in cpu.rows)
    assert all(r.to_json()["measured_host_s"] is None for r in cpu.rows)

    def text(result) -> str:
        console = Console(width=200, record=True)
        console.print(validation_table(result, "plan.yaml"))
        return console.export_text()

    assert "host issue" not in text(cpu) and validation_notes(cpu) == []
    # each stage's miss in time beside its relative error: blocks predicted 120 ms, measured 100
    line = next(line for line in text(cpu).splitlines() if "block compute" in line)
    assert "+20.0%" in line and "+20.0 ms" in line
    assert "off by" in text(cpu)
    write_run(tmp_path / "gpu", [1.0, 0.2], {0: [1.0, 0.1], 1: [1.0, 0.1]})
    add_host_totals(
        tmp_path / "gpu", {0: [{"compute": 1.0}, {"compute": 0.25}], 1: [{"compute": 1.0}, {"compute": 0.25}]}
    )
    gpu = compare(measure(tmp_path / "gpu", two_rank_plan), sim)
    assert {r.stage: r.measured_host_s for r in gpu.rows}["compute"] == pytest.approx(0.25)
    assert "host issue" in text(gpu) and "250.0 ms" in text(gpu)
    assert any(note.startswith("host issue:") for note in validation_notes(gpu))


def test_whole_block_update_host_time_counts_as_compute(two_rank_plan, tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_run(run, [1.0, 0.2], {0: [1.0, 0.1], 1: [1.0, 0.1]})
    for f in run.glob("spans-rank*.jsonl"):
        f.write_text(f.read_text().replace('"h2d": 0.001}', '"h2d": 0.001, "update": 0.02}'))
    add_host_totals(run, {r: [{"compute": 1.0}, {"compute": 0.15, "update": 0.05}] for r in (0, 1)})
    sim = SimResult(
        step_time_s=0.2,
        window=(0.0, 0.2),
        step_ends=[0.0, 0.2],
        utilization={},
        bottleneck="x",
        spans=[("rank0", "compute", "compute", "block 0", 1, 0, 0.0, 0.12)],
    )
    rows = {r.stage: r for r in compare(measure(run, two_rank_plan), sim).rows}
    assert "update" not in rows and rows["compute"].measured_host_s == pytest.approx(0.20)


def test_cuda_peak_memory_is_reported_beside_the_prediction(two_rank_plan, tmp_path: Path) -> None:
    from zoplan.cli.render import validation_notes

    run = tmp_path / "run"
    write_run(run, [1.0, 0.2, 0.2], {0: [1.0, 0.1, 0.1], 1: [1.0, 0.1, 0.1]})
    for rank, peaks in ((0, [3 * 2**30, 5 * 2**30, 4 * 2**30]), (1, [2**30, 2**30, 6 * 2**30])):
        f = run / f"spans-rank{rank}.jsonl"
        rows = [json.loads(line) for line in f.read_text().splitlines()]
        f.write_text("".join(json.dumps({**row, "peak_bytes": p}) + "\n" for row, p in zip(rows, peaks)))
    sim = SimResult(
        step_time_s=0.2,
        window=(0.0, 0.2),
        step_ends=[0.0, 0.2],
        utilization={},
        bottleneck="x",
        spans=[("rank0", "compute", "compute", "block 0", 1, 0, 0.0, 0.1)],
    )
    result = compare(measure(run, two_rank_plan), sim, predicted_gpu_bytes=7 * 2**30)
    assert result.peak_gpu_bytes == 6 * 2**30  # the most on any rank, warm-up step included
    assert to_json(result, Path("p.yaml"), run, None)["gpu_memory"] == {
        "predicted_bytes": 7 * 2**30,
        "measured_peak_bytes": 6 * 2**30,
    }
    notes = validation_notes(result)
    assert len(notes) == 1 and "predicted 7.0 GiB" in notes[0] and "peak allocated by torch 6.0 GiB" in notes[0]
    cpu = compare(measure(tmp_path / "run", two_rank_plan), sim)
    assert cpu.predicted_gpu_bytes is None


def test_the_training_loop_is_the_slowest_ranks_as_the_planner_counts_it(two_rank_plan, tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_run(run, [5.0, 0.10, 0.30, 0.20], {0: [4.0, 0.02, 0.06, 0.04], 1: [4.0, 0.04, 0.08, 0.06]})
    loop = {0: [0.5, 0.003, 0.004, 0.005], 1: [0.5, 0.001, 0.001, 0.001]}  # rank 0 also writes the journal
    for rank in (0, 1):
        f = run / f"spans-rank{rank}.jsonl"
        rows = [json.loads(line) for line in f.read_text().splitlines()]
        for row in rows:
            row["totals"]["loop"] = loop[rank][row["step"]]
        f.write_text("".join(json.dumps(row) + "\n" for row in rows))
    rows = {r.stage: r for r in measure(run, two_rank_plan).rows}
    assert rows["loop"].measured_s == pytest.approx(0.004)  # rank 0's: 3, 4, 5 ms
    assert rows["compute"].measured_s == pytest.approx(0.05)  # the other stages still average


def test_the_spread_of_the_measured_steps_is_reported_beside_the_error(two_rank_plan, tmp_path: Path) -> None:
    from zoplan.cli.render import validation_notes

    times = [9.0] + [0.20 + 0.01 * k for k in range(11)]  # steps 1-11: 0.20 .. 0.30 s
    write_run(tmp_path / "run", times, {0: [0.1] * 12, 1: [0.1] * 12})

    def validated(predicted_s: float):
        sim = SimResult(
            step_time_s=predicted_s,
            window=(0.0, predicted_s),
            step_ends=[0.0, predicted_s],
            utilization={},
            bottleneck="x",
            spans=[("rank0", "compute", "compute", "block 0", 1, 0, 0.0, 0.1)],
        )
        return compare(measure(tmp_path / "run", two_rank_plan), sim)

    inside = validated(0.23)
    assert inside.step_spread_s == pytest.approx((0.21, 0.29))  # deciles of 0.20 .. 0.30, step 0 left out
    assert to_json(inside, Path("p.yaml"), tmp_path, None)["gpu_memory"] is None  # no GPU measured (CPU ranks)
    assert to_json(inside, Path("p.yaml"), tmp_path, None)["step_spread"] == {
        "p10_s": pytest.approx(0.21),
        "p90_s": pytest.approx(0.29),
    }
    note = validation_notes(inside)[0]
    assert "under 210.0 ms" in note and "over 290.0 ms" in note and "within that spread" in note
    assert "within that spread" not in validation_notes(validated(0.18))[0]
    # and one outside says so, and on which side (it said nothing)
    assert "the prediction (180.0 ms) lies below that spread" in validation_notes(validated(0.18))[0]
    assert "the prediction (400.0 ms) lies above that spread" in validation_notes(validated(0.40))[0]
    # a plan made without a profile and 28% under the step (0.18 against a median 0.25) is told how
    # to calibrate; one within 15%, or made with a profile, is not
    hint = [n for n in validation_notes(validated(0.18), profiled=False) if "zoplan calibrate" in n]
    assert len(hint) == 1 and "28% under" in hint[0]
    assert not [n for n in validation_notes(validated(0.18), profiled=True) if "zoplan calibrate" in n]
    assert not [n for n in validation_notes(inside, profiled=False) if "zoplan calibrate" in n]
    # how much they vary, the figure a topology of several such nodes gives as network.step_cv
    steps = times[1:]
    cv = statistics.stdev(steps) / statistics.mean(steps)
    assert inside.step_cv == pytest.approx(cv) and to_json(inside, Path("p.yaml"), tmp_path, None)["step_cv"] == (
        pytest.approx(cv)
    )
    assert any(f"network.step_cv: {cv:.3f}" in n for n in validation_notes(inside))
    write_run(tmp_path / "short", [1.0, 0.2, 0.2], {0: [0.1] * 3, 1: [0.1] * 3})
    short = measure(tmp_path / "short", two_rank_plan)
    assert short.step_spread_s is None and short.step_cv is None  # too few steps to say


def test_steps_that_speed_up_or_slow_down_during_the_run_are_pointed_out(two_rank_plan, tmp_path: Path) -> None:
    """The medians of the first and second half of the measured steps; a note when they are more
    than 10% of the median apart, saying which way (warm-up past --skip, or a machine slowing)."""
    from zoplan.cli.render import validation_notes

    sim = SimResult(
        step_time_s=0.1,
        window=(0.0, 0.1),
        step_ends=[0.0, 0.1],
        utilization={},
        bottleneck="x",
        spans=[("rank0", "compute", "compute", "block 0", 1, 0, 0.0, 0.1)],
    )

    def notes_for(name: str, times: list[float]):
        write_run(tmp_path / name, times, {0: [0.05] * len(times), 1: [0.05] * len(times)})
        result = compare(measure(tmp_path / name, two_rank_plan), sim)
        return result, [n for n in validation_notes(result) if "during the run" in n]

    # step 0 is skipped; steps 1-3 slow (warm-up), 4-7 steady: halves 1-3 and 5-7 (step 4 in neither)
    warm, notes = notes_for("warm", [9.0, 0.13, 0.14, 0.13, 0.10, 0.10, 0.10, 0.10])
    assert warm.step_halves_s == pytest.approx((0.13, 0.10))
    assert to_json(warm, Path("p.yaml"), tmp_path, None)["step_halves"] == {
        "first_s": pytest.approx(0.13),
        "last_s": pytest.approx(0.10),
    }
    assert len(notes) == 1 and "sped up" in notes[0] and "130.0 ms" in notes[0] and "--skip" in notes[0]
    slower, notes = notes_for("slower", [9.0, 0.10, 0.10, 0.10, 0.12, 0.12, 0.12, 0.12])
    assert len(notes) == 1 and "slowed down" in notes[0]
    steady, notes = notes_for("steady", [9.0, 0.10, 0.105, 0.10, 0.10, 0.104, 0.10, 0.10])
    assert steady.step_halves_s is not None and notes == []
    few, notes = notes_for("few", [9.0, 0.2, 0.1, 0.1, 0.1, 0.1])  # 5 measured steps: too few to halve
    assert few.step_halves_s is None and notes == []


def test_padded_batches_are_reported_as_the_share_of_positions_that_held_padding(two_rank_plan, tmp_path: Path) -> None:
    from zoplan.cli.render import validation_notes

    run = tmp_path / "run"
    write_run(run, [1.0, 0.2, 0.2, 0.2], {0: [1.0, 0.1, 0.1, 0.1], 1: [1.0, 0.1, 0.1, 0.1]})
    sim = SimResult(
        step_time_s=0.2,
        window=(0.0, 0.2),
        step_ends=[0.0, 0.2],
        utilization={},
        bottleneck="x",
        spans=[("rank0", "compute", "compute", "block 0", 1, 0, 0.0, 0.1)],
    )
    # runs written before the share was recorded: nothing to say
    assert compare(measure(run, two_rank_plan), sim).padding_fraction is None

    def with_padding(shares: list[float]):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        (run / "metrics.jsonl").write_text(
            "".join(json.dumps({**r, "padding": p}) + "\n" for r, p in zip(rows, shares))
        )
        return compare(measure(run, two_rank_plan), sim)

    padded = with_padding([0.9, 0.5, 0.4, 0.3])
    assert padded.padding_fraction == pytest.approx(0.4)  # the measured steps' mean, step 0 left out
    assert to_json(padded, Path("p.yaml"), run, None)["padding_fraction"] == pytest.approx(0.4)
    assert any(n.startswith("40% of the batch positions were padding") for n in validation_notes(padded))
    full = with_padding([0.9, 0.0, 0.0, 0.0])
    assert full.padding_fraction == 0.0 and not any("padding" in n for n in validation_notes(full))
