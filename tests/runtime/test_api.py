"""``zoplan.runtime.fine_tune``: zoplan run from Python, the same implementation and options."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from safetensors.torch import load_file

from zoplan.errors import ZoplanError
from zoplan.runtime import fine_tune

README = Path(__file__).parents[2] / "README.md"


def python_blocks() -> list[str]:
    """The README's Python examples, in order."""
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def weights(out: Path) -> dict:
    return load_file(str(out / "model" / "model.safetensors"))


def test_fine_tune_is_zoplan_run(tiny_dirs, tmp_path: Path) -> None:
    """The same options give the same run, bit for bit, as the command line; the summary is the
    command's closing lines; a resume with a planned option given again warns that it is ignored."""
    options = dict(lr=1e-3, eps=1e-3, global_batch=4, label_words="dull,fine")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"review {i}", "label": i % 2}) + "\n" for i in range(24)))
    api = fine_tune(tiny_dirs["tiny-opt"], data, steps=3, output=tmp_path / "api", quiet=True, **options)
    cli = subprocess.run(
        [sys.executable, "-m", "zoplan.cli", "run", "--model", str(tiny_dirs["tiny-opt"]), "--data", str(data)]
        + ["--steps", "3", "-o", str(tmp_path / "cli"), "--lr", "1e-3", "--eps", "1e-3", "-b", "4"]
        + ["--label-words", "dull,fine"],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert cli.returncode == 0, cli.stderr
    a, b = weights(tmp_path / "api"), weights(tmp_path / "cli")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert api.steps == 3 and api.model == tmp_path / "api" / "model" and api.eval_before is not None
    assert str(api).replace(str(tmp_path / "api"), "OUT") == "\n".join(
        line.replace(str(tmp_path / "cli"), "OUT") for line in cli.stdout.strip().splitlines()[-4:]
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        more = fine_tune(resume=tmp_path / "api", steps=4, lr=1e-2, quiet=True)
    assert more.steps == 4 and any("--lr ignored: the run in" in str(w.message) for w in caught)


def test_fine_tune_refuses_what_zoplan_run_refuses(tmp_path: Path) -> None:
    with pytest.raises(ZoplanError, match="no option 'stepz': did you mean 'steps'"):
        fine_tune(stepz=3)
    with pytest.raises(ZoplanError, match="lr"):
        fine_tune(lr=-1.0, output=tmp_path / "o")
    plan = tmp_path / "plan.yaml"
    plan.write_text("not a plan")
    with pytest.raises(ZoplanError, match="--pertp set what the plan"):
        fine_tune(plan=plan, pins={"perturbation": 2}, output=tmp_path / "o")
    with pytest.raises(ZoplanError, match="both say what is held out"):
        fine_tune(eval_data="sentiment", eval_fraction=0.2, data="sentiment", output=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_the_readme_python_example_runs(tiny_dirs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """README's Python block, with this test's tiny model, bundled data and 2 steps."""
    code = python_blocks()[0]
    assert len(code.strip().splitlines()) <= 10  # the promise: under 10 lines
    code = (
        code.replace('"path/to/hf-model"', repr(str(tiny_dirs["tiny-opt"])))
        .replace('"train.jsonl"', '"sentiment"')
        .replace("steps=200", "steps=2")
        .replace("lr=1e-5", "lr=1e-3")
    )
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["result"].steps == 2 and (tmp_path / "run1" / "model" / "config.json").exists()
    assert type(scope["model"]).__name__ == "OPTForCausalLM"
