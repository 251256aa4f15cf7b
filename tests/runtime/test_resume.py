"""No completed step is lost: resume, a torn journal line, a failed snapshot.

Runs use 2 gloo ranks (a 2x1 plan with sliced uploads) and compare final weights bit for bit
with an uninterrupted run of the same plan: the journal and the snapshots carry everything a
step depends on (seeds and data order are functions of the step).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zoplan.runtime.rankserver import SERVER_ENV
from zoplan.runtime.scratch import OWNER, processes_naming, rank_processes, shared_memory, supervisor_process

STEPS = 8


def zoplan_run(out: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "zoplan.cli",
        "run",
        "--model",
        "tiny-opt",
        "--pertp",
        "2",
        "--ddp",
        "1",
        "--upload",
        "sliced",
        "--slices",
        "2",
        "--lr",
        "1e-3",
        "--snapshot-every",
        "3",
        *extra,
    ]
    if "--resume" not in extra:
        cmd += ["-o", str(out)]
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1", **(env or {})),
    )


def finished(proc: subprocess.Popen, code: int = 0) -> str:
    """The run's output, stdout (progress, summary) then stderr (errors)."""
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == code, out + err
    return out + err


def scratch_folders() -> set[Path]:
    """Every launch's folders outside its output: host copies in shared memory, private temporary
    directories (torchrun's log folders included) in the temporary directory."""
    import tempfile

    return {
        p
        for base in (shared_memory(), Path(tempfile.gettempdir()))
        for pattern in ("zoplan-*", "torchelastic_*")
        for p in base.glob(pattern)
    }


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The output of an uninterrupted run of STEPS steps (copy it to change it)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    finished(zoplan_run(out, "--steps", str(STEPS)))
    assert [p.name for p in sorted((out / "snapshots").iterdir())] == ["step-00000003", "step-00000006"]
    return out


@pytest.fixture(scope="module")
def uninterrupted(straight: Path) -> dict[str, torch.Tensor]:
    return weights(straight)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_a_torn_journal_line_is_bit_identical(uninterrupted, tmp_path: Path) -> None:
    out = tmp_path / "run"
    finished(zoplan_run(out, "--steps", "5"))
    with (out / "journal.jsonl").open("a") as f:
        f.write('{"step": 5, "seed": 12')  # power loss mid-write
    # resumed with nothing but the run's total: the run's own settings (run.json) carry on, so
    # the snapshot of step 6 is written as --snapshot-every 3 asked when the run started
    bare = [sys.executable, "-m", "zoplan.cli", "run", "--resume", str(out), "--steps", str(STEPS)]
    finished(
        subprocess.Popen(
            bare, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1")
        )
    )
    lines = (out / "journal.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == list(range(STEPS))
    assert [p.name for p in sorted((out / "snapshots").iterdir())] == ["step-00000003", "step-00000006"]
    assert json.loads((out / "run.json").read_text())["steps"] == STEPS
    assert same(weights(out), uninterrupted)


def test_a_metrics_row_cut_short_is_removed_and_said_and_the_resume_shows_its_line(tmp_path: Path) -> None:
    """A run stopped (a full disk) while it wrote step 5's row of metrics.jsonl: the resume's
    "resuming with ..." line was missing from its display (its first bytes were counted as the
    old file's), and the next row was joined to the cut one. Now the cut row is removed, and said."""
    out = tmp_path / "run"
    finished(zoplan_run(out, "--steps", "5", "--eval-every", "0"))
    metrics = out / "metrics.jsonl"
    raw = metrics.read_bytes()
    assert raw.endswith(b"\n") and b'{"step": 4, "loss"' in raw
    metrics.write_bytes(raw[: raw.rindex(b'{"step": 4, "loss"') + 25])  # step 5's row, cut
    said = finished(zoplan_run(out, "--resume", str(out), "--steps", "7"))
    assert "resuming with 5 step(s) done" in said, said
    assert "the last row of" in said and "about step 5, was cut short" in said, said
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]  # every line whole
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [0, 1, 2, 3, 5, 6], steps
    assert [r["resumed_at"] for r in rows if "resumed_at" in r] == [5]


@pytest.mark.parametrize("locked", ["metrics.jsonl", "worker-node0.log", "snapshots"])
def test_a_resume_this_user_cannot_write_is_refused_before_it_changes_anything(
    straight: Path, tmp_path: Path, monkeypatch, locked: str
) -> None:
    """Another user resuming a run (or one whose file was made read-only) failed in its ranks
    with "a rank exited without a message", after the resume had moved the finished model/ aside
    and rewritten run.json. Now it is refused first, with what it cannot write. (As root every file
    is writable: the permission is what os.access says here.)"""
    import shutil

    from zoplan.errors import ZoplanError
    from zoplan.runtime import launch

    out = tmp_path / "run"
    shutil.copytree(straight, out)
    files = lambda: {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and not p.name.startswith(".lock")}  # noqa: E731
    before = files()
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path).name != locked and real(path, mode, **kw))
    cfg, _ = launch.resume_config(out, {"steps": STEPS + 2})
    with pytest.raises(ZoplanError, match=f"cannot resume the run in .*cannot write {locked} "):
        launch.run(cfg, resume=True)
    assert files() == before  # model/ where it was, run.json as it was
    monkeypatch.undo()
    assert launch._unwritable(out, 0) == []


def test_a_rank_that_stops_without_a_word_on_a_full_disk_is_said_to_be_the_disk(tmp_path: Path, monkeypatch) -> None:
    """A disk too full for a rank to write its error (or the supervisor its log) said "a rank
    exited without a message", with an empty log and a fix about --max-restarts."""
    from zoplan.errors import ZoplanError
    from zoplan.runconfig import make
    from zoplan.runtime import launch

    monkeypatch.setenv("ZOPLAN_FAULTS", "exit:1:1")  # rank 1 exits in step 1, without a word
    for free, said in ((10 << 30, "a rank exited without a message"), (200 << 10, "is full (200 KiB free")):
        monkeypatch.setattr(launch, "_free_bytes", lambda path: free)
        out = tmp_path / f"free-{free}"
        with pytest.raises(ZoplanError) as stopped:
            launch.run(make(model="tiny-opt", output=out, steps=3, quiet=True))
        assert said in stopped.value.message, stopped.value.message
        assert re.search(
            r"the journal holds [12] completed step\(s\)", stopped.value.message
        )  # (rank 0's step 1 may end)
        assert ("free disk space, then continue" in stopped.value.fix) == (free < launch.NEARLY_FULL_BYTES)


def test_a_rank_that_raises_is_said_with_its_exception_and_a_restart_goes_on(tmp_path: Path) -> None:
    """A rank that raised what zoplan does not expect (a bug, or a library version it does not
    support: transformers 4.40's OPT refused position_ids) was "a rank exited without a message",
    the exception only in the log. The message names it now, and the versions to report; such a
    failure is still restarted with --max-restarts."""
    out = tmp_path / "run"
    err = finished(zoplan_run(out, "--steps", "3", env={"ZOPLAN_FAULTS": "raise:1:1"}), code=2)
    assert "a rank failed with RuntimeError: an injected failure of rank 1 (ZOPLAN_FAULTS)" in err, err
    assert "without a message" not in err and "Traceback" not in err, err
    assert re.search(r"not support \(python [\d.]+, torch [^,]+, transformers [^)]+\)", err), err
    assert "--max-restarts N restarts crashed ranks" in err, err

    again = tmp_path / "again"
    said = finished(zoplan_run(again, "--steps", "3", "--max-restarts", "1", env={"ZOPLAN_FAULTS": "raise:1:1"}))
    assert "every rank was restarted (restart 1 of 1)" in said, said
    assert len((again / "journal.jsonl").read_text().splitlines()) == 3


def test_the_failure_said_is_the_first_rank_s_not_its_peers_that_lost_it() -> None:
    """The rank that raised first is named: the others then fail in their collectives, later in
    the log (with Python 3.10 and torch 2.1 the message named rank 0's "Connection closed by peer"
    instead of rank 1's own exception). torchrun's line prefixes are read through."""
    from zoplan.runtime.launch import _raised

    log = (
        'rank 1: compute on cpu\nTraceback (most recent call last):\n  File "w.py", line 1, in <module>\n'
        'RuntimeError: the first failure\nTraceback (most recent call last):\n  File "w.py", line 2\n'
        "RuntimeError: [gloo] Connection closed by peer\n"
    )
    assert _raised(log) == "RuntimeError: the first failure"
    assert _raised(
        "[rank0]: Traceback (most recent call last):\n[rank0]: torch.distributed.DistBackendError: boom"
    ) == ("torch.distributed.DistBackendError: boom")
    assert _raised("rank 0: no traceback here\nValueError: said, but not raised") is None


def test_a_failed_snapshot_stops_the_run_and_keeps_the_last_good_one(tmp_path: Path) -> None:
    out = tmp_path / "run"
    err = finished(zoplan_run(out, "--steps", str(STEPS), env={"ZOPLAN_FAULTS": "fail-snapshot:0:6"}), code=2)
    assert "writing the snapshot of step 6 failed" in err and "step-00000003" in err and "Traceback" not in err
    assert [p.name for p in (out / "snapshots").iterdir()] == ["step-00000003"]
    assert len((out / "journal.jsonl").read_text().splitlines()) == 6
    load_file(str(out / "snapshots" / "step-00000003" / "model.safetensors"))  # intact and loadable
    assert json.loads((out / "error.json").read_text())["kind"] == "disk"  # a full disk, as docs/runtime.md says
    # a run that has trained keeps its lock (docs/runtime.md: it stays once a run has started; a
    # run stopped so removed it, as a run refused before its first step does)
    assert (out / ".lock-node0").is_file()


def test_a_rank_killed_mid_step_is_restarted_and_no_step_is_lost(uninterrupted, tmp_path: Path) -> None:
    # rank 0 (the journal writer) dies by SIGKILL in step 4, after the snapshot of step 3; the
    # restarted run loads that snapshot, which the one of step 6 then replaces (--keep-snapshots 1)
    out = tmp_path / "run"
    said = finished(
        zoplan_run(
            out,
            "--steps",
            str(STEPS),
            "--max-restarts",
            "1",
            "--keep-snapshots",
            "1",
            env={"ZOPLAN_FAULTS": "kill:0:4"},
        )
    )
    assert [p.name for p in (out / "snapshots").iterdir()] == ["step-00000006"]
    assert "exitcode: -9" in (out / "worker-node0.log").read_text()  # the kill did happen
    # the user is told: steps 0-3 were journaled; the snapshot of step 3 plus step 3's line
    assert (
        "every rank was restarted (restart 1 of 1), resuming with 4 step(s) done: snapshot "
        "step-00000003 + 1 journal step(s) replayed, no completed step lost"
    ) in said, said
    resumed = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "resumed_at" in l]
    assert resumed == [{"resumed_at": 4, "snapshot": "step-00000003", "replayed": 1, "restart": 1}]
    lines = (out / "journal.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == list(range(STEPS))
    assert same(weights(out), uninterrupted)


def test_without_restarts_a_killed_rank_stops_the_run_with_a_resume_hint(uninterrupted, tmp_path: Path) -> None:
    out = tmp_path / "run"
    err = finished(zoplan_run(out, "--steps", str(STEPS), env={"ZOPLAN_FAULTS": "kill:1:5"}), code=2)
    done = len((out / "journal.jsonl").read_text().splitlines())
    assert done in (5, 6)  # step 5 is complete on rank 0 if it journaled before it was stopped
    assert f"journal holds {done} completed step(s)" in err and "--resume" in err and "Traceback" not in err
    assert "a rank was killed by SIGKILL, most often by the kernel's out-of-memory killer" in err  # named
    said = finished(zoplan_run(out, "--resume", str(out), "--steps", str(STEPS)))
    assert f"resuming with {done} step(s) done: snapshot step-00000003 + {done - 3} journal step(s) replayed" in said
    assert "restarted" not in said
    assert same(weights(out), uninterrupted)


def test_a_rank_aborting_after_the_run_finished_is_not_a_failure(uninterrupted, tmp_path: Path) -> None:
    # rank 1 aborts (SIGABRT) after the final barrier, like a rare gloo teardown abort: the run is
    # complete on every rank, so zoplan run succeeds with a warning
    out = tmp_path / "run"
    err = finished(zoplan_run(out, "--steps", str(STEPS), env={"ZOPLAN_FAULTS": "abort-at-exit:1"}))
    assert "while shutting down, after the run had finished on every rank" in err
    assert "exitcode: -6" in (out / "worker-node0.log").read_text()  # the abort did happen
    assert same(weights(out), uninterrupted)
    # a resume asking for more steps does not count the earlier run's markers as its own
    err = finished(
        zoplan_run(out, "--resume", str(out), "--steps", str(STEPS + 1), env={"ZOPLAN_FAULTS": "kill:1:8"}), code=2
    )
    assert "journal holds" in err and "--resume" in err


def test_a_killed_loader_leaves_no_host_copy_behind(tmp_path: Path) -> None:
    """The rank that made the machine's host copy dies by SIGKILL (its own cleanup never runs):
    zoplan run still removes the copy from shared memory."""
    before = scratch_folders()
    err = finished(zoplan_run(tmp_path / "run", "--steps", "3", env={"ZOPLAN_FAULTS": "kill:0:1"}), code=2)
    assert "journal holds 1 completed step(s)" in err
    assert scratch_folders() <= before  # (other jobs on the machine may end meanwhile)


def started_by(served: bool, monkeypatch: pytest.MonkeyPatch, unreachable: Path | None = None) -> None:
    """The run's supervisor is forked by the session's rank server (tests/runtime/conftest.py),
    or started by the launcher itself, as a user's run does by default; with ``unreachable``,
    because the rank server its environment names is not there (it warns and goes on)."""
    assert (SERVER_ENV in os.environ) is True  # the session's server
    if not served and unreachable is not None:
        monkeypatch.setenv(SERVER_ENV, str(unreachable))
    elif not served:
        monkeypatch.delenv(SERVER_ENV)


def wait_for_a_step(out: Path, proc: subprocess.Popen) -> None:
    import time

    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "journal.jsonl").exists() and (out / "journal.jsonl").read_text().count("\n") >= 1:
            return
        time.sleep(0.2)
    raise AssertionError("the run did not complete a step")


def gone(text: str, seconds: float = 30) -> bool:
    import time

    deadline = time.monotonic() + seconds
    while processes_naming(text):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_stops_the_ranks_and_says_how_to_resume(tmp_path: Path) -> None:
    """`kill PID` of zoplan run (what a job scheduler sends): the ranks stop with it, the
    host copy leaves shared memory, and the message names the step and the resume command."""
    import signal

    out = tmp_path / "run"
    before = scratch_folders()
    proc = zoplan_run(out, "--steps", "500")
    wait_for_a_step(out, proc)
    # while it trains, the run directory is its own: a second start on it is refused
    err = finished(zoplan_run(out, "--resume", str(out), "--steps", "500"), code=2)
    assert f"{out} is in use by another zoplan run (pid {proc.pid})" in err
    proc.send_signal(signal.SIGTERM)
    err = finished(proc, code=128 + signal.SIGTERM)
    assert "stopped by SIGTERM after" in err and f"zoplan run --resume {out} --steps 500" in err
    assert gone(str(out)), processes_naming(str(out))
    assert scratch_folders() <= before  # (other jobs on the machine may end meanwhile)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_new_run_stopped_before_its_first_step_keeps_nothing(tmp_path: Path) -> None:
    """SIGTERM while the ranks load: the directory held run.json and plan.yaml, the same command
    was refused ("not empty") and the fix resumed a run of no step. Nothing is kept now, and the
    same command starts the run."""
    import signal
    import time

    out = tmp_path / "run"
    before = scratch_folders()
    proc = zoplan_run(out, "--steps", "500")
    deadline = time.monotonic() + 120
    while not (out / "run.json").exists() and time.monotonic() < deadline:  # written before any rank starts
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    err = finished(proc, code=128 + signal.SIGTERM)
    assert "stopped by SIGTERM before the first step; nothing was trained" in err and "--resume" not in err, err
    assert not out.exists() and gone(str(out)), processes_naming(str(out))
    assert scratch_folders() <= before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("served", [True, False], ids=["rank-server", "own-supervisor"])
def test_the_ranks_die_with_a_killed_launcher(tmp_path: Path, served: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL of zoplan run (no handler runs): the kernel stops the rank supervisor, which stops the ranks; the
    run directory is free again, and the next launch removes the folders the killed one left."""
    started_by(served, monkeypatch)
    import os
    import signal
    import time

    out = tmp_path / "run"
    before = scratch_folders()
    proc = zoplan_run(out, "--steps", "500")
    wait_for_a_step(out, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert gone(str(out)), processes_naming(str(out))
    left = scratch_folders() - before
    assert {p.name.split("-")[1] == "tmp" for p in left} == {True, False}, left  # host copy and temp folder
    then = time.time() - 60  # old enough for a sweep to judge (runtime/scratch.py MIN_AGE_S)
    for folder in left:
        os.utime(folder / OWNER, (then, then))
    done = (out / "journal.jsonl").read_bytes().count(b"\n")
    monkeypatch.undo()  # the session's server again, if it was left out: what is checked now is the sweep
    finished(zoplan_run(out, "--resume", str(out), "--steps", str(done + 1)))
    assert not scratch_folders() - before  # the killed launch's removed, none new left


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("served", [True, False], ids=["rank-server", "own-supervisor"])
def test_the_ranks_die_with_a_killed_rank_supervisor(
    tmp_path: Path, served: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL of the process that started the ranks (runtime/ranks.py): its ranks stop too, and
    zoplan run reports the stop."""
    started_by(served, monkeypatch, unreachable=tmp_path / "gone.sock")
    import signal
    import time

    out = tmp_path / "run"
    proc = zoplan_run(out, "--steps", "500")
    wait_for_a_step(out, proc)
    supervisor = supervisor_process(str(out))
    ranks = rank_processes(str(out))  # named zoplan-rank<N>, children of the supervisor
    assert supervisor is not None and sorted(ranks) == [0, 1]
    assert {int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) for pid in ranks.values()} == {
        supervisor
    }
    os.kill(supervisor, signal.SIGKILL)
    err = finished(proc, code=2)
    if not served:  # the launcher said why it started the supervisor itself
        assert f"warning: {SERVER_ENV}={tmp_path / 'gone.sock'}" in err and "starting the ranks without it" in err
    assert (
        "--resume" in err
        and "the rank supervisor (zoplan.runtime.ranks) (which stopped the ranks) was killed by SIGKILL" in err
    )
    time.sleep(0.1)
    assert gone(str(out)), processes_naming(str(out))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_run_that_stands_still_says_which_rank_holds_it_up_and_when_it_goes_on(tmp_path: Path) -> None:
    """A rank stopped by SIGSTOP (a debugger, a paused container) or blocked on a file system
    held every rank up, and the run stood still without a word (for the 10 minutes a rank waits
    at a collective). The launcher says which rank, and how to let it go on."""
    import signal
    import time

    out, log = tmp_path / "run", tmp_path / "stderr.txt"
    cmd = [sys.executable, "-m", "zoplan.cli", "run", "--model", "tiny-opt", "--steps", "100000", "-o", str(out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", ZOPLAN_STALL_NOTE_AFTER_S="2")
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True, env=env)
    ranks: dict[int, int] = {}
    try:
        wait_for_a_step(out, proc)
        ranks = rank_processes(str(out))
        os.kill(ranks[1], signal.SIGSTOP)

        def said(words: str) -> str:
            deadline = time.monotonic() + 60
            while words not in log.read_text():
                assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
                time.sleep(0.2)
            return log.read_text()

        text = said("no step has finished for")
        assert f"rank 1 (pid {ranks[1]}) is stopped" in text and f"`kill -CONT {ranks[1]}` lets it go on" in text
        assert f"rank 0 (pid {ranks[0]}) is" in text and "(a step waits for every rank)" in text
        assert text.count("no step has finished") == 1  # once a stillness
        os.kill(ranks[1], signal.SIGCONT)
        assert "the run goes on again, after" in said("goes on again")
    finally:
        with contextlib.suppress(ProcessLookupError, KeyError):
            os.kill(ranks[1], signal.SIGCONT)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    assert proc.returncode == 130 and gone(str(out))


def test_a_journal_cut_back_past_a_snapshot_is_retrained_and_a_failed_resume_is_not_taken_for_finished(
    straight: Path, uninterrupted, tmp_path: Path
) -> None:
    """A finished run whose journal is cut back (as the refusal of a damaged line advises: keep
    the good lines) to before its last snapshot: the resume drops that snapshot (the journal no
    longer holds the steps that made it) and takes the steps again. The first run's marks of a
    finished run do not speak for the resume: failing at the same --steps, it fails (exit 2), and
    a resume after that ends bit-identical to an uninterrupted run."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(straight, out)  # a finished run (its marks of one included)
    journal = out / "journal.jsonl"
    journal.write_text("".join(journal.read_text().splitlines(keepends=True)[:4]))
    resume = ("--resume", str(out), "--steps", str(STEPS))
    err = finished(zoplan_run(out, *resume, env={"ZOPLAN_FAULTS": "fail-snapshot:0:6"}), code=2)
    assert "snapshot step-00000006 removed: the journal ends at step 4" in err, err
    assert "writing the snapshot of step 6 failed" in err and "free disk space" in err, err
    assert [p.name for p in sorted((out / "snapshots").iterdir())] == ["step-00000003"]
    finished(zoplan_run(out, *resume))
    assert [json.loads(line)["step"] for line in journal.read_text().splitlines()] == list(range(STEPS))
    assert same(weights(out), uninterrupted)


def test_a_resume_from_other_weights_than_the_run_started_from_is_refused(tiny_dirs, tmp_path, monkeypatch) -> None:
    """run.json records a fingerprint of the weights a run starts from: a checkpoint replaced since
    (same shape, other values) is refused on resume, before any rank starts; the same weights,
    copied anew, are not."""
    import shutil

    from safetensors.torch import save_file

    from zoplan.errors import ZoplanError
    from zoplan.runtime import launch

    monkeypatch.setattr(launch, "check_model_dir", lambda model_dir: None)  # (the run's own check: seconds)
    base = tmp_path / "base"
    shutil.copytree(tiny_dirs["tiny-opt"], base)
    out = tmp_path / "run"
    cfg, _ = launch.configure({"model": str(base), "output": out, "steps": 2})
    launch.prepare(cfg)  # what a run writes before its ranks start: run.json among it
    assert len(json.loads((out / "run.json").read_text())["model_weights"]) == 32
    weights = base / "model.safetensors"
    shutil.copyfile(weights, tmp_path / "copy")
    shutil.copyfile(tmp_path / "copy", weights)  # the same weights written anew: a new file, new times
    launch.prepare(launch.configure({"steps": 3}, resume=out)[0], resume=True)
    tensors = load_file(str(weights))
    name = sorted(tensors)[-1]
    tensors[name] = tensors[name] + 1.0  # another checkpoint of the same shape
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(ZoplanError, match="are not the ones the run in"):
        launch.prepare(launch.configure({"steps": 3}, resume=out)[0], resume=True)


def test_a_node_other_than_0_points_to_node_0s_journal() -> None:
    """Rank 0 writes the journal, in node 0's output directory: another node's messages about a
    stopped run say so instead of counting the steps of a journal it does not have (0)."""
    from zoplan.runconfig import make
    from zoplan.runtime.launch import _the_journal

    assert _the_journal(make()) == "the journal"
    assert _the_journal(make(nnodes=2, node_rank=1, master_port=29500)).startswith("node 0's journal")


def test_a_start_with_no_step_left_still_evaluates_the_final_weights(tmp_path: Path) -> None:
    """A restart or resume after the last step's journal line trains nothing: the evaluation after
    the last step, which the earlier start did not make (here: --eval-every 0), is made then, and
    the closing line reports it (it reported an earlier evaluation, or none)."""
    out = tmp_path / "run"
    finished(zoplan_run(out, "--steps", "2", "--eval-every", "0"))
    assert "eval_loss" not in (out / "metrics.jsonl").read_text()
    said = finished(zoplan_run(out, "--resume", str(out), "--steps", "2", "--eval-every", "5"))
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line]
    assert [e["step"] for e in evals] == [1] and f"held-out: loss {evals[0]['eval_loss']:.4f}" in said, said


def test_a_restart_before_the_first_step_is_said_and_recorded(tmp_path: Path) -> None:
    """Rank 0 killed in step 0 and every rank restarted: the display and metrics.jsonl say so
    (a start that picked up at step 0 wrote no resumed_at row, as if nothing had happened)."""
    out = tmp_path / "run"
    said = finished(
        zoplan_run(out, "--steps", "1", "--max-restarts", "1", "--eval-every", "0", env={"ZOPLAN_FAULTS": "kill:0:0"})
    )
    assert "every rank was restarted (restart 1 of 1), resuming with 0 step(s) done" in said, said
    resumed = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "resumed_at" in l]
    assert resumed == [{"resumed_at": 0, "replayed": 0, "restart": 1}]


def test_a_restarted_attempt_of_a_run_that_stopped_itself_stops_at_once(tmp_path: Path, monkeypatch) -> None:
    """torchrun (runs of several machines) restarts any failed attempt: a rank's own stop (losses
    not finite --max-nonfinite steps in a row, a full disk), which the rank supervisor of one
    machine never restarts, was trained again from its count of 0, and a run of nothing but
    skipped steps ended with exit 0 and the base weights (two torchrun 'machines', lr 1e30,
    --max-restarts 1: exit 0 on both, 2026-12-06). A restart whose launch has a rank's error on
    record now stops at once, before it loads anything, and torchrun's restarts run out."""
    from zoplan import records
    from zoplan.records import RankError
    from zoplan.runtime import worker
    from zoplan.runtime.ranks import STOPPED

    monkeypatch.setattr("zoplan.runtime.launch.die_with_parent", lambda signum: None)  # (not this test's process)
    monkeypatch.setattr(worker.runconfig, "read", lambda path: path)

    def train(cfg, out, host_dir):
        raise RuntimeError(f"trains {cfg}")

    monkeypatch.setattr(worker, "train", train)
    args = [str(tmp_path / "run.json"), "--host-dir", str(tmp_path / "host")]
    records.write_error(tmp_path, RankError(rank=0, kind="error", message="losses not finite", fix=None))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    with pytest.raises(SystemExit) as stopped:
        worker.main(args)
    assert stopped.value.code == STOPPED
    # the first attempt (the launcher removes the error of the launch before), or a restart after
    # a crash (no rank's error on record), trains
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    with pytest.raises(RuntimeError, match="trains .*run.json"):
        worker.main(args)
    (tmp_path / records.ERROR_FILE).unlink()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    with pytest.raises(RuntimeError, match="trains .*run.json"):
        worker.main(args)


def test_the_signal_that_ended_a_rank_is_named_not_the_supervisors_sigterm(tmp_path: Path) -> None:
    """A rank ended by SIGBUS (its checkpoint's pages replaced under it) read "a rank exited
    without a message": the supervisor's record names the signal. The SIGTERM with which the
    supervisor stops the other ranks is not what ended the run."""
    import json
    import signal

    from zoplan.runtime.launch import _rank_signal

    status, log = tmp_path / "ranks.json", tmp_path / "worker.log"
    log.write_text("")
    for exits, ended in (
        ({"0": -signal.SIGBUS, "1": -signal.SIGTERM}, signal.SIGBUS),
        ({"0": -signal.SIGBUS, "1": -signal.SIGKILL}, signal.SIGKILL),
        ({"0": 1, "1": -signal.SIGTERM}, None),  # an error exit, the other stopped
        ({"0": 0, "1": 0}, None),
    ):
        status.write_text(json.dumps({"attempts": [{"exits": exits}]}))
        assert _rank_signal(log, status) == ended, exits
    status.unlink()
    log.write_text("... exitcode  : -9 (pid: 12)\n")  # torchrun's summary, several machines
    assert _rank_signal(log, status) == signal.SIGKILL
    # the log is appended to by every launch of the run: an earlier launch's kill is not this one's
    since = log.stat().st_size
    with log.open("a") as f:
        f.write("... exitcode  : 1 (pid: 13)\n")
    assert _rank_signal(log, status, since) is None


def test_an_output_directory_removed_mid_run_is_said_so(tmp_path: Path) -> None:
    """`rm -rf OUT` while the ranks train: they write on into a folder they recreate, and the
    launcher then said "plan file OUT/plan.yaml does not exist; fix: make one with zoplan plan".
    It says the folder went, and to start again."""
    import shutil

    out = tmp_path / "run"
    proc = zoplan_run(out, "--steps", "150")
    wait_for_a_step(out, proc)
    shutil.rmtree(out, ignore_errors=True)
    said = finished(proc, code=2)
    assert f"the output directory {out} was removed or emptied while the run went on" in said, said
    assert f"remove {out} and start the run again" in said and "zoplan plan" not in said


def test_a_run_whose_launcher_ignores_sigint_is_not_stopped_by_it(tmp_path: Path) -> None:
    """A script's background job ignores Ctrl-C (bash sets SIGINT to SIG_IGN), and so did zoplan
    run; its rank supervisor and ranks did not, so Ctrl-C to the script's group stopped the ranks
    and the launcher read it as a crash ("a rank exited without a message"). An ignored signal is
    ignored by the whole run: it goes on and finishes."""
    import signal
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "zoplan.cli", "run", "--model", "tiny-opt", "--steps", "60", "-o", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # its own supervisor (not the session's rank server's), in the group the signal reaches
        env={k: v for k, v in dict(os.environ, HF_HUB_OFFLINE="1").items() if k != "ZOPLAN_RANK_SERVER"},
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    wait_for_a_step(out, proc)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C to the whole group
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    said = finished(proc)
    assert (out / "journal.jsonl").read_text().count("\n") == 60, said
