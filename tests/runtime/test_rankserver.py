"""The rank server (runtime/rankserver.py): runs whose supervisor it forks behave as runs that
start their own, and neither a server nor a launcher that goes away leaves a process behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zoplan.runtime import rankserver
from zoplan.runtime.launch import rank_env
from zoplan.runtime.rankserver import SERVER_ENV
from zoplan.runtime.scratch import processes_naming

from .test_resume import gone

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Unix sockets, /proc")


def start_server(sock: Path) -> subprocess.Popen:
    return rankserver.start(sock, env=rank_env(os.environ), log=subprocess.PIPE)


def zoplan_run(out: Path, server: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "zoplan.cli", "run", "--model", "tiny-opt", "-o", str(out), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, **{SERVER_ENV: str(server)}),
    )


def test_a_server_that_goes_away_stops_its_runs(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    server = start_server(sock)
    # a request that is not one (no file descriptor) is answered, and the server keeps serving
    with socket.socket(socket.AF_UNIX) as probe:
        probe.connect(str(sock))
        probe.sendall(b'{"argv": []}\n')
        assert b"error" in probe.recv(4096)
    out = tmp_path / "run"
    run = zoplan_run(out, sock, "--steps", "500")
    deadline = time.monotonic() + 120
    while not (out / "journal.jsonl").exists() or not (out / "journal.jsonl").read_text():
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()
        time.sleep(0.1)
    supervisor = [pid for pid in processes_naming(str(out)) if pid != run.pid]
    assert supervisor, "the run's supervisor and ranks write to its log"
    server.kill()  # SIGKILL: no handler of the server's runs; its supervisors are told by the kernel
    server.communicate()
    _, err = run.communicate(timeout=120)
    assert run.returncode == 2 and "--resume" in err, err
    # said as what happened: the server went, not a rank, not torchrun
    assert f"the rank server {sock} that started this run's ranks stopped" in err and "torchrun" not in err, err
    assert gone(str(out)), processes_naming(str(out))
    # its socket is left (a SIGKILLed server cannot remove it): a launcher that finds nobody there
    # warns and starts its own supervisor (test_resume.py's killed-supervisor test runs one)
    assert sock.exists()
    with open(os.devnull, "w") as log, pytest.raises(OSError):
        rankserver.request(str(sock), ["--nproc", "1"], log.fileno(), rank_env(os.environ))


def test_a_run_in_another_import_time_environment_is_refused_and_a_stopped_server_cleans_up(
    tmp_path: Path,
) -> None:
    sock = tmp_path / "s.sock"
    server = start_server(sock)
    run = zoplan_run(tmp_path / "run", sock, "--steps", "1")
    said, err = run.communicate(timeout=300)
    assert run.returncode == 0 and "trained 1 step:" in said and "warning" not in err, err
    # a variable torch reads when imported: the server's reading would not be this run's (its
    # launcher then starts its own supervisor)
    env = dict(rank_env(os.environ), TORCH_SHOW_CPP_STACKTRACES="1")
    with (
        open(os.devnull, "w") as log,
        pytest.raises(OSError, match="differs from the server's in TORCH_SHOW_CPP_STACKTRACES"),
    ):
        rankserver.request(str(sock), ["--nproc", "1"], log.fileno(), env)
    # a thread count of the user's where the server's ranks take a share of the cores: named as
    # the user set it (OMP_NUM_THREADS), not by zoplan's own mark of its choice
    env = rank_env({**os.environ, "OMP_NUM_THREADS": "1"})
    with (
        open(os.devnull, "w") as log,
        pytest.raises(OSError, match="differs from the server's in OMP_NUM_THREADS, read"),
    ):
        rankserver.request(str(sock), ["--nproc", "1"], log.fileno(), env)
    server.send_signal(signal.SIGTERM)
    log, _ = server.communicate(timeout=60)
    assert server.returncode == 0 and not sock.exists()
    assert "stopped after starting 1 run(s) and refusing 2" in log, log


def test_zoplans_own_switches_are_read_as_a_run_runs_so_a_served_run_may_set_them() -> None:
    """Every ZOPLAN_* variable zoplan reads is read by the launcher or the ranks while a run runs,
    never when a module is imported (the server has imported them): a run that sets one is served
    (a run with ZOPLAN_CUDA_GRAPHS=1 is, test_graphs.py). A new variable read at import must be
    compared instead: take it out of this test's list and out of rankserver.NOT_COMPARED."""
    import re

    from zoplan.runtime.launch import SHARE_THREADS_ENV

    root = Path(__file__).parents[2]
    names = {
        name
        for folder in ("runtime", "zoplan")
        for source in (root / folder).rglob("*.py")
        for name in re.findall(r"ZOPLAN_[A-Z][A-Z_]*", source.read_text())
    }
    assert {"ZOPLAN_Z_KERNEL", "ZOPLAN_SHARED_MEMORY", "ZOPLAN_CUDA_GRAPHS"} <= names  # the pattern finds them
    # zoplan's mark of a thread count it chose stands for the user's OMP_NUM_THREADS (compared)
    names -= {SHARE_THREADS_ENV}
    assert rankserver.import_time_differences({}, {name: "1" for name in names}) == []
    assert rankserver.import_time_differences({}, {"TORCH_SHOW_CPP_STACKTRACES": "1"}) == ["TORCH_SHOW_CPP_STACKTRACES"]
