"""`zoplan run`, `validate` and `replay` as whole commands, with at least one bad argument each.

The contract: any mix of options in which at least one value is wrong (out of range, not a
number, a path that does not exist or is not what it should be, a choice that is not offered)
ends with exit status 2 and one message (usage or "error:"), never a traceback, a hang or a
training run, and leaves nothing behind: no output directory, no shared-memory segment, no
temporary run directory. Good values are mixed in (cheap ones: a run that slipped through would
train one step of the tiny model), so a bad value must be refused also next to good ones.
Every bad value is tried alone next to every good option, then hypothesis mixes up to three bad
options with good ones (derandomized: the same commands on every run).
"""

from __future__ import annotations

import functools
import glob
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from fuzzkit import console, fresh, fuzz_settings
from hypothesis import given
from hypothesis import strategies as st

from zoplan.runtime.perturb import step_seed

INTS = ["0", "-1", "1000000000000", str(2**63), "abc", "", "nan", "1e3"]
FLOATS = ["nan", "inf", "-inf", "-1", "abc", ""]
# option -> values that must be refused on their own, whatever else is given
RUN_BAD = {
    "--model": ["nobody/nothing-here", "/dev/null", "/nonexistent-model", ""],
    "--data": ["/nonexistent.jsonl", "/dev/null", "no-such-dataset", ""],
    "--steps": INTS[:5],
    "--global-batch": INTS,
    "--seq-len": INTS + [str(2**21)],
    "--topology": ["nobody", "/dev/null", "/nonexistent.yaml", "cpu_local", ""],
    "--pertp": INTS + ["3"],
    "--ddp": INTS,
    "--slices": INTS + ["129"],
    "--wire-dtype": ["fp8", "int4", "FP32x", ""],
    "--gpus": ["gpu9", ",,", "rank0,rank0", "rank7", ""],
    "--upload": ["both", ""],
    "--resident": ["-1", "1000000000000", "abc", "9"],
    "--micro-batch": ["0", "-1", "1000000000000", "abc", "3"],
    "--lr": FLOATS,  # (an lr whose update overflows runs, and writes no weights: test_integrity.py)
    "--eps": FLOATS + ["0"],
    "--seed": ["-1", str(2**63), "abc"],
    "--eval-every": ["-1", "abc"],
    "--eval-data": ["/nonexistent.jsonl", "/dev/null", "no-such-dataset", ""],
    "--eval-fraction": ["-0.1", "1", "1.5", "nan", "inf", "abc"],
    "--max-nonfinite": ["0", "-1"],
    "--nnodes": ["0", "4097", "-1"],
    "--node-rank": ["-1", "1", "4096"],
    "--master-port": ["0", "-1", "65536", "abc"],
    "--resume": ["/nonexistent-run", "/dev/null", "EMPTY"],
    "--max-restarts": ["-1", "abc"],
    "--snapshot-every": ["-1", "abc"],
    "--snapshot-minutes": ["-1", "nan", "inf", "abc"],
    "--keep-snapshots": ["-1", "abc"],
    "--journal-sync-every": ["0", "-1"],
    "--tuning": ["lorra", "LoRA ", ""],
    "--lora-rank": ["0", "-1", "4097", "abc"],
    "--lora-alpha": ["0", "-1", "nan", "abc"],
    "--prefix-tokens": ["0", "-1", "abc"],
}
# cheap values a real run accepts (one step of the tiny model, if all else were good)
RUN_GOOD = {
    "--steps": "1",
    "--global-batch": "4",
    "--seq-len": "16",
    "--lr": "1e-3",
    "--eps": "1e-3",
    "--seed": "3",
    "--eval-every": "0",
    "--wire-dtype": "fp32",
    "--upload": "whole",
    "--snapshot-every": "0",
    "--keep-snapshots": "2",
    "--journal-sync-every": "1",
    "--max-restarts": "0",
    "--nnodes": "1",
    "--node-rank": "0",
    "--topology": "cpu-local",
    "--model": "tiny-opt",
    "--data": "sentiment",
    "--tuning": "lora",
    "--lora-rank": "4",
    "--lora-alpha": "8",
}


def leftovers(private_tmp: Path) -> set[str]:
    """What this process's launches hold outside an output directory: host-copy folders in shared
    memory whose owner file names this process (other jobs on the machine have their own), and what
    the command left in the private temporary directory it ran with."""
    from zoplan.runtime.scratch import shared_memory

    mine = set()
    for folder in glob.glob(str(shared_memory() / "zoplan-*")):
        try:
            if (Path(folder) / ".owner").read_text().split()[:1] == [str(os.getpid())]:
                mine.add(folder)
        except OSError:
            continue
    # torch's compile cache (torchinductor_USER) is torch's, kept on purpose and shared by every run
    return mine | {str(p) for p in private_tmp.iterdir() if not p.name.startswith("torchinductor_")}


def assert_refused(args: list[str], root: Path, out: Path | None) -> None:
    private_tmp = root / "tmp"
    private_tmp.mkdir()
    before, tempfile.tempdir = tempfile.tempdir, str(private_tmp)  # where validate and torchrun keep scratch
    try:
        code, output = console(args, limit=60)
    finally:
        tempfile.tempdir = before
    shown = f"zoplan {' '.join(repr(a) if not a or ' ' in a else a for a in args)}\n{output[-2000:]}"
    assert code == 2, shown
    assert "Traceback" not in output, shown
    assert "error" in output.lower() or "usage" in output.lower(), shown
    if out is not None:
        assert not out.exists() or not any(out.iterdir()), f"a refused command left {sorted(out.iterdir())}\n{shown}"
    assert not leftovers(private_tmp), f"left behind: {leftovers(private_tmp)}\n{shown}"


def run_args(root: Path, bad: dict[str, str], good: list[str]) -> tuple[list[str], Path]:
    out = fresh(root, "out")
    args = ["run"]
    for flag, value in bad.items():
        if value == "EMPTY":
            value = str(fresh(root, "empty"))
            Path(value).mkdir()
        args += [flag, value]
    args += [a for flag in good if flag not in bad for a in (flag, RUN_GOOD[flag])]
    if "--resume" not in bad:
        args += ["-o", str(out)]
    return args, out


@pytest.mark.parametrize("flag", sorted(RUN_BAD))
def test_run_refuses_each_bad_value_next_to_good_ones(tmp_path: Path, flag: str) -> None:
    for value in RUN_BAD[flag]:
        root = fresh(tmp_path, "case").parent
        args, out = run_args(root, {flag: value}, sorted(RUN_GOOD))
        assert_refused(args, root, out)


@fuzz_settings(60, shrink=False)
@given(
    bad=st.lists(st.sampled_from(sorted(RUN_BAD)), min_size=1, max_size=3, unique=True),
    good=st.lists(st.sampled_from(sorted(RUN_GOOD)), max_size=5, unique=True),
    data=st.data(),
)
def test_run_refuses_any_mix_with_a_bad_argument_before_a_rank_starts(
    tmp_path_factory, bad: list[str], good: list[str], data
) -> None:
    root = tmp_path_factory.mktemp("run-fuzz")
    args, out = run_args(root, {flag: data.draw(st.sampled_from(RUN_BAD[flag]), label=flag) for flag in bad}, good)
    assert_refused(args, root, out)


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plan") / "plan.yaml"
    code, output = console(
        [
            "plan",
            "--model",
            "tiny-opt",
            "--topology",
            "cpu-local",
            "--global-batch",
            "4",
            "--seq-len",
            "16",
            "-o",
            str(path),
        ]
    )
    assert code == 0, output
    return path


def validate_bad(root: Path, plan: Path) -> dict[str, list[str]]:
    """option -> values `zoplan validate` must refuse (paths made per example)."""
    full = root / "full"
    full.mkdir(exist_ok=True)
    (full / "x").write_text("kept")
    nan_plan = root / "nan.yaml"
    nan_plan.write_text(plan.read_text().replace("lr: ", "lr: .nan #", 1))
    return {
        "PLAN": ["/nonexistent.yaml", "/dev/null", str(nan_plan), str(root)],
        "--steps": ["0", "-1", "1", "abc", "1000000000000"],
        "--skip": ["-1", "50", "abc"],
        "--model": ["nobody/nothing-here", "/dev/null", "/nonexistent-model"],
        "--data": ["/nonexistent.jsonl", "/dev/null", "no-such-dataset"],
        "--output": [str(full), "/dev/null", "/proc/zoplan-out"],
        "--trace": ["/nonexistent-dir/trace.json", str(root), "/proc/trace.json"],
    }


VALIDATE_OPTIONS = ["PLAN", "--steps", "--skip", "--model", "--data", "--output", "--trace"]
VALIDATE_GOOD = ["--steps", "--skip", "--model", "--data", "--json", "--no-pad"]


def validate_args(root: Path, plan: Path, bad: dict[str, str], good: list[str]) -> list[str]:
    good_values = {"--steps": "3", "--skip": "1", "--model": "tiny-opt", "--data": "sentiment"}
    bad = dict(bad)
    args = ["validate", bad.pop("PLAN", str(plan))]
    for flag, value in bad.items():
        args += [flag, value]
    for flag in good:
        if flag not in bad:
            args += [flag] + ([good_values[flag]] if flag in good_values else [])
    return args


@pytest.mark.parametrize("flag", VALIDATE_OPTIONS)
def test_validate_refuses_each_bad_value_before_it_runs(tmp_path: Path, tiny_plan: Path, flag: str) -> None:
    for value in validate_bad(tmp_path, tiny_plan)[flag]:
        root = fresh(tmp_path, "case").parent
        assert_refused(validate_args(root, tiny_plan, {flag: value}, VALIDATE_GOOD), root, None)


@fuzz_settings(40, shrink=False)
@given(
    bad=st.lists(st.sampled_from(VALIDATE_OPTIONS), min_size=1, max_size=3, unique=True),
    good=st.lists(st.sampled_from(VALIDATE_GOOD), max_size=3, unique=True),
    data=st.data(),
)
def test_validate_refuses_any_mix_with_a_bad_argument_before_it_runs(
    tmp_path_factory, tiny_plan: Path, bad: list[str], good: list[str], data
) -> None:
    root = tmp_path_factory.mktemp("validate-fuzz")
    values = validate_bad(root, tiny_plan)
    chosen = {flag: data.draw(st.sampled_from(values[flag]), label=flag) for flag in bad}
    assert_refused(validate_args(root, tiny_plan, chosen, good), root, None)


def replay_bad(root: Path) -> dict[str, list[str]]:
    """argument -> values `zoplan replay` must refuse (files made per example)."""
    full = root / "full"
    full.mkdir(exist_ok=True)
    (full / "x").write_text("kept")
    torn = root / "torn.jsonl"
    torn.write_text(JOURNAL.splitlines(keepends=True)[0][:30] + "\n" + JOURNAL.splitlines(keepends=True)[1])
    late = root / "late.jsonl"
    late.write_text(JOURNAL.splitlines(keepends=True)[1])
    # a folder without a journal (root itself is none: replay_args writes journal.jsonl into it,
    # and replay reads a run's folder as its journal)
    empty = root / "no-journal"
    empty.mkdir(exist_ok=True)
    return {
        "BASE": ["nobody/nothing-here", "/nonexistent-model", "/dev/null", ""],
        "JOURNAL": ["/nonexistent.jsonl", str(empty), str(torn), str(late)],
        "-o": [str(full), "/proc/zoplan-replay", ""],
        "--dtype": ["fp8", "", "FP32x"],
        "--device": ["tpu", ""] + ([] if torch.cuda.is_available() else ["cuda"]),
    }


JOURNAL = "".join(  # lines that hold together with replay_plan's ZO settings (journal.check_lines)
    json.dumps(
        {
            "step": s,
            "seed": step_seed(0, s),
            "loss_plus": 0.7,
            "loss_minus": 0.71,
            "projected_grad": (0.7 - 0.71) / (2 * 1e-3),
            "lr": 1e-6,  # the plan's (the planner's default)
            "eps": 1e-3,
            "weight_decay": 0.0,
            "skipped": False,
        }
    )
    + "\n"
    for s in range(2)
)
REPLAY_ARGS = ["BASE", "JOURNAL", "-o", "--dtype", "--device"]


@functools.lru_cache(maxsize=1)
def replay_plan() -> str:
    """The plan.yaml of the run that wrote JOURNAL (full-parameter, fp32): replay refuses a journal
    without its run's plan beside it."""
    from zoplan.planfile import write_plan
    from zoplan.planner import plan
    from zoplan.runtime.tiny import resolve_model

    report = plan(str(resolve_model("tiny-opt") / "config.json"), "cpu-local", global_batch=4, seq_len=16, dtype="fp32")
    with tempfile.TemporaryDirectory() as scratch:
        write_plan(report.plan, Path(scratch) / "plan.yaml")
        return (Path(scratch) / "plan.yaml").read_text()


def replay_args(root: Path, bad: dict[str, str]) -> tuple[list[str], Path]:
    good = root / "journal.jsonl"
    good.write_text(JOURNAL)
    (root / "plan.yaml").write_text(replay_plan())
    out = fresh(root, "out")
    values = {"BASE": "tiny-opt", "JOURNAL": str(good), "-o": str(out), **bad}
    args = ["replay", values.pop("BASE"), values.pop("JOURNAL")]
    for flag, value in values.items():
        args += [flag, value]
    return args, out


@pytest.mark.parametrize("arg", REPLAY_ARGS)
def test_replay_refuses_each_bad_argument_and_writes_nothing(tmp_path: Path, arg: str) -> None:
    for value in replay_bad(tmp_path)[arg]:
        root = fresh(tmp_path, "case").parent
        args, out = replay_args(root, {arg: value})
        assert_refused(args, root, out)
        assert (tmp_path / "full").is_dir() and [p.name for p in (tmp_path / "full").iterdir()] == ["x"]


@fuzz_settings(30, shrink=False)
@given(bad=st.lists(st.sampled_from(REPLAY_ARGS), min_size=1, max_size=3, unique=True), data=st.data())
def test_replay_refuses_any_mix_with_a_bad_argument(tmp_path_factory, bad: list[str], data) -> None:
    root = tmp_path_factory.mktemp("replay-fuzz")
    values = replay_bad(root)
    args, out = replay_args(root, {arg: data.draw(st.sampled_from(values[arg]), label=arg) for arg in bad})
    assert_refused(args, root, out)


def test_the_good_arguments_above_do_replay(tmp_path: Path) -> None:
    """The good values mixed into the refusals are good: alone, they replay."""
    args, out = replay_args(tmp_path, {})
    code, output = console(args, limit=120)
    assert code == 0 and "replayed 2 steps" in output, output
    assert (out / "config.json").exists()


def test_the_good_run_and_validate_arguments_above_do_run(tmp_path: Path, tiny_plan: Path) -> None:
    """The good values mixed into the refusals are good: alone, `zoplan run` trains its step and
    `zoplan validate` measures (so a refusal above came from the bad value)."""
    args, out = run_args(tmp_path, {}, sorted(RUN_GOOD))
    code, output = console(args, limit=300)
    assert code == 0 and "trained 1 step:" in output, output
    assert (out / "model" / "adapter_config.json").exists()  # (--tuning lora: the adapter)
    code, output = console(validate_args(tmp_path, tiny_plan, {}, VALIDATE_GOOD), limit=300)
    assert code == 0 and '"measured_steps"' in output, output
