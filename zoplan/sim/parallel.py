"""Simulations of a search's candidates on the machine's other cores.

The search decides candidate after candidate, each decision depending on the results before it
(zoplan.search). Its answers must not depend on how many cores ran it, so the decisions stay in
one process, in order, and only the simulations move: worker processes, forked from the search
once it has run long enough to pay for them, simulate the candidates the search will reach next,
each with the limit it would have now. Limits only tighten as results arrive, so what a worker
finds (the step, or that the step is at least its limit) settles what ``simulate`` would have
answered later under the tighter limit: the same results, counts and ranking, bit for bit, as
one process (tests/test_search.py).

Forked workers are used where the platform forks (Linux); elsewhere, or with
``ZOPLAN_PLAN_WORKERS=1``, the search runs in its own process. Workers exit when the search ends,
fails or is interrupted, and on their own when it dies (their pipe closes).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from zoplan.errors import ZoplanError
from zoplan.sim import Exceeded, SimResult, simulate
from zoplan.sim.costs import StepCosts

MAX_WORKERS = 8
MAX_GIVEN_WORKERS = 256  # (each a process and a pipe: thousands ran out of file descriptors)
# a search this much into its simulations forks its workers (forking two from a search of a
# thousand candidates takes ~3 ms, closing them ~2 ms; most searches end well before)
START_AFTER_S = 0.05


def workers_wanted() -> int:
    """How many worker processes a search may use: ``ZOPLAN_PLAN_WORKERS`` if set, else the cores
    this process may run on (at most MAX_WORKERS); 1 runs every simulation in the search's own
    process."""
    given = os.environ.get("ZOPLAN_PLAN_WORKERS", "").strip()
    if given:  # (empty: unset)
        try:
            count = int(given)
        except ValueError:
            count = -1
        if not 0 <= count <= MAX_GIVEN_WORKERS:
            raise ZoplanError(
                f"ZOPLAN_PLAN_WORKERS={given!r} is not a number of worker processes from 0 to {MAX_GIVEN_WORKERS}",
                fix="set it to the cores the planner may use (0 or 1: none besides its own), or unset it",
            )
        return max(1, count)
    if not sys.platform.startswith("linux"):
        return 1
    return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))


@dataclass(frozen=True)
class AtLeast:
    """A simulation stopped once the step was certain to take at least ``limit_s``."""

    limit_s: float


Answer = SimResult | AtLeast


def answers(answer: Answer, limit_s: float | None) -> Answer | None:
    """What ``simulate(costs, limit_s=limit_s)`` gives, from what a simulation of the same inputs
    with another limit found: the result, ``AtLeast(limit_s)`` (it would raise Exceeded), or None
    when that cannot be told (the step is only known to reach less than ``limit_s``)."""
    if isinstance(answer, SimResult):
        if limit_s is not None and answer.step_time_s >= limit_s:
            return AtLeast(limit_s)
        return answer
    if limit_s is not None and answer.limit_s >= limit_s:
        return AtLeast(limit_s)
    return None


def simulate_answer(costs: StepCosts, limit_s: float | None) -> Answer:
    """``simulate(costs, limit_s=limit_s)`` as an answer: the result, or ``AtLeast(limit_s)``
    where it raises Exceeded. The program is released after (a search keeps every candidate's
    costs, but needs a program only while it simulates it)."""
    try:
        return simulate(costs, limit_s=limit_s)
    except Exceeded:
        assert limit_s is not None  # only a limited simulation stops early
        return AtLeast(limit_s)
    finally:
        costs.release_program()


def _serve(conn: Connection, candidates: list[StepCosts], inherited: list[Connection]) -> None:
    """A worker: simulate the candidates asked for until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the search handles Ctrl-C and stops its workers
    for other in inherited:  # the search's ends of the pipes: held here, they would never close
        other.close()
    while True:
        try:
            asked = conn.recv()
        except (EOFError, OSError):
            return
        if asked is None:
            return
        index, limit_s = asked
        reply: object
        try:
            reply = simulate_answer(candidates[index], limit_s)
        except Exception as exc:  # a bug in the simulator: the search raises it where it needs it
            reply = RuntimeError(f"{type(exc).__name__}: {exc}")
        try:
            conn.send((index, reply))
        except OSError:  # the search is gone (killed): nobody to answer, nothing to say
            return


class Workers:
    """Forked simulators of a search's candidates (``candidates[index]``)."""

    def __init__(self, candidates: list[StepCosts], count: int) -> None:
        context = multiprocessing.get_context("fork")
        self.idle: list[Connection] = []
        self.busy: dict[Connection, int] = {}
        self.processes: dict[Connection, multiprocessing.process.BaseProcess] = {}
        try:
            for _ in range(count):
                parent, child = context.Pipe()
                inherited = [parent, *self.processes]
                process = context.Process(target=_serve, args=(child, candidates, inherited), daemon=True)
                process.start()
                child.close()
                self.processes[parent] = process
                self.idle.append(parent)
        except BaseException:
            self.close()
            raise

    def submit(self, index: int, limit_s: float | None) -> None:
        conn = self.idle.pop()
        conn.send((index, limit_s))
        self.busy[conn] = index

    def collect(self) -> list[tuple[int, Answer | Exception]]:
        """Wait for at least one worker to answer; every answer ready, by candidate index."""
        out: list[tuple[int, Answer | Exception]] = []
        for conn in wait(list(self.busy)):
            assert isinstance(conn, Connection)
            index = self.busy.pop(conn)
            try:
                index, reply = conn.recv()
            except (EOFError, OSError):  # killed from outside: the search cannot go on without it
                reply = RuntimeError(f"a simulation worker ended while it simulated candidate {index}")
            else:
                self.idle.append(conn)
            out.append((index, reply))
        return out

    def close(self) -> None:
        """Stop every worker: an idle one exits when its pipe closes, a busy one is not needed."""
        for conn, process in self.processes.items():
            if conn in self.busy:
                process.terminate()
            conn.close()
        for process in self.processes.values():
            process.join()
        self.idle, self.busy, self.processes = [], {}, {}
