"""Bounded work on hostile input (issue 20, item 4): every loader bounds size, nesting and alias
expansion, and every number is range-checked before anything is sized by it. A refusal is a
ZoplanError naming the file or option and the field; these tests assert the refusal, which proves
the loader never expanded or searched what it was given."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from zoplan.errors import ZoplanError
from zoplan.fileio import (
    MAX_FILE_BYTES,
    MAX_RECORD_LINE_BYTES,
    MAX_YAML_DEPTH,
    load_yaml_text,
    parse_yaml,
    read_jsonl,
    read_yaml,
)
from zoplan.layout import divisors
from zoplan.models import load_model_shape
from zoplan.planfile import ZoSettings, load_plan, write_plan
from zoplan.planner import compare, plan, timeline
from zoplan.limits import MAX_GLOBAL_BATCH, MAX_SLICES_PER_BLOCK
from zoplan.search import Pins
from zoplan.topology import load_topology


def bomb(levels: int = 11, width: int = 9) -> str:
    """The "billion laughs" of the issue: 12 lines that expand to width**(levels+1) values."""
    s = "a: &a [" + ",".join(["x"] * width) + "]\n"
    for i in range(1, levels + 1):
        s += f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}" if i > 1 else "*a"] * width) + "]\n"
    return s


def test_alias_bomb_is_refused_by_every_yaml_loader(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text("version: 1\n" + bomb())
    assert path.stat().st_size < 1000
    for load in (load_topology, load_plan, lambda p: read_yaml(Path(p), "profile")):
        with pytest.raises(ZoplanError, match="refused YAML: more than 100000 values once its aliases are expanded"):
            load(str(path))
    from zoplan.profile import load_profile

    with pytest.raises(ZoplanError, match="refused YAML: more than 100000 values"):
        load_profile(path)


def test_small_aliases_still_load_and_recursive_ones_are_refused() -> None:
    assert parse_yaml("a: &x [1, 2]\nb: *x\n") == {"a": [1, 2], "b": [1, 2]}
    with pytest.raises(ZoplanError, match="a value that contains it"):
        load_yaml_text("a: &r [1, *r]\n", "r.yaml")


def test_nesting_is_bounded_before_python_recursion() -> None:
    assert parse_yaml("[" * MAX_YAML_DEPTH + "]" * MAX_YAML_DEPTH) is not None
    with pytest.raises(
        ZoplanError,
        match=f"deep.yaml: refused YAML: at line 1, column {MAX_YAML_DEPTH + 1}: "
        f"nested deeper than {MAX_YAML_DEPTH} levels",
    ):
        load_yaml_text("[" * 100_000 + "]" * 100_000, "deep.yaml")
    # aliases that nest each other: shallow as written, deep once expanded
    text = "a0: &a0 [[[[1]]]]\n" + "".join(f"a{i}: &a{i} [[[[*a{i - 1}]]]]\n" for i in range(1, 12))
    with pytest.raises(ZoplanError, match="nested deeper than 32 levels once its aliases are expanded"):
        load_yaml_text(text, "x.yaml")


def test_file_size_is_capped_before_reading(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("version: 1\n" + "# padding\n" * (MAX_FILE_BYTES // 10 + 1))
    with pytest.raises(ZoplanError, match="big.yaml: the topology file is larger than 1024 KiB"):
        load_topology(str(big))
    with pytest.raises(ZoplanError, match="the model config file is larger than 1024 KiB"):
        load_model_shape(str(_write(tmp_path / "config.json", '{"a": "' + "x" * MAX_FILE_BYTES + '"}')))
    if Path("/dev/zero").exists():  # endless: only limit + 1 bytes are read
        with pytest.raises(ZoplanError, match="larger than 1024 KiB"):
            load_topology("/dev/zero")


def test_records_read_back_are_bounded_and_skip_what_is_not_a_record(tmp_path: Path) -> None:
    """metrics and spans files (zoplan's own, but in a directory anyone can edit): a damaged line
    is left out, an overlong one is skipped without being held whole, a line still being written
    is left for the next read, and reading can resume from the offset returned."""
    path = tmp_path / "metrics.jsonl"
    good = [{"step": 0, "loss": 1.5}, {"step": 1, "loss": 1.25}]
    lines = [
        b'{"step": 0, "loss": 1.5}',
        b"not json",
        b"[1, 2]",
        b"\xff\xfe{}",
        b"[" * 100_000 + b"]" * 100_000,
        b'{"pad": "' + b"x" * (MAX_RECORD_LINE_BYTES + 10) + b'"}',
        b'{"step": 1, "loss": 1.25}',
    ]
    path.write_bytes(b"\n".join(lines) + b"\n" + b'{"step": 2, "lo')
    rows, end = read_jsonl(path)
    assert rows == good
    assert end == path.stat().st_size - len(b'{"step": 2, "lo')  # the unterminated line: not yet
    with path.open("ab") as f:
        f.write(b'ss": 1.0}\n')
    assert read_jsonl(path, start=end) == ([{"step": 2, "loss": 1.0}], path.stat().st_size)
    assert read_jsonl(path, max_bytes=30)[0] == good[:1]  # nothing read past the bound but the line it is in
    if Path("/dev/zero").exists():  # one endless line: skipped piece by piece, up to the bound
        assert read_jsonl(Path("/dev/zero"), max_bytes=4 * MAX_RECORD_LINE_BYTES)[0] == []


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_divisors_take_square_root_time() -> None:
    assert divisors(1) == [1] and divisors(36) == [1, 2, 3, 4, 6, 9, 12, 18, 36]
    assert len(divisors(963761198400)) == 6720  # trial division to 981 748, not to 10**12


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            {"global_batch": 10**12},
            f"--global-batch 1000000000000 is not a whole number of sequences from 1 to {MAX_GLOBAL_BATCH}",
        ),
        ({"global_batch": 0}, "--global-batch 0 is not a whole number"),
        ({"global_batch": -4}, "--global-batch -4 is not a whole number"),
        ({"global_batch": math.nan}, "--global-batch nan is not a whole number"),
        ({"global_batch": math.inf}, "--global-batch inf is not a whole number"),
        ({"seq_len": 10**12}, "--seq-len 1000000000000 is not a whole number of tokens"),
        ({"seq_len": 0}, "--seq-len 0 is not a whole number of tokens"),
        # one token: nothing to predict (a run would stop inside its ranks, after writing its output)
        ({"seq_len": 1}, "--seq-len 1 is not a whole number of tokens from 2 to"),
        ({"seq_len": 4096}, "--seq-len 4096 is longer than the 2048 positions opt-175b was trained with"),
        (
            {"pins": Pins(slices=10**8)},
            f"--slices 100000000 is more than the slices a block can be cut into \\({MAX_SLICES_PER_BLOCK}\\)",
        ),
        ({"pins": Pins(micro_batch=10**12)}, "--micro-batch 1000000000000 is more than the global batch \\(16\\)"),
        ({"pins": Pins(prefetch=10**12)}, "--prefetch 1000000000000 is more than the blocks of opt-175b \\(96\\)"),
        ({"pins": Pins(resident=10**12)}, "--resident 1000000000000 is more than the blocks of opt-175b \\(96\\)"),
        ({"pins": Pins(data=10**12)}, "--ddp 1000000000000 is more than the GPUs per node of 'dgx-a100' \\(8\\)"),
        ({"pins": Pins(perturbation=10**12)}, "--pertp must be 1 or 2"),
        ({"pins": Pins(slices=0)}, "--slices must be at least 1, got 0"),
        # pins that contradict one another are named (one was dropped, or "no layout matches")
        ({"pins": Pins(upload="whole", slices=4)}, "--upload whole moves each block whole, but --slices 4"),
        ({"pins": Pins(upload="whole", movers="all")}, "--movers all shares a block's slices among every GPU"),
        (
            {"pins": Pins(slices=3, perturbation=2, data=2, movers="compute")},
            "--slices 3 does not divide among the 4 compute GPUs",
        ),
        ({"pins": Pins(slices=3, perturbation=2, data=2)}, "--slices 3 divides evenly among none of the sets"),
    ],
)
def test_absurd_numbers_are_refused_before_the_search(kwargs: dict, message: str) -> None:
    with pytest.raises(ZoplanError, match=message):
        plan("opt-175b", "dgx-a100", **kwargs)


def test_compare_refuses_an_absurd_batch_once() -> None:
    with pytest.raises(ZoplanError, match="--global-batch 1000000000000 is not a whole number"):
        compare("opt-13b", ["dgx-a100", "l40s-8x"], global_batch=10**12)


@pytest.fixture(scope="module")
def sliced_plan(tmp_path_factory: pytest.TempPathFactory) -> str:
    report = plan("tiny-opt", "cpu-local", pins=Pins(upload="sliced", slices=2), zo=ZoSettings(lr=1e-3))
    path = tmp_path_factory.mktemp("plan") / "plan.yaml"
    write_plan(report.plan, path)
    text = path.read_text()
    assert "slices_per_block: 2" in text and "resident_blocks: [0, 1, 2, 3]" in text
    return text


@pytest.mark.parametrize(
    "old,new,message",
    [
        (
            "slices_per_block: 2",
            "slices_per_block: 100000000",
            "field 'transfer.slices_per_block' \\(100000000\\) is more than the slices a block can be cut into \\(128\\)",
        ),
        (
            "global_batch: 16",
            "global_batch: 1000000000000",
            "field 'batch.global_batch' \\(1000000000000\\) is not a whole number of sequences from 1 to 65536",
        ),
        (
            "seq_len: 128",
            "seq_len: 100000",
            "field 'batch.seq_len' \\(100000\\) is longer than the 128 positions tiny-opt-v1 was trained with",
        ),
        (
            "micro_batch: 16",
            "micro_batch: 1000000000",
            "field 'batch.micro_batch' \\(1000000000\\) is more than the global batch",
        ),
        ("prefetch: 1", "prefetch: 100000000", "field 'transfer.prefetch' \\(100000000\\) is more than the 4 blocks"),
        (
            "resident_blocks: [0, 1, 2, 3]",
            "resident_blocks: [0, 0, 1, 2]",
            "field 'resident_blocks' .* names a block twice",
        ),
        (
            "resident_blocks: [0, 1, 2, 3]",
            "resident_blocks: [0, 1, 2, 99]",
            "field 'resident_blocks' \\(\\[99\\]\\) outside 0..3",
        ),
        (
            "nodes: 1",
            "nodes: 1000000000",
            "field 'layout.nodes' \\(1000000000\\) is more than the 2 entries of 'layout.ranks'",
        ),
        ("lr: 0.001", "lr: .nan", "field 'zo.lr': Input should be a finite number"),
        ("eps: 0.001", "eps: -1.0", "field 'zo.eps': Input should be greater than 0"),
        ("wire_dtype: fp32", "wire_dtype: fp64", "field 'transfer.wire_dtype'"),
    ],
)
def test_plan_fields_are_checked_for_what_they_mean(
    tmp_path: Path, sliced_plan: str, old: str, new: str, message: str
) -> None:
    assert old in sliced_plan
    path = _write(tmp_path / "edited.yaml", sliced_plan.replace(old, new, 1))
    with pytest.raises(ZoplanError, match=message) as info:
        load_plan(path)
    assert info.value.message.startswith(f"{path}: ")  # names the file, then the field


def test_plan_gpus_must_exist_in_the_topology(tmp_path: Path, sliced_plan: str) -> None:
    path = _write(tmp_path / "renamed.yaml", sliced_plan.replace("rank1", "rank7"))
    load_plan(path)  # consistent with itself ...
    with pytest.raises(
        ZoplanError, match="field 'layout.compute_gpus' names 'rank7', not a GPU of topology 'cpu-local'"
    ):
        timeline(path)  # ... but not with its machine


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zoplan.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "args,message",
    [
        (("plan", "--global-batch", "1000000000000"), "error: --global-batch 1000000000000 is not a whole number"),
        (("timeline", "PLAN", "--width", "1000000000000"), "error: gantt width must be from 10 to 1000 columns"),
        (("plan", "-t", "BOMB"), "refused YAML: more than 100000 values once its aliases are expanded"),
    ],
)
def test_cli_refuses_with_one_message(tmp_path: Path, sliced_plan: str, args: tuple, message: str) -> None:
    files = {
        "PLAN": _write(tmp_path / "plan.yaml", sliced_plan),
        "BOMB": _write(tmp_path / "bomb.yaml", bomb()),
        "OUT": tmp_path / "out",
    }
    proc = run_cli(*(str(files.get(a, a)) for a in args))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and message in proc.stderr.splitlines()[0], proc.stderr
    assert "fix:" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
