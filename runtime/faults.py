"""Fault injection, for tests and benchmarks: the one hook through which a run fails on purpose.

The training loop, the snapshot writer and the calibration call :func:`hit` at named points; it
does nothing unless the environment variable ``ZOPLAN_FAULTS`` names a fault for that point,
this rank and this step. A fault is ``POINT:RANK[:STEP]``, several separated by commas:

- ``kill:R:S``: rank R SIGKILLs itself in step S, after its forward passes and before the step is
  journaled; in the first attempt only (a restarted run then goes on); in a calibration (S: 0),
  once it has measured;
- ``exit:R:S``: rank R exits (status 1) in step S, at the same point, without a word: as a rank
  does that cannot write its error (a full disk); in the first attempt only;
- ``raise:R:S``: rank R raises an exception of no kind zoplan expects (a RuntimeError) in step S,
  at the same point, as a bug or a library version zoplan does not support would; in the first
  attempt only;
- ``abort-at-exit:R``: rank R aborts (SIGABRT) after the run is complete on every rank, as a
  rare teardown abort of a collective library does;
- ``fail-snapshot:R:S``: writing the snapshot of step S fails as a full disk does (R: the first
  rank of a node, which writes that node's snapshots; 0 on one machine).

For example ``ZOPLAN_FAULTS=kill:0:4`` (tests/runtime/test_resume.py). The variable is read once
per process.
"""

from __future__ import annotations

import errno
import functools
import os
import signal

POINTS = ("kill", "exit", "raise", "abort-at-exit", "fail-snapshot")


@functools.lru_cache(maxsize=1)
def _faults(spec: str) -> frozenset[tuple[str, int, int | None]]:
    faults = set()
    for item in filter(None, (part.strip() for part in spec.split(","))):
        point, _, rest = item.partition(":")
        rank, _, step = rest.partition(":")
        if point not in POINTS or not rank.isdigit() or (step and not step.isdigit()):
            raise ValueError(f"ZOPLAN_FAULTS: {item!r} is not POINT:RANK[:STEP] with POINT one of {', '.join(POINTS)}")
        faults.add((point, int(rank), int(step) if step else None))
    return frozenset(faults)


def check(spec: str) -> None:
    """ValueError where ``spec`` (a ``ZOPLAN_FAULTS`` value) names no fault as the ranks read them."""
    _faults(spec)


def planned(point: str, rank: int, step: int | None = None) -> bool:
    """Whether ``ZOPLAN_FAULTS`` names this fault (always False without it)."""
    spec = os.environ.get("ZOPLAN_FAULTS")
    return bool(spec) and (point, rank, step) in _faults(spec)


def hit(point: str, rank: int, step: int | None = None) -> None:
    """Fail here if a test asked for it (see the module's description)."""
    if not planned(point, rank, step):
        return
    first = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if point == "kill" and first:
        os.kill(os.getpid(), signal.SIGKILL)
    elif point == "exit" and first:
        os._exit(1)
    elif point == "raise" and first:
        raise RuntimeError(f"an injected failure of rank {rank} (ZOPLAN_FAULTS)")
    elif point == "abort-at-exit":
        os.abort()
    elif point == "fail-snapshot":
        raise OSError(errno.ENOSPC, "No space left on device (injected)")
