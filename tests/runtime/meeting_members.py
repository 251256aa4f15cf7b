"""The members of test_meetings.py's meetings, each a process of its own (spawned: a fresh
interpreter). This module imports no torch, so a member starts in a fraction of a second."""

from __future__ import annotations

import mmap
import time
from pathlib import Path

from zoplan.runtime.meeting import NodeMeeting

ROUNDS = 300


def member(folder: str, members: int, index: int, failures) -> None:
    """Each round: write the round into this member's cell of a shared table (after a pause that
    differs by member and round), meet, check every cell holds the round, meet again (so nobody
    writes the next round before every member has checked this one)."""
    barrier = NodeMeeting(Path(folder) / "barrier", members, index)
    with open(Path(folder) / "table", "r+b") as f:
        page = mmap.mmap(f.fileno(), 8 * members)
    table = memoryview(page).cast("q")
    bad = 0
    for r in range(1, ROUNDS + 1):
        if (r + index) % 7 == 0:
            time.sleep(0.002 * (1 + index))
        table[index] = r
        barrier.wait()
        bad += int(any(table[k] != r for k in range(members)))
        barrier.wait()
    failures[index] = bad
    table.release()
    page.close()
    barrier.close()


def summer(folder: str, members: int, index: int, failures) -> None:
    """Each round: sum values that differ by member and round (after a pause that differs by
    member and round), between barriers now and then; every sum must be the member-order sum."""
    meeting = NodeMeeting(Path(folder) / "sum", members, index)
    bad = 0
    for r in range(1, ROUNDS + 1):
        if (r + index) % 5 == 0:
            time.sleep(0.001 * (1 + index))
        values = [r + 0.1 * index, -r * 1e-17 * (index + 1), float(index)]
        got = meeting.sum(values)
        expected = [r + 0.0, -r * 1e-17, 0.0]
        for k in range(1, members):
            expected = [e + v for e, v in zip(expected, [r + 0.1 * k, -r * 1e-17 * (k + 1), float(k)])]
        bad += int(got != expected)
        if r % 3 == 0:
            meeting.wait()
    failures[index] = bad
    meeting.close()


def wait_forever(folder: str) -> None:
    NodeMeeting(Path(folder) / "barrier", 2, 1).wait()
