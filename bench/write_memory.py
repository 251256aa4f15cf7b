"""What writing a model's weights out of the host copy holds in host memory, beyond the host copy:
``safetensors.torch.save_file`` over a copy of every weight (as zoplan wrote them before) against
``zoplan.runtime.checkpoint.write_safetensors`` (each tensor made as it is written), at every
snapshot and at a run's end (docs/results/runtime-cpu.md).

Each way runs in a process of its own: a "host copy" of --gib GiB of fp32 blocks (tensors of
--tensor-mib MiB) is made and touched, then written to a temporary file in fp32 (its own dtype:
views) and in bf16 (converted); the peak resident memory above the host copy is reported.

Usage: python -m bench.write_memory [--gib 1] [--tensor-mib 64]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def one(way: str, gib: float, tensor_mib: int, dtype: str) -> dict:
    import torch

    from zoplan.runtime.checkpoint import write_safetensors

    numel = tensor_mib * 2**20 // 4
    count = max(1, int(gib * 1024 // tensor_mib))
    flat = torch.ones(count * numel)  # the host copy: every page touched
    target = getattr(torch, dtype)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    views = {f"t{i}": flat[i * numel : (i + 1) * numel] for i in range(count)}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.safetensors"
        if way == "save_file":
            from safetensors.torch import save_file

            save_file({n: v.to(target).clone() for n, v in views.items()}, str(path), metadata={"format": "pt"})
        else:
            write_safetensors(
                path,
                {n: (target, tuple(v.shape), lambda v=v: v.to(target)) for n, v in views.items()},
                {"format": "pt"},
            )
        written = path.stat().st_size
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "way": way,
        "dtype": dtype,
        "host_copy_gib": flat.numel() * 4 / 2**30,
        "written_gib": written / 2**30,
        "above_gib": (peak - before) / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--tensor-mib", type=int, default=64)
    parser.add_argument("--one", nargs=2, metavar=("WAY", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], args.gib, args.tensor_mib, args.one[1])))
        return
    print(f"host copy {args.gib:g} GiB of fp32 tensors of {args.tensor_mib} MiB; peak resident memory above it")
    for dtype in ("float32", "bfloat16"):
        for way in ("save_file", "write_safetensors"):
            cmd = [
                sys.executable,
                "-m",
                "bench.write_memory",
                "--gib",
                str(args.gib),
                "--tensor-mib",
                str(args.tensor_mib),
                "--one",
                way,
                dtype,
            ]
            row = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
            print(f"  {dtype:9} {way:18} {row['above_gib']:.3f} GiB above (wrote {row['written_gib']:.2f} GiB)")


if __name__ == "__main__":
    main()
