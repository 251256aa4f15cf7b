"""Shared fixtures for the runtime tests: offline hub, one tiny model directory per family."""
from __future__ import annotations

import os

# Before anything imports huggingface_hub (it reads this once, at import): an unknown hub id must
# fail at once instead of waiting on the network.
os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# the runtime needs the `runtime` extra (torch, transformers); the planner's tests run without it
try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
except ImportError:
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each built-in tiny model, built once per test session (seed 0)."""
    from zoplan.runtime.tiny import TINY, build_tiny

    root = tmp_path_factory.mktemp("tiny")
    return {name: build_tiny(name, root / name) for name in TINY}
