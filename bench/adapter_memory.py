"""Step time and host memory of full-parameter, LoRA and prefix runs of the same model (issue 21's
figure; docs/results/learning.md, "What an adapter saves").

Each configuration is one ``zoplan run`` of SmolLM2-135M-Instruct (``zoplan.runtime.pretrained``)
on the bundled sentiment task, the default plan for this machine, as its own process tree (no rank
server); ``lora-copied`` is LoRA with its read-only blocks copied into /dev/shm
(``ZOPLAN_HOST_COPY=copy``) instead of mapped from the checkpoint. While it runs, every 50 ms: the proportional set size (PSS, shared pages divided among
the processes that map them) summed over the run's processes (launcher, supervisor, ranks), and
what the run holds in /dev/shm. Reported: the peaks, and the median step time from metrics.jsonl
(the first step excluded). ROUNDS rounds, the configurations interleaved.

Usage: python -m bench.adapter_memory [--steps 12] [--rounds 2] [--only full,lora,...] [--out DIR]
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

# name: (options, environment); lora-copied: LoRA with its blocks copied into /dev/shm, not mapped
CONFIGS = {
    "full": (["--tuning", "full"], {}),
    "lora": (["--tuning", "lora"], {}),
    "lora-copied": (["--tuning", "lora"], {"ZOPLAN_HOST_COPY": "copy"}),
    "prefix": (["--tuning", "prefix"], {}),
}


def tree(root: int) -> list[int]:
    """``root`` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def shm_bytes(before: set[str]) -> int:
    """Bytes in /dev/shm entries that were not there before the run."""
    total = 0
    for entry in set(os.listdir("/dev/shm")) - before:
        for dirpath, _, files in os.walk(f"/dev/shm/{entry}"):
            for name in files:
                try:
                    total += os.stat(os.path.join(dirpath, name)).st_blocks * 512
                except OSError:
                    pass
    return total


def one(model: Path, name: str, steps: int, work: Path) -> dict:
    out = work / f"{name}-{time.time_ns()}"
    options, extra = CONFIGS[name]
    env = {**{k: v for k, v in os.environ.items() if k != "ZOPLAN_RANK_SERVER"}, **extra}
    cmd = [sys.executable, "-m", "zoplan.cli", "run", "--model", str(model), "--data", "sentiment"]
    cmd += [*options, "--steps", str(steps), "--global-batch", "16", "--seq-len", "32"]
    cmd += ["--eval-every", "0", "--output", str(out)]
    before = set(os.listdir("/dev/shm"))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak_pss = peak_shm = 0
    while proc.poll() is None:
        peak_pss = max(peak_pss, sum(pss_kib(p) for p in tree(proc.pid)))
        peak_shm = max(peak_shm, shm_bytes(before))
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name}: zoplan run failed: {proc.stderr.read()[-2000:] if proc.stderr else ''}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time_s"] for r in rows if "step_time_s" in r][1:]
    log = (out / "worker-node0.log").read_text()
    host = next((line for line in log.splitlines() if line.startswith("host copy:")), "host copy: copied")
    return {
        "peak_pss_mib": peak_pss / 1024,
        "peak_shm_mib": peak_shm / 2**20,
        "step_s": statistics.median(times),
        "wall_s": wall,
        "host_copy": host,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", default=",".join(CONFIGS))
    parser.add_argument("--out", type=Path, default=None, help="write adapter_memory.json here")
    opts = parser.parse_args()
    from zoplan.runtime.pretrained import smollm2

    model = smollm2(say=print)
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="zoplan-bench-") as tmp:
        for r in range(opts.rounds):
            for name in opts.only.split(","):
                got = one(model, name, opts.steps, Path(tmp))
                results.setdefault(name, []).append(got)
                print(f"round {r + 1} {name}: {json.dumps(got)}", flush=True)
    print("| run | peak PSS of the run's processes | peak /dev/shm | median step | host copy |")
    print("|---|---|---|---|---|")
    summary = {}
    for name, rows in results.items():
        summary[name] = {
            k: statistics.median(row[k] for row in rows) for k in ("peak_pss_mib", "peak_shm_mib", "step_s")
        }
        s = summary[name]
        print(
            f"| {name} | {s['peak_pss_mib']:.0f} MiB | {s['peak_shm_mib']:.0f} MiB | {s['step_s']:.2f} s | "
            f"{rows[0]['host_copy'].removeprefix('host copy: ')} |"
        )
    if opts.out is not None:
        opts.out.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        (opts.out / "adapter_memory.json").write_text(
            json.dumps({"date": stamp, "steps": opts.steps, "rounds": results, "median": summary}, indent=1)
        )


if __name__ == "__main__":
    main()
