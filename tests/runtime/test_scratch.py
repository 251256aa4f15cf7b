"""A launch's folders outside its output go with it; a dead launch's are swept; a run directory is
locked while a run uses it."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zoplan.errors import Refused, ZoplanError
from zoplan.runtime.scratch import (
    MIN_AGE_S,
    OWNER,
    abandoned,
    before_measuring,
    live_launches,
    measured_beside,
    others_busy_cores,
    owned,
    run_lock,
    sizes,
    sweep,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="flock and /proc: Linux")


def age(folder: Path, seconds: float = MIN_AGE_S + 5) -> None:
    """As if the folder had been made ``seconds`` ago."""
    then = time.time() - seconds
    os.utime(folder / OWNER, (then, then))


# another launch, as far as its folders tell: it holds ``base/zoplan-<name>`` until its stdin closes
HOLD = (
    "import sys; from pathlib import Path; from zoplan.runtime.scratch import owned\n"
    "with owned(Path(sys.argv[1]), sys.argv[2]):\n"
    "    print('held', flush=True); sys.stdin.read()\n"
)


@contextlib.contextmanager
def another_launch(base: Path, name: str):
    """A process holding a launch's folder ``zoplan-<name>`` in ``base`` while the block runs; its pid."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(base), name], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        yield proc.pid
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=60)


def test_an_owned_folder_is_removed_when_its_block_ends_however_it_ends(tmp_path: Path) -> None:
    with owned(tmp_path, "a") as folder:
        (folder / "data.bin").write_bytes(b"x" * 100)
        assert folder.name == "zoplan-a" and folder.is_dir()
    assert not folder.exists()
    with pytest.raises(RuntimeError), owned(tmp_path, "b") as folder:
        raise RuntimeError("a failure inside")
    assert not folder.exists()


def test_a_live_owners_folder_is_kept_and_a_dead_owners_swept(tmp_path: Path) -> None:
    with owned(tmp_path, "live") as live:
        age(live)
        assert sweep(tmp_path) == [] and live.exists()  # locked: in use
        assert not abandoned(live)
    # a launch killed with SIGKILL: its folder stays, its lock goes with the process
    code = (
        "import os, sys, time; from pathlib import Path; from zoplan.runtime.scratch import owned\n"
        "with owned(Path(sys.argv[1]), 'dead') as f:\n"
        "    print(f, flush=True); os.kill(os.getpid(), 9)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9
    dead = Path(proc.stdout.strip())
    assert dead.is_dir() and abandoned(dead)  # its lock went with its process
    assert sweep(tmp_path) == []  # too young to judge: its owner may not hold the lock yet
    age(dead)
    assert sweep(tmp_path) == [dead] and not dead.exists()


def test_folders_that_are_not_a_launchs_are_left_alone(tmp_path: Path) -> None:
    (tmp_path / "zoplan-without-owner").mkdir()  # no lock file: not ours to judge
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / OWNER).write_text("1")
    age(tmp_path / "other")
    assert sweep(tmp_path) == []
    assert (tmp_path / "zoplan-without-owner").is_dir() and (tmp_path / "other").is_dir()


def test_a_name_in_use_is_refused_with_a_message(tmp_path: Path) -> None:
    with owned(tmp_path, "same"):
        with pytest.raises(ZoplanError, match="another zoplan launch is using it"), owned(tmp_path, "same"):
            pass


def test_a_run_directory_is_held_by_one_run_at_a_time(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with run_lock(out, 0):
        with pytest.raises(ZoplanError) as caught, run_lock(out, 0):
            pass
        assert f"in use by another zoplan run (pid {os.getpid()})" in str(caught.value)
        # another node of the same run, in node 0's directory (a disk the machines share): refused,
        # as every node writes its own run.json and snapshots there
        with pytest.raises(ZoplanError) as caught, run_lock(out, 1, nodes=2):
            pass
        assert f"{out} is the output directory of node 0 of this run (pid {os.getpid()}" in str(caught.value)
        assert "give each machine its own --output" in str(caught.value)
    with run_lock(out, 0):  # released
        pass
    with run_lock(out, 1, nodes=2):  # node 0's lock left behind by a run that has ended
        pass


def test_a_probe_holding_a_run_s_lock_for_an_instant_does_not_refuse_the_run(tmp_path: Path) -> None:
    """A probe of the lock (``held_by``: replay's check of a live run, a node's check of the
    others) holds it for an instant; a run starting at that instant was refused as "in use by
    another zoplan run". It waits the probe out."""
    import fcntl
    import threading

    out = tmp_path / "run"
    out.mkdir()
    probe = os.open(out / ".lock-node0", os.O_CREAT | os.O_RDWR, 0o644)
    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    threading.Timer(0.1, os.close, (probe,)).start()  # (the probe's end: closing releases it)
    with run_lock(out, 0):
        pass  # (held by this run)
    # a lock held for good is still refused (after the probe's patience)
    holder = os.open(out / ".lock-node0", os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with pytest.raises(ZoplanError, match="is in use by another zoplan run"), run_lock(out, 0):
            pass
    finally:
        os.close(holder)


def test_a_lock_file_removed_between_its_opening_and_its_locking_is_not_held(tmp_path: Path, monkeypatch) -> None:
    """A refused new run removes the lock file it made (it leaves nothing of its own in the
    user's directory). A run that had opened that file just before then locked a file no path
    names, and a third run, making a new one, got in beside it: the lock must be on the file
    the path names."""
    from zoplan.runtime import scratch

    out = tmp_path / "run"
    out.mkdir()
    lock = out / scratch.lock_name(0)
    lock.touch()
    real = scratch._try_lock
    tries = []

    def refused_run_removes_it_first(fd: int, patience_s: float = 0.0) -> bool:
        if not tries:  # the refused run's unlink, between this run's open and its lock
            lock.unlink()
        tries.append(fd)
        return real(fd, patience_s)

    monkeypatch.setattr(scratch, "_try_lock", refused_run_removes_it_first)
    with run_lock(out, 0):
        assert lock.exists() and len(tries) == 2  # the file the path names, locked on a second try
        monkeypatch.setattr(scratch, "_try_lock", real)
        with pytest.raises(ZoplanError, match="in use by another zoplan run"), run_lock(out, 0):
            pass


def test_processes_naming_finds_a_live_process_by_its_command_line(tmp_path: Path) -> None:
    from zoplan.runtime.scratch import processes_naming

    marker = str(tmp_path / "marker")
    proc = subprocess.Popen([sys.executable, "-c", "import time, sys; time.sleep(60)", marker])
    try:
        deadline = time.monotonic() + 30
        while proc.pid not in processes_naming(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes_naming(marker) == [proc.pid]
    finally:
        proc.kill()
        proc.wait()
    assert processes_naming(marker) == []  # reaped: gone


def test_an_output_directory_that_cannot_be_written_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ZoplanError, match="cannot write into the output directory"), run_lock(blocker / "run", 0):
        pass
    # the output named as a file itself: said so ("File exists" was all it said)
    with pytest.raises(ZoplanError, match=r"the output directory .*file is a file, not a folder"), run_lock(blocker, 0):
        pass
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")  # it said "File exists", with a fix about permissions
    with pytest.raises(
        ZoplanError, match=r"the output directory .*dangling is a link to .*nowhere, which does not exist"
    ):
        with run_lock(dangling, 0):
            pass


def test_a_launcher_refused_by_the_lock_leaves_the_holders_directory(tmp_path: Path, monkeypatch) -> None:
    """Two launches of the same new -o at once: both see no directory, one takes the lock; the
    other, refused, removed the directory it thought it had made, and the winner's lock with it
    (a third launch could then train in it beside the winner)."""
    import contextlib

    from zoplan.runconfig import make
    from zoplan.runtime import launch

    out = tmp_path / "run"
    held = contextlib.ExitStack()

    def another_launch_takes_it(base: Path) -> list[Path]:  # between this launch's look and its lock
        if not out.exists():
            held.enter_context(run_lock(out, 0))
        return []

    monkeypatch.setattr(launch, "sweep", another_launch_takes_it)
    with held:
        with pytest.raises(ZoplanError, match="in use by another zoplan run"):
            launch.run(make(output=out, steps=1))
        assert (out / ".lock-node0").exists()


def test_host_copies_go_where_zoplan_shared_memory_says_and_a_bad_folder_is_refused(
    tmp_path: Path, monkeypatch
) -> None:
    from zoplan.runtime.scratch import SHARED_MEMORY_ENV, shared_memory

    monkeypatch.delenv(SHARED_MEMORY_ENV, raising=False)
    default = shared_memory()
    monkeypatch.setenv(SHARED_MEMORY_ENV, str(tmp_path))
    assert shared_memory() == tmp_path != default
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here").mkdir()
    monkeypatch.setenv(SHARED_MEMORY_ENV, "here")
    assert shared_memory() == tmp_path / "here"  # absolute: the ranks are handed folders under it
    for bad in ("missing", "a-file"):
        (tmp_path / "a-file").write_text("x")
        monkeypatch.setenv(SHARED_MEMORY_ENV, bad)
        with pytest.raises(ZoplanError, match=f"{SHARED_MEMORY_ENV}={bad} is not a folder this user can write in"):
            shared_memory()


def test_a_host_copy_that_does_not_fit_is_refused_before_a_page_is_written(tmp_path: Path, monkeypatch) -> None:
    """A tmpfs that fills while pages are written kills the writer with SIGBUS: the files' bytes
    are claimed first, and a shortfall (seen in the free space, or only when claiming: another
    launch took the room meanwhile) is a message that says how much is needed and where."""
    import errno
    import shutil

    from zoplan.runtime import hostcopy

    files = [("block0.bin", 3 << 20), ("block1.bin", 3 << 20), ("resident.wte.bin", 1 << 20)]
    hostcopy.reserve(tmp_path, files)
    assert {p.name: p.stat().st_size for p in tmp_path.iterdir()} == dict(files)
    assert all(p.stat().st_blocks * 512 >= size for p, (_, size) in zip(sorted(tmp_path.iterdir()), sorted(files)))

    room = tmp_path / "small"
    room.mkdir()
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.delenv("ZOPLAN_SHARED_MEMORY", raising=False)
    # (room for the launch's small files too: 1 MiB; scratch.py reads the free space as hostcopy.py does)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=5 << 20))
    with pytest.raises(
        Refused, match=r"too small for the host copy of the weights: it needs 8\.0 MiB, and 5\.0 MiB is free"
    ) as said:
        hostcopy.reserve(room, files)
    assert "--shm-size=1g" in said.value.fix and "ZOPLAN_SHARED_MEMORY" in said.value.fix
    assert list(room.iterdir()) == []
    with pytest.raises(Refused, match=r"it needs 15\.0 MiB \(7\.0 MiB for each of 2 ranks' copies\)"):
        hostcopy.reserve(room, files, copies=2)
    monkeypatch.setenv("ZOPLAN_SHARED_MEMORY", str(room))  # the user's own folder: no word of containers
    with pytest.raises(Refused) as said:
        hostcopy.reserve(room, files)
    assert (
        "docker" not in said.value.fix and "point ZOPLAN_SHARED_MEMORY at a folder on a larger tmpfs" in said.value.fix
    )
    assert sizes(932 << 10, 928 << 10) == ["932 KiB", "928 KiB"] and sizes(2**20 + 10**4, 2**20) == [
        "1.01 MiB",
        "1.00 MiB",
    ]

    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=64 << 20))
    claimed: list[str] = []

    def claim(fd: int, offset: int, size: int) -> None:
        claimed.append(os.readlink(f"/proc/self/fd/{fd}"))
        if len(claimed) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hostcopy.os, "posix_fallocate", claim)
    with pytest.raises(Refused, match=r"it needs 8\.0 MiB"):
        hostcopy.reserve(room, files)
    assert len(claimed) == 2 and list(room.iterdir()) == []  # none half-claimed left


def test_a_run_with_too_little_shared_memory_says_so_instead_of_dying_of_sigbus(tmp_path: Path) -> None:
    """The real thing: a 64 KiB tmpfs as the run's shared memory (root only: it mounts one, and
    unmounts it however the test ends; skipped where that cannot be done)."""
    from zoplan.runtime.scratch import SHARED_MEMORY_ENV

    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        out = tmp_path / "run"
        proc = subprocess.run(
            [sys.executable, "-m", "zoplan.cli", "run", "--steps", "1", "-o", str(out)],
            capture_output=True,
            text=True,
            env={**os.environ, SHARED_MEMORY_ENV: str(small)},
            timeout=300,
        )
        listed = sorted(p.name for p in small.iterdir())
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)
    said = proc.stdout + proc.stderr
    assert proc.returncode == 2, said[-3000:]
    assert f"shared memory in {small} is too small for the host copy of the weights: it needs" in said, said[-3000:]
    assert "SIGBUS" not in said and "container" not in said  # not /dev/shm: no word of containers
    assert listed == []  # nothing left in it
    assert not out.exists()  # refused before the first step: the same command, corrected, runs again


def test_a_full_shared_memory_or_one_out_of_files_is_said_when_a_launch_makes_its_folder(
    tmp_path: Path, monkeypatch
) -> None:
    """No traceback, and nothing left that no later launch would sweep (a folder without its owner file)."""
    import errno

    from zoplan.runtime import scratch

    monkeypatch.setenv(scratch.SHARED_MEMORY_ENV, str(tmp_path))
    real_open = os.open

    def full(path, *args, **kwargs):
        if str(path).endswith(OWNER):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(scratch.os, "open", full)
    with pytest.raises(Refused, match=r"shared memory in .* has too little room left for this launch"):
        with owned(tmp_path, "run"):
            pass
    assert list(tmp_path.iterdir()) == []
    # elsewhere (the temporary directory), the same in its own words
    other = tmp_path / "tmp"
    other.mkdir()
    with pytest.raises(ZoplanError, match="has no room left for this launch's scratch folder") as said:
        with owned(other, "run"):
            pass
    assert not isinstance(said.value, Refused) and "TMPDIR" in said.value.fix and list(other.iterdir()) == []


def test_an_interrupted_launcher_kills_a_rank_supervisor_that_does_not_stop(tmp_path: Path) -> None:
    """A supervisor stopped by SIGSTOP never takes the SIGTERM a Ctrl-C or SIGTERM of the
    launcher sends it: the launcher waited for ever. It kills it after the wait."""
    import signal
    import subprocess
    import sys
    import time

    from zoplan.runtime.launch import stop_ranks

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        proc.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        stop_ranks(proc, wait_s=1.0)
        # (killed, it takes the SIGTERM still pending first: either ends it)
        assert proc.returncode in (-signal.SIGKILL, -signal.SIGTERM) and time.monotonic() - t0 < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    quick = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    stop_ranks(quick, wait_s=30.0)  # one that stops on SIGTERM is not killed
    assert quick.returncode == -signal.SIGTERM


def test_a_second_stop_signal_kills_a_slow_supervisor_at_once_and_never_cuts_the_stop_short() -> None:
    """A second Ctrl-C while the launcher waited for a supervisor slow to stop (a big model's
    ranks, one stopped by SIGSTOP) broke out of the wait: the launcher said "the ranks have
    stopped", removed their host copy and released the run's lock while they trained on (a resume
    then trained beside them). Now the later signals only hurry the stop: SIGKILL at once, and
    the wait goes on until the supervisor is gone; the first signal alone interrupts."""
    import signal
    import threading

    from zoplan.runtime.launch import stop_ranks, stop_signals

    slow = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", slow], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    main, stopped = threading.get_ident(), []
    t0 = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt), stop_signals(stopped):
            try:
                signal.pthread_kill(main, signal.SIGINT)  # the first: stops the run
                time.sleep(30)  # (interrupted)
            finally:
                # a second, and a third, while the launcher stops the ranks
                for delay in (0.3, 0.6):
                    threading.Timer(delay, signal.pthread_kill, (main, signal.SIGINT)).start()
                stop_ranks(proc, wait_s=30.0)
                time.sleep(0.8)  # (the third comes after: it interrupts nothing either)
        assert proc.returncode == -signal.SIGKILL and time.monotonic() - t0 < 10
        assert stopped == [signal.SIGINT] * 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # outside a launch, Ctrl-C is Python's again
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_stop_signal_after_the_ranks_have_finished_removes_nothing(tiny_dirs, tmp_path: Path, monkeypatch) -> None:
    """A Ctrl-C as the launcher read the finished run's metrics (the progress bar full) reached
    run() as a stop "before the first step", which removed what the run wrote: its model and
    journal, "nothing was trained". Once the ranks have exited a stop signal stops nothing."""
    import signal
    import threading

    from zoplan.runconfig import make
    from zoplan.runtime import launch

    real, main = launch.summarize, threading.get_ident()

    def ctrl_c_then(out: Path):
        signal.pthread_kill(main, signal.SIGINT)
        time.sleep(0.2)  # (where the handler runs)
        return real(out)

    monkeypatch.setattr(launch, "summarize", ctrl_c_then)
    out = tmp_path / "run"
    summary = launch.run(make(model=str(tiny_dirs["tiny-opt"]), steps=2, output=out, quiet=True, eval_every=0))
    assert summary.steps == 2 and (out / "model" / "model.safetensors").is_file()
    assert (out / "journal.jsonl").read_text().count("\n") == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_stop_signal_that_comes_while_the_ranks_are_forked_is_not_lost() -> None:
    """A SIGTERM as the launcher forked its rank supervisor ran the handler inside the fork's
    callbacks, where Python ignores an exception ("Exception ignored in: _releaseLock"): the stop
    was lost and the run trained to its end, exit 0. It is raised once the fork has returned."""
    import signal
    import threading

    from zoplan.runtime.launch import stop_signals
    from zoplan.runtime.signals import deferred

    stopped: list[int] = []
    with pytest.raises(KeyboardInterrupt), stop_signals(stopped):
        with deferred():
            try:  # as a fork's callbacks run the handler: what it raises there is dropped
                signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
                time.sleep(0.1)
            except KeyboardInterrupt:
                pass
    assert stopped == [signal.SIGTERM]


def test_a_stop_signal_the_caller_ignores_stays_ignored() -> None:
    """`nohup zoplan run ... &` ignores SIGHUP so that the run outlives its terminal: the launch
    made SIGHUP stop the run all the same when the terminal closed."""
    import signal

    from zoplan.runtime.launch import stop_signals

    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with stop_signals([]):
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_IGN, signal.SIG_DFL)  # stops the run
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks")
def test_a_stop_sent_while_a_child_is_forked_waits_for_the_child_s_own_handlers_and_the_parent_s_record() -> None:
    """A rank server's child inherited the server's SIGTERM handler (which only notes the signal)
    until it set its own: a SIGTERM in that moment was lost, and the run's supervisor trained
    every step while its launcher waited to stop it. A supervisor stopped between forking a rank
    and recording it left that rank running. Held while a child is forked and recorded, a stop
    reaches the child once it has its own handlers, and the parent once it knows the child."""
    import signal
    import threading

    from zoplan.runtime.signals import after_fork, signals_held

    noted: list[object] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: noted.append(known))  # as the server's
    known = None
    try:
        with signals_held():
            pid = os.fork()
            if pid == 0:  # the child: a SIGTERM comes before its own handlers
                os.kill(os.getpid(), signal.SIGTERM)
                after_fork()  # the default action, now: it ends here
                os._exit(0)  # only if the signal went to the inherited handler
            # the parent: handled once the child is recorded (sent to this thread: a test worker has other
            # threads, and a signal sent to the process goes to any thread that does not hold it back;
            # the server and the supervisor that fork are of one thread)
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
            known = pid
        _, status = os.waitpid(pid, 0)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM, status
    assert noted == [pid]


def test_shared_memory_that_takes_no_folder_is_a_message(monkeypatch) -> None:
    """ZOPLAN_SHARED_MEMORY=/proc (writable to root's access check, yet it takes no folder) ended
    in a FileNotFoundError traceback, leaving a half-made output directory."""
    from zoplan.errors import ZoplanError
    from zoplan.runtime.scratch import SHARED_MEMORY_ENV, shared_memory

    monkeypatch.setenv(SHARED_MEMORY_ENV, "/proc")
    with pytest.raises(ZoplanError, match="ZOPLAN_SHARED_MEMORY=/proc"):
        with owned(shared_memory(), "run"):
            pass


def test_the_launches_running_beside_a_measurement_are_found_and_named(tmp_path: Path, monkeypatch) -> None:
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setenv("ZOPLAN_SHARED_MEMORY", str(tmp_path / "shm"))
    for folder in ("tmp", "shm"):
        (tmp_path / folder).mkdir()
    assert live_launches() == {} and before_measuring("calibrate", cpu=False) == ({}, None)
    with (
        another_launch(tmp_path / "tmp", "calibrate-tmp-0a1b") as calibration,
        another_launch(tmp_path / "shm", "5c6d-node0") as run,  # a run's host copy
        owned(tmp_path / "tmp", "tmp-mine-node0") as mine,
    ):
        # this process's own folders are not another launch; nor are those ``own`` names
        assert live_launches() == {calibration: "zoplan calibrate", run: "zoplan run"}
        assert live_launches(own=[tmp_path / "shm" / "zoplan-5c6d-node0"]) == {calibration: "zoplan calibrate"}
        assert mine.is_dir()
        beside, warning = before_measuring("validate", cpu=True)
        assert beside == {calibration: "zoplan calibrate", run: "zoplan run"}
        said = sorted([(calibration, "zoplan calibrate"), (run, "zoplan run")])
        assert warning == (
            f"warning: another zoplan launch is running on this machine ({said[0][1]} (pid {said[0][0]}) and "
            f"{said[1][1]} (pid {said[1][0]})): what is measured beside it is a shared machine's, slower than its "
            "own; validate when it has ended"
        )
    # both have ended: the measurement was still made beside them, and says so after
    assert live_launches() == {}
    after = measured_beside(beside, "validate")
    assert after is not None and f"zoplan run (pid {run})" in after and "validate again" in after
    assert measured_beside({}, "validate") is None
    # a launch that was killed holds its folder no more
    code = (
        "import os, sys; from pathlib import Path; from zoplan.runtime.scratch import owned\n"
        "with owned(Path(sys.argv[1]), 'tmp-killed-node0'):\n"
        "    os.kill(os.getpid(), 9)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "tmp")], timeout=60)
    assert proc.returncode == -9 and (tmp_path / "tmp" / "zoplan-tmp-killed-node0").is_dir()
    assert live_launches() == {}


def test_a_busy_cpu_machine_is_said_before_a_cpu_measurement(tmp_path: Path, monkeypatch) -> None:
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("ZOPLAN_SHARED_MEMORY", str(tmp_path))
    spin = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time() + 60\nwhile time.time() < t: pass"])
    try:
        time.sleep(0.3)
        busy = others_busy_cores(0.5)
        assert busy is not None and 0.5 <= busy <= (os.cpu_count() or 1) + 0.01  # the spinner: about a core
        beside, warning = before_measuring("calibrate", cpu=True)
        assert beside == {} and warning is not None
        assert "cores busy" in warning and "calibrate when it is idle" in warning
        assert before_measuring("calibrate", cpu=False) == ({}, None)  # a GPU's figures: not the cores'
    finally:
        spin.kill()
        spin.wait()


def test_the_stillness_watch_starts_with_the_first_step_ends_with_the_last_and_speaks_once(
    tmp_path: Path, monkeypatch
) -> None:
    """It said "no step has finished" while the first evaluation ran before step 0, and while the
    model was written after the last step; a run's ranks are found by its whole directory."""
    from zoplan.runtime import watch

    now = [1000.0]
    monkeypatch.setattr(watch.time, "monotonic", lambda: now[0])
    looked: list[str] = []
    monkeypatch.setattr(watch, "rank_processes", lambda text: looked.append(text) or {})
    monkeypatch.delenv("ZOPLAN_STALL_NOTE_AFTER_S", raising=False)
    still = watch.ProgressWatch(tmp_path / "run", steps=3)
    assert still.progressed() is None  # the evaluation before the first step
    now[0] += 10_000
    assert still.check() is None  # not watched before the first step
    assert still.progressed(0, 10.0) is None  # the slowest step: 10 s, so 200 s of stillness
    now[0] += 199
    assert still.check() is None
    now[0] += 2
    said = still.check()
    assert said is not None and said.startswith("warning: no step has finished for 201 s (the slowest took 10 s)")
    assert still.check() is None  # once a stillness
    assert looked and all(t == str((tmp_path / "run").resolve()) + os.sep for t in looked)
    assert still.progressed(1, 1.0) == "the run goes on again, after 201 s without a step"
    assert still.progressed(2, 1.0) is None  # the last step: the final evaluation and the model follow
    now[0] += 10_000
    assert still.check() is None


def _watch_on_a_clock(monkeypatch):
    """runtime.watch with a clock the test moves (``now[0]``), and the note's default time."""
    from zoplan.runtime import watch

    now = [1000.0]
    monkeypatch.setattr(watch.time, "monotonic", lambda: now[0])
    monkeypatch.delenv("ZOPLAN_STALL_NOTE_AFTER_S", raising=False)
    return watch, now


def test_the_stillness_of_a_run_over_nodes_points_at_the_other_nodes_when_none_is_stuck_here(
    tmp_path: Path, monkeypatch
) -> None:
    """A rank of node 1 stopped by SIGSTOP: node 0 said only that its own ranks were running."""
    watch, now = _watch_on_a_clock(monkeypatch)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        monkeypatch.setattr(watch, "rank_processes", lambda text: {0: busy.pid})
        for nodes, said in ((2, True), (1, False)):
            still = watch.ProgressWatch(tmp_path / "run", steps=3, nodes=nodes)
            still.progressed(0, 1.0)
            now[0] += 70
            assert still.check() is None  # (halfway: the ranks' CPU ticks)
            now[0] += 60
            text = still.check()
            assert text is not None and ("a rank of another node may be" in text) == said, text
    finally:
        busy.kill()
        busy.wait()


def test_a_node_other_than_node_0_says_when_a_rank_of_its_own_is_stopped(tmp_path: Path, monkeypatch) -> None:
    """Node 1's rank stopped by SIGSTOP: every step waited for it, and node 1's launcher said
    nothing (the stillness watch read node 0's metrics only) until the 10-minute timeout."""
    import signal

    watch, now = _watch_on_a_clock(monkeypatch)
    rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        monkeypatch.setattr(watch, "rank_processes", lambda text: {1: rank.pid})
        still = watch.ProgressWatch(tmp_path / "run", steps=3, nodes=2)
        assert still.stuck_here() is None  # sleeping: waiting, not stuck
        os.kill(rank.pid, signal.SIGSTOP)
        time.sleep(0.2)
        now[0] += 10
        assert still.stuck_here() is None  # stopped since now: said after 120 s
        now[0] += 121
        said = still.stuck_here()
        assert said is not None and "rank 1" in said and "is stopped" in said and "on this node" in said, said
        now[0] += 10
        assert still.stuck_here() is None  # once
        os.kill(rank.pid, signal.SIGCONT)
        time.sleep(0.2)
        now[0] += 10
        assert still.stuck_here() is None and not still.stuck_said  # it goes on: said again next time
    finally:
        rank.kill()
        rank.wait()
