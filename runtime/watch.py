"""A run that makes no progress says so: which rank is stuck, and how.

A rank stopped by SIGSTOP (a debugger, a shell's Ctrl-Z sent to it, a container paused), blocked
on a file system that no longer answers, or waiting in a collective for a rank that is, stops
every rank of a ZO step: the others wait for its loss. Nothing fails for the 10 minutes a rank
waits at a collective (runtime/meeting.py), and the progress display just stands still. The launcher watches the
metrics: when no step has finished for ``quiet_s`` (at least ``STALL_NOTE_AFTER_S``, and 20 times
the slowest step so far: an evaluation or a snapshot takes several steps' time), it says what
each of this machine's ranks is doing, from /proc (Linux; elsewhere it says only the time), and
says again when steps go on.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from zoplan.runtime.scratch import rank_processes

# the shortest stillness worth a word, in seconds (ZOPLAN_STALL_NOTE_AFTER_S: a test's)
STALL_NOTE_AFTER_S = 120.0
# a still run is said after this many times its slowest step so far
SLOWEST_STEPS = 20
# how often a node other than node 0 looks at its ranks (stuck_here), in seconds
LOOK_EVERY_S = 5.0


def _stat(pid: int) -> tuple[str, int] | None:
    """A process's state letter (R, S, D, T, ...) and the CPU ticks it has used; None: gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return None


def rank_states(ranks: dict[int, int], before: dict[int, int]) -> list[tuple[str, bool]]:
    """What each rank (rank -> pid) is doing, in words, and whether that holds the step up
    (stopped, blocked, gone), from its state and whether it used CPU since ``before`` (pid -> CPU
    ticks)."""
    said = []
    for rank, pid in sorted(ranks.items()):
        stat = _stat(pid)
        who = f"rank {rank} (pid {pid})"
        if stat is None:
            said.append((f"{who} has exited", True))
            continue
        state, ticks = stat
        if state in ("T", "t"):
            said.append((f"{who} is stopped (SIGSTOP, a debugger: `kill -CONT {pid}` lets it go on)", True))
        elif state == "D":
            said.append((f"{who} waits on a disk or network file system that does not answer", True))
        elif state == "R" or ticks > before.get(pid, ticks):
            said.append((f"{who} is running", False))  # (a rank waiting for another at a meeting spins)
        else:
            said.append((f"{who} is waiting (for another rank, or another node)", False))
    return said


class ProgressWatch:
    """Follows a run's progress (``progressed`` on each row the ranks write) and says when it
    stands still (``check``)."""

    def __init__(self, out: Path, steps: int, nodes: int = 1) -> None:
        # the ranks are found by the run's directory in their command lines and log: whole, with
        # its separator ("run" alone is in every rank's module name, "/x/run1" in "/x/run10")
        self.out, self.steps, self.nodes = str(out.resolve()) + os.sep, steps, nodes
        try:
            self.floor = float(os.environ.get("ZOPLAN_STALL_NOTE_AFTER_S", STALL_NOTE_AFTER_S))
        except ValueError:  # (a test's setting: one that is no number is left out)
            self.floor = STALL_NOTE_AFTER_S
        self.last: float | None = None  # when a row last came (None: before the first step)
        self.slowest = 0.0
        self.noted_at: float | None = None  # when the stillness was said
        self.ticks: dict[int, int] = {}  # the ranks' CPU ticks halfway through a stillness
        self.ticks_of: float | None = None  # the stillness they were taken in (its start)
        self.next_look = 0.0  # stuck_here: when to look at this node's ranks again
        self.stuck_since: float | None = None  # since when a rank of this node is stopped or blocked
        self.stuck_said = False

    def progressed(self, step: int | None = None, step_time_s: float | None = None) -> str | None:
        """A row came: a step's (its number, 0-based, and time), or an evaluation's; after a
        stillness that was said, the words that it has ended. The watch starts with the first
        step (loading and the first evaluation take what they take) and ends with the last (the
        final evaluation and the writing of the model follow it)."""
        now = time.monotonic()
        said = None
        if self.noted_at is not None and self.last is not None:
            said = f"the run goes on again, after {now - self.last:.0f} s without a step"
            self.noted_at = None
        if step is None:
            if self.last is not None:
                self.last = now
            return said
        assert step_time_s is not None
        self.slowest = max(self.slowest, step_time_s)
        self.last = now if step + 1 < self.steps else None
        return said

    def stuck_here(self) -> str | None:
        """On a node other than node 0 (which alone has the metrics): the words for a rank of this
        node stopped or blocked for the shortest stillness worth a word, once a time. Every node's
        step waits for it, and this node's launcher said nothing while node 0 named its own ranks
        as running. Looked at every few seconds."""
        now = time.monotonic()
        if now < self.next_look:
            return None
        self.next_look = now + LOOK_EVERY_S
        stuck = [text for text, held in rank_states(rank_processes(self.out), {}) if held]
        if not stuck:
            self.stuck_since, self.stuck_said = None, False
            return None
        if self.stuck_since is None:
            self.stuck_since = now
        if self.stuck_said or now - self.stuck_since < self.floor:
            return None
        self.stuck_said = True
        return (
            f"warning: on this node {'; '.join(stuck)}, for {now - self.stuck_since:.0f} s: every node's step waits "
            "for it. Ctrl-C stops the run; node 0's journal keeps every completed step"
        )

    def check(self) -> str | None:
        """The words for a run that has stood still for too long, once per stillness (None: it
        moves, or was said)."""
        if self.last is None or self.noted_at is not None:
            return None
        now = time.monotonic()
        quiet_s = max(self.floor, SLOWEST_STEPS * self.slowest)
        if now - self.last < quiet_s / 2:
            return None
        if self.ticks_of != self.last:  # halfway: the ranks' CPU ticks, to tell who computes by the end
            self.ticks_of = self.last
            self.ticks = {pid: stat[1] for pid in rank_processes(self.out).values() if (stat := _stat(pid))}
        if now - self.last < quiet_s:
            return None
        self.noted_at = now
        states = rank_states(rank_processes(self.out), self.ticks)
        stuck_here = any(stuck for _, stuck in states)
        here = (
            (" on this node" if self.nodes > 1 else "")
            + (": " + "; ".join(text for text, _ in states) if states else "")
            + (" (a step waits for every rank)" if stuck_here else "")
            # (the ranks here wait at a collective for one of another node's: say where to look)
            + (
                ", none stuck here: a rank of another node may be (its launcher's output, `ps` there)"
                if self.nodes > 1 and not stuck_here
                else ""
            )
        )
        return (
            f"warning: no step has finished for {now - self.last:.0f} s (the slowest took {self.slowest:.3g} s)"
            f"{here}. Ctrl-C stops the run; the journal keeps every completed step"
        )
