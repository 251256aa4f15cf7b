"""Crash survival: SIGKILL a process of a CPU run at random points, count the steps lost and
compare the final weights with an uninterrupted run (docs/results/reliability.md).

Each trial starts the same 2-rank run (PertP 2x1, sliced uploads, snapshots every 5 steps) with
``--max-restarts 1``, waits until the journal holds a random number of steps, waits a random
fraction of a step more, and SIGKILLs one rank chosen at random (found by its process name,
zoplan-rank<N>). The rank supervisor stops the other rank and restarts both; they resume from
the newest snapshot and the journal. With ``--targets`` the process killed is drawn from the kinds
given: a rank (as above), the rank supervisor, or the launcher (``zoplan run`` itself); after those the run is
continued with ``zoplan run --resume``. A step is lost when a journal line present at the kill is
missing (or different) afterwards; the final weights must equal the uninterrupted run's bit for
bit. At the end, what killed launchers left outside their output is counted (the next launch
removes it: runtime/scratch.py) and the work folder is removed.

Usage: python -m bench.kill_resume [--kills 20] [--steps 24] [--seed 0] [--targets rank,supervisor,launcher]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

RUN = [
    "--model",
    "tiny-opt",
    "--pertp",
    "2",
    "--ddp",
    "1",
    "--upload",
    "sliced",
    "--slices",
    "2",
    "--lr",
    "1e-3",
    "--snapshot-every",
    "5",
]


def start(out: Path, steps: int, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "zoplan.cli", "run", *RUN, "--steps", str(steps), "-o", str(out), *extra]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1")
    )


def journal_lines(out: Path) -> list[bytes]:
    path = out / "journal.jsonl"
    return path.read_bytes().splitlines(keepends=True) if path.exists() else []


def rank_pid(out: Path, rank: int) -> int | None:
    """The process of ``rank`` in the run writing to ``out`` (named zoplan-rank<N>)."""
    from zoplan.runtime.scratch import rank_processes

    return rank_processes(str(out)).get(rank)


def supervisor_pid(out: Path) -> int | None:
    from zoplan.runtime.scratch import supervisor_process

    return supervisor_process(str(out))


def weights_equal(a: Path, b: Path) -> bool:
    import torch

    wa, wb = load_file(str(a / "model" / "model.safetensors")), load_file(str(b / "model" / "model.safetensors"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--targets", default="rank", help="the kinds of process killed: rank, supervisor, launcher")
    args = parser.parse_args()
    kinds = args.targets.split(",")
    if not set(kinds) <= {"rank", "supervisor", "launcher"}:
        sys.exit(f"--targets {args.targets}: the kinds are rank, supervisor and launcher")
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="kill-resume-"))
    ref = work / "uninterrupted"
    proc = start(ref, args.steps)
    out, err = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"the uninterrupted run failed:\n{err}")
    step_s = statistics.median(
        json.loads(l)["step_time_s"] for l in (ref / "metrics.jsonl").read_text().splitlines() if "step_time_s" in l
    )
    print(f"uninterrupted run: {args.steps} steps, median step {step_s * 1e3:.1f} ms")
    rows = []
    trial = -1
    while len(rows) < args.kills:
        trial += 1
        run = work / f"trial-{trial:02d}"
        # a kill after the last steps could miss the ranks (they exit after the final save)
        target, rank, extra = rng.randrange(0, args.steps - 2), rng.randrange(2), rng.uniform(0, step_s)
        kind = rng.choice(kinds)
        proc = start(run, args.steps, "--max-restarts", "1")
        while len(journal_lines(run)) < target and proc.poll() is None:
            time.sleep(0.005)
        time.sleep(extra)

        def find() -> int | None:
            return rank_pid(run, rank) if kind == "rank" else supervisor_pid(run) if kind == "supervisor" else proc.pid

        pid = find()
        while pid is None and proc.poll() is None and not journal_lines(run):
            time.sleep(0.02)  # the ranks have not started yet: kill one while it loads
            pid = find()
        before = journal_lines(run)
        if pid is None or proc.poll() is not None:
            proc.communicate()
            print(
                f"trial {trial}: the {kind} had already exited ({len(before)} steps journaled); not counted", flush=True
            )
            continue
        os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate()
        if kind != "rank":  # nothing restarts the run: the user continues it
            from zoplan.runtime.scratch import processes_naming

            deadline = time.monotonic() + 60
            while processes_naming(str(run)) and time.monotonic() < deadline:
                time.sleep(0.1)
            resumed = subprocess.run(
                [sys.executable, "-m", "zoplan.cli", "run", "--resume", str(run), "--steps", str(args.steps)],
                capture_output=True,
                text=True,
                env=dict(os.environ, HF_HUB_OFFLINE="1"),
            )
            proc, err = resumed, resumed.stderr
        after = journal_lines(run)
        complete = [l for l in before if l.endswith(b"\n")]
        lost = sum(1 for i, line in enumerate(complete) if i >= len(after) or after[i] != line)
        steps_after = [json.loads(l)["step"] for l in after]
        identical = proc.returncode == 0 and weights_equal(run, ref)
        restarted = "exitcode: -9" in (run / "worker-node0.log").read_text()
        rows.append(
            {
                "trial": trial,
                "kind": kind,
                "rank": rank,
                "killed_after_steps": len(complete),
                "lost": lost,
                "journal_complete": steps_after == list(range(args.steps)),
                "bit_identical": identical,
                "restarted": restarted,
                "exit": proc.returncode,
            }
        )
        victim = f"rank {rank}" if kind == "rank" else kind
        print(
            f"trial {trial:2d}: killed {victim} with {len(complete):2d} step(s) journaled: lost {lost}, "
            f"journal 0..{args.steps - 1} {'complete' if rows[-1]['journal_complete'] else 'INCOMPLETE'}, "
            f"weights {'bit-identical' if identical else 'DIFFERENT'}"
            + ("" if proc.returncode == 0 else f", exit {proc.returncode}: {err.strip()[-300:]}")
        )
    from zoplan.runtime.scratch import MIN_AGE_S, shared_memory, sweep

    time.sleep(MIN_AGE_S + 1)  # what killed launchers left, as the next launch finds it
    left = [p for base in (shared_memory(), Path(tempfile.gettempdir())) for p in sweep(base)]
    shutil.rmtree(work, ignore_errors=True)
    print(
        json.dumps(
            {
                "kills": len(rows),
                "by_kind": {k: sum(r["kind"] == k for r in rows) for k in kinds},
                "steps_lost": sum(r["lost"] for r in rows),
                "bit_identical": sum(r["bit_identical"] for r in rows),
                "journal_complete": sum(r["journal_complete"] for r in rows),
                "restarted": sum(r["restarted"] for r in rows),
                "left_by_killed_launchers_then_swept": len(left),
            }
        )
    )


if __name__ == "__main__":
    main()
