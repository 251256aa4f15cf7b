"""The records a run writes (zoplan.records): one schema each, strict rows, bounded reads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from zoplan import records
from zoplan.records import EvalRow, RankError, ResumedRow, SpanLine, TrainRow, read_metrics, summarize


def train(step: int, loss: float) -> TrainRow:
    return TrainRow(
        step=step,
        loss=loss,
        projected_grad=0.1,
        step_time_s=0.5,
        tokens_per_s=1000.0,
        elapsed_s=0.5 * (step + 1),
        nonfinite_total=0,
    )


def test_the_run_summary_leaves_out_metrics_rows_that_are_not_as_written(tmp_path: Path) -> None:
    rows = [
        EvalRow(step=-1, eval_loss=0.9, eval_accuracy=0.5),
        train(0, 2.0),
        train(1, 1.0),
        EvalRow(step=1, eval_loss=0.7, eval_accuracy=0.75),
    ]
    good = [json.loads(r.line()) for r in rows]
    damaged = [
        {**good[1], "loss": "low"},
        {**good[1], "step": True},
        {"step": 4},
        [1],
        {**good[1], "extra": 1},
        {**good[0], "eval_loss": None},
    ]
    lines = [
        rows[0].line(),
        json.dumps(damaged[0]) + "\n",
        rows[1].line(),
        *(json.dumps(d) + "\n" for d in damaged[1:5]),
        rows[2].line(),
        json.dumps(damaged[5]) + "\n",
        rows[3].line(),
        '{"step": 5, "lo',
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(lines))
    result = summarize(tmp_path)
    assert (result.steps, result.first_loss, result.last_loss) == (2, 2.0, 1.0)
    assert (result.eval_before, result.eval) == (rows[0], rows[3])


def test_metrics_are_read_incrementally_and_a_torn_line_waits(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    assert read_metrics(path) == ([], 0)
    path.write_text(train(0, 3.0).line() + ResumedRow(resumed_at=1, snapshot=None, replayed=1, restart=0).line())
    rows, offset = read_metrics(path)
    assert [type(r) for r in rows] == [TrainRow, ResumedRow] and offset == path.stat().st_size
    torn = train(1, 2.0).line()
    with path.open("a") as f:
        f.write(torn[:10])
    assert read_metrics(path, offset) == ([], offset)  # half a line: not yet
    with path.open("a") as f:
        f.write(torn[10:])
    rows, end = read_metrics(path, offset)
    assert rows == [train(1, 2.0)] and end == path.stat().st_size


def test_rows_are_strict_but_keep_what_the_run_saw() -> None:
    assert math.isnan(TrainRow.model_validate_json(train(0, float("nan")).line()).loss)  # a non-finite loss
    for bad in ({"step": True}, {"step": 1.0}, {"loss": "1"}, {"spare": 0}):
        with pytest.raises(ValueError):
            TrainRow.model_validate({**json.loads(train(0, 1.0).line()), **bad})
    assert "padding" not in train(0, 1.0).line()  # a field left unset is not written


def test_span_lines_read_back_and_damaged_ones_are_left_out(tmp_path: Path) -> None:
    line = SpanLine(step=2, wall_s=0.3, totals={"compute": 0.2}, spans=[("compute", "compute", "block 0", 0, 0.0, 0.2)])
    (tmp_path / "spans-rank0.jsonl").write_text(line.line() + '{"step": 3, "totals": [1, 2]}\n' + line.line())
    assert records.read_spans(tmp_path / "spans-rank0.jsonl") == [line, line]


def test_a_rank_error_is_a_record_written_whole(tmp_path: Path) -> None:
    assert records.read_error(tmp_path) is None
    error = RankError(rank=1, kind="disk", message="the disk is full", fix="free some space")
    assert records.write_error(tmp_path, error)
    assert records.read_error(tmp_path) == error and [p.name for p in tmp_path.iterdir()] == ["error.json"]
    for damaged in ('{"rank": 1', '{"version": 1, "rank": 1, "kind": "other", "message": "m"}', "x" * 100_000):
        (tmp_path / "error.json").write_text(damaged)
        assert records.read_error(tmp_path) is None
    assert not records.write_error(tmp_path / "missing", error)  # (the launcher then reads the log)


def test_a_learning_rate_too_small_for_the_model_is_said_once_after_20_steps() -> None:
    """-lr * g**2 per step, to first order: 20 steps of lr 1e-6 and g 30 add up to 0.018, 1.8% of
    a loss of 1.0 (warned); lr 1e-5 adds up to 18% (quiet). A row without lr (an older run) counts
    for nothing."""
    from zoplan.records import StallCheck

    def rows(lr: float) -> list[TrainRow]:
        return [train(s, 1.0).model_copy(update={"lr": lr, "projected_grad": 30.0 * (-1) ** s}) for s in range(30)]

    check = StallCheck()
    said = [w for r in rows(1e-6) if (w := check.add(r))]
    assert len(said) == 1 and "0.018" in said[0] and "1.8% of the loss" in said[0] and "--lr 1e-05" in said[0]
    check = StallCheck()
    assert not [w for r in rows(1e-5) if check.add(r)]
    check = StallCheck()
    assert not [w for r in [train(s, 1.0) for s in range(30)] if check.add(r)]
    # a resume after step 900 (its loss long past the start's): it warned on every resume
    check = StallCheck()
    later = [r.model_copy(update={"step": 900 + r.step}) for r in rows(1e-6)]
    assert not [w for r in later if check.add(r)]


def test_a_summary_says_when_the_loss_rose(tmp_path: Path) -> None:
    from zoplan.records import EvalRow, RunSummary

    def summary(
        first: float | None, last: float | None, before: float | None, after: float | None, window: int = 3
    ) -> list[str]:
        evals = [
            None if x is None else EvalRow(step=s, eval_loss=x, eval_accuracy=0.0)
            for s, x in ((-1, before), (29, after))
        ]
        return RunSummary(tmp_path, 30, first, last, evals[1], evals[0], window).warnings()

    assert summary(7.6, 4.2e5, 7.2, 5.0e5)[0].startswith("the held-out loss rose from 7.2000 to 500000.0000")
    assert summary(7.6, 16.0, None, None)[0].startswith("the training loss rose from 7.6000 to 16.0000")
    assert summary(7.6, 7.0, 7.2, 7.1) == [] and summary(7.6, 7.7, 7.2, 7.5) == []  # (a little up: noise)
    assert summary(None, None, 7.2, float("nan")) == []  # (not finite: said as an error where it matters)
    # the held-out loss, where there is one, speaks for the run; a single step's training loss is noise
    assert summary(0.40, 0.85, 7.2, 7.1) == [] and summary(0.40, 0.85, None, None, window=1) == []


def test_a_run_shorter_than_the_check_is_told_when_no_perturbation_changed_its_loss() -> None:
    """Every g of a 10-step run exactly 0 (eps below the compute dtype's precision): nothing was
    learned, and the summary's "training loss a -> b" (other batches) read as a change; the check
    waited for a 20th step that never came. Judged after the last step; the learning rate's hint,
    which needs 20 steps of a noisy g, is not given early."""
    from zoplan.records import StallCheck

    flat = [train(s, 7.2).model_copy(update={"lr": 1e-3, "projected_grad": 0.0}) for s in range(10)]
    check = StallCheck(total=10)
    said = [(r.step, w) for r in flat if (w := check.add(r))]
    assert len(said) == 1 and said[0][0] == 9 and "in 10 steps no perturbation changed the loss" in said[0][1]
    small = [r.model_copy(update={"projected_grad": 1e-3 * (-1) ** r.step}) for r in flat]  # (lr * g**2 tiny)
    check = StallCheck(total=10)
    assert not [w for r in small if check.add(r)]
    check = StallCheck(total=100)  # a longer run: after its 20th step, as before
    assert [r.step for r in [*flat, *[f.model_copy(update={"step": 10 + f.step}) for f in flat]] if check.add(r)] == [
        19
    ]


def test_a_summary_whose_first_rows_are_gone_counts_every_step_and_says_where_its_rows_start(
    tmp_path: Path,
) -> None:
    """metrics.jsonl removed before a resume at step 3000: the summary said "trained 100 steps" of
    a run of 3100, its first loss "of the first 10 steps"."""
    rows = [ResumedRow(resumed_at=3000, snapshot=None, replayed=3000, restart=0)]
    rows += [train(s, 5.0) for s in range(3000, 3100)]
    (tmp_path / "metrics.jsonl").write_text("".join(r.line() for r in rows))
    result = summarize(tmp_path)
    assert (result.steps, result.first_step, result.window) == (3100, 3000, 10)
    from zoplan.planfile import write_plan
    from zoplan.planner import plan

    write_plan(plan("opt-125m", "cpu-local").plan, tmp_path / "plan.yaml")  # (the closing lines name the layout)
    said = result.lines()[0]
    assert said.startswith("trained 3100 steps: training loss 5.0000 (step 3001-3010, the first metrics.jsonl holds)")


def test_a_step_trained_again_after_a_resume_is_counted_once_and_its_last_row_counts(tmp_path: Path) -> None:
    """A resume whose journal lost its last line trains that step again: metrics.jsonl holds a row
    for it from each start. `trained N steps` counts steps, not rows (a 4-step run said 5), and
    the later row (the step the weights hold) gives its figures."""
    rows = [
        train(0, 4.0),
        train(1, 3.0),
        train(2, 9.0),  # the first start's step 2, whose journal line was cut
        ResumedRow(resumed_at=2, snapshot="step-00000002", replayed=0, restart=0),
        train(2, 2.0),
        train(3, 1.0),
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(r.line() for r in rows))
    result = summarize(tmp_path)
    assert (result.steps, result.first_loss, result.last_loss, result.window) == (4, 4.0, 1.0, 1)
    many = [train(s, 100.0) for s in range(20)] + [train(s, float(s)) for s in range(15, 20)]
    (tmp_path / "metrics.jsonl").write_text("".join(r.line() for r in many))
    result = summarize(tmp_path)  # 20 steps, not 25: windows of 2, from the last rows of steps 18 and 19
    assert (result.steps, result.window, result.first_loss, result.last_loss) == (20, 2, 100.0, 18.5)


def test_an_eps_that_moves_no_loss_is_named_instead_of_the_learning_rate() -> None:
    """eps below the weights' precision: every step's losses at +eps and -eps are equal, g is
    exactly 0, and nothing is learned at any learning rate. The warning says so (and suggests a
    larger --eps), instead of calling the learning rate too small; steps with non-finite losses
    (g 0 as well) do not count either way, and one step that moved the loss keeps the lr warning."""
    from zoplan.records import StallCheck

    def row(step: int, g: float, loss: float = 1.0) -> TrainRow:
        return train(step, loss).model_copy(update={"lr": 1e-3, "projected_grad": g})

    check = StallCheck()
    flat = [row(s, 0.0, float("nan") if s % 7 == 3 else 1.0) for s in range(25)]
    said = [w for r in flat if (w := check.add(r))]
    assert len(said) == 1, said
    assert "no perturbation changed the loss" in said[0] and "below the precision of the compute dtype" in said[0]
    assert "--eps" in said[0] and "likely too small" not in said[0] and "--lr" not in said[0]
    check = StallCheck()
    said = [w for r in [row(0, 0.5)] + [row(s, 0.0) for s in range(1, 25)] if (w := check.add(r))]
    assert len(said) == 1 and "likely too small" in said[0] and "--lr 0.01" in said[0], said


def test_the_held_out_line_reports_only_the_evaluations_before_the_first_and_after_the_last_step(
    tmp_path: Path,
) -> None:
    """A start that ended without evaluating its last step (an earlier start's evaluation after
    step 3, a run resumed with --eval-every 0): that evaluation is not the run's result. It was
    reported as "held-out: loss before -> after"."""
    rows = [
        EvalRow(step=-1, eval_loss=0.9, eval_accuracy=0.5),
        *(train(s, 2.0 - 0.1 * s) for s in range(4)),
        EvalRow(step=3, eval_loss=0.8, eval_accuracy=0.6),
        *(train(s, 1.5) for s in range(4, 6)),
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(r.line() for r in rows))
    result = summarize(tmp_path)
    assert result.steps == 6 and result.eval is None and result.eval_before == rows[0]
    rows.append(EvalRow(step=5, eval_loss=0.7, eval_accuracy=0.7))  # the last step's, at last
    (tmp_path / "metrics.jsonl").write_text("".join(r.line() for r in rows))
    result = summarize(tmp_path)
    assert (result.eval_before, result.eval) == (rows[0], rows[-1])


def test_skipped_steps_are_counted_and_left_out_of_the_loss_means(tmp_path: Path) -> None:
    """A step whose loss was not finite (its update skipped) says nothing of the training loss:
    the first and last means are of the finite ones, the closing line counts the skipped (the
    mean was NaN, and a run of nothing but skipped steps read as 'trained')."""
    rows = [train(0, float("nan")), *(train(s, 2.0 - 0.1 * s) for s in range(1, 19)), train(19, float("inf"))]
    (tmp_path / "metrics.jsonl").write_text("".join(r.line() for r in rows))
    result = summarize(tmp_path)
    assert (result.steps, result.window, result.skipped) == (20, 2, 2)
    assert result.first_loss == pytest.approx(1.9) and result.last_loss == pytest.approx(0.2)
    (tmp_path / "metrics.jsonl").write_text("".join(train(s, float("nan")).line() for s in range(3)))
    result = summarize(tmp_path)
    assert (result.first_loss, result.last_loss, result.skipped) == (None, None, 3)
