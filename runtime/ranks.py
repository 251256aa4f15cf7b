"""One machine's ranks, forked from one process that has already imported what a rank needs.

``zoplan run`` on one machine starts this module instead of torchrun: it imports torch,
transformers (the model's own modelling module included) and the worker once, then forks one
child per rank with the environment torchrun would give it (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT, TORCHELASTIC_RESTART_COUNT, ...). A fresh interpreter per rank pays
those imports once per rank, and torchrun's own start besides: several seconds per run on a small
machine, for each of its ranks (``python -m bench.rank_start``, docs/results/suite.md). This
process never computes (a parent that had used torch's thread pool could leave it unusable in a
forked child) and never initialises CUDA (each rank does, on its own device).

It does what torchrun's agent does for one node: when a rank fails, the others are stopped
(SIGTERM, then SIGKILL after ``GRACE_S``) and, while ``--max-restarts`` allows, every rank starts
again (the ranks resume from the journal; each attempt rendezvous on a fresh port). Each rank's
exit is written to ``--status`` (JSON), which the launcher reads instead of scraping a log. Runs
over several machines use torchrun (its rendezvous spans machines).

``zoplan calibrate`` starts its ranks the same way (``--module zoplan.runtime.calibrate``).

Usage (the launchers build it): python -m zoplan.runtime.ranks --nproc N --master-port P
    [--module M] [--model-dir DIR] [--master-addr A] [--max-restarts R] [--status FILE] -- RANK-ARGUMENTS

Where many short runs follow each other (a test suite, a sweep, a notebook), the supervisor's own
start (its imports: seconds) can be paid once: ``python -m zoplan.runtime.ranks --serve SOCKET``
starts a rank server (runtime/rankserver.py), and a launcher whose environment names it in
``ZOPLAN_RANK_SERVER`` has the server fork the supervisor instead of starting a new interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

GRACE_S = 30.0  # a stopped rank's time to exit on SIGTERM before SIGKILL (torchrun waits as long)
# a rank's exit status when it stopped the run itself, its message written (worker.main: a
# non-finite loss too many times, a full disk, a refused input): the run ends, never restarted
STOPPED = 2


WORKER = "zoplan.runtime.worker"


def _preload(module: str, worker_args: list[str], model_dir: Path | None) -> None:
    """Import what every rank imports before its first step: torch and the rank's module (the
    engine, the kernels), transformers' auto classes and the model's modelling module (named by
    its config.json's model_type; ``model_dir``, or the run configuration's)."""
    import importlib

    importlib.import_module(module)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    try:
        if model_dir is None and module == WORKER:  # the run's configuration: the first worker argument
            from zoplan import runconfig

            model_dir = runconfig.read(Path(worker_args[0])).model_dir
        model_type = json.loads((Path(model_dir) / "config.json").read_text())["model_type"]
        importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    except Exception:  # noqa: BLE001  (a rank reports any problem with the model itself)
        pass


def _free_port(addr: str) -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def _start(module: str, rank: int, nproc: int, addr: str, port: int, attempt: int, worker_args: list[str]) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        from zoplan.runtime.signals import after_fork, die_with_parent

        after_fork(keep_ignored=True)  # (a signal ignored by the launcher is by the rank too)
        from zoplan.runtime.scratch import RANK_NAME, name_process

        die_with_parent(signal.SIGKILL)  # a rank whose supervisor is gone stops at once
        name_process(f"{RANK_NAME}{rank}")
        os.environ.update(
            {
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(nproc),
                "LOCAL_WORLD_SIZE": str(nproc),
                "GROUP_RANK": "0",
                "ROLE_RANK": str(rank),
                "ROLE_WORLD_SIZE": str(nproc),
                "MASTER_ADDR": addr,
                "MASTER_PORT": str(port),
                "TORCHELASTIC_RESTART_COUNT": str(attempt),
            }
        )
        import importlib

        importlib.import_module(module).main(worker_args)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001  (a rank's unexpected failure: its traceback, in the log)
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _describe(status: int) -> str:
    if status < 0:
        try:
            return f"exitcode: {status} ({signal.Signals(-status).name})"
        except ValueError:
            return f"exitcode: {status}"
    return f"exitcode: {status}"


class Ranks:
    """The children of one attempt, by pid."""

    def __init__(self) -> None:
        self.pids: dict[int, int] = {}  # pid -> rank

    def stop(self, sig: int = signal.SIGTERM) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def reap(self, exits: dict[int, int], block: bool = True) -> None:
        """Collect exited children into ``exits`` (rank -> exit code, a signal as its negative):
        blocking, the next one to exit; not blocking, every one that has exited."""
        while self.pids:
            try:
                pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
            except ChildProcessError:
                self.pids.clear()
                return
            if pid == 0:
                return
            rank = self.pids.pop(pid, None)
            if rank is not None:
                exits[rank] = os.waitstatus_to_exitcode(status)
            if block:
                return

    def stop_all(self, exits: dict[int, int], signum: int = signal.SIGTERM) -> None:
        """Stop every rank still running: ``signum``, then SIGKILL after ``GRACE_S``."""
        self.stop(signum)
        deadline = time.monotonic() + GRACE_S
        while self.pids and time.monotonic() < deadline:
            self.reap(exits, block=False)
            time.sleep(0.05)
        self.stop(signal.SIGKILL)
        while self.pids:
            self.reap(exits)


def run(
    module: str, nproc: int, addr: str, port: int, max_restarts: int, worker_args: list[str], status: Path | None
) -> int:
    from zoplan.runtime.signals import STOPPING, signals_held

    record: list[dict] = []
    ranks = Ranks()

    def stop_and_exit(signum, frame):  # the launcher (or a user) stops the run: the ranks stop with it
        ranks.stop_all({}, signum)
        os._exit(128 + signum)

    for signum in STOPPING:
        # a signal the launcher ignores (SIGINT in a script's background job, SIGHUP under nohup)
        # the whole run ignores: the ranks stopped while the launcher went on and read it as a crash
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, stop_and_exit)
    for attempt in range(max_restarts + 1):
        if attempt:
            port = _free_port(addr)  # the killed attempt's store may still hold its port
            print(
                f"[zoplan ranks] restarting every rank (restart {attempt} of {max_restarts})",
                file=sys.stderr,
                flush=True,
            )
        for rank in range(nproc):
            # a stop that comes while a rank is forked waits until the rank is known (and stopped)
            with signals_held():
                ranks.pids[_start(module, rank, nproc, addr, port, attempt, worker_args)] = rank
        exits: dict[int, int] = {}
        while ranks.pids:
            ranks.reap(exits)
            bad = [r for r, code in exits.items() if code != 0]
            if bad and ranks.pids:  # the first failure stops the others (they would wait for it forever)
                print(
                    f"[zoplan ranks] rank {bad[0]} failed ({_describe(exits[bad[0]])}): stopping the other ranks",
                    file=sys.stderr,
                    flush=True,
                )
                ranks.stop_all(exits)
        record.append({"attempt": attempt, "exits": {str(r): exits.get(r) for r in range(nproc)}})
        if status is not None:
            tmp = status.with_suffix(".tmp")
            tmp.write_text(json.dumps({"version": 1, "attempts": record}))
            tmp.replace(status)
        bad = {r: code for r, code in exits.items() if code != 0}
        if not bad:
            return 0
        print(
            "[zoplan ranks] " + "; ".join(f"rank {r} {_describe(c)}" for r, c in sorted(bad.items())),
            file=sys.stderr,
            flush=True,
        )
        if STOPPED in bad.values():  # a rank's own stop, not a crash: a restart would only hide it
            return 1
    return 1


def read_status(path: Path) -> list[dict]:
    """The attempts written by ``run`` (none when the file is missing or damaged)."""
    try:
        data = json.loads(path.read_text())
        attempts = data["attempts"]
        return attempts if isinstance(attempts, list) else []
    except (OSError, ValueError, KeyError, TypeError):
        return []


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", default=WORKER, help="the rank's module; its main(argv) is called")
    parser.add_argument("--model-dir", type=Path, default=None, help="the model whose modelling code to import")
    parser.add_argument("--nproc", type=int, required=True)
    # the launcher passes every setting of the run (zoplan.runconfig declares their defaults)
    parser.add_argument("--master-addr", required=True)
    parser.add_argument("--master-port", type=int, required=True)
    parser.add_argument("--max-restarts", type=int, required=True)
    parser.add_argument("--status", type=Path, default=None)
    parser.add_argument("worker_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    worker_args = args.worker_args[1:] if args.worker_args[:1] == ["--"] else args.worker_args
    from zoplan.runtime.signals import die_with_parent

    die_with_parent(signal.SIGTERM)  # a launcher that dies, however, stops this process and so the ranks
    from zoplan.runtime.scratch import SUPERVISOR_NAME, name_process

    name_process(SUPERVISOR_NAME)
    _preload(args.module, worker_args, args.model_dir)
    code = run(args.module, args.nproc, args.master_addr, args.master_port, args.max_restarts, worker_args, args.status)
    sys.stdout.flush()
    sys.stderr.flush()
    # nothing of this process needs tearing down (the status is written, the ranks are reaped):
    # skipping the interpreter's teardown of torch and transformers saves about a second a run
    os._exit(code)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        from zoplan.runtime.rankserver import serve_main

        serve_main(sys.argv[2:])
    else:
        main()
