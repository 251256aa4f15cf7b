"""The fault-injection hook (zoplan.runtime.faults): silent unless asked, exact when asked."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys

import pytest

from zoplan.runtime import faults


def test_no_fault_without_the_variable(monkeypatch) -> None:
    monkeypatch.delenv("ZOPLAN_FAULTS", raising=False)
    for point in faults.POINTS:
        assert not faults.planned(point, 0, 4)
        faults.hit(point, 0, 4)  # returns: nothing asked for


def test_a_fault_hits_its_point_rank_and_step_only(monkeypatch) -> None:
    monkeypatch.setenv("ZOPLAN_FAULTS", "fail-snapshot:0:6, kill:1:5")
    assert faults.planned("fail-snapshot", 0, 6) and faults.planned("kill", 1, 5)
    assert not faults.planned("fail-snapshot", 0, 5) and not faults.planned("kill", 0, 5)
    assert not faults.planned("abort-at-exit", 1)
    with pytest.raises(OSError) as caught:
        faults.hit("fail-snapshot", 0, 6)
    assert caught.value.errno == errno.ENOSPC
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    faults.hit("kill", 1, 5)  # a restarted attempt is not killed again


@pytest.mark.parametrize("spec", ["kill", "kill:x:1", "explode:0:1", "kill:0:1:2"])
def test_a_malformed_fault_is_refused(monkeypatch, spec: str) -> None:
    monkeypatch.setenv("ZOPLAN_FAULTS", spec)
    with pytest.raises(ValueError, match="ZOPLAN_FAULTS"):
        faults.planned("kill", 0, 1)


def test_kill_is_a_sigkill_of_the_rank_itself() -> None:
    code = "from zoplan.runtime import faults; faults.hit('kill', 2, 7); print('alive')"
    env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_RESTART_COUNT"}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "ZOPLAN_FAULTS": "kill:2:7"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL and "alive" not in proc.stdout
