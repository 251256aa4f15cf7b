"""Session-wide hooks, loaded by pytest's main process (with pytest-xdist too, where the
runtime's own conftest lives only in its worker): what the summary says about tests/runtime."""

from __future__ import annotations

import os

import pytest

# Before anything loads OpenMP (torch, in the workers and in every run they start): the suite's two
# workers run their runs side by side, more ranks than the machine has cores, and OpenMP's threads
# spinning while they wait then burn the cores the other runs need (the whole suite, 2026-12-06:
# 566 CPU-s and 303 s, 496 CPU-s and 272 s with this). It changes when a waiting thread sleeps, not
# what any run computes. A value already set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from zoplan.runtime import INSTALL, missing_packages  # torch-free: names the packages, imports none

# the runtime's tests need the `runtime` extra (tests/runtime/conftest.py leaves them out without it)
MISSING = missing_packages()
FROM_WORKERS: list[str] = []  # pytest-xdist: the runtime worker's rank-server line


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    FROM_WORKERS.extend(getattr(node, "workeroutput", {}).get("served", []))


def pytest_terminal_summary(terminalreporter) -> None:
    """Said at the end of every run, -q included: a suite without its runtime half must not look
    like a complete green run; and (with workers) how many runs the rank server started, which
    tests/runtime/conftest.py says itself in one process."""
    for line in FROM_WORKERS:
        terminalreporter.write_line(f"tests/runtime: {line}")
    if MISSING:
        terminalreporter.write_line(
            f"tests/runtime: not collected ({MISSING} not installed: {INSTALL})",
            yellow=True,
        )
