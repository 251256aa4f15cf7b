"""CPU ranks of one machine meeting through a page of shared memory (``NodeMeeting``), without
torch: zoplan.runtime.dist chooses where ranks meet this way and where through collectives.

The meeting is ordered like the gloo collective it replaces only where a plain store is seen
after the stores before it (x86's total store order): elsewhere the ranks meet through gloo."""

from __future__ import annotations

import mmap
import os
import time
from datetime import timedelta
from pathlib import Path

from zoplan.errors import ZoplanError
from zoplan.vocab import Meetings, local_meetings

TIMEOUT = timedelta(minutes=10)  # a rank waits this long for the others (meetings and collectives)

SHARED_MEMORY_MEETINGS = local_meetings() is Meetings.SHARED_MEMORY
SUM_VALUES = 7  # float64 values a meeting can sum
_LINE = 2 * SUM_VALUES + 2  # 8-byte words per member: its count, then two sets of values (two cache lines)
_SPIN_S = 50e-6  # spin this long, then yield the core, then (after _YIELD_S) sleep between looks
_YIELD_S = 2e-3


class NodeMeeting:
    """Meetings of the CPU ranks of one machine through a page of shared memory (a small file):
    each member counts its meetings in its own cache lines and waits until every other member's
    count has reached its own. ``wait`` is a barrier: stores before a meeting (a share of the host
    copy written back) are seen by every member after it, as with the gloo barrier it stands for
    (x86: ``SHARED_MEMORY_MEETINGS``). ``sum`` also adds up a few float64 values over the members,
    in member order (so every member gets the same bits; two members' sum is gloo's all-reduce's):
    each writes its values before its count, in one of two sets by the meeting's parity (a member
    writes a meeting's set only once every other has arrived at the meeting before, having read
    that set two meetings ago).

    A member that never comes is waited for up to ``timeout_s``; the supervisor stops the others
    when a rank dies, and a signal interrupts the wait (it runs in Python). Each start of a run
    (``TORCHELASTIC_RESTART_COUNT``) meets in files of its own, so counts never carry over."""

    def __init__(self, path: Path, members: int, index: int, timeout_s: float = TIMEOUT.total_seconds()) -> None:
        if not 0 <= index < members or members * _LINE * 8 > mmap.PAGESIZE:
            raise ValueError(f"member {index} of {members}: a meeting holds 1 to {mmap.PAGESIZE // (_LINE * 8)}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, mmap.PAGESIZE)  # every member may do it: the same size keeps what is there
            self._map = mmap.mmap(fd, mmap.PAGESIZE)
        finally:
            os.close(fd)
        self._words = memoryview(self._map).cast("q")
        self._floats = memoryview(self._map).cast("d")
        self._mine = index * _LINE
        self._members = [k * _LINE for k in range(members)]
        self._others = [at for at in self._members if at != self._mine]
        self._count = self._words[self._mine]
        self.timeout_s = timeout_s

    def wait(self) -> None:
        self._arrive(self._count + 1)

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the members (every member gives as many, at most ``SUM_VALUES``)."""
        n = len(values)
        if n > SUM_VALUES:
            raise ValueError(f"a meeting sums at most {SUM_VALUES} values, not {n}")
        count = self._count + 1
        values_at = 1 + (count % 2) * SUM_VALUES
        floats = self._floats
        for k, v in enumerate(values):
            floats[self._mine + values_at + k] = v
        self._arrive(count)
        totals = [floats[self._members[0] + values_at + k] for k in range(n)]
        for at in self._members[1:]:
            for k in range(n):
                totals[k] += floats[at + values_at + k]
        return totals

    def _arrive(self, count: int) -> None:
        words = self._words
        self._count = count
        words[self._mine] = count
        start = time.perf_counter()
        for other in self._others:
            looks = 0
            while words[other] < count:
                looks += 1
                if looks % 64:
                    continue
                waited = time.perf_counter() - start
                if waited > self.timeout_s:
                    raise ZoplanError(
                        f"a rank of this machine did not come to a meeting in {self.timeout_s:.0f} s",
                        fix="see the other ranks' errors and logs: one of them stopped or hangs; the "
                        "journal holds every completed step: `zoplan run --resume` on the run's folder continues",
                    )
                if waited > _YIELD_S:
                    time.sleep(50e-6)
                elif waited > _SPIN_S:
                    time.sleep(0)

    def close(self) -> None:
        self._words.release()
        self._floats.release()
        self._map.close()
