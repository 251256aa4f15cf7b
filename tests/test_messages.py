"""What a refusal tells a user to do must be there for them: an install from a wheel has no
docs/ folder, so a fix never sends them to one (it names a command, or says what to write)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _fix_texts(path: Path) -> list[tuple[int, str]]:
    """The literal text of every ``fix=`` given to a call in ``path`` (f-strings' literal parts)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        for kw in node.keywords:
            if kw.arg == "fix":
                text = "".join(
                    part.value
                    for part in ast.walk(kw.value)
                    if isinstance(part, ast.Constant) and isinstance(part.value, str)
                )
                out.append((node.lineno, text))
    return out


def test_no_fix_sends_a_user_to_the_docs_folder() -> None:
    sources = sorted((ROOT / "zoplan").rglob("*.py")) + sorted((ROOT / "runtime").rglob("*.py"))
    fixes = [(path, line, text) for path in sources for line, text in _fix_texts(path)]
    assert len(fixes) > 100  # the walk finds them
    wrong = [f"{path.relative_to(ROOT)}:{line}: {text}" for path, line, text in fixes if "docs/" in text]
    assert not wrong, "\n".join(wrong)
