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
