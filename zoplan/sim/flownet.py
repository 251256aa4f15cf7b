"""Bandwidth shared fairly between concurrent transfers, inside a simulation (zoplan.sim.events).

A FIFO resource (``Slots``) serves one user at a time in FIFO order: right for a CUDA stream, wrong for
a PCIe uplink that two GPUs copy through at once (each gets half). Here every transfer (a *flow*)
crosses a set of resources (directed links, a socket's memory bus) and rates are the max-min fair
allocation (progressive filling), recomputed whenever a flow starts or ends. All changes at one
instant are folded into one recomputation. Iteration follows insertion order, so a run is
deterministic.

A step's pipeline starts the same few kinds of transfer over and over, so the same set of routes
is in flight again and again (OPT-175B on l40s-8x: 98% of the recomputations of a search meet a
set seen before in the same simulation). The rates depend only on the routes, in order, and the
capacities, so each set's allocation is kept and reused, to the bit.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

from zoplan.sim.events import Callback, Loop


@dataclass(eq=False, slots=True)
class Flow:
    fid: int
    least: float  # what may be left of it when it counts as done (rounding)
    remaining: float
    links: tuple[int, ...]  # the resources it crosses, by their number (their order in capacity)
    done: Callback  # scheduled when the flow's last byte has arrived
    rate: float = 0.0
    latency_s: float = 0.0
    route: int = 0  # the number the network gives its resources (the key of its allocations)


@dataclass
class FlowNet:
    loop: Loop
    capacity: dict[str, float]  # bytes/s per resource
    record: bool = False
    flows: dict[int, Flow] = field(default_factory=dict)
    samples: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    # by the resources' numbers (lists are quicker than dicts by name in the inner loops):
    # cumulative bytes, capacities
    _moved: list[float] = field(init=False)
    _capacity: list[float] = field(init=False)
    _number: dict[str, int] = field(init=False)
    _last: float = 0.0
    _next_id: int = 0
    _version: int = 0
    _pending: bool = False
    # allocations already made: the routes in flight, in order -> each one's rate
    _routes: dict[tuple[str, ...], int] = field(default_factory=dict)
    _links: list[tuple[int, ...]] = field(default_factory=list)  # each route's resources' numbers
    _solved: dict[tuple[int, ...], tuple[float, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._moved = [0.0] * len(self.capacity)
        self._capacity = list(self.capacity.values())
        self._number = {r: i for i, r in enumerate(self.capacity)}
        for r, c in self.capacity.items():
            if c <= 0:
                raise ValueError(f"resource {r} has no bandwidth")

    def transfer(self, nbytes: float, resources: tuple[str, ...], latency_s: float, done: Callback) -> None:
        """Start moving ``nbytes`` across ``resources``; ``done`` is called (as an entry of the
        loop) ``latency_s`` after the last byte has left (the path's latency, paid once per
        transfer)."""
        if nbytes <= 0 or not resources:
            self.loop.after(latency_s, done)
            return
        if self.loop.now != self._last:
            self._advance()
        route = self._routes.get(resources)
        if route is None:
            route = self._routes[resources] = len(self._routes)
            self._links.append(tuple([self._number[r] for r in resources]))
        size = float(nbytes)
        fid = self._next_id
        self.flows[fid] = Flow(fid, 1e-9 * size + 1e-6, size, self._links[route], done, 0.0, latency_s, route)
        self._next_id = fid + 1
        if not self._pending:  # one recomputation for every change of this instant
            self._pending = True
            self.loop.after(0.0, self._recompute)

    def snapshot(self) -> dict[str, float]:
        """Cumulative bytes per resource up to now."""
        self._advance()
        return dict(zip(self.capacity, self._moved))

    def moved_now(self) -> dict[str, float]:
        """Cumulative bytes per resource up to now, leaving the flows as they are (``snapshot``
        advances them, which splits their arithmetic differently: a simulation that only looks
        must give the same bits as one that does not)."""
        dt = self.loop.now - self._last
        moved = list(self._moved)
        if dt > 0:
            for f in self.flows.values():
                for r in f.links:
                    moved[r] += f.rate * dt
        return dict(zip(self.capacity, moved))

    # ------------------------------------------------------------------------------------
    def _advance(self) -> None:
        now = self.loop.now
        dt = now - self._last
        if dt > 0:
            moved = self._moved
            for f in self.flows.values():
                step = f.rate * dt
                f.remaining -= step
                for r in f.links:
                    moved[r] += step
        self._last = now

    def _wake(self, version: int) -> None:
        """The first flow of an allocation is done, unless a recomputation since has replaced it."""
        if version == self._version:
            self._recompute()

    def _recompute(self) -> None:
        self._pending = False
        self._advance()
        # a flow is done when its bytes are (to rounding), or when what is left would take less
        # than the clock can resolve at this time (now + dt == now would never advance)
        flows, loop = self.flows, self.loop
        resolution = max(abs(loop.now) * 1e-13, 1e-15)
        finished, routes = [], []  # and the routes of the others, in order: the allocation's key
        for f in flows.values():
            if f.remaining <= f.least or (f.rate > 0 and f.remaining / f.rate <= resolution):
                finished.append(f)
            else:
                routes.append(f.route)
        for f in finished:
            del flows[f.fid]
            for r in f.links:  # account the rounding crumbs so byte totals stay exact
                self._moved[r] += f.remaining
            loop.after(f.latency_s, f.done)
        key = tuple(routes)
        rates = self._solved.get(key)
        if rates is None:
            self._fill()
            rates = self._solved[key] = tuple([f.rate for f in flows.values()])
        self._version += 1
        if flows:
            # the rates set, and the time to the first flow's end
            dt = math.inf
            for f, rate in zip(flows.values(), rates):
                f.rate = rate
                if rate > 0 and f.remaining / rate < dt:
                    dt = f.remaining / rate
            loop.after(max(dt, 0.0), functools.partial(self._wake, self._version))
        if self.record:
            self._sample()

    def _fill(self) -> None:
        """Max-min fair rates by progressive filling.

        Each round finds the smallest fair share among the resources still in use and freezes
        every flow crossing a resource at that share (ties together: symmetric layouts, where
        eight GPUs copy at once, then take one round instead of eight)."""
        spare: dict[int, float] = {}
        count: dict[int, int] = {}
        capacity = self._capacity
        for f in self.flows.values():
            for r in f.links:
                if r in count:
                    count[r] += 1
                else:
                    spare[r] = capacity[r]
                    count[r] = 1
        unfrozen = list(self.flows.values())
        while unfrozen:
            best = float("inf")
            for r, c in count.items():
                if c:
                    share = spare[r] / c
                    if share < best:
                        best = share
            limit = best * (1 + 1e-12)
            tight = {r for r, c in count.items() if c and spare[r] / c <= limit}
            rate = best if best > 0 else 0.0
            rest = []
            for f in unfrozen:
                if tight.isdisjoint(f.links):
                    rest.append(f)
                    continue
                f.rate = rate
                for r in f.links:
                    spare[r] -= rate
                    count[r] -= 1
            unfrozen = rest

    def _sample(self) -> None:
        rates: dict[int, float] = {}
        for f in self.flows.values():
            for r in f.links:
                rates[r] = rates.get(r, 0.0) + f.rate
        now = self.loop.now
        for number, name in enumerate(self.capacity):
            series = self.samples.setdefault(name, [])
            value = rates.get(number, 0.0)
            if not series or series[-1][1] != value:
                if series and series[-1][0] == now:
                    series[-1] = (now, value)
                else:
                    series.append((now, value))
