"""The simulator's event loop: simpy's order of events, without its generality.

A simulation's result depends on the order of what happens at one instant (the float sums of the
flow network, which op takes a free buffer first), and that order is simpy's: a heap of
``(time, priority, counter)``, every scheduling taking the next count, urgent entries (a process's
start) before normal ones at their instant. This loop keeps exactly that order for every entry
whose processing does something, and leaves out the ones whose processing does nothing (a request
granted at once that nobody waits for, a process's end that nobody waits for): only the relative
order of the others matters. It does without simpy's event values, failures and interrupts, and
its processes resume themselves, so an entry costs a fraction of a simpy event.

- An entry is a callable without arguments, scheduled by :meth:`Loop.call` (now),
  :meth:`Loop.after` (after a delay) or :meth:`Loop.first` (now, before the others).
- An :class:`Event` is processed once: its callbacks run in the order they were added, and a
  callback added to a processed event never runs (its ``callbacks`` is then ``None``: whoever
  waits checks that first).
- A process is a generator. Its first ``yield`` receives its own wake-up (its ``__next__``), and
  before each later ``yield`` it arranges for that wake-up to be called: added to an event's
  callbacks, scheduled after a delay, or queued for a :class:`Slots`. :meth:`Loop.start` starts
  one. A process that returns just ends.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Generator, Iterable
from heapq import heappop, heappush

Callback = Callable[[], object]
# a process: it receives its wake-up at its first yield, and yields nothing else
Process = Generator[None, Callback, None]

# urgent entries take their counts from the same counter, less this: before every normal entry of
# their instant, among themselves in the order they were scheduled
_URGENT = 1 << 62


class Loop:
    """The clock and the queue of entries, by (time, count)."""

    __slots__ = ("now", "_queue", "_count")

    def __init__(self) -> None:
        # simpy's clock starts at the integer 0: what happens at the start reads 0, not 0.0
        self.now: float = 0
        self._queue: list[tuple[float, int, Callback]] = []
        self._count = itertools.count()

    def call(self, entry: Callback) -> None:
        """Call ``entry`` at this instant, after what was scheduled for it before (the clock keeps
        its type: simpy schedules an event triggered now with the integer delay 0)."""
        heappush(self._queue, (self.now, next(self._count), entry))

    def after(self, delay: float, entry: Callback) -> None:
        """Call ``entry`` ``delay`` from now, after what was scheduled for that time before."""
        heappush(self._queue, (self.now + delay, next(self._count), entry))

    def first(self, entry: Callback) -> None:
        """Call ``entry`` at this instant, before every entry of it scheduled otherwise (simpy's
        urgent priority: a process starts so)."""
        heappush(self._queue, (self.now, next(self._count) - _URGENT, entry))

    def start(self, process: Process) -> None:
        """Start ``process`` as simpy starts one: now, before the instant's other entries."""
        next(process)  # to its first yield, which takes its wake-up
        self.first(lambda: process.send(process.__next__))

    def fail(self, error: Exception) -> None:
        """Stop the loop with ``error`` once the entries scheduled for now before it are done (a
        simpy process that raises stops the simulation so: when its own event is processed)."""

        def stop() -> None:
            raise error

        self.call(stop)

    def run(self) -> None:
        """Process entries until none is left (or one raises)."""
        queue = self._queue
        while queue:
            self.now, _, entry = heappop(queue)
            try:
                entry()
            except StopIteration:  # a process's last wake-up: it has ended
                pass

    def clear(self) -> None:
        """Drop every entry left (a simulation stopped early leaves some)."""
        self._queue.clear()


class Event:
    """Something to wait for, processed once (:meth:`fire`, as an entry: ``loop.call(e.fire)``)."""

    __slots__ = ("callbacks",)

    def __init__(self) -> None:
        self.callbacks: list[Callback] | None = []

    def then(self, callback: Callback) -> None:
        """Call ``callback`` when this event is processed (it must not have been yet)."""
        callbacks = self.callbacks
        assert callbacks is not None, "the event has been processed"
        callbacks.append(callback)

    def fire(self) -> None:
        callbacks, self.callbacks = self.callbacks, None
        assert callbacks is not None, "an event is processed once"
        for callback in callbacks:
            try:
                callback()
            except StopIteration:  # a process's last wake-up
                pass


class AllOf(Event):
    """Processed after every one of ``events`` (simpy's ``AllOf``), and then calls ``then``:
    scheduled when the last of them is processed, or at once when all already are."""

    __slots__ = ("_loop", "_left")

    def __init__(self, loop: Loop, events: Iterable[Event], then: Callback) -> None:
        self.callbacks = [then]
        self._loop = loop
        left = 0
        for event in events:
            if event.callbacks is not None:
                event.callbacks.append(self._check)
                left += 1
        self._left = left
        if not left:
            loop.call(self.fire)

    def _check(self) -> None:
        self._left -= 1
        if not self._left:
            self._loop.call(self.fire)


class Slots:
    """``capacity`` slots taken in FIFO order (simpy's ``Resource``, to its order).

    As in simpy, a release frees its slot at once but hands it to a waiting taker only when the
    release is processed, an entry of its own; a taker arriving meanwhile serves the longest
    waiting one first, and each of these hands over one slot at most."""

    __slots__ = ("_loop", "_free", "_waiting")

    def __init__(self, loop: Loop, capacity: int) -> None:
        self._loop = loop
        self._free = capacity
        self._waiting: deque[Callback] = deque()

    def take(self, granted: Callback) -> bool:
        """Take a slot now (True: ``granted`` is not called), or queue for one: ``granted`` is
        scheduled when it is handed over."""
        waiting = self._waiting
        if self._free and not waiting:
            self._free -= 1
            return True
        waiting.append(granted)
        self._serve()
        return False

    def release(self) -> None:
        self._free += 1
        self._loop.call(self._serve)

    def _serve(self) -> None:
        if self._waiting and self._free:
            self._free -= 1
            self._loop.call(self._waiting.popleft())
