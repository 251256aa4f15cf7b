"""A run with no held-out example evaluates nothing and says so, instead of evaluating an empty
set as a loss and accuracy of 0 (rows of zeros in metrics.jsonl, `held-out: loss 0.0000 -> 0.0000`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zoplan.records import EvalRow, TrainRow, read_metrics
from zoplan.runconfig import make
from zoplan.runtime import data as zdata
from zoplan.runtime.launch import run


def test_a_fraction_that_rounds_to_no_example_holds_out_none() -> None:
    examples = [zdata.Example(text=f"text {i}") for i in range(40)]
    for fraction in (0.0, 0.01):
        train, held = zdata.split(examples, fraction, seed=0)
        assert (len(train), held) == (40, [])
    assert len(zdata.split(examples, 0.1, seed=0)[1]) == 4


@pytest.mark.parametrize(
    "fraction, every", [(0.0, None), (0.01, 1)], ids=["eval-fraction-0", "rounds-to-none-every-step"]
)
def test_no_held_out_example_means_no_evaluation_and_one_note(
    tiny_dirs, tmp_path: Path, fraction: float, every: int | None
) -> None:
    data = tmp_path / "texts.jsonl"  # 40 examples: a fraction of 0.01 holds out round(0.4) = 0
    data.write_text("".join(json.dumps({"text": f"the film number {i} was fine."}) + "\n" for i in range(40)))
    out = tmp_path / "run"
    summary = run(
        make(
            model=str(tiny_dirs["tiny-opt"]),
            data=str(data),
            eval_fraction=fraction,
            eval_every=every,
            steps=2,
            global_batch=4,
            seq_len=16,
            output=out,
            quiet=True,
        )
    )
    rows = read_metrics(out / "metrics.jsonl")[0]
    assert [r.step for r in rows if isinstance(r, TrainRow)] == [0, 1]
    assert not [r for r in rows if isinstance(r, EvalRow)], rows  # no evaluation of nothing
    assert summary.eval is None and summary.eval_before is None
    lines = summary.lines()
    assert not [line for line in lines if line.startswith("held-out")], lines
    notes = [line for line in lines if "holds out no example" in line]
    assert len(notes) == 1 and notes[0].startswith("not evaluated: --eval-fraction"), lines
    assert ("rounds to none" in notes[0]) == (fraction > 0), notes
    assert "0 held out (" in (out / "worker-node0.log").read_text()
