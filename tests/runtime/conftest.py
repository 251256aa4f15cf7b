"""Shared fixtures for the runtime tests: offline hub, one tiny model directory per family."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub (it reads this once, at import): an unknown hub id must
# fail at once instead of waiting on the network.
os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from zoplan.runtime import missing_packages  # noqa: E402  (torch-free)

# The runtime needs the `runtime` extra (zoplan.runtime.PACKAGES); the planner's tests run without
# it. Only a missing package leaves these tests out (and says so in the header): an installed one
# that fails to import is an error, not a silently shorter suite.
MISSING = missing_packages()
if MISSING:
    collect_ignore_glob = ["test_*.py"]
else:
    import torch  # noqa: F401
    import transformers  # noqa: F401


SERVED: list[str] = []  # the session's rank server's last line: how many runs it started
HERE = Path(__file__).resolve().parent


# With pytest-xdist (`-n 2 --dist loadgroup`, the README's command) the runtime's tests run in two
# halves of about the same time, one per worker, each half's files one after another on it; the
# planner's tests fill whichever worker is free. A worker gives its half's runs a temporary
# directory and a shared-memory folder of their own (``own_scratch``), so a check that a run leaves
# nothing behind sees only its own half's runs. The first half (seconds in one process, 2026-12-06):
FIRST_HALF = {
    "test_resume.py",  # 47
    "test_fused_interpreter.py",  # 29
    "test_layouts.py",  # 20
    "test_meetings.py",  # 14
    "test_rankserver.py",  # 11
    "test_graphs.py",  # 6
    "test_trainer.py",  # 5
}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's, which reads the groups
def pytest_collection_modifyitems(config, items) -> None:
    gone = FIRST_HALF - {p.name for p in HERE.glob("test_*.py")}
    if gone:  # a file renamed or removed: its half would silently lose it
        raise pytest.UsageError(
            f"tests/runtime/conftest.py: FIRST_HALF names {', '.join(sorted(gone))}, not a test file"
        )
    for item in items:
        if HERE in item.path.resolve().parents:
            half = "runtime-1" if item.path.name in FIRST_HALF else "runtime-2"
            item.add_marker(pytest.mark.xdist_group(half))


@pytest.fixture(scope="session", autouse=True)
def own_scratch(tmp_path_factory: pytest.TempPathFactory):
    """In a pytest-xdist worker: this worker's runs keep their scratch (TMPDIR) and host copies
    (ZOPLAN_SHARED_MEMORY) in folders of their own, removed at the end (the other worker's runs
    run at the same time). Without workers, the machine's own."""
    import shutil
    import tempfile

    from zoplan.runtime.scratch import SHARED_MEMORY_ENV, shared_memory

    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker or os.environ.get(SHARED_MEMORY_ENV):  # (a session inside a session: its parent's)
        yield
        return
    tmp = tmp_path_factory.mktemp("tmp")
    shm = Path(tempfile.mkdtemp(prefix=f"pytest-{worker}-", dir=shared_memory()))  # not zoplan-*: no sweep takes it
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("TMPDIR", str(tmp))
            mp.setattr(tempfile, "tempdir", str(tmp))
            mp.setenv(SHARED_MEMORY_ENV, str(shm))
            yield
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def pytest_terminal_summary(terminalreporter) -> None:
    """How many runs the session's rank server started (in one process; a pytest-xdist worker
    hands it to tests/conftest.py, which also says when this half was not collected)."""
    for line in SERVED:
        terminalreporter.write_line(f"tests/runtime: {line}")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each built-in tiny model, built once per test session (seed 0)."""
    from zoplan.runtime.tiny import TINY, build_tiny

    root = tmp_path_factory.mktemp("tiny")
    return {name: build_tiny(name, root / name) for name in TINY}


@pytest.fixture(scope="session", autouse=True)
def rank_server(own_scratch, tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config):
    """One rank server for the session (runtime/rankserver.py): each run's supervisor is forked
    from it instead of a new interpreter importing torch and transformers, seconds a run. The
    tests that need a run to start its own supervisor remove ZOPLAN_RANK_SERVER from their
    environment (test_resume.py's ``started_by``)."""
    from zoplan.runtime import rankserver

    if os.environ.get(rankserver.SERVER_ENV):  # a session inside a session (test_fused_interpreter.py): its parent's
        yield Path(os.environ[rankserver.SERVER_ENV])
        return
    root = tmp_path_factory.mktemp("rankserver")
    sock = root / "s.sock"
    log = open(root / "server.log", "w")
    server = rankserver.start(sock, ("opt", "llama", "qwen2"), log=log)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(rankserver.SERVER_ENV, str(sock))
        yield sock
    server.terminate()
    server.wait(timeout=60)
    log.close()
    SERVED.extend((root / "server.log").read_text().splitlines()[-1:])
    if hasattr(pytestconfig, "workeroutput"):  # a pytest-xdist worker: the controller prints it
        pytestconfig.workeroutput["served"] = list(SERVED)
