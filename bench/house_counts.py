"""How many places declare each `zoplan run` option's default, and how many times one `zoplan run`
reads its topology file (issue 19's figures; docs/results/house.md).

1. Declarations: every default given to a `zoplan run` option on its way from the command line
   to the ranks, found by walking the code (ast): a field of the run's configuration
   (zoplan.runconfig.RunConfig), a ``typer.Option`` of the ``run`` command whose first argument is
   not None, in runtime/ an ``argparse`` ``add_argument`` with a ``default`` or a class field of
   the same name with a default.
2. Topology reads: a 1-step `zoplan run` of tiny-opt through ``zoplan.runtime.fine_tune`` (the
   launcher the command line uses, in this process), counting the calls that read a topology
   file. The ranks read only the run's configuration and plan (run.json, plan.yaml).

Usage: python -m bench.house_counts
"""

from __future__ import annotations

import argparse
import ast
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def declarations() -> Counter[str]:
    """Per option, the defaults declared for it on its way from the command line to the ranks."""
    from zoplan.runconfig import RunConfig, flag

    names = set(RunConfig.model_fields)
    flags = {flag(n): n for n in names}
    found: Counter[str] = Counter()

    def fields(cls: ast.ClassDef) -> None:  # `name: type = value`, a default other than None
        for item in cls.body:
            if (
                isinstance(item, ast.AnnAssign)
                and isinstance(item.target, ast.Name)
                and item.target.id in names
                and item.value is not None
                and not (isinstance(item.value, ast.Constant) and item.value.value is None)
                # a default taken from the run's configuration (``runconfig.default``) declares nothing
                and not any(isinstance(n, ast.Name) and n.id == "run_default" for n in ast.walk(item.value))
            ):
                found[item.target.id] += 1

    def calls(root: ast.AST) -> None:
        for node in ast.walk(root):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            named = [flags[a.value] for a in node.args if isinstance(a, ast.Constant) and a.value in flags]
            if not named:
                continue
            if (
                node.func.attr == "Option"
                and node.args
                and not (isinstance(node.args[0], ast.Constant) and node.args[0].value is None)
            ):
                found[named[0]] += 1  # a typer option with its own default
            if node.func.attr == "add_argument" and any(k.arg == "default" for k in node.keywords):
                found[named[0]] += 1  # an argparse flag with its own default

    config = ast.parse((ROOT / "zoplan" / "runconfig.py").read_text(encoding="utf-8"))
    for node in ast.walk(config):
        if isinstance(node, ast.ClassDef) and node.name == "RunConfig":
            fields(node)
    cli = ast.parse((ROOT / "zoplan" / "cli" / "__init__.py").read_text(encoding="utf-8"))
    for node in ast.walk(cli):
        if isinstance(node, ast.FunctionDef) and node.name == "run_cmd":
            calls(node)
    for path in (ROOT / "runtime").rglob("*.py"):  # the launcher, the supervisor, the ranks
        tree = ast.parse(path.read_text(encoding="utf-8"))
        calls(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                fields(node)
    return found


def topology_reads() -> int:
    import zoplan.topology as topology
    from zoplan.runtime import fine_tune

    reads = [0]
    read = topology.read_yaml

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        reads[0] += 1
        return read(*args, **kwargs)

    topology.read_yaml = counting  # type: ignore[assignment]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            fine_tune("tiny-opt", steps=1, output=Path(tmp) / "run", quiet=True)
    finally:
        topology.read_yaml = read  # type: ignore[assignment]
    return reads[0]


def main() -> None:
    from zoplan.runconfig import RunConfig

    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # (no options: --help says so)

    found = declarations()
    counts = Counter(found.get(name, 0) for name in RunConfig.model_fields)
    print(
        f"{len(RunConfig.model_fields)} options of zoplan run; places declaring a default: {dict(sorted(counts.items()))}"
    )
    for name in sorted(n for n in RunConfig.model_fields if found.get(n, 0) > 1):
        print(f"  {name}: {found[name]} places")
    print(f"topology file reads in one zoplan run (launcher): {topology_reads()}")


if __name__ == "__main__":
    main()
