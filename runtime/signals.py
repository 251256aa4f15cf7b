"""The signals that stop a run, and the few ways zoplan's processes hold them back.

Light on purpose (no torch, nothing of the launch): the launcher, the rank supervisor, the rank
server, the ranks and ZOTrainer all import it.
- :data:`STOPPING`: what stops a run (a job scheduler's SIGTERM, Ctrl-C, a closed terminal);
- :func:`deferred`: a block that must run whole (a pass over the parameters, a fork whose callbacks
  would swallow a handler's exception) gets a stop signal once it has ended;
- :func:`signals_held` and :func:`after_fork`: a process that forks a child and records it;
- :func:`die_with_parent`: a child that must not outlive its parent.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator, Sequence

# the signals that stop a run (a job scheduler, Ctrl-C, a closed terminal)
STOPPING = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@contextlib.contextmanager
def deferred(signums: Sequence[int] = STOPPING) -> Iterator[None]:
    """Run the block whole: a signal of ``signums`` that comes meanwhile is raised again when it
    ends, to the handler it was meant for (once per signal). Two blocks need it: a parameter loop
    cut short (an update, a perturbation taken back) leaves some parameters moved and others not,
    weights that no record describes; and a fork runs a handler inside its callbacks, where Python
    drops what the handler raises (a stop lost: the run trained to its end, exit 0). A signal the
    process ignores stays ignored. Signals reach the main thread only; elsewhere nothing is held."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    previous = {}
    for signum in signums:
        if signal.getsignal(signum) not in (signal.SIG_IGN, None):  # (None: set outside Python)
            previous[signum] = signal.signal(signum, lambda signum, frame: came.append(signum))
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
        for signum in dict.fromkeys(came):  # now, to the handlers they were meant for
            signal.raise_signal(signum)


@contextlib.contextmanager
def signals_held(signums: Sequence[int] = STOPPING) -> Iterator[None]:
    """Hold ``signums`` back while a process forks a child and records it. One that arrives
    meanwhile is handled when the hold ends: by the parent once it knows its child (a supervisor
    stopping its ranks), and in the child only after ``after_fork`` (the Python handler a child
    inherits would act for its parent: a rank server's child, its run's supervisor, noted a
    SIGTERM for the server and trained on). Held back in the calling thread: the processes that
    fork so (the rank server, a supervisor) are of one thread, or a signal sent to the process
    would go to another."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signums)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def after_fork(signums: Sequence[int] = STOPPING, keep_ignored: bool = False) -> None:
    """In a child forked within ``signals_held``: ``signums`` back to their default action (one
    the parent ignores stays ignored with ``keep_ignored``), then let through."""
    for signum in signums:
        if not (keep_ignored and signal.getsignal(signum) is signal.SIG_IGN):
            signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signums)


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Have the kernel send this process ``signum`` when its parent dies, however it dies (SIGKILL
    included): torchrun then stops its ranks, and a rank whose torchrun is gone stops, rather than
    training on, orphaned. Linux only (elsewhere nothing happens)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signum))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
