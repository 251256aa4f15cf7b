"""The README's two commands are the ones users and CI run."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _block_after(heading: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {heading}", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, f"no bash block under '## {heading}'"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command() -> None:
    readme = _block_after("Run the tests")
    ci = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "set ", "cd "))
    ]
    assert ci == readme


def test_readme_main_command_is_plan() -> None:
    assert _block_after("Plan a run") == ["pip install -e .", "zoplan plan"]


def _lower_bounds() -> dict[str, str]:
    """pyproject.toml's lower bound of every library it asks for (its >=), by lower-case name."""
    import tomllib  # (Python 3.11: on 3.10, which bench/oldest.sh runs, the test below skips)

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"]) + [d for extra in project["optional-dependencies"].values() for d in extra]
    bounds = {}
    for spec in wanted:
        found = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)(;.*)?", spec.replace(" ", ""))
        assert found, f"pyproject.toml: {spec!r} is not NAME>=VERSION"
        bounds[found.group(1).lower()] = found.group(2)
    return bounds


def test_the_oldest_versions_bench_pins_pyprojects_lower_bounds() -> None:
    """bench/oldest.sh runs the suite on bench/oldest.txt: every library there at the lower bound
    pyproject.toml gives it (or a patch release of it, where another library needs one), and every
    bound there, but for the tools (ruff, mypy) and triton, which torch 2.1 replaces with its own."""
    import sys

    if sys.version_info < (3, 11):
        import pytest

        pytest.skip("tomllib: Python 3.11")
    pins = {}
    for line in (ROOT / "bench" / "oldest.txt").read_text().splitlines():
        found = re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9.]+)", line.strip())
        if found:
            pins[found.group(1).lower()] = found.group(2)
    bounds = _lower_bounds()
    for name, low in bounds.items():
        if name in ("ruff", "mypy", "triton"):
            continue
        assert name in pins, f"bench/oldest.txt pins no {name} (pyproject.toml: >={low})"
        pinned, floor = pins[name].split("."), low.split(".")
        # the bound's release, to the bound's own precision (>=0.4 is pinned 0.4.x; >=3.0 may be 3.0)
        assert (pinned + ["0"] * len(floor))[: len(floor)] == floor, (name, low, pins[name])
    assert set(pins) - set(bounds) == set(), (
        f"bench/oldest.txt pins what pyproject.toml does not ask for: {set(pins) - set(bounds)}"
    )
