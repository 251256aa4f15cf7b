"""Checks of the CUDA code paths that only a GPU can run; skipped without one.

- Single-GPU layouts train the same weights, bit for bit: whole-block uploads, sliced uploads in
  4 rounds (each round updated and written back as it lands, an event per round), and 4 rounds
  with 2 resident blocks and a prefetch depth of 2. On one GPU each does the same arithmetic in
  another order of transfers. tests/runtime/test_layouts.py runs the same schedules on CPU ranks,
  without streams. The peak GPU memory of each run stays within the plan's prediction.
- Replay on the GPU of a run trained there is bit-identical (`zoplan replay --device cuda`).

bench/gpu_checks.sh runs this file on a lent GPU (`layouts`); bench/gpu_replay.py measures how far
a replay on another kind of device lands (a measurement, not a check).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zoplan.layout import Pins
from zoplan.planfile import write_plan
from zoplan.planner import plan
from zoplan.records import read_spans
from zoplan.topology import load_topology

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TOPOLOGY = "h100-pcie-1x"  # one GPU; another model of GPU only makes the run warn that it differs
STEPS = 4
# name -> (slices per block, resident blocks, prefetch depth); one compute GPU, dual forward. The
# planner never slices for a single mover (nothing to gain on one PCIe link), so the sliced
# layouts are the whole-block plan with its transfer section edited: the same ranks, 4 rounds
LAYOUTS = {"whole": (1, 0, 1), "sliced-4-rounds": (4, 0, 1), "sliced-4-resident-2-prefetch-2": (4, 2, 2)}


def zoplan(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "zoplan.cli", *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_single_gpu_layouts_train_the_same_weights(tiny_dirs, tmp_path: Path) -> None:
    model = tiny_dirs["tiny-opt"]
    machine = load_topology(TOPOLOGY)
    weights = {}
    for name, (slices, resident, prefetch) in LAYOUTS.items():
        planned = plan(
            str(model / "config.json"),
            machine,
            global_batch=8,
            seq_len=64,
            dtype="bf16",
            pins=Pins(
                perturbation=1,
                data=1,
                gpus=(machine.gpus[0],),
                wire_dtype="bf16",
                upload="whole",
                resident=resident,
                prefetch=prefetch,
            ),
        ).plan
        if slices > 1:
            planned = planned.model_copy(
                update={
                    "transfer": planned.transfer.model_copy(update={"upload": "sliced", "slices_per_block": slices})
                }
            )
        write_plan(planned, tmp_path / f"{name}.yaml")
        out = tmp_path / name
        zoplan("run", str(tmp_path / f"{name}.yaml"), "--model", str(model), "--steps", str(STEPS), "-o", str(out))
        weights[name] = load_file(str(out / "model" / "model.safetensors"))
        peak = max((line.peak_bytes or 0) for line in read_spans(out / "spans-rank0.jsonl"))
        assert 0 < peak <= planned.prediction.gpu_memory_bytes, (name, peak, planned.prediction.gpu_memory_bytes)
    base = weights["whole"]
    for name, got in weights.items():
        assert got.keys() == base.keys() and all(torch.equal(got[k], base[k]) for k in base), name


def test_replay_on_the_gpu_is_bit_identical(tiny_dirs, tmp_path: Path) -> None:
    run = tmp_path / "run"
    zoplan("run", "--model", str(tiny_dirs["tiny-opt"]), "--topology", TOPOLOGY, "--steps", "6", "-o", str(run))
    zoplan(
        "replay",
        str(tiny_dirs["tiny-opt"]),
        str(run / "journal.jsonl"),
        "-o",
        str(tmp_path / "replayed"),
        "--device",
        "cuda",
    )
    trained = load_file(str(run / "model" / "model.safetensors"))
    rebuilt = load_file(str(tmp_path / "replayed" / "model.safetensors"))
    keys = sorted(set(trained) & set(rebuilt))  # a tied head may be left out of one of them
    assert len(keys) >= len(rebuilt) - 1
    assert all(torch.equal(trained[k], rebuilt[k]) for k in keys)
