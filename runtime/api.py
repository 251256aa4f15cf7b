"""zoplan from Python: ``fine_tune`` does what ``zoplan run`` does, from a script or a notebook.

    from zoplan.runtime import fine_tune

    result = fine_tune(model="path/to/model", data="train.jsonl", steps=200, lr=1e-5, output="run1")
    print(result)  # the losses before and after, what ran, what was written
    model = AutoModelForCausalLM.from_pretrained(result.model)

It is the command's own implementation (``launch.configure`` then ``launch.run``): the same
options under the same names (RunConfig's: ``plan``, ``data``, ``eval_data``, ``prompt``,
``label_words``, ``lr``, ``eps``, ``global_batch``, ``seq_len``, ``topology``, ``steps``,
``output``, ...), the same checks, the same output directory, the same ranks (forked on this
machine: no torchrun, no shell). A problem is raised as ``ZoplanError`` (its ``message`` and
``fix``); what ``zoplan run`` prints as a warning is a Python warning.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from zoplan.errors import ZoplanError, did_you_mean
from zoplan.layout import Pins
from zoplan.records import RunSummary
from zoplan.runconfig import CONFIG_FILE, RunConfig

# what a caller may not set: the version, and what the launcher completes
_NOT_OPTIONS = {"version", "model_dir", "device"}


def fine_tune(
    model: str | Path | None = None,
    data: str | Path | None = None,
    *,
    plan: str | Path | None = None,
    steps: int | None = None,
    output: str | Path | None = None,
    resume: str | Path | None = None,
    quiet: bool = False,
    **options: Any,
) -> RunSummary:
    """Fine-tune ``model`` on ``data`` with MeZO, as ``zoplan run`` does, and return what the run
    did (``RunSummary``: its losses, its held-out figures, ``.model``, the trained model's
    directory; ``print`` it for ``zoplan run``'s closing lines).

    ``model``: a local directory, a hub id or a built-in tiny model (default ``tiny-opt``);
    ``data``: a .jsonl/.csv file or a bundled set (default ``sentiment-text``); ``plan``: a plan
    file (``zoplan plan -o``), else one is made for ``topology`` (default: this machine's CPU
    ranks). ``resume``: the output directory of a run to continue up to ``steps``. ``options``:
    any other option of ``zoplan run`` by its configuration name (``lr=1e-5``,
    ``label_words=("bad", "good")``, ``pins={"perturbation": 2}``; see ``zoplan.runconfig``).
    A progress bar shows unless ``quiet``.
    """
    allowed = set(RunConfig.model_fields) - _NOT_OPTIONS
    for name in options:
        if name not in allowed:
            raise ZoplanError(
                f"fine_tune() has no option {name!r}" + did_you_mean(name, sorted(allowed)),
                fix=f"the options are zoplan run's, by their configuration names: {', '.join(sorted(allowed))}",
            )
    given = {
        name: value
        for name, value in {
            "model": None if model is None else str(model),
            "data": None if data is None else str(data),
            "plan": plan,
            "steps": steps,
            "output": output,
            "quiet": quiet,
            **options,
        }.items()
        if value is not None
    }
    if isinstance(given.get("pins"), dict):
        given["pins"] = Pins(**given["pins"])
    if isinstance(given.get("label_words"), str):  # "bad,good", as on the command line
        given["label_words"] = tuple(given["label_words"].split(","))
    from zoplan.runtime.launch import configure, run

    done = None if resume is None else Path(resume)
    cfg, ignored = configure(given, done)
    if ignored and done is not None:
        warnings.warn(
            f"{', '.join(ignored)} ignored: the run in {done} continues with the plan, model and data it "
            f"started with ({done / CONFIG_FILE})",
            stacklevel=2,
        )
    return run(cfg, resume=done is not None)
