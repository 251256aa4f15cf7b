"""Whole commands under hostile arguments and files, as the console script runs them.

The contract: ``zoplan plan`` and ``zoplan timeline`` with any mix of bad, extreme and good
arguments, or with a plan file whose fields were changed to anything, end with status 0 (it was
valid) or 2 (usage error or one "error:" message), never a traceback, and answer within a time
limit (a hang fails). The runtime's commands get the same treatment in
tests/runtime/test_fuzz_runtime_loaders.py (--resume and replay on mutated run directories),
tests/runtime/test_fuzz_commands.py (`run` and `validate` with bad arguments) and bench/hostile.py (bad inputs and faults through the real `zoplan run`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from fuzzkit import console, fuzz_settings
from zoplan import cli

INTS = ["-1", "0", "1", "2", "3", "8", "64", "65537", "1000000000000", str(2**63), "nan", "abc", "1e3", ""]
FLOATS = ["1e-6", "0", "-1", "nan", "inf", "-inf", "1e308", "abc", "1e-320"]
OPTIONS = {
    "--model": st.sampled_from(["opt-125m", "opt-1.3b", "opt-66B", "nobody", "", "../../../etc/passwd", "/dev/null"]),
    "--topology": st.sampled_from(
        ["cpu-local", "h100-pcie-1x", "rtx4090-4x", "dgx_a100", "", "/dev/null", "/nonexistent.yaml"]
    ),
    "--global-batch": st.sampled_from(INTS),
    "--seq-len": st.sampled_from(INTS + [str(2**20 + 1)]),
    "--micro-batch": st.sampled_from(INTS),
    "--slices": st.sampled_from(INTS + ["129"]),
    "--resident": st.sampled_from(INTS),
    "--pertp": st.sampled_from(INTS),
    "--ddp": st.sampled_from(INTS),
    "--dtype": st.sampled_from(["fp32", "bf16", "fp16", "fp8", "BF16", ""]),
    "--wire-dtype": st.sampled_from(["fp32", "bf16", "fp16", "int4"]),
    "--upload": st.sampled_from(["whole", "sliced", "both"]),
    "--gpus": st.sampled_from(["gpu0", "gpu0,gpu0", "gpu9", "", ",,", "rank0,rank1"]),
    "--lr": st.sampled_from(FLOATS),
    "--eps": st.sampled_from(FLOATS),
    "--top": st.sampled_from(INTS),
}
# a plan's fields and what each may be set to: the types it expects, the wrong ones, the extremes
VALUES = st.one_of(
    st.sampled_from(
        [
            0,
            -1,
            1,
            2,
            3,
            10**12,
            2**63,
            float("nan"),
            float("inf"),
            1e-300,
            "",
            "x",
            None,
            True,
            [],
            {},
            [0, 0],
            "fp8",
            "gpu9",
        ]
    ),
    st.integers(-3, 300),
)


SEEN: dict[tuple[str, int], int] = {}  # (command, exit status) -> examples
# one worker runs this file's tests, in order, so the last sees what the others tried
pytestmark = pytest.mark.xdist_group("fuzz_cli")


def assert_answered(code: int, output: str, args: list[str]) -> None:
    SEEN[args[0], code] = SEEN.get((args[0], code), 0) + 1
    assert code in (0, 2), f"zoplan {' '.join(args)} exited {code}\n{output[-2000:]}"
    assert "Traceback" not in output, f"zoplan {' '.join(args)}\n{output[-2000:]}"
    if code == 2:
        assert "error" in output.lower() or "usage" in output.lower(), output[-2000:]


@fuzz_settings(60)
@given(picked=st.lists(st.sampled_from(sorted(OPTIONS)), min_size=1, max_size=5, unique=True), data=st.data())
def test_plan_answers_any_arguments_with_a_plan_or_one_message(picked: list[str], data) -> None:
    args = ["plan"]
    for flag in picked:
        args += [flag, data.draw(OPTIONS[flag], label=flag)]
    if "--model" not in picked:  # a small model, so that valid mixes plan within the limit
        args += ["--model", "opt-125m"]
    if "--topology" not in picked:
        args += ["--topology", "rtx4090-4x"]
    assert_answered(*console(args), args)


@pytest.fixture(scope="module")
def a_plan(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("plan") / "plan.yaml"
    result = cli.app  # the command, in-process, as the console script would run it
    from typer.testing import CliRunner

    out = CliRunner().invoke(
        result,
        [
            "plan",
            "--model",
            "opt-125m",
            "--topology",
            "rtx4090-4x",
            "--global-batch",
            "8",
            "--seq-len",
            "128",
            "--resident",
            "0",
            "--upload",
            "sliced",
            "-o",
            str(path),
        ],
    )
    assert out.exit_code == 0, out.output
    return yaml.safe_load(path.read_text())


def leaves(tree, prefix=()) -> list[tuple]:
    """Every field of a plan file, as a path of keys and indices."""
    if isinstance(tree, dict):
        return [p for k, v in tree.items() for p in leaves(v, prefix + (k,))] or [prefix]
    if isinstance(tree, list):
        return [p for i, v in enumerate(tree) for p in leaves(v, prefix + (i,))] or [prefix]
    return [prefix]


@fuzz_settings(60)
@given(data=st.data())
def test_timeline_answers_any_edited_plan_file(tmp_path_factory, a_plan: dict, data) -> None:
    import copy

    spec = copy.deepcopy(a_plan)
    paths = leaves(spec)
    for _ in range(data.draw(st.integers(0, 3), label="edits")):  # 0: the plan as written answers
        path = data.draw(st.sampled_from(paths), label="field")
        node = spec
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = data.draw(VALUES, label="value")
    plan_file = tmp_path_factory.mktemp("edited") / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    args = ["timeline", str(plan_file)]
    assert_answered(*console(args), args)


def test_the_fuzzed_commands_are_the_console_scripts_and_tried_both_outcomes(monkeypatch) -> None:
    """The tests above drive ``zoplan.cli.main``, which the entry point pyproject installs as
    `zoplan` runs, and (run in this file's order) saw valid mixes as well as refusals of both
    commands."""
    import zoplan.cli
    from zoplan import start

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert 'zoplan = "zoplan.start:main"' in text
    called = []
    monkeypatch.setattr(zoplan.cli, "main", lambda as_program=False: called.append(as_program))
    start.main()
    assert called == [True]
    ran = {command for command, _ in SEEN}
    if ran != {"plan", "timeline"}:
        pytest.skip(f"run with the fuzz tests above to check what they tried (ran here: {sorted(ran)})")
    for command in ("plan", "timeline"):
        assert SEEN.get((command, 0), 0) >= 3 and SEEN.get((command, 2), 0) >= 10, SEEN
    print(f"commands tried, by exit status: {SEEN}")
