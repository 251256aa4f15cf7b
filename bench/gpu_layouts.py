"""Single-GPU layouts train the same weights (docs/results/runtime-gpu.md, "Layouts on one GPU").

On one GPU every layout does the same arithmetic in another order of transfers, so the trained
weights must be bit-identical: whole-block uploads (the baseline), sliced uploads in 4 rounds
(each round updated and written back as soon as it lands), and sliced uploads with 2 resident
blocks and a prefetch depth of 2. This checks the CUDA code paths of those schedules (events per
round, buffers in flight, resident blocks) that the CPU tests (tests/runtime/test_layouts.py) run
without streams. Each run's peak GPU memory is printed beside the plan's prediction.

Usage (on a GPU machine, zoplan installed with the runtime extra):
    python -m bench.gpu_layouts --out OUT [--topology machine.yaml] [--steps 4]
The same check on a CPU: python -m bench.gpu_layouts --out OUT --topology cpu-local
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# name -> (slices per block, resident blocks, prefetch depth); one compute GPU, dual forward. The
# planner never slices for a single mover (nothing to gain on one PCIe link), so the sliced
# layouts are the whole-block plan with its transfer section edited: the same ranks, 4 rounds
LAYOUTS = {
    "whole": (1, 0, 1),
    "sliced-4-rounds": (4, 0, 1),
    "sliced-4-resident-2-prefetch-2": (4, 2, 2),
}


def main() -> None:
    from zoplan.planfile import write_plan
    from zoplan.planner import plan
    from zoplan.runtime.tiny import resolve_model
    from zoplan.search import Pins
    from zoplan.topology import load_topology

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--topology", default="h100-pcie-1x", help="the machine (cpu-local: a CPU check)")
    parser.add_argument("--steps", type=int, default=4)
    opts = parser.parse_args()
    opts.out.mkdir(parents=True, exist_ok=True)
    model = resolve_model("tiny-opt")
    machine = load_topology(opts.topology)
    dtype = "fp32" if opts.topology == "cpu-local" else "bf16"
    report: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "runs": {}}
    weights = {}
    for name, (slices, resident, prefetch) in LAYOUTS.items():
        planned = plan(str(model / "config.json"), opts.topology, global_batch=8, seq_len=64, dtype=dtype,
                       pins=Pins(perturbation=1, data=1, gpus=(machine.gpus[0],), wire_dtype=dtype, upload="whole",
                                 resident=resident, prefetch=prefetch)).plan
        if slices > 1:
            planned = planned.model_copy(update={"transfer": planned.transfer.model_copy(
                update={"upload": "sliced", "slices_per_block": slices})})
        path = opts.out / f"{name}.yaml"
        write_plan(planned, path)
        out = opts.out / name
        proc = subprocess.run([sys.executable, "-m", "zoplan.cli", "run", str(path), "--model", "tiny-opt",
                               "--steps", str(opts.steps), "-o", str(out)], capture_output=True, text=True)
        if proc.returncode != 0:
            log = (out / "worker-node0.log").read_text()[-3000:] if (out / "worker-node0.log").exists() else ""
            raise SystemExit(f"{name}: zoplan run failed ({proc.returncode}):\n{proc.stderr[-2000:]}\n{log}")
        weights[name] = load_file(str(out / "model" / "model.safetensors"))
        peaks = [json.loads(line).get("peak_bytes") for line in (out / "spans-rank0.jsonl").read_text().splitlines()]
        peak = max((p for p in peaks if p is not None), default=None)
        report["runs"][name] = {"predicted_gpu_bytes": planned.prediction.gpu_memory_bytes, "peak_bytes": peak}
        print(f"{name}: trained {opts.steps} steps; GPU memory predicted "
              f"{planned.prediction.gpu_memory_bytes / 2**20:.0f} MiB, peak allocated "
              f"{'-' if peak is None else f'{peak / 2**20:.0f} MiB'}", flush=True)
    base = weights["whole"]
    for name, got in weights.items():
        same = got.keys() == base.keys() and all(torch.equal(got[k], base[k]) for k in base)
        report["runs"][name]["bit_identical_to_whole"] = same
        print(f"{name}: weights bit-identical to whole-block uploads: {same}", flush=True)
    (opts.out / "gpu_layouts.json").write_text(json.dumps(report, indent=1))
    if not all(r["bit_identical_to_whole"] for r in report["runs"].values()):
        raise SystemExit("the layouts trained different weights")


if __name__ == "__main__":
    main()
