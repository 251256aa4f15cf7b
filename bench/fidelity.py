"""Planner fidelity (docs/results/fidelity.md): calibrate, plan with the profile, run, compare.

For each model: ``zoplan calibrate`` at the benchmark's micro-batch and sequence length, then for
each layout ``zoplan plan --profile`` with that layout pinned and ``zoplan validate --json``
(the plan runs for ``--steps`` steps; the first is left out). The same layout planned without the
profile (the topology and presets alone: what a buyer sees) is compared with the same measured
steps. The data are long texts, so every
sequence fills ``--seq-len`` tokens as in the calibration.

Usage:
    CPU: python -m bench.fidelity --out OUT --device cpu --models tiny-opt,opt-125m --layouts 1x1,2x1
         python -m bench.fidelity --out OUT --device cpu --uncalibrated-only   (the buyer's prediction only)
    GPU: python -m bench.fidelity --out OUT --device cuda --topology machine.yaml \\
             --models opt-1.3b,opt-2.7b --layouts 1x1 --batch 8 --micro-batch 8 --seq-len 256
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.runtime_gpu import build, long_texts

from zoplan.planfile import load_plan  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def zoplan(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "zoplan.cli", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"zoplan {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )
    return proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--topology", default="cpu-local")
    parser.add_argument("--models", default="tiny-opt,opt-125m")
    parser.add_argument("--layouts", default="1x1,2x1", help="PertP x DDP, comma separated")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--calibrate-steps", type=int, default=20, help="zoplan calibrate --steps")
    parser.add_argument("--work", type=Path, default=None, help="models, plans, profiles, traces (default OUT/work)")
    parser.add_argument(
        "--uncalibrated-only",
        action="store_true",
        help="no calibration: run the plan made from the topology and presets alone (minutes, "
        "not the quarter hour an OPT-125m-shaped calibration takes on a 2-core CPU)",
    )
    opts = parser.parse_args()
    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    work = opts.work or out / "work"
    work.mkdir(parents=True, exist_ok=True)
    data = long_texts(work / "long.jsonl")
    dtype = "fp32" if opts.device == "cpu" else "bf16"
    results = []
    log = (out / "fidelity.txt").open("a")

    def say(text: str) -> None:
        print(text, flush=True)
        log.write(text + "\n")
        log.flush()

    say(
        f"{time.strftime('%Y-%m-%d %H:%M:%S')} device {opts.device}, topology {opts.topology}, "
        f"batch {opts.batch} x {opts.seq_len}, micro-batch {opts.micro_batch}, {opts.steps} steps"
    )
    if opts.device == "cuda":
        # measured against the topology's nominal figures (the preset the file was built from)
        from runtime_gpu import copy_gbps, duplex_gbps, matmul_tflops

        from zoplan.topology import load_topology

        machine = load_topology(opts.topology)
        g = machine.gpus[0]
        link = machine.directed[machine.host_path(g, "h2d")[-1]]
        back = machine.directed[machine.host_path(g, "d2h")[0]]
        gm = machine.gpu_model(g)
        say(
            f"nominal ({machine.gpu_model_name(g)}): H2D {link.gbps} GB/s, D2H {back.gbps} GB/s, bf16 matmul "
            f"{gm.tflops.get('bf16')} TFLOP/s peak x efficiency {gm.matmul_efficiency}"
        )
        say(
            f"measured: pinned 1 GiB H2D {copy_gbps('h2d'):.1f} GB/s, D2H {copy_gbps('d2h'):.1f} GB/s, "
            f"bf16 matmul 8192^3 {matmul_tflops():.0f} TFLOP/s"
        )
        try:  # a supplementary figure: its failure must not cost the run its calibrations
            up, down = duplex_gbps()
            say(f"measured: pinned 1 GiB both directions at once: H2D {up:.1f} GB/s, D2H {down:.1f} GB/s")
        except RuntimeError as exc:
            say(f"measured: both directions at once failed: {exc}")

    def uncalibrated(name: str, model: Path, layout: str) -> dict:
        """The buyer's prediction run on its own: the plan from the topology and presets alone, validated."""
        p, d = layout.split("x")
        bare = work / f"{name}-{layout}-uncalibrated.yaml"
        zoplan(
            "plan",
            "--model",
            str(model / "config.json"),
            "--topology",
            opts.topology,
            "--global-batch",
            str(opts.batch),
            "--seq-len",
            str(opts.seq_len),
            "--dtype",
            dtype,
            "--wire-dtype",
            dtype,
            "--pertp",
            p,
            "--ddp",
            d,
            "--micro-batch",
            str(opts.micro_batch),
            "--resident",
            "0",
            "-o",
            str(bare),
        )
        run_dir = work / f"{name}-{layout}-uncalibrated-run"
        shutil.rmtree(run_dir, ignore_errors=True)
        report = json.loads(
            zoplan(
                "validate",
                str(bare),
                "--model",
                str(model),
                "--data",
                str(data),
                "--steps",
                str(opts.steps),
                "--json",
                "--output",
                str(run_dir),
            )
        )
        step = next(r for r in report["rows"] if r["stage"] == "step")
        spread = report.get("step_spread") or {}
        say(
            f"{name} {layout}: uncalibrated (topology and presets only): step {step['predicted_s'] * 1e3:.2f}/"
            f"{step['measured_s'] * 1e3:.2f} ms ({step['error']:+.1%}); measured 10th-90th percentile "
            + (
                f"{spread['p10_s'] * 1e3:.2f}-{spread['p90_s'] * 1e3:.2f} ms"
                if spread
                else "not given (fewer than 5 measured steps)"
            )
        )
        say(
            f"{name} {layout}: "
            + ", ".join(
                f"{r['stage']} {r['predicted_s'] * 1e3:.2f}/{r['measured_s'] * 1e3:.2f} ms ({r['error']:+.1%})"
                if r["error"] is not None
                else f"{r['stage']} -"
                for r in report["rows"]
            )
        )
        return {"model": name, "layout": layout, "uncalibrated_step_s": step["predicted_s"], **report}

    for name in opts.models.split(","):
        if name.startswith("tiny-"):
            from zoplan.runtime.tiny import resolve_model

            model = resolve_model(name)
        else:
            model = work / name
            if not (model / "config.json").exists():
                build(model, name, device=opts.device)
        if opts.uncalibrated_only:
            for layout in opts.layouts.split(","):
                results.append(uncalibrated(name, model, layout))
            continue
        profile = work / f"{name}-profile.yaml"
        t0 = time.perf_counter()
        zoplan(
            "calibrate",
            "--model",
            str(model),
            "--topology",
            opts.topology,
            "--micro-batch",
            str(opts.micro_batch),
            "--seq-len",
            str(opts.seq_len),
            "--dtype",
            dtype,
            "-o",
            str(profile),
            "--steps",
            str(opts.calibrate_steps),
            "--spans",
            str(work / f"{name}-calibration-spans"),
        )
        say(f"{name}: calibrated in {time.perf_counter() - t0:.0f} s -> {profile}")
        say((profile.read_text()))
        for layout in opts.layouts.split(","):
            p, d = layout.split("x")
            plan = work / f"{name}-{layout}.yaml"
            zoplan(
                "plan",
                "--model",
                str(model / "config.json"),
                "--topology",
                opts.topology,
                "--profile",
                str(profile),
                "--global-batch",
                str(opts.batch),
                "--seq-len",
                str(opts.seq_len),
                "--dtype",
                dtype,
                "--wire-dtype",
                dtype,
                "--pertp",
                p,
                "--ddp",
                d,
                "--micro-batch",
                str(opts.micro_batch),
                "--resident",
                "0",
                "-o",
                str(plan),
            )
            # the run directory keeps the spans files (per step: wall time, GPU and host time per stage)
            run_dir = work / f"{name}-{layout}-run"
            shutil.rmtree(run_dir, ignore_errors=True)
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
                    str(run_dir),
                    "--trace",
                    str(work / f"{name}-{layout}-trace.json"),
                )
            )
            # the buyer's prediction: the same plan from the topology and presets alone (no profile),
            # against the same measured steps
            bare = work / f"{name}-{layout}-uncalibrated.yaml"
            zoplan(
                "plan",
                "--model",
                str(model / "config.json"),
                "--topology",
                opts.topology,
                "--global-batch",
                str(opts.batch),
                "--seq-len",
                str(opts.seq_len),
                "--dtype",
                dtype,
                "--wire-dtype",
                dtype,
                "--pertp",
                p,
                "--ddp",
                d,
                "--micro-batch",
                str(opts.micro_batch),
                "--resident",
                "0",
                "-o",
                str(bare),
            )
            uncalibrated_s = load_plan(bare).prediction.step_time_s
            measured_s = next(r["measured_s"] for r in report["rows"] if r["stage"] == "step")
            results.append({"model": name, "layout": layout, "uncalibrated_step_s": uncalibrated_s, **report})
            say(
                f"{name} {layout}: uncalibrated (topology and presets only): step {uncalibrated_s * 1e3:.2f}/"
                f"{measured_s * 1e3:.2f} ms ({(uncalibrated_s - measured_s) / measured_s:+.1%})"
            )
            memory = report.get("gpu_memory") or {}
            if memory.get("measured_peak_bytes"):
                say(
                    f"{name} {layout}: GPU memory predicted {memory['predicted_bytes'] / 2**30:.2f} GiB (with the "
                    f"2 GiB reserve), peak allocated {memory['measured_peak_bytes'] / 2**30:.2f} GiB"
                )
            say(
                f"{name} {layout}: "
                + ", ".join(
                    f"{r['stage']} {r['predicted_s'] * 1e3 if r['predicted_s'] is not None else float('nan'):.2f}/"
                    f"{r['measured_s'] * 1e3 if r['measured_s'] is not None else float('nan'):.2f} ms"
                    f" ({r['error']:+.1%})"
                    + (f" [host {r['measured_host_s'] * 1e3:.2f}]" if r.get("measured_host_s") else "")
                    if r["error"] is not None
                    else f"{r['stage']} -"
                    for r in report["rows"]
                )
            )
            spread = report.get("step_spread")
            if spread:
                say(
                    f"{name} {layout}: measured step times, 10th-90th percentile: {spread['p10_s'] * 1e3:.2f}-"
                    f"{spread['p90_s'] * 1e3:.2f} ms"
                )
            # each step's wall time and uploads, in order: warm-up and drift show here, not in a median
            rows = [
                json.loads(line) for line in (run_dir / "spans-rank0.jsonl").read_text().splitlines() if line.strip()
            ]
            say(
                f"{name} {layout}: per step, wall / h2d ms: "
                + " ".join(f"{r['wall_s'] * 1e3:.1f}/{r['totals'].get('h2d', 0.0) * 1e3:.1f}" for r in rows)
            )
    (out / "fidelity.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
