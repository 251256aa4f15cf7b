"""The rank processes' allocator settings (runtime/launch.py MALLOC_ENV), on and off, side by side.

For each model and layout: a plan on the CPU machine, then ``zoplan validate`` of it, alternating
the ranks' glibc thresholds (on: zoplan's settings; off: none, glibc's own dynamic thresholds, as
before they were set) round after round, so both see the same machine load. Prints each round's
measured median step and the medians over rounds.

Usage: python -m bench.alloc_ab [--models tiny-opt,opt-125m] [--layouts 1x1,2x1] [--rounds 3] [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.runtime_gpu import build, long_texts

# the CLI with the launcher's allocator settings removed
OFF = (
    "import sys; import zoplan.runtime.launch as launch; launch.MALLOC_ENV.clear(); from zoplan.cli import main; main()"
)


def zoplan(*args: str, env=None, off: bool = False) -> str:
    head = ["-c", OFF] if off else ["-m", "zoplan.cli"]
    proc = subprocess.run([sys.executable, *head, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"zoplan {' '.join(args)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="tiny-opt,opt-125m")
    parser.add_argument("--layouts", default="1x1")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    opts = parser.parse_args()
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} alloc A/B, {opts.rounds} rounds, {opts.steps} steps (first left out)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = long_texts(work / "long.jsonl")
        for name in opts.models.split(","):
            if name.startswith("tiny-"):
                from zoplan.runtime.tiny import resolve_model

                model = resolve_model(name)
            else:
                model = work / name
                build(model, name, device="cpu")
            for layout in opts.layouts.split(","):
                p, d = layout.split("x")
                plan = work / f"{name}-{layout}.yaml"
                zoplan(
                    "plan",
                    "--model",
                    str(model / "config.json"),
                    "--topology",
                    "cpu-local",
                    "--global-batch",
                    "4",
                    "--seq-len",
                    "64",
                    "--dtype",
                    "fp32",
                    "--pertp",
                    p,
                    "--ddp",
                    d,
                    "--micro-batch",
                    "2",
                    "--resident",
                    "0",
                    "-o",
                    str(plan),
                )
                steps: dict[str, list[float]] = {"on": [], "off": []}
                for r in range(opts.rounds):
                    for setting in ("on", "off") if r % 2 == 0 else ("off", "on"):
                        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
                        report = json.loads(
                            zoplan(
                                "validate",
                                str(plan),
                                "--model",
                                str(model),
                                "--data",
                                str(data),
                                "--steps",
                                str(opts.steps),
                                "--json",
                                "--output",
                                str(work / f"run-{name}-{layout}-{r}-{setting}"),
                                env=env,
                                off=setting == "off",
                            )
                        )
                        step = next(row["measured_s"] for row in report["rows"] if row["stage"] == "step")
                        steps[setting].append(step)
                        print(f"{name} {layout} round {r} {setting}: {step * 1e3:.1f} ms", flush=True)
                on, off = statistics.median(steps["on"]), statistics.median(steps["off"])
                print(
                    f"{name} {layout}: median step, allocator settings on {on * 1e3:.1f} ms, off {off * 1e3:.1f} ms "
                    f"(on/off {on / off:.2f})",
                    flush=True,
                )


if __name__ == "__main__":
    main()
