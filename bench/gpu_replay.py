"""Replay across devices (docs/results/reliability.md): train on a GPU, rebuild the weights from the
base model and the journal alone on the GPU (must be bit-identical) and on the CPU (equal up to
rounding: the CPU computes z's log/cos with another math library).

Usage (on a GPU machine, zoplan installed with the runtime extra):
    python -m bench.gpu_replay --out OUT [--steps 20]
The same check on a CPU: python -m bench.gpu_replay --out OUT --topology cpu-local --devices cpu
The other device's half of a run trained elsewhere (its directory copied here, journal and model):
    python -m bench.gpu_replay --out OUT --run RUN_DIR --trained-on 'NVIDIA H200' --devices cpu
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
    parser.add_argument(
        "--run",
        type=Path,
        default=None,
        help="replay this finished tiny-opt run (journal.jsonl, model/) instead of training one",
    )
    parser.add_argument("--trained-on", default="another machine", help="with --run: where it trained, for the report")
    opts = parser.parse_args()
    if opts.run is None:
        run = opts.out / "run"
        zoplan("run", "--model", "tiny-opt", "--topology", opts.topology, "--steps", str(opts.steps), "-o", str(run))
        trained_on = torch.cuda.get_device_name() if opts.topology != "cpu-local" else "cpu"
    else:
        run, trained_on = opts.run, opts.trained_on
    trained = load_file(str(run / "model" / "model.safetensors"))
    steps = sum(1 for line in (run / "journal.jsonl").read_text().splitlines() if line.strip())
    report = {"trained_on": trained_on, "steps": steps}
    for device in opts.devices.split(","):
        target = opts.out / f"replayed-{device}"
        zoplan("replay", "tiny-opt", str(run / "journal.jsonl"), "-o", str(target), "--device", device)
        rebuilt = load_file(str(target / "model.safetensors"))
        keys = sorted(set(trained) & set(rebuilt))  # save_pretrained may drop a tied head
        if len(keys) < len(rebuilt) - 1:
            raise SystemExit(f"the replayed weights hold other tensors: {sorted(set(rebuilt) - set(trained))}")
        same = all(torch.equal(trained[k], rebuilt[k]) for k in keys)
        diff = max(float((trained[k].float() - rebuilt[k].float()).abs().max()) for k in keys)
        differ = sum(int((trained[k] != rebuilt[k]).sum()) for k in keys)
        # how far apart, in units in the last place of the trained value (1: adjacent numbers)
        ulps = max((_ulps(trained[k], rebuilt[k]) for k in keys), default=0)
        report[device] = {
            "bit_identical": same,
            "max_abs_diff": diff,
            "elements_differing": differ,
            "elements": sum(trained[k].numel() for k in keys),
            "max_ulps": ulps,
        }
        print(
            f"replay on {device} of {steps} steps trained on {trained_on}: bit-identical {same}, max |diff| "
            f"{diff:.3g}, {differ} of {report[device]['elements']} elements differ, by at most {ulps} ulp",
            flush=True,
        )
    (opts.out / "gpu_replay.json").write_text(json.dumps(report, indent=1))


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance between a and b in representable numbers of their dtype (same sign:
    the difference of the bit patterns read as integers)."""
    if torch.equal(a, b):
        return 0
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    ia, ib = a.contiguous().view(ints).long(), b.contiguous().view(ints).long()
    same_sign = (a >= 0) == (b >= 0)
    if not bool(same_sign.all()):
        return -1  # a sign flip: not a rounding difference
    return int((ia - ib).abs().max())


if __name__ == "__main__":
    main()
