"""The layering contract (docs/architecture.md, "Two halves"), checked on the source.

- The planner (every module of zoplan/ and its subpackages but the CLI, zoplan/cli/, which
  dispatches to both halves) never
  imports torch, transformers or the runtime, not even inside a function: it plans on a laptop
  with neither installed.
- The runtime (runtime/, installed as zoplan.runtime) reads plan, profile and topology files only
  through the planner's file modules (zoplan.planfile and friends): it never parses YAML itself.
- torch.distributed is called from one module, zoplan.runtime.dist.
- The command line (zoplan/cli/) reaches torch and the Hugging Face libraries only through the
  runtime (zoplan.runtime), which the type check does not read: a lazy `import transformers` there
  made `mypy` read all of transformers (27 s on a fresh clone instead of 5).

Each rule walks every import of every module (at any depth), so a lazy import inside a function
counts like one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLANNER = sorted(p for p in (ROOT / "zoplan").rglob("*.py") if "cli" not in p.relative_to(ROOT / "zoplan").parts)
CLI = sorted((ROOT / "zoplan" / "cli").glob("*.py"))
RUNTIME = sorted((ROOT / "runtime").glob("*.py"))
HEAVY = ("torch", "transformers", "safetensors", "tokenizers", "triton", "zoplan.runtime")


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in ``path``; ``from a import b`` gives a.b as well as a."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_there_are_modules_to_check() -> None:
    assert len(PLANNER) > 10 and len(RUNTIME) > 10 and len(CLI) >= 2
    assert (ROOT / "zoplan" / "program.py") in PLANNER and (ROOT / "runtime" / "engine.py") in RUNTIME


@pytest.mark.parametrize("path", PLANNER, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_planner_never_imports_torch_transformers_or_the_runtime(path: Path) -> None:
    bad = [f"{path.name}:{line} imports {m}" for line, m in imports(path) if any(_under(m, h) for h in HEAVY)]
    assert not bad, bad


@pytest.mark.parametrize("path", CLI, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_command_line_reaches_torch_and_transformers_only_through_the_runtime(path: Path) -> None:
    libraries = [h for h in HEAVY if h != "zoplan.runtime"]
    bad = [f"{path.name}:{line} imports {m}" for line, m in imports(path) if any(_under(m, h) for h in libraries)]
    assert not bad, bad


@pytest.mark.parametrize("path", RUNTIME, ids=lambda p: p.name)
def test_the_runtime_reads_files_of_the_plan_only_through_the_planners_file_modules(path: Path) -> None:
    bad = [f"{path.name}:{line} imports {m}" for line, m in imports(path) if _under(m, "yaml")]
    assert not bad, bad


@pytest.mark.parametrize("path", [p for p in RUNTIME if p.name != "dist.py"], ids=lambda p: p.name)
def test_only_the_dist_module_calls_torch_distributed(path: Path) -> None:
    bad = [
        f"{path.name}:{line} imports {m}"
        for line, m in imports(path)
        if _under(m, "torch.distributed") or m == "torch.distributed"
    ]
    tree = ast.parse(path.read_text())
    # torch.distributed.<anything> used through a plain `import torch`
    bad += [
        f"{path.name}:{node.lineno} uses torch.distributed"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr == "distributed"
        and isinstance(node.value, ast.Name)
        and node.value.id == "torch"
    ]
    assert not bad, bad


def test_the_rules_catch_a_lazy_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "def f():\n    import torch.distributed as d\n    from zoplan.runtime.tiny import x\n"
        "    import torch\n    return torch.distributed.barrier\n"
    )
    found = [m for _, m in imports(sample)]
    assert "torch.distributed" in found and "zoplan.runtime.tiny" in found
    assert any(_under(m, "zoplan.runtime") for m in found)
