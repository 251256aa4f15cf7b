"""A zoplan step against plain MeZO and ZO2 on the CPU, side by side (docs/results/runtime-cpu.md).

Model: the OPT-125m shape (12 blocks of 768, ffn 3072, vocab 50272, tied embeddings), random
weights, fp32; batch 4 x 128 tokens of the bundled texts (language-modelling loss); lr 1e-6,
eps 1e-3, no weight decay. Rounds are interleaved (this machine is noisy); each figure is the
median step time of the steps after the first ``--skip`` of a run, then the median over rounds.

- ``mezo``: plain in-memory MeZO in this process, the 30 lines of the paper's algorithm: per step,
  z drawn per parameter with a seeded ``torch.randn``, θ += εz, loss, θ −= 2εz, loss, θ += εz,
  θ −= lr·g·z (z drawn again from the same seed each time).
- ``zo2``: ZO2's ``zo`` mode (its MeZO-SGD on the CPU), with the transformers it patches (4.51.3):
  ``--zo2 PATH`` (a checkout of github.com/liangyuwang/zo2) and either ``--zo2-python`` (a Python
  with torch and transformers 4.51.3) or ``--zo2-site`` (a folder with transformers 4.51.3 and the
  versions it requires, for this Python: bench/zo2_peer.py); see ../shared/peers/README.md. A
  step is one ``model(input_ids, labels)`` call after ``zo_train()``.
- ``zoplan``: ``zoplan run`` with a 1x1 plan on cpu-local, every block streamed (``--resident 0``,
  whole-block uploads, one rank), on one core (``taskset``: a rank alone would take them all).
With ``--threads 2``: every one on 2 threads, and zoplan's default plan for this machine (its
2 CPU ranks) instead of the 1x1 one.

    python -m bench.speed_cpu --zo2 ../shared/peers/zo2 --zo2-python /tmp/venv-zo2/bin/python [--rounds 3]
    python -m bench.speed_cpu --zo2 ../shared/peers/zo2 --zo2-site /tmp/site-zo2 [--rounds 3]
        [--steps 6] [--skip 1] [--threads 1]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import zo2_peer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SEQ, BATCH, LR, EPS = 128, 4, 1e-6, 1e-3


def build(work: Path) -> tuple[Path, Path, Path]:
    """The model directory (the tiny models' tokenizer, OPT-125m's shape), long texts, and the
    token ids of the batches zoplan reads from them (for the two in-memory loops)."""
    from bench.runtime_cpu import build_model
    from zoplan.runtime import data as zdata

    model_dir = build_model(
        work / "opt-125m-shape", hidden=768, layers=12, ffn=3072, heads=12, vocab=50272, positions=2048
    )
    data = zdata.write_long_text(work / "long.jsonl", SEQ, records=64)
    return model_dir, data, zo2_peer.token_batches(model_dir, data, work / "batches.json", BATCH, SEQ, count=16)


def mezo_step(params: list[torch.Tensor], seed: int, eps: float, lr: float, loss) -> float:
    """One step of the plain MeZO loop (the paper's algorithm, in place): z drawn per parameter
    from ``torch.randn`` seeded with ``seed``, θ += εz, ``loss()``, θ −= 2εz, ``loss()``, θ += εz,
    θ −= lr·g·z; returns g. Call it under ``torch.no_grad()``."""

    def perturb(scale: float) -> None:
        gen = torch.Generator().manual_seed(seed)
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen), alpha=scale)

    perturb(eps)
    plus = loss()
    perturb(-2 * eps)
    minus = loss()
    perturb(eps)
    g = (plus - minus) / (2 * eps)
    perturb(-lr * g)
    return g


def mezo(model_dir: Path, batches: Path, steps: int, threads: int) -> list[float]:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().requires_grad_(False)
    params = list(model.parameters())
    ids_list = json.loads(batches.read_text())

    times = []
    with torch.no_grad():
        for step in range(steps):
            ids = torch.tensor(ids_list[step % len(ids_list)])
            t = time.perf_counter()
            mezo_step(params, step, EPS, LR, lambda: float(model(input_ids=ids, labels=ids).loss))
            times.append(time.perf_counter() - t)
    return times


def zo2(opts: argparse.Namespace, model_dir: Path, batches: Path) -> list[float]:
    """ZO2's ``zo`` mode on the CPU (bench.zo2_peer), in its environment or with its site folder."""
    where = dict(python=opts.zo2_python, site=opts.zo2_site)
    run = zo2_peer.step_times(
        opts.zo2, model_dir, batches, steps=opts.steps, lr=LR, eps=EPS, threads=opts.threads, **where
    )
    return [float(t) for t in run["times"]]  # type: ignore[attr-defined]


def zoplan(model_dir: Path, data: Path, out: Path, steps: int, threads: int) -> list[float]:
    # a rank takes the cores it may use (zoplan.runtime.worker.threads_per_rank): with one thread
    # for every tool, it may use one core
    pin = ["taskset", "-c", str(min(os.sched_getaffinity(0)))] if threads == 1 else []
    args = [*pin, sys.executable, "-m", "zoplan.cli", "run", "--model", str(model_dir), "--data", str(data)]
    args += ["--steps", str(steps), "-o", str(out), "--seq-len", str(SEQ), "--global-batch", str(BATCH)]
    args += ["--lr", str(LR), "--eps", str(EPS), "--eval-every", "0"]
    if threads == 1:  # one rank computing, every block streamed
        args += ["--pertp", "1", "--ddp", "1", "--gpus", "rank0", "--upload", "whole", "--resident", "0"]
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"zoplan run failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time_s"] for r in rows if "step_time_s" in r]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zo2", type=Path, required=True, help="a checkout of ZO2")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--zo2-python", help="a Python with ZO2's torch and transformers 4.51.3")
    where.add_argument("--zo2-site", type=Path, help="transformers 4.51.3 and its needs, for this Python (zo2_peer)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--skip", type=int, default=1, help="steps left out at the start of each run")
    parser.add_argument("--threads", type=int, default=1)
    opts = parser.parse_args()
    # ZO2's arguments checked before minutes of building and measuring, not after
    if not (opts.zo2 / "zo2").is_dir():
        parser.error(f"--zo2 {opts.zo2}: not a checkout of ZO2 (no zo2/ package folder in it)")
    if opts.zo2_python is not None and shutil.which(opts.zo2_python) is None:  # (a path, or a name on PATH)
        parser.error(f"--zo2-python {opts.zo2_python}: no such Python (bench.zo2_peer makes one)")
    if opts.zo2_site is not None and not opts.zo2_site.is_dir():
        parser.error(f"--zo2-site {opts.zo2_site}: no such folder (bench.zo2_peer --wheels makes one)")
    work = Path(tempfile.mkdtemp(prefix="zoplan-speed-"))
    atexit.register(shutil.rmtree, work, True)  # the model, the runs (hundreds of MB): nothing left behind
    model_dir, data, batches = build(work)
    print(f"{time.strftime('%Y-%m-%d %H:%M')} torch {torch.__version__}, {opts.threads} thread(s), {work}", flush=True)
    results: dict[str, list[float]] = {"mezo": [], "zo2": [], "zoplan": []}
    for r in range(opts.rounds):
        for name in results:
            if name == "mezo":
                times = mezo(model_dir, batches, opts.steps, opts.threads)
            elif name == "zo2":
                times = zo2(opts, model_dir, batches)
            else:
                times = zoplan(model_dir, data, work / f"run{r}", opts.steps, opts.threads)
            median = statistics.median(times[opts.skip :])
            results[name].append(median)
            print(f"round {r + 1} {name}: {median:.3f} s/step ({', '.join(f'{t:.2f}' for t in times)})", flush=True)
    final = {k: statistics.median(v) for k, v in results.items()}
    print(
        f"medians: plain MeZO {final['mezo']:.3f}, ZO2 {final['zo2']:.3f}, zoplan {final['zoplan']:.3f} s/step; "
        f"zoplan / MeZO {final['zoplan'] / final['mezo']:.2f}, zoplan / ZO2 {final['zoplan'] / final['zo2']:.2f}"
    )
    print(json.dumps({"rounds": results, "medians": final}))


if __name__ == "__main__":
    main()
