"""Replay across devices (docs/results/reliability.md): train on a GPU, rebuild the weights from the
base model and the journal alone on the GPU (must be bit-identical) and on the CPU (equal up to
rounding: the CPU computes z's log/cos with another math library).

Usage (on a GPU machine, zoplan installed with the runtime extra):
    python bench/gpu_replay.py --out OUT [--steps 20]
The same check on a CPU: python bench/gpu_replay.py --out OUT --topology cpu-local --devices cpu
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


def zoplan(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "zoplan.cli", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"zoplan {' '.join(args)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--topology", default="h100-pcie-1x", help="the machine trained on (cpu-local: a CPU check)")
    parser.add_argument("--devices", default="cuda,cpu", help="devices to replay on")
    opts = parser.parse_args()
    run = opts.out / "run"
    zoplan("run", "--model", "tiny-opt", "--topology", opts.topology, "--steps", str(opts.steps), "-o", str(run))
    trained = load_file(str(run / "model" / "model.safetensors"))
    report = {"trained_on": torch.cuda.get_device_name() if opts.topology != "cpu-local" else "cpu",
              "steps": opts.steps}
    for device in opts.devices.split(","):
        target = opts.out / f"replayed-{device}"
        zoplan("replay", "tiny-opt", str(run / "journal.jsonl"), "-o", str(target), "--device", device)
        rebuilt = load_file(str(target / "model.safetensors"))
        keys = sorted(set(trained) & set(rebuilt))  # save_pretrained may drop a tied head
        if len(keys) < len(rebuilt) - 1:
            raise SystemExit(f"the replayed weights hold other tensors: {sorted(set(rebuilt) - set(trained))}")
        same = all(torch.equal(trained[k], rebuilt[k]) for k in keys)
        diff = max(float((trained[k].float() - rebuilt[k].float()).abs().max()) for k in keys)
        report[device] = {"bit_identical": same, "max_abs_diff": diff}
        print(f"replay on {device}: bit-identical {same}, max |diff| {diff:.3g}", flush=True)
    (opts.out / "gpu_replay.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
