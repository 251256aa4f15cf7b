"""Hostile and clumsy use, by kind: what each bad input or fault gives (docs/results/reliability.md).

Every case runs the real command (``python -m zoplan.cli ...``) on a small run (tiny-opt, the
default plan: 2 CPU ranks) and is judged on what a user would see:
- status: the exit status; a case that must be refused and exits 0 is an "exit-0-wrong" result;
  a case that must finish (a damaged snapshot, a resume after a kill) must also give the weights
  of an uninterrupted run, bit for bit, or it is one too;
- a traceback in the output, a hang (the case's limit, 120 s, reached), the generic "a rank exited
  without a message" where the cause is known;
- leaks: folders named zoplan-* or torchelastic_* left in shared memory or the temporary
  directory, and processes still naming the case's directory, once the case is over;
- for a case given what it ``says``: its output must say that (the cause, where a misleading one
  was given).

Usage: python -m bench.hostile [--work DIR] [--only SUBSTRING]   (about 5 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml
from safetensors.torch import load_file

from zoplan.runtime.scratch import abandoned, processes_naming, rank_processes, shared_memory, supervisor_process

LIMIT_S = 120
ENV = dict(os.environ, HF_HUB_OFFLINE="1")


def zoplan_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "zoplan.cli", *args]


def scratch() -> set[Path]:
    return {
        p
        for base in (shared_memory(), Path(tempfile.gettempdir()))
        for pattern in ("zoplan-*", "torchelastic_*")
        for p in base.glob(pattern)
    }


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / "model" / "model.safetensors")), load_file(str(b / "model" / "model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@dataclass
class Case:
    kind: str
    name: str
    run: Callable[[Path], tuple[int, str]]  # the case's directory -> (exit status, output)
    refused: bool = True  # must end with status 2 (or 128 + a signal) and a message
    check: Callable[[Path], bool] | None = None  # for a case that must finish: its result is right
    says: str | None = None  # what the output must say (the cause, where a misleading one was given)


def call(*args: str, cwd: Path, env: dict | None = None) -> tuple[int, str]:
    try:
        proc = subprocess.run(
            zoplan_cmd(*args), cwd=cwd, capture_output=True, text=True, timeout=LIMIT_S, env=env or ENV
        )
        return proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        return -1, f"HANG after {LIMIT_S} s\n{exc.stdout or ''}{exc.stderr or ''}"


def on_tmpfs(folder: Path, size: str, go: Callable[[], tuple[int, str]]) -> tuple[int, str]:
    """``go()`` with ``folder`` a tmpfs of ``size``, unmounted after (root only: a case that cannot
    mount one is skipped)."""
    folder.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]
    if subprocess.run(mount, capture_output=True).returncode != 0:
        return 2, "error: skipped: cannot mount a tmpfs here"
    try:
        return go()
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


def nothing_left(code: int, out: str, run: Path) -> tuple[int, str]:
    """A new run refused before its first step leaves no ``run`` (a folder it made): one left makes
    the case an exit-0-wrong result for the bench."""
    if code == 2 and run.exists():
        return 0, out + f"\nleft {sorted(p.name for p in run.iterdir())} (exit-0-wrong for the bench)"
    return code, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--only", default="")
    opts = parser.parse_args()
    work = opts.work or Path(tempfile.mkdtemp(prefix="hostile-"))
    if opts.work is None:  # a folder of its own: removed at the end (--work keeps its base runs for the next)
        atexit.register(shutil.rmtree, work, True)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # the runs every case starts from: 6 steps with snapshots, and an uninterrupted 8-step run
    for name, steps in (("base", "6"), ("reference", "8")):
        if not (work / name / "model").exists():
            code, out = call("run", "--steps", steps, "--snapshot-every", "2", "-o", name, cwd=work)
            assert code == 0, out
    print(f"base runs ready in {time.perf_counter() - t0:.0f} s ({work})", flush=True)

    def copy(d: Path) -> Path:
        shutil.copytree(work / "base", d / "run")
        return d / "run"

    def edit_journal(fn) -> Callable[[Path], tuple[int, str]]:
        def go(d: Path) -> tuple[int, str]:
            run = copy(d)
            lines = (run / "journal.jsonl").read_text().splitlines()
            (run / "journal.jsonl").write_text("".join(line + "\n" for line in fn(lines)))
            return call("run", "--resume", str(run), "--steps", "8", cwd=d)

        return go

    def set_field(lines, index, **fields):
        row = json.loads(lines[index])
        row.update(fields)
        return lines[:index] + [json.dumps(row)] + lines[index + 1 :]

    def resume_with(*args: str) -> Callable[[Path], tuple[int, str]]:
        return lambda d: call("run", "--resume", str(copy(d)), *args, cwd=d)

    def plan_edited(then: str) -> Callable[[Path], tuple[int, str]]:
        def go(d: Path) -> tuple[int, str]:
            run = copy(d)
            text = (run / "plan.yaml").read_text()
            edited = text.replace("lr: 0.001", "lr: 0.1") if then == "resume" else text.replace("fp32", "bf16")
            assert edited != text
            (run / "plan.yaml").write_text(edited)
            if then == "resume":
                return call("run", "--resume", str(run), "--steps", "8", cwd=d)
            return call("replay", str(run), "-o", str(d / "replayed"), cwd=d)

        return go

    def plan_with(edit) -> Callable[[Path], tuple[int, str]]:
        def go(d: Path) -> tuple[int, str]:
            code, out = call("plan", "-m", "tiny-opt", "-t", "cpu-local", "-b", "4", "-s", "32", "-o", "p.yaml", cwd=d)
            assert code == 0, out
            (d / "p.yaml").write_text(edit((d / "p.yaml").read_text()))
            return call("run", "p.yaml", "-o", "run", cwd=d)

        return go

    def zo_set(**values) -> Callable[[str], str]:
        def edit(text: str) -> str:
            tree = yaml.safe_load(text)
            tree["zo"].update(values)
            return yaml.safe_dump(tree)

        return edit

    def fifo_as(command: str) -> Callable[[Path], tuple[int, str]]:
        def go(d: Path) -> tuple[int, str]:
            os.mkfifo(d / "f.yaml")
            if command == "run":
                return call("run", "f.yaml", "-o", "run", cwd=d)
            return call("plan", "-m", "tiny-opt", "-t", "cpu-local", "-o", "f.yaml", cwd=d)

        return go

    def replay_with(fn) -> Callable[[Path], tuple[int, str]]:
        def go(d: Path) -> tuple[int, str]:
            run = copy(d)
            lines = (run / "journal.jsonl").read_text().splitlines()
            (run / "journal.jsonl").write_text("".join(line + "\n" for line in fn(lines)))
            return call("replay", "tiny-opt", str(run / "journal.jsonl"), "-o", str(d / "replayed"), cwd=d)

        return go

    def damaged_model(fn, base: str = "tiny-opt") -> Callable[[Path], tuple[int, str]]:
        def go(d: Path) -> tuple[int, str]:
            from zoplan.runtime.tiny import resolve_model

            model = d / "model"
            shutil.copytree(resolve_model(base), model)
            fn(model)
            return call("run", "--model", str(model), "--steps", "2", "-o", str(d / "out"), cwd=d)

        return go

    def sliding_after_full(model: Path) -> None:
        """A Qwen2 config as older transformers write it (no layer_types): layer 0 full, layer 1 sliding."""
        path = model / "config.json"
        config = {k: v for k, v in json.loads(path.read_text()).items() if k != "layer_types"}
        path.write_text(json.dumps({**config, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}))

    def own_head(model: Path) -> None:
        """tiny-opt ties its head: the weights given a head of their own, with other values."""
        from safetensors.torch import load_file, save_file

        path = model / "model.safetensors"
        tensors = load_file(str(path))
        tensors["lm_head.weight"] = tensors["model.decoder.embed_tokens.weight"] + 1.0
        save_file(tensors, str(path), metadata={"format": "pt"})

    def in_bf16(model: Path) -> None:
        from safetensors.torch import load_file, save_file

        path = model / "model.safetensors"
        save_file({n: t.bfloat16() for n, t in load_file(str(path)).items()}, str(path), metadata={"format": "pt"})
        edit_config(model, torch_dtype="bfloat16")

    def trained_in_float32(d: Path) -> bool:
        return json.loads((d / "out" / "model" / "config.json").read_text()).get("torch_dtype") == "float32"

    def plan_through_a_link(d: Path) -> tuple[int, str]:
        (d / "kept").mkdir()
        (d / "p.yaml").symlink_to(d / "kept" / "p.yaml")
        return call("plan", "-m", "tiny-opt", "-t", "cpu-local", "-o", "p.yaml", cwd=d)

    def over_a_topology(d: Path) -> tuple[int, str]:
        from zoplan.topology import resolve_topology_path

        (d / "mine.yaml").write_text(
            "# PCIe layout: as the vendor says\n" + resolve_topology_path("cpu-local").read_text()
        )
        code, out = call("plan", "-m", "tiny-opt", "-t", "mine.yaml", "-o", "mine.yaml", cwd=d)
        return code, out + ("" if (d / "mine.yaml").read_text().startswith("# PCIe layout") else "\nTOPOLOGY REPLACED")

    def trace_into_own_stdout(d: Path) -> tuple[int, str]:
        with open(d / "out.json", "w") as stdout:
            proc = subprocess.run(
                zoplan_cmd("timeline", str(work / "base" / "plan.yaml"), "-o", "/dev/stdout"),
                cwd=d,
                stdout=stdout,
                stderr=subprocess.PIPE,
                text=True,
                timeout=LIMIT_S,
                env=ENV,
            )
        return proc.returncode, proc.stderr

    def edit_config(model: Path, **fields) -> None:
        path = model / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))

    def as_bin(model: Path) -> None:
        """The weights saved again in torch's pickled format (pytorch_model.bin), as older checkpoints are."""
        path = model / "model.safetensors"
        torch.save(load_file(str(path)), model / "pytorch_model.bin")
        path.unlink()

    def bin_fewer_layers(model: Path) -> None:
        as_bin(model)
        edit_config(model, num_hidden_layers=1)

    def cpu_plan(d: Path) -> tuple[int, str]:
        """A model the CPU ranks of cpu-local and the host copy could hold only together: its plan."""
        code, out = call("plan", "-m", "qwen2.5-1.5b", "-t", "cpu-local", "-b", "8", "-s", "128", "--json", cwd=d)
        (d / "plan.json").write_text(out if code == 0 else "{}")
        return code, out

    def fits_cpu_local(d: Path) -> bool:
        """Every rank's working set and the host copy within cpu-local's memory, less its reserve."""
        from zoplan.sim.costs import host_room_bytes
        from zoplan.topology import load_topology

        best = json.loads((d / "plan.json").read_text())["best"]
        ranks = best["gpu_memory_bytes"] * len(best["gpus"])
        return ranks + best["host_memory_bytes"] <= host_room_bytes(load_topology("cpu-local"))

    def bomb(d: Path) -> tuple[int, str]:
        text = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
            f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}" if i > 1 else "*a"] * 9) + "]\n" for i in range(1, 12)
        )
        (d / "bomb.yaml").write_text(text)
        return call("plan", "-t", str(d / "bomb.yaml"), cwd=d)

    def plan_edit(field: str, value) -> Callable[[Path], tuple[int, str]]:
        """The base run's plan with one field (a dotted path) set to ``value``."""

        def go(d: Path) -> tuple[int, str]:
            import yaml

            spec = yaml.safe_load((work / "base" / "plan.yaml").read_text())
            *parents, key = field.split(".")
            node = spec
            for name in parents:
                node = node[name]
            assert key in node, field
            node[key] = value
            (d / "plan.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
            return call("run", str(d / "plan.yaml"), "-o", str(d / "out"), "--steps", "1", cwd=d)

        return go

    def start(d: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
        return subprocess.Popen(
            zoplan_cmd("run", *args), cwd=d, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env or ENV
        )

    def wait_steps(run: Path, n: int, proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + LIMIT_S
        while time.monotonic() < deadline and proc.poll() is None:
            journal = run / "journal.jsonl"
            if journal.exists() and journal.read_bytes().count(b"\n") >= n:
                return
            time.sleep(0.1)

    def kill_then_resume(target: str) -> Callable[[Path], tuple[int, str]]:
        """SIGKILL one process of a run in its third step, then --resume to 8 steps."""

        def go(d: Path) -> tuple[int, str]:
            run = d / "run"
            proc = start(d, "--steps", "8", "--snapshot-every", "2", "-o", str(run))
            wait_steps(run, 2, proc)
            if target == "launcher":
                pid = proc.pid
            elif target == "supervisor":  # the process that forked the ranks (runtime/ranks.py)
                pid = supervisor_process(str(run))
            else:
                pid = next(iter(rank_processes(str(run)).values()))
            os.kill(pid, signal.SIGKILL)
            first = proc.communicate(timeout=LIMIT_S)[0]
            deadline = time.monotonic() + 30
            while processes_naming(str(run)) and time.monotonic() < deadline:
                time.sleep(0.2)
            then = time.time() - 60  # a killed launcher's folders, old enough to be judged stale
            for folder in scratch():
                if (folder / ".owner").exists():
                    os.utime(folder / ".owner", (then, then))
            code, out = call("run", "--resume", str(run), "--steps", "8", cwd=d)
            return code, f"{first}\n--- resume ---\n{out}"

        return go

    def second_resume(d: Path) -> tuple[int, str]:
        run = d / "run"
        proc = start(d, "--steps", "400", "-o", str(run))
        wait_steps(run, 1, proc)
        code, out = call("run", "--resume", str(run), "--steps", "400", cwd=d)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=LIMIT_S)
        return code, out

    def sigterm(d: Path) -> tuple[int, str]:
        run = d / "run"
        proc = start(d, "--steps", "400", "-o", str(run))
        wait_steps(run, 1, proc)
        proc.send_signal(signal.SIGTERM)
        return proc.returncode if proc.wait(timeout=LIMIT_S) is not None else -1, proc.communicate()[0]

    def second_ctrl_c(d: Path) -> tuple[int, str]:
        """Ctrl-C, and Ctrl-C again while the rank supervisor is slow to stop (here: stopped by
        SIGSTOP): the launcher said "the ranks have stopped" and let go of the run while they
        trained on. Leaked processes (the bench's check) make this case fail."""
        run = d / "run"
        proc = start(d, "--steps", "4000", "-o", str(run))
        wait_steps(run, 1, proc)
        supervisor = supervisor_process(str(run))
        if supervisor is not None:
            os.kill(supervisor, signal.SIGSTOP)
        proc.send_signal(signal.SIGINT)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(timeout=LIMIT_S), proc.communicate()[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            return -1, f"HANG after {LIMIT_S} s\n{proc.communicate()[0]}"

    def replay_into_live_run(d: Path) -> tuple[int, str]:
        """`zoplan replay RUN -o RUN/replayed` while RUN trains: its finish removes what stands in
        the way of its model/; refused."""
        run = d / "run"
        proc = start(d, "--steps", "4000", "-o", str(run))
        wait_steps(run, 1, proc)
        code, out = call("replay", str(run), "-o", str(run / "model"), cwd=d)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=LIMIT_S)
        return code, out

    def stopped_rank(d: Path) -> tuple[int, str]:
        """A rank stopped by SIGSTOP holds every rank up: the run must say which (within its
        note's time, here 3 s), not stand still without a word (counted exit-0-wrong)."""
        run = d / "run"
        proc = start(d, "--steps", "4000", "-o", str(run), env=dict(ENV, ZOPLAN_STALL_NOTE_AFTER_S="3"))
        wait_steps(run, 1, proc)
        ranks = rank_processes(str(run))
        os.kill(ranks[max(ranks)], signal.SIGSTOP)
        time.sleep(8)
        os.kill(ranks[max(ranks)], signal.SIGCONT)
        proc.send_signal(signal.SIGINT)
        code, out = proc.wait(timeout=LIMIT_S), proc.communicate()[0]
        if "no step has finished" not in out or f"rank {max(ranks)} (pid {ranks[max(ranks)]}) is stopped" not in out:
            return 0, out + "\n(the stillness was not said: exit-0-wrong for the bench)"
        return code, out

    def replaced_before_a_restart(what: str) -> Callable[[Path], tuple[int, str]]:
        """A rank killed at step 40 and restarted (--max-restarts 1), the run's --data (or its
        model's weights) replaced by others after its first step: the restart read them, and
        trained on, exit 0. It must stop and say which changed."""

        def go(d: Path) -> tuple[int, str]:
            data, model, run = d / "data.jsonl", d / "model", d / "run"
            data.write_text("".join(json.dumps({"text": f"the film was good {i}"}) + "\n" for i in range(40)))
            shutil.copytree(work / "base" / "model", model)
            args = ("--model", str(model), "--data", str(data), "--steps", "400", "--max-restarts", "1")
            proc = start(d, *args, "-o", str(run), env=dict(ENV, ZOPLAN_FAULTS="kill:1:40"))
            wait_steps(run, 1, proc)
            if what == "data":
                data.write_text("".join(json.dumps({"text": f"the film was bad {i}"}) + "\n" for i in range(40)))
            else:
                shutil.copy(work / "reference" / "model" / "model.safetensors", model / "model.safetensors")
            try:
                out = proc.communicate(timeout=LIMIT_S)[0]
            except subprocess.TimeoutExpired:
                proc.kill()
                return -1, f"HANG after {LIMIT_S} s\n{proc.communicate()[0]}"
            return proc.returncode, out

        return go

    def damaged_snapshot(d: Path) -> tuple[int, str]:
        run = copy(d)
        newest = sorted((run / "snapshots").iterdir())[-1] / "model.safetensors"
        newest.write_bytes(newest.read_bytes()[:1000])
        return call("run", "--resume", str(run), "--steps", "8", cwd=d)

    def flipped_snapshot(d: Path) -> tuple[int, str]:
        """One bit of the newest snapshot's weights flipped: size and header as written."""
        run = copy(d)
        newest = sorted((run / "snapshots").iterdir())[-1] / "model.safetensors"
        data = bytearray(newest.read_bytes())
        data[-100] ^= 1
        newest.write_bytes(bytes(data))
        return call("run", "--resume", str(run), "--steps", "8", cwd=d)

    def data_file(lines: list[str], *args: str, more: bool = True) -> Callable[[Path], tuple[int, str]]:
        """A new run of ``lines`` as its --data file (with ``more``, 40 bundled sentiment records after them)."""

        def go(d: Path) -> tuple[int, str]:
            from zoplan.runtime.data import SENTIMENT_FILE

            records = SENTIMENT_FILE.read_text().splitlines()[:40] if more else []
            (d / "data.jsonl").write_text("\n".join(lines + records) + "\n")
            return call("run", "--steps", "2", "--data", "data.jsonl", *args, "-o", "run", cwd=d)

        return go

    def read_only_output(d: Path) -> tuple[int, str]:
        """An output directory the run cannot write into (immutable: also for root, who ignores modes)."""
        (d / "ro").mkdir()
        os.chmod(d / "ro", 0o500)
        immutable = os.geteuid() == 0 and subprocess.run(["chattr", "+i", str(d / "ro")]).returncode == 0
        try:
            return call("run", "--steps", "2", "-o", str(d / "ro" / "out"), cwd=d)
        finally:
            if immutable:
                subprocess.run(["chattr", "-i", str(d / "ro")])
            os.chmod(d / "ro", 0o700)

    def small_shared_memory(size: str) -> Callable[[Path], tuple[int, str]]:
        def go(d: Path) -> tuple[int, str]:
            """The host copy's shared memory (ZOPLAN_SHARED_MEMORY) on a tmpfs of ``size`` (root only)."""
            env = dict(ENV, ZOPLAN_SHARED_MEMORY=str(d / "shm"))
            return on_tmpfs(
                d / "shm",
                size,
                lambda: nothing_left(*call("run", "--steps", "2", "-o", "run", cwd=d, env=env), d / "run"),
            )

        return go

    def full_disk(d: Path) -> tuple[int, str]:
        """The output on a 300 KiB tmpfs: the final weights do not fit (root only: it mounts one)."""
        return on_tmpfs(
            d / "small", "300k", lambda: call("run", "--steps", "20", "-o", str(d / "small" / "run"), cwd=d)
        )

    def small_disk(size: str, empty: bool) -> Callable[[Path], tuple[int, str]]:
        """The output on a tmpfs of ``size``: too small for a new run's first files (8k: nothing
        may be left, ``empty``), or for the ranks to write their error or log (12k) (root only: it
        mounts one)."""

        def go(d: Path) -> tuple[int, str]:
            def attempt() -> tuple[int, str]:
                done = call("run", "--steps", "4", "-o", str(d / "small" / "run"), cwd=d)
                return nothing_left(*done, d / "small" / "run") if empty else done

            return on_tmpfs(d / "small", size, attempt)

        return go

    def cut_metrics_row(d: Path) -> tuple[int, str]:
        """The base run's last metrics row cut short (a disk full as it was written), resumed."""
        run = copy(d)
        raw = (run / "metrics.jsonl").read_bytes()
        (run / "metrics.jsonl").write_bytes(raw[: raw.rindex(b'{"step": 5') + 20])
        code, out = call("run", "--resume", str(run), "--steps", "8", cwd=d)
        if code == 0 and "resuming with 6 step(s) done" not in out:
            out += "\n(the resume's own line is missing)"
            code = 1
        return code, out

    def slow_topology(d: Path) -> tuple[int, str]:
        import yaml

        spec = yaml.safe_load((Path(__file__).parents[1] / "topologies" / "cpu-local.yaml").read_text())
        spec["sockets"][0]["memory_gbps"] = 1e-300
        (d / "slow.yaml").write_text(yaml.safe_dump(spec))
        return call("plan", "-m", "tiny-opt", "-t", str(d / "slow.yaml"), cwd=d)

    def matches_reference(d: Path) -> bool:
        return same_weights(d / "run", work / "reference")

    def cut_back(source: str, keep: int, env: dict | None = None) -> Callable[[Path], tuple[int, str]]:
        """A copy of run ``source`` with its journal cut to ``keep`` lines (as the refusal of a
        damaged line advises: `head -n`), resumed to 8 steps."""

        def go(d: Path) -> tuple[int, str]:
            shutil.copytree(work / source, d / "run")
            journal = d / "run" / "journal.jsonl"
            journal.write_text("".join(journal.read_text().splitlines(keepends=True)[:keep]))
            return call("run", "--resume", str(d / "run"), "--steps", "8", cwd=d, env=env)

        return go

    def lone_journal(d: Path) -> tuple[int, str]:
        (d / "lone").mkdir()
        shutil.copy(work / "base" / "journal.jsonl", d / "lone" / "journal.jsonl")
        return call("replay", "tiny-opt", str(d / "lone" / "journal.jsonl"), "-o", str(d / "replayed"), cwd=d)

    def planned_steps(d: Path) -> tuple[int, str]:
        code, out = call("plan", "-m", "tiny-opt", "-t", "cpu-local", "--steps", "3", "-o", str(d / "p.yaml"), cwd=d)
        return (code, out) if code else call("run", str(d / "p.yaml"), "-o", str(d / "run"), cwd=d)

    def journal_steps(n: int) -> Callable[[Path], bool]:
        return lambda d: len((d / "run" / "journal.jsonl").read_text().splitlines()) == n

    def evaluated_nothing(d: Path) -> bool:
        return "eval_loss" not in (d / "run" / "metrics.jsonl").read_text()

    def shadowed_built_in(d: Path) -> tuple[int, str]:
        """``--model tiny-opt`` beside a folder ./tiny-opt of other weights (the built-in trains),
        6 steps, then --resume to 8: run.json named the folder, and every resume was refused."""
        shutil.copytree(work / "reference" / "model", d / "tiny-opt")
        code, out = call("run", "--model", "tiny-opt", "--steps", "6", "-o", "run", cwd=d)
        if code:
            return code, out
        code, more = call("run", "--resume", "run", "--steps", "8", cwd=d)
        return code, f"{out}\n--- resume ---\n{more}"

    def one_port_twice(d: Path) -> tuple[int, str]:
        """Two runs started at once with one --master-port: one trains, the other is refused with
        the port (each found it free, then one's ranks met the other's: one or both failed with
        the generic message). The refused one's status and output are the case's."""
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = str(probe.getsockname()[1])
        procs = [start(d, "--steps", "20", "--master-port", port, "-o", str(d / f"run{i}")) for i in (1, 2)]
        try:
            done = [(p.wait(timeout=LIMIT_S), p.communicate()[0]) for p in procs]
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            return -1, f"HANG after {LIMIT_S} s"
        said = "\n".join(out for _, out in done)
        codes = sorted(code for code, _ in done)
        if codes == [0, 0] or codes[0] != 0:  # both trained (no port met twice), or neither did
            return (0 if codes == [0, 0] else 1), said + f"\n(statuses {codes})"
        return codes[1], said

    def prompt_with_a_space(d: Path) -> tuple[int, str]:
        """A classification prompt that ends in a space: the model reads two before each label
        word. It trains, and says so."""
        code, out = call("run", "--steps", "2", "--data", "sentiment", "--prompt", "{text} It was ", "-o", "run", cwd=d)
        if code == 0 and "ends in a space" not in out:
            return 1, out + "\n(not said)"
        return code, out

    def in_memory_cgroup(d: Path, limit: str, args: list[str]) -> tuple[int, str]:
        """``zoplan args`` in a child memory cgroup of ``limit`` (cgroup v1 and root only: a case
        that cannot make one is skipped), the cgroup removed after."""
        own = next(
            (
                line.split(":", 2)[2]
                for line in Path("/proc/self/cgroup").read_text().splitlines()
                if line.split(":")[1] == "memory"
            ),
            None,
        )
        group = Path("/sys/fs/cgroup/memory") / (own or "/").lstrip("/") / f"zoplan-hostile-{os.getpid()}"
        try:
            group.mkdir()
            (group / "memory.limit_in_bytes").write_text(limit)
        except OSError:
            return 2, "error: skipped: cannot make a memory cgroup here"
        procs = group / "cgroup.procs"
        try:
            proc = subprocess.run(
                zoplan_cmd(*args),
                cwd=d,
                capture_output=True,
                text=True,
                timeout=LIMIT_S,
                env=ENV,
                preexec_fn=lambda: procs.write_text(str(os.getpid())),
            )
            return proc.returncode, proc.stdout + proc.stderr
        finally:
            for _ in range(50):  # (its processes gone, it can be removed)
                try:
                    group.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)

    def over_the_container_limit(d: Path) -> tuple[int, str]:
        """An OPT-125m-shaped model (random weights, 0.47 GiB) planned on cpu-local, run in a
        container of 1.2 GiB: the plan's host copy and working sets exceed it. It was killed by
        the container's out-of-memory killer once loaded (status 2, `dmesg`); it must be refused
        before any rank starts, with the limit."""
        from transformers import AutoModelForCausalLM, OPTConfig

        from zoplan.runtime.tiny import resolve_model

        config = OPTConfig(
            vocab_size=50272,
            hidden_size=768,
            num_hidden_layers=12,
            ffn_dim=3072,
            num_attention_heads=12,
            word_embed_proj_dim=768,
        )
        AutoModelForCausalLM.from_config(config).save_pretrained(d / "m")
        for f in resolve_model("tiny-opt").glob("tokenizer*"):
            shutil.copy(f, d / "m" / f.name)
        code, out = in_memory_cgroup(
            d, "1200M", ["run", "--model", "m", "--steps", "2", "-b", "4", "-s", "128", "-o", "run"]
        )
        return nothing_left(code, out, d / "run")

    cases = [
        Case(
            "journal",
            "non-finite projected gradient",
            edit_journal(lambda L: set_field(L, 5, projected_grad=float("nan"))),
        ),
        Case("journal", "a string as gradient", edit_journal(lambda L: set_field(L, 5, projected_grad="abc"))),
        Case("journal", "a torn line in the middle", edit_journal(lambda L: L[:2] + [L[2][:20]] + L[3:])),
        Case("journal", "a missing line", edit_journal(lambda L: L[:3] + L[4:])),
        Case("journal", "a missing first line", edit_journal(lambda L: L[1:])),
        Case("journal", "a repeated line", edit_journal(lambda L: L[:4] + [L[3]] + L[4:])),
        Case(
            "journal",
            "a projected gradient edited by hand (x1.5)",
            edit_journal(lambda L: set_field(L, 3, projected_grad=json.loads(L[3])["projected_grad"] * 1.5)),
        ),
        Case("resume", "--steps -5", resume_with("--steps", "-5")),
        Case("resume", "--steps 4 after 6 steps", resume_with("--steps", "4")),
        Case(
            "resume",
            "a damaged run.json",
            lambda d: (
                (copy(d) / "run.json").write_text("{")
                and call("run", "--resume", str(d / "run"), "--steps", "8", cwd=d)
            ),
        ),
        Case(
            "resume",
            "the newest snapshot truncated (must finish, bit-identical)",
            damaged_snapshot,
            refused=False,
            check=matches_reference,
        ),
        Case(
            "resume",
            "a bit of the newest snapshot's weights flipped (must finish, bit-identical)",
            flipped_snapshot,
            refused=False,
            check=matches_reference,
        ),
        Case(
            "input",
            "a record whose text holds half of a JSON escape pair (\\ud800)",
            data_file(['{"text": "bad \\ud800 half", "label": 1}']),
        ),
        Case(
            "input", "--eval-fraction 0.95 of 40 examples (2 left to train)", data_file([], "--eval-fraction", "0.95")
        ),
        Case(
            "input",
            "an empty field the recipe's prompt reads",
            data_file(
                ['{"sentence": " ", "label": 0}'] + ['{"sentence": "fine", "label": 1}'] * 40,
                "--recipe",
                "sst2",
                more=False,
            ),
        ),
        Case(
            "resume",
            "the journal cut back before the newest snapshot (must finish, bit-identical)",
            cut_back("base", 3),
            refused=False,
            check=matches_reference,
        ),
        Case(
            "resume",
            "a finished run cut back, its resume failing at the same --steps",
            cut_back("reference", 3, env=dict(ENV, ZOPLAN_FAULTS="fail-snapshot:0:4")),
        ),
        Case("replay", "a journal without its first line", replay_with(lambda L: L[1:])),
        Case("replay", "a finite step marked skipped by hand", replay_with(lambda L: set_field(L, 2, skipped=True))),
        Case("replay", "a journal copied without its run's plan.yaml", lone_journal),
        Case(
            "replay",
            "updates that overflow the weights",
            # losses whose projected gradient (L+ - L-) / 2 eps, 1e303, times the lr overflows fp32
            replay_with(
                lambda L: set_field(
                    L, 0, loss_plus=1e300, loss_minus=-1e300, projected_grad=(1e300 + 1e300) / (2 * 1e-3)
                )
            ),
        ),
        Case("model", "no weights", damaged_model(lambda m: (m / "model.safetensors").unlink())),
        Case(
            "model",
            "truncated weights",
            damaged_model(
                lambda m: (m / "model.safetensors").write_bytes((m / "model.safetensors").read_bytes()[:5000])
            ),
        ),
        Case("model", "no tokenizer", damaged_model(lambda m: [p.unlink() for p in m.glob("tokenizer*")])),
        Case(
            "model",
            "a config with fewer layers than the weights",
            damaged_model(lambda m: edit_config(m, num_hidden_layers=1)),
        ),
        Case(
            "model",
            "a config of another width",
            damaged_model(lambda m: edit_config(m, hidden_size=128, word_embed_proj_dim=128)),
        ),
        Case("input", "a YAML alias bomb as topology", bomb),
        Case(
            "input",
            "zoplan plan --global-batch 10^12",
            lambda d: call("plan", "--global-batch", "1000000000000", cwd=d),
        ),
        Case(
            "input",
            "zoplan run --global-batch 10^12",
            lambda d: call("run", "--global-batch", "1000000000000", "-o", str(d / "out"), cwd=d),
        ),
        Case(
            "input",
            "zoplan run --steps 10^12",
            lambda d: call("run", "--steps", "1000000000000", "-o", str(d / "out"), cwd=d),
        ),
        Case(
            "input",
            'zoplan run -o "" (an unset shell variable)',
            lambda d: call("run", "--steps", "2", "-o", "", cwd=d),
        ),
        Case("input", "a plan edited to 10^8 slices per block", plan_edit("transfer.slices_per_block", 10**8)),
        Case("input", "a plan edited to micro-batch 0", plan_edit("batch.micro_batch", 0)),
        Case("input", "a plan edited to prefetch 10^6", plan_edit("transfer.prefetch", 10**6)),
        Case("input", "a plan edited to lr NaN", plan_edit("zo.lr", float("nan"))),
        Case(
            "input",
            "--seq-len 100000 on a 128-position model",
            lambda d: call("run", "--seq-len", "100000", "-o", str(d / "out"), cwd=d),
        ),
        Case(
            "input",
            "zoplan validate --steps 1 --skip 5",
            lambda d: call("validate", str(work / "base" / "plan.yaml"), "--steps", "1", "--skip", "5", cwd=d),
        ),
        Case(
            "input",
            "zoplan validate of a plan for another model",
            lambda d: call(
                "validate", str(work / "base" / "plan.yaml"), "--model", "tiny-llama", "--steps", "2", cwd=d
            ),
        ),
        Case(
            "input",
            "zoplan validate of a plan edited to micro-batch 10^9",
            lambda d: (
                plan_edit("batch.micro_batch", 10**9)(d),
                call("validate", str(d / "plan.yaml"), "--steps", "2", cwd=d),
            )[1],
        ),
        Case(
            "input",
            "zoplan run --master-addr of another machine, one node",
            lambda d: call("run", "--steps", "1", "--master-addr", "10.1.2.3", "-o", str(d / "run"), cwd=d),
        ),
        Case(
            "input",
            "zoplan run of a plan of 3 steps (must run its 3)",
            planned_steps,
            refused=False,
            check=journal_steps(3),
        ),
        Case(
            "input",
            "--eval-fraction 0 (must finish, nothing evaluated)",
            lambda d: call("run", "--steps", "2", "--eval-fraction", "0", "-o", str(d / "run"), cwd=d),
            refused=False,
            check=evaluated_nothing,
        ),
        Case("output", "a read-only output directory", read_only_output),
        Case("fault", "a second --resume while the run trains", second_resume),
        Case("fault", "SIGTERM of zoplan run", sigterm),
        Case("fault", "--data replaced before an automatic restart", replaced_before_a_restart("data")),
        Case("fault", "the checkpoint replaced before an automatic restart", replaced_before_a_restart("model")),
        Case(
            "fault",
            "a weight update that overflows (--lr 1e38)",
            lambda d: call("run", "--steps", "2", "--lr", "1e38", "-o", str(d / "run"), cwd=d),
        ),
        Case(
            "fault",
            "a snapshot write failing (disk full)",
            lambda d: call(
                "run",
                "--steps",
                "6",
                "--snapshot-every",
                "2",
                "-o",
                str(d / "run"),
                cwd=d,
                env=dict(ENV, ZOPLAN_FAULTS="fail-snapshot:0:4"),
            ),
        ),
        Case("output", "a disk that fills up at the final write", full_disk),
        Case("output", "a disk too small for a new run's run.json", small_disk("8k", empty=True)),
        Case("output", "a disk too full for the ranks to write their error", small_disk("12k", empty=False)),
        Case(
            "fault",
            "a metrics row cut short, then --resume (must finish, bit-identical)",
            cut_metrics_row,
            refused=False,
            check=matches_reference,
        ),
        Case(
            "input",
            "a plan edited to name a GPU its ranks do not run on",
            plan_edit("layout.compute_gpus", ["rank0", "rank5"]),
        ),
        Case("input", "a topology with 1e-300 GB/s of memory bandwidth", slow_topology),
        Case(
            "output",
            "a relative output directory whose name starts with a dash (must finish)",
            lambda d: call("run", "--steps", "2", "-o", "./-run", cwd=d),
            refused=False,
            check=lambda d: (d / "-run" / "model" / "model.safetensors").is_file(),
        ),
        Case(
            "input",
            "ZOPLAN_PLAN_WORKERS=abc",
            lambda d: call(
                "plan", "-m", "tiny-opt", "-t", "cpu-local", cwd=d, env=dict(ENV, ZOPLAN_PLAN_WORKERS="abc")
            ),
        ),
        Case(
            "input",
            "a plan given as a calibration profile",
            lambda d: call("plan", "-m", "tiny-opt", "--profile", str(work / "base" / "plan.yaml"), cwd=d),
        ),
        Case("output", "shared memory smaller than the host copy (a container's /dev/shm)", small_shared_memory("64k")),
        Case("output", "shared memory with room for the weights only", small_shared_memory("940k")),
        Case(
            "input",
            "a prompt with a format spec",
            lambda d: call("run", "--data", "sentiment", "--prompt", "{text:>5} It was", "-o", "run", cwd=d),
        ),
        Case(
            "input",
            "a prompt whose words after {text} fill the sequence",
            lambda d: call(
                "run",
                "--data",
                "sentiment",
                "--prompt",
                "{text}" + " and so on" * 30 + " It was",
                "--steps",
                "1",
                "-o",
                "run",
                cwd=d,
            ),
        ),
        Case("signal", "Ctrl-C twice while the rank supervisor is slow to stop", second_ctrl_c),
        Case("output", "replay -o into the directory of a run that is training", replay_into_live_run),
        Case("signal", "a rank stopped by SIGSTOP in the middle of a run", stopped_rank),
        Case(
            "kill",
            "SIGKILL of zoplan run, then --resume (must finish, bit-identical)",
            kill_then_resume("launcher"),
            refused=False,
            check=matches_reference,
        ),
        Case(
            "kill",
            "SIGKILL of the rank supervisor, then --resume (must finish, bit-identical)",
            kill_then_resume("supervisor"),
            refused=False,
            check=matches_reference,
        ),
        Case(
            "kill",
            "SIGKILL of a rank, then --resume (must finish, bit-identical)",
            kill_then_resume("rank"),
            refused=False,
            check=matches_reference,
        ),
        Case("journal", "a line's learning rate edited (-1000)", edit_journal(lambda l: set_field(l, 2, lr=-1000.0))),
        Case("journal", "a line's learning rate edited, replayed", replay_with(lambda l: set_field(l, 2, lr=0.0))),
        Case("output", "the run's plan.yaml edited (another lr), then --resume", plan_edited("resume")),
        Case("output", "the run's plan.yaml edited (bf16), then replay", plan_edited("replay")),
        Case("input", "a plan whose steps is true", plan_with(zo_set(steps=True))),
        Case("input", "a named pipe given as the plan", fifo_as("run")),
        Case("input", "a named pipe given as plan -o", fifo_as("plan")),
        Case("input", "eps 1e308 in a plan of 3 steps (every step skipped)", plan_with(zo_set(eps=1e308, steps=3))),
        Case(
            "input",
            "a Qwen2 config with sliding-window layers after full ones",
            damaged_model(sliding_after_full, "tiny-qwen2"),
        ),
        Case("input", "a tied config over weights with a head of their own", damaged_model(own_head)),
        Case(
            "output",
            "a bf16 checkpoint trained (its model's config must say float32)",
            damaged_model(in_bf16),
            refused=False,
            check=trained_in_float32,
        ),
        Case(
            "output",
            "plan -o through a symbolic link (must finish, the link kept)",
            plan_through_a_link,
            refused=False,
            check=lambda d: (d / "p.yaml").is_symlink() and (d / "kept" / "p.yaml").is_file(),
        ),
        Case("output", "plan -o over a topology whose comment says layout:", over_a_topology),
        Case("output", "timeline -o /dev/stdout into the command's own output", trace_into_own_stdout),
        Case("model", "a pytorch_model.bin checkpoint with a config of fewer layers", damaged_model(bin_fewer_layers)),
        Case(
            "input",
            "plan a model on cpu-local that its ranks and host copy fill together",
            cpu_plan,
            refused=False,
            check=fits_cpu_local,
        ),
        Case(
            "input",
            "plan --resident 64 of opt-66b on one H100",
            lambda d: call("plan", "-m", "opt-66b", "-t", "h100-pcie-1x", "--resident", "64", cwd=d),
        ),
        Case(
            "input",
            "compare --tokens inf --json",
            lambda d: call("compare", "-m", "opt-125m", "-t", "dgx-a100", "--tokens", "inf", "--json", cwd=d),
        ),
        Case(
            "resume",
            "a built-in model's name beside a folder of that name, then --resume (must finish, bit-identical)",
            shadowed_built_in,
            refused=False,
            check=matches_reference,
        ),
        Case("fault", "two runs started at once with one --master-port", one_port_twice),
        Case("input", "a prompt that ends in a space (must finish, said)", prompt_with_a_space, refused=False),
        Case(
            "fault",
            "a run that ends on losses that are not finite (--lr 1, --max-nonfinite 1000)",
            lambda d: call("run", "--lr", "1", "--steps", "14", "--max-nonfinite", "1000", "-o", "run", cwd=d),
            says="the run ended on weights whose loss is not finite",
        ),
        Case(
            "input",
            "bf16 with eps 1e-5 (must finish, said)",
            lambda d: (
                call(
                    "plan",
                    "-m",
                    "tiny-opt",
                    "-t",
                    "cpu-local",
                    "--dtype",
                    "bf16",
                    "--eps",
                    "1e-5",
                    "-o",
                    "p.yaml",
                    cwd=d,
                ),
                call("run", "p.yaml", "--steps", "4", "-o", "run", cwd=d),
            )[1],
            refused=False,
            says="is below the resolution of bf16",
        ),
        Case(
            "input",
            "a learning rate that makes the loss diverge (--lr 0.03, must finish, said)",
            lambda d: call("run", "--lr", "0.03", "--steps", "30", "-o", "run", cwd=d),
            refused=False,
            says="the run diverged",
        ),
        Case(
            "input",
            "a bf16 host copy at lr 1e-8 (must finish, said)",
            lambda d: call("run", "--wire-dtype", "bf16", "--lr", "1e-8", "--steps", "20", "-o", "run", cwd=d),
            refused=False,
            says="in the host copy (bf16)",
        ),
        Case(
            "input",
            "a model whose plan exceeds the container's memory limit",
            over_the_container_limit,
            says="container allows",
        ),
    ]
    rows = []
    before = scratch()
    for number, case in enumerate(c for c in cases if opts.only in c.name or opts.only == c.kind):
        d = work / f"case{number:02d}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        t = time.perf_counter()
        code, out = case.run(d)
        seconds = time.perf_counter() - t
        time.sleep(0.5)
        # new folders no live launch holds: a folder another run on this machine holds is not
        # this case's leak, and is not removed under that run
        left = [p for p in scratch() - before if abandoned(p)]
        leaks = sorted(p.name for p in left)
        procs = processes_naming(str(d))
        for p in procs:
            os.kill(p, signal.SIGKILL)
        for p in left:
            shutil.rmtree(p, ignore_errors=True)
        traceback = "Traceback" in out
        generic = "exited without a message" in out
        hang = code == -1
        if case.refused:
            wrong = code == 0
        else:
            wrong = code == 0 and case.check is not None and not case.check(d)
        message = next((line.strip() for line in reversed(out.splitlines()) if line.strip().startswith("error:")), "")
        unsaid = case.says is not None and case.says not in out and "skipped" not in out
        ok = not (traceback or generic or hang or wrong or leaks or procs or unsaid) and (
            code != 0 if case.refused else code == 0
        )
        rows.append(
            {
                "kind": case.kind,
                "case": case.name,
                "status": code,
                "seconds": round(seconds, 1),
                "traceback": traceback,
                "hang": hang,
                "generic": generic,
                "exit0_wrong": wrong,
                "leaked": leaks + [f"pid {p}" for p in procs],
                "unsaid": case.says if unsaid else None,
                "ok": ok,
                "message": message[:160],
            }
        )
        print(
            f"{'ok ' if ok else 'BAD'} [{case.kind}] {case.name}: status {code}, {seconds:.1f} s"
            + (f" | {message[:140]}" if message else "")
            + ("" if ok else f" | {rows[-1]}"),
            flush=True,
        )
    totals = {
        key: sum(bool(r[key]) for r in rows)
        for key in ("traceback", "hang", "generic", "exit0_wrong", "leaked", "unsaid")
    }
    print(
        f"\n{len(rows)} cases, {sum(r['ok'] for r in rows)} as they must be; tracebacks {totals['traceback']}, "
        f"hangs {totals['hang']}, generic messages {totals['generic']}, exit-0-wrong results "
        f"{totals['exit0_wrong']}, cases leaking {totals['leaked']}, causes unsaid {totals['unsaid']}; "
        f"{time.perf_counter() - t0:.0f} s in all"
    )
    (work / "hostile.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
