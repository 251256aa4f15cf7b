"""The simulator's event loop keeps simpy's order: what the simulations' bits depend on."""

from __future__ import annotations

import pytest

from zoplan.sim.events import AllOf, Event, Loop, Process, Slots


def test_entries_run_by_time_then_in_the_order_they_were_scheduled() -> None:
    loop = Loop()
    seen: list[tuple[float, str]] = []
    for name, delay in (("b", 2.0), ("a", 1.0), ("c", 2.0), ("d", 1.0)):
        loop.after(delay, lambda name=name: seen.append((loop.now, name)))
    loop.run()
    assert seen == [(1.0, "a"), (1.0, "d"), (2.0, "b"), (2.0, "c")]


def test_a_process_starts_before_what_its_instant_had_scheduled() -> None:
    """simpy's urgent priority: a process started during an instant runs before the entries
    already scheduled for it, after the entry that started it."""
    loop = Loop()
    seen: list[str] = []

    def process() -> Process:
        yield
        seen.append("process")

    def starter() -> None:
        loop.call(lambda: seen.append("scheduled after the start"))
        loop.start(process())
        seen.append("starter")

    loop.call(lambda: seen.append("scheduled first"))
    loop.call(starter)
    loop.call(lambda: seen.append("scheduled before the start"))
    loop.run()
    assert seen == ["scheduled first", "starter", "process", "scheduled before the start", "scheduled after the start"]


def test_the_clock_keeps_the_integer_zero_until_a_delay_moves_it() -> None:
    loop = Loop()
    times: list[float] = []
    loop.call(lambda: times.append(loop.now))
    loop.after(0.0, lambda: times.append(loop.now))
    loop.run()
    assert [repr(t) for t in times] == ["0", "0.0"]


def test_a_process_resumes_from_an_event_in_the_order_it_started_waiting() -> None:
    loop = Loop()
    event, seen = Event(), []

    def waiter(name: str) -> Process:
        wake = yield
        event.then(wake)
        yield
        seen.append(name)

    for name in "xyz":
        loop.start(waiter(name))
    loop.after(1.0, event.fire)
    loop.run()
    assert seen == ["x", "y", "z"] and event.callbacks is None


def test_all_of_is_processed_one_entry_after_its_last_event() -> None:
    loop = Loop()
    first, second, seen = Event(), Event(), []
    AllOf(loop, [first, second], lambda: seen.append("all"))
    loop.call(second.fire)
    loop.call(first.fire)
    loop.call(lambda: seen.append("scheduled before the last was processed"))
    loop.run()
    assert seen == ["scheduled before the last was processed", "all"]
    # all of events already processed: scheduled at once
    AllOf(loop, [first, second], lambda: seen.append("again"))
    loop.run()
    assert seen[-1] == "again"


def test_a_released_slot_goes_to_the_longest_waiting_when_the_release_is_processed() -> None:
    loop, seen = Loop(), []
    slots = Slots(loop, 1)
    assert slots.take(lambda: seen.append("never"))  # free: taken at once
    assert not slots.take(lambda: seen.append("first waiting"))
    slots.release()  # free now, handed over once this release is processed (an entry)
    loop.call(lambda: seen.append("scheduled after the release"))
    loop.run()
    assert seen == ["scheduled after the release", "first waiting"]


def test_a_taker_arriving_after_a_release_serves_the_longest_waiting_first() -> None:
    loop, seen = Loop(), []
    slots = Slots(loop, 1)
    assert slots.take(lambda: seen.append("never"))
    assert not slots.take(lambda: seen.append("first waiting"))
    slots.release()
    assert not slots.take(lambda: seen.append("second waiting"))  # the free slot goes to the first
    loop.run()
    assert seen == ["first waiting"]
    slots.release()
    loop.run()
    assert seen == ["first waiting", "second waiting"]


def test_a_failure_stops_the_loop_after_what_its_instant_had_scheduled_before_it() -> None:
    loop, seen = Loop(), []
    loop.call(lambda: seen.append("before"))
    loop.fail(KeyError("stop"))
    loop.call(lambda: seen.append("after"))
    with pytest.raises(KeyError):
        loop.run()
    assert seen == ["before"]
