"""CPU ranks of one machine meet through shared memory (NodeMeeting): before each whole block,
and to sum a step's loss scalars where they are all the world. Nobody passes a meeting before
every member has reached it, every member gets the same sums (in member order), a member that
never comes is an error after the timeout, a signal ends a wait, and each start of a run meets in
files of its own."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from zoplan.errors import ZoplanError
from zoplan.runtime import dist as zdist
from zoplan.runtime.meeting import SHARED_MEMORY_MEETINGS, SUM_VALUES, NodeMeeting

from . import meeting_members

pytestmark = pytest.mark.skipif(not SHARED_MEMORY_MEETINGS, reason="shared-memory meetings: x86 only")


@pytest.mark.parametrize("target", [meeting_members.member, meeting_members.summer], ids=["barrier", "sum"])
@pytest.mark.parametrize("members", [2, 3])
def test_no_member_passes_a_meeting_before_every_member_reached_it(tmp_path: Path, members: int, target) -> None:
    (tmp_path / "table").write_bytes(bytes(8 * members))
    ctx = mp.get_context("spawn")
    failures = ctx.Array("i", [-1] * members)
    procs = [ctx.Process(target=target, args=(str(tmp_path), members, k, failures)) for k in range(members)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * members
    assert list(failures) == [0] * members  # -1: a member did not finish; > 0: a stale cell or a wrong sum seen


def test_a_member_that_never_comes_is_an_error_after_the_timeout(tmp_path: Path) -> None:
    barrier = NodeMeeting(tmp_path / "barrier", 2, 0, timeout_s=0.2)
    start = time.perf_counter()
    with pytest.raises(ZoplanError, match="did not come to a meeting"):
        barrier.wait()
    assert 0.2 <= time.perf_counter() - start < 5
    barrier.close()


def test_a_signal_ends_a_wait(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=meeting_members.wait_forever, args=(str(tmp_path),))
    p.start()
    deadline = time.monotonic() + 60
    while not (tmp_path / "barrier").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # in the wait by now
    os.kill(p.pid, signal.SIGTERM)
    p.join(5)
    assert p.exitcode == -signal.SIGTERM


def test_a_meeting_is_refused_more_members_than_its_page_holds_and_more_values_than_it_sums(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        NodeMeeting(tmp_path / "barrier", 2, 2)
    with pytest.raises(ValueError):
        NodeMeeting(tmp_path / "barrier", 10_000, 0)
    alone = NodeMeeting(tmp_path / "alone", 1, 0)
    assert alone.sum([1.5, 2.0]) == [1.5, 2.0]
    with pytest.raises(ValueError):
        alone.sum([0.0] * (SUM_VALUES + 1))
    alone.close()


def _context(device: str, ranks: tuple[int, ...], rank: int = 0, nodes: int = 1) -> zdist.RankContext:
    return zdist.RankContext(
        rank=rank,
        world=len(ranks),
        node=0,
        local_rank=rank,
        device=torch.device(device),
        role="compute",
        signs=(1,),
        replica=0,
        replicas=1,
        mover_index=None,
        movers=len(ranks),
        compute_index=rank,
        computes=len(ranks),
        exchange_ranks=ranks,
        nodes=nodes,
    )


def test_each_start_of_a_run_meets_in_files_of_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for attempt in ("0", "1"):
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", attempt)
        for meet in (
            zdist.exchange_barrier(_context("cpu", (0, 1)), tmp_path),
            zdist.world_sum(_context("cpu", (0, 1)), tmp_path),
        ):
            assert isinstance(meet.__self__, NodeMeeting)
            meet.__self__.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["barrier-0-0", "barrier-1-0", "sum-0-0", "sum-1-0"]


def test_gpu_ranks_lone_ranks_and_the_gloo_switch_meet_through_torch_distributed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for ctx in (_context("cuda", (0, 1)), _context("cpu", (0,))):
        meet = zdist.exchange_barrier(ctx, tmp_path)
        assert not isinstance(getattr(meet, "__self__", None), NodeMeeting)
    # the loss scalars of several machines' ranks: gloo
    assert zdist.world_sum(_context("cpu", (0, 1), nodes=2), tmp_path) is zdist.all_reduce_sum
    assert zdist.world_sum(_context("cuda", (0, 1)), tmp_path) is zdist.all_reduce_sum
    monkeypatch.setenv("ZOPLAN_MEETINGS", "gloo")
    meet = zdist.exchange_barrier(_context("cpu", (0, 1)), tmp_path)
    assert not isinstance(getattr(meet, "__self__", None), NodeMeeting)
    assert zdist.world_sum(_context("cpu", (0, 1)), tmp_path) is zdist.all_reduce_sum
    assert list(tmp_path.iterdir()) == []
