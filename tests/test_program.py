"""The step program (zoplan.program): one place that writes the order of a step.

For a matrix of layouts (1x1, 2x1, 1x2, 2x2; sliced and whole-block; relays; resident blocks;
prefetch 1 and 2; one and several rounds per block) the program must be complete (every block
moved, updated, written back and computed once per step, on the right ranks), runnable by one
thread per rank in its issue order, free of references to ops it does not have, and what the
simulator times, op by op.
"""

from __future__ import annotations

import collections
import json
import math
import re
import sys

import pytest
from typer.testing import CliRunner

from zoplan.cli import app, main
from zoplan.sim.costs import StepCosts, Workload
from zoplan.layout import Layout
from zoplan.models import load_model_shape
from zoplan.program import END, Kind, Stream, build
from zoplan.sim import STEPS, simulate
from zoplan.topology import load_topology
from zoplan.tuning import FULL, Tuning

LORA = Tuning("lora")

LAYERS = 6


def layout(
    p: int,
    d: int,
    upload: str,
    *,
    relays: int = 0,
    slices: int | None = None,
    prefetch: int = 1,
    resident: tuple[int, ...] = (),
) -> Layout:
    compute = tuple(f"gpu{i}" for i in range(p * d))
    movers = compute if upload == "whole" else compute + tuple(f"gpu{p * d + i}" for i in range(relays))
    return Layout(
        perturbation=p,
        data=d,
        compute_gpus=compute,
        upload=upload,
        movers=movers,
        slices_per_block=1 if upload == "whole" else (slices or len(movers)),
        wire_dtype="bf16",
        param_dtype="bf16",
        micro_batch=1,
        prefetch=prefetch,
        resident=resident,
    )


MATRIX = {
    "1x1 whole": layout(1, 1, "whole"),
    "1x1 whole prefetch 2": layout(1, 1, "whole", prefetch=2),
    "1x1 sliced 2 rounds": layout(1, 1, "sliced", slices=2),
    "1x1 relay resident": layout(1, 1, "sliced", relays=1, slices=4, resident=(2,)),
    "2x1 sliced prefetch 2": layout(2, 1, "sliced", slices=4, prefetch=2),
    "1x2 whole resident": layout(1, 2, "whole", resident=(1, 4), prefetch=2),
    "2x2 sliced resident": layout(2, 2, "sliced", slices=8, resident=(0, 3)),
    "2x2 whole": layout(2, 2, "whole"),
    "1x2 relays": layout(1, 2, "sliced", relays=2, slices=4),
}


@pytest.fixture(params=[(name, frozen) for name in sorted(MATRIX) for frozen in (False, True)], scope="module")
def case(request):
    """A layout of the matrix and its program: full-parameter, or frozen (an adapter trained on
    read-only blocks: zoplan.tuning)."""
    name, frozen = request.param
    L = MATRIX[name]
    return L, build(
        L, layers=LAYERS, block_params=1000, micro_batches=2, block_flops=1e9, head_flops=1e8, frozen=frozen
    )


def test_every_reference_names_an_op_of_the_program(case) -> None:
    L, program = case
    have = {(op.id, op.ranks) for op in program.ops} | {(END, ())}
    for op in program.ops:
        for ref in op.deps + op.frees:
            assert (ref.op, ref.ranks) in have, (op.id, ref)
        assert set(op.ranks) <= set(L.gpus)


def test_every_block_is_moved_updated_written_back_and_computed_once_a_step(case) -> None:
    L, program = case
    trains = not program.frozen  # read-only blocks: moved and computed, never updated or written back
    count = collections.Counter((op.kind, op.block, op.round, r) for op in program.ops for r in op.ranks)
    streamed = [b for b in range(LAYERS) if b not in L.resident]
    for b in range(LAYERS):
        for g in L.compute_gpus:
            assert count[Kind.BLOCK, b, None, g] == 1
        for g in L.movers:
            for r in range(L.rounds):
                if L.upload == "sliced":
                    assert count[Kind.UPDATE, b, r, g] == trains
                if b in streamed:
                    assert count[Kind.H2D, b, r, g] == 1  # this step's or, carried, the next one's
                    assert count[Kind.D2H, b, r, g] == trains
                else:
                    assert count[Kind.H2D, b, r, g] == 0 and count[Kind.D2H, b, r, g] == 0
            if L.upload == "sliced" and len(L.movers) > 1:
                assert count[Kind.UNPACK, b, None, g] == (b in L.resident)
                assert [count[Kind.ALLGATHER, b, r, g] for r in range(L.rounds)] == [1] * L.rounds
        if L.upload == "whole":
            assert [count[Kind.UPDATE, b, None, g] for g in L.compute_gpus] == [trains] * len(L.compute_gpus)
    if not trains:
        assert not [op for op in program.ops if op.kind in (Kind.UPDATE, Kind.D2H, Kind.BARRIER)]
        # a block is computed only once it has landed on its rank (or been gathered there)
        for op in program.ops:
            if op.kind is Kind.BLOCK and op.block in streamed:
                assert op.deps and op.deps[0].op.startswith(("h2d", "all-gather")), op
    # one all-reduce over every rank, relays included
    assert [op.ranks for op in program.ops if op.kind is Kind.ALLREDUCE] == [L.gpus]


def test_one_thread_per_rank_can_run_its_ops_in_issue_order(case) -> None:
    """A same-step dependency on the same rank comes earlier in that rank's list, and every
    collective comes in the same order on each of its members (else the ranks would hang)."""
    L, program = case
    for g in L.gpus:
        mine = program.rank_ops(g)
        carried = {op.id for op in mine if op.step == 1}  # issued during the step before
        seen: set[str] = set()
        for op in mine:
            for ref in op.deps:
                if ref.step == 0 and op.step == 0 and ref.ranks == (g,) and ref.op not in carried:
                    assert ref.op in seen, (g, op.id, ref.op)
            seen.add(op.id)
    order = {g: [op.id for op in program.rank_ops(g) if op.collective] for g in L.gpus}
    for op in program.ops:
        if op.collective:
            positions = {
                tuple(x for x in order[g] if x in {o.id for o in program.ops if o.ranks == op.ranks}) for g in op.ranks
            }
            assert len(positions) == 1, op.id


def test_the_simulator_times_the_programs_ops_in_the_programs_order(case) -> None:
    L, program = case
    machine = load_topology("dgx-a100")
    shape = load_model_shape("opt-1.3b")
    costs = StepCosts(machine, Workload(shape, 8, 128, LORA if program.frozen else FULL), L)
    result = simulate(costs, record=True)
    timed = costs.program  # the same layout, with the model's real sizes
    assert timed.frozen == program.frozen
    assert [(op.id, op.kind, op.stream, op.ranks) for op in timed.ops[:5]] == [
        (op.id, op.kind, op.stream, op.ranks)
        for op in build(L, layers=shape.layers, block_params=1, frozen=program.frozen).ops[:5]
    ]
    lanes = collections.defaultdict(list)
    for span in result.spans:
        lanes[span.gpu, span.stream].append((span.label, span.step))
    for g in L.gpus:
        for stream in Stream:
            ops = [op for op in timed.rank_ops(g) if op.stream is stream]
            want = [(op.id, 0) for op in ops if op.step == 1]
            want += [(op.id, s + op.step) for s in range(STEPS) for op in ops if s + op.step < STEPS]
            # a host op costs nothing without a profile: no span for it
            want = [w for w in want if not w[0].startswith("host")]
            assert lanes[g, stream.value] == want, (g, stream)


def test_the_program_costs_what_its_ops_move() -> None:
    L = MATRIX["2x1 sliced prefetch 2"]
    program = build(L, layers=LAYERS, block_params=1001, micro_batches=3, block_flops=2e9, head_flops=1e8)
    h2d = [op for op in program.ops if op.kind is Kind.H2D]
    assert {op.nbytes for op in h2d} == {math.ceil(1001 / 4) * 2}
    gather = [op for op in program.ops if op.kind is Kind.ALLGATHER]
    assert {op.nbytes for op in gather} == {math.ceil(1001 / 4) * 2 * 2}
    assert {op.flops for op in program.ops if op.kind is Kind.BLOCK} == {2e9 * 3}  # one branch per rank
    # the next step's first prefetch-deep uploads are issued while this step's last blocks compute
    assert sorted({op.block for op in h2d if op.step == 1}) == [0, 1]
    # ... and before a run's first step
    first = program.prologue("gpu0")
    assert [(op.id, op.step) for op in first] == [(op.id, 0) for op in h2d if op.step == 1 and op.ranks == ("gpu0",)]


def test_timeline_ops_lists_each_ranks_program(tmp_path, monkeypatch, capsys) -> None:
    runner = CliRunner()
    plan = tmp_path / "plan.yaml"
    result = runner.invoke(
        app,
        [
            "plan",
            "--model",
            "opt-1.3b",
            "-t",
            "dgx-a100",
            "--pertp",
            "1",
            "--ddp",
            "2",
            "--upload",
            "whole",
            "--resident",
            "0",
            "-o",
            str(plan),
        ],
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["timeline", str(plan), "--ops", "--rank", "gpu0"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(line.startswith("gpu0 (compute,") for line in lines)
    assert not any(line.startswith("gpu2 (") for line in lines)
    assert any(line.split()[:3] == ["upload", "h2d", "b0"] for line in lines)
    assert any(line.split()[:3] == ["compute", "block", "23"] for line in lines)
    monkeypatch.setattr(sys, "argv", ["zoplan", "timeline", str(plan), "--ops", "--rank", "gpu9"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2 and "no rank gpu9" in capsys.readouterr().err
    # the chrome trace of the same plan carries the op ids
    trace = tmp_path / "t.json"
    assert runner.invoke(app, ["timeline", str(plan), "-o", str(trace)]).exit_code == 0
    spans = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("ph") == "X" and e["cat"] != "step"]
    assert spans and all({"op", "rank", "stream"} <= set(e["args"]) for e in spans)
    assert {e["args"]["op"] for e in spans} >= {"h2d b0", "update b0", "barrier b0", "d2h b0", "block 0", "head"}


def test_a_listing_fits_80_columns_with_its_long_lines_under_their_description(tmp_path) -> None:
    """`zoplan timeline --ops` in 80 columns: an op that waits for one write-back on each of four
    ranks says so once (`d2h b0@gpu0,gpu2,gpu4,gpu6 (step before)`) and a line still too long
    goes on under its description, broken between two items, never inside an op id."""
    from rich.console import Console

    from zoplan import cli
    from zoplan.cli import _hanging

    plan = tmp_path / "p.yaml"
    runner = CliRunner()
    args = ["plan", "-m", "opt-175b", "-t", "l40s-8x", "--pertp", "2", "--ddp", "2", "--upload", "whole"]
    assert runner.invoke(cli.app, [*args, "-o", str(plan)]).exit_code == 0
    from zoplan.planner import timeline

    listing = timeline(plan, None).program.describe(["gpu0"])
    assert "d2h b0@gpu0,gpu2,gpu4,gpu6 (step before)" in listing and "d2h b0@gpu2" not in listing
    assert max(len(line) for line in listing.splitlines()) > 80  # the case needs the wrapping
    wrapped = _hanging(listing, 80)
    assert max(len(line) for line in wrapped.splitlines()) <= 80
    assert " ".join(wrapped.split()) == " ".join(listing.split())  # the same words, in order
    continued = [line for line in wrapped.splitlines() if line.startswith(" " * 32)]
    assert continued and all(not line[32:].startswith(("b", "r")) for line in continued)  # not inside an id
    console = Console(width=80, record=True, color_system=None)
    console.print(wrapped, soft_wrap=True, highlight=False)
    assert "…" not in console.export_text()
    # a narrow terminal still wraps, under the op's id (lines of 100 columns at 40: none wrapped)
    for narrow in (40, 52):
        wrapped = _hanging(listing, narrow)
        # an op's line longer than that holds no break between items (its stream, id and first item)
        long = [line for line in wrapped.splitlines() if line.startswith("  ") and len(line) > narrow]
        assert all(len(re.split(r"(?<=[;,]) ", line.strip())) == 1 for line in long), long
        assert " ".join(wrapped.split()) == " ".join(listing.split())
