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
``fix``), naming the options as fine_tune takes them (``in_its_words``: ``steps``, not
``--steps``); what ``zoplan run`` prints as a warning is a Python warning. An option it does not have
is refused with the one meant (``learning_rate``: did you mean ``lr``?), and ``pins`` is checked
here, pin by pin, in its own words (``pins["perturbation"] must be 1 or 2``).
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import re
import traceback
import typing
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from zoplan.errors import Stopped, ZoplanError, did_you_mean
from zoplan.fileio import brief
from zoplan.layout import Pins
from zoplan.limits import MAX_SLICES_PER_BLOCK
from zoplan.records import RunSummary
from zoplan.runconfig import PIN_FLAGS, RunConfig, default
from zoplan.vocab import Dtype, Upload

# what a caller may not set: the version, and what the launcher completes
_NOT_OPTIONS = {"version", "model_dir", "device", "model_weights", "data_stamp", "eval_data_stamp", "plan_stamp"}
# fine_tune's own parameter that is not an option of the run
_PARAMETERS = {"resume"}

# names a caller may know from elsewhere (Hugging Face's TrainingArguments, MeZO's code,
# ZOTrainer) -> the option meant
_ALIASES = {
    "learning_rate": "lr",
    "epsilon": "eps",
    "zo_eps": "eps",
    "zo_seed": "seed",
    "max_steps": "steps",
    "num_steps": "steps",
    "train_steps": "steps",
    "num_train_steps": "steps",
    "batch_size": "global_batch",
    "global_batch_size": "global_batch",
    "train_batch_size": "global_batch",
    "per_device_train_batch_size": "global_batch",
    "max_length": "seq_len",
    "max_seq_len": "seq_len",
    "max_seq_length": "seq_len",
    "seq_length": "seq_len",
    "sequence_length": "seq_len",
    "output_dir": "output",
    "out_dir": "output",
    "model_name_or_path": "model",
    "model_name": "model",
    "model_path": "model",
    "dataset": "data",
    "train_data": "data",
    "train_file": "data",
    "train_dataset": "data",
    "eval_dataset": "eval_data",
    "eval_file": "eval_data",
    "validation_data": "eval_data",
    "eval_steps": "eval_every",
    "save_steps": "snapshot_every",
    "save_total_limit": "keep_snapshots",
    "lora_r": "lora_rank",
    "num_virtual_tokens": "prefix_tokens",
    "resume_from_checkpoint": "resume",
    "zo_max_nonfinite": "max_nonfinite",
}
# what a plan file sets and zoplan run does not: the flag of zoplan plan that does
_PLAN_ONLY = {
    "weight_decay": "--weight-decay",
    "lr_schedule": "--lr-schedule",
    "lr_scheduler_type": "--lr-schedule",
    "prefetch": "--prefetch",
    "movers": "--movers",
}

# zoplan run's pins (runconfig.PIN_FLAGS) and what each must be: whole numbers (least, most),
# words (the allowed ones), or gpus (device names)
_PIN_NUMBERS: dict[str, tuple[int, int | None, int]] = {  # least, most, an example
    "perturbation": (1, 2, 2),
    "data": (1, None, 2),
    "slices": (1, MAX_SLICES_PER_BLOCK, 4),
    "micro_batch": (1, None, 1),
    "resident": (0, None, 0),
}
_PIN_WORDS: dict[str, tuple[str, ...]] = {
    "wire_dtype": tuple(d.value for d in Dtype),
    "upload": tuple(u.value for u in Upload),
}
# each pin's other names: its command-line flag's (pertp, ddp, ...)
_PIN_ALIASES = {flag.removeprefix("--").replace("-", "_"): pin for pin, flag in PIN_FLAGS.items()}


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
    ``pins``: a dict of zoplan run's pins (``perturbation`` 1 or 2, ``data``, ``slices``,
    ``micro_batch``, ``resident``: ints; ``wire_dtype``, ``upload``: their words; ``gpus``: a
    list of device names, or one comma-separated string as on the command line).
    A progress bar shows unless ``quiet``.
    """
    allowed = set(RunConfig.model_fields) - _NOT_OPTIONS
    for name in options:
        if name not in allowed:
            raise _unknown_option(name, allowed)
    for name, value in (("model", model), ("data", data), ("plan", plan), ("output", output), ("resume", resume)):
        # str() of anything else (a list of files, say) would be read as a path or a name
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise ZoplanError(
                f"fine_tune({name}=...) takes a path or a name (str or pathlib.Path), not {type(value).__name__} {value!r:.60}",
                fix="pass one data set: a file, or a bundled set's name"
                if name == "data"
                else f"pass {name} as one path or name",
            )
    for name, value in (("steps", steps), *options.items()):
        default = RunConfig.model_fields[name].default if name in RunConfig.model_fields else None
        if isinstance(value, bool) and not isinstance(default, bool):  # True would count as 1
            raise ZoplanError(
                f"fine_tune({name}={value}) takes a number, not True or False", fix=f"give {name} a number"
            )
        if isinstance(value, str) and _numeric(name):  # "3" is the command line's; Python gives 3
            raise ZoplanError(
                f"fine_tune({name}={value!r}) takes a number, not a string", fix=f"give {name} a number, unquoted"
            )
    given = {
        name: value
        for name, value in {
            "model": None if model is None else str(model),
            "data": None if data is None else str(data),
            "plan": plan,
            "steps": steps,
            # absolute: a fix the run gives (the call that continues it) holds whatever the
            # working directory becomes
            "output": None if output is None else Path(output).absolute(),
            "quiet": quiet,
            **options,
        }.items()
        if value is not None
    }
    if "pins" in given:
        given["pins"] = _pins(given["pins"])
        if plan is None and resume is None:
            _check_micro_batch(given)
            _check_devices(given)
    if isinstance(given.get("label_words"), str):  # "bad,good", as on the command line
        given["label_words"] = tuple(given["label_words"].split(","))
    from zoplan.runtime.launch import configure, ignored_note, run, warnings_to

    done = None if resume is None else Path(resume).absolute()

    def warn(text: str) -> None:  # the launcher's warnings, as Python's, from the caller's line
        warnings.warn(in_its_words(text), stacklevel=2 + len(traceback.extract_stack()) - depth)

    depth = len(traceback.extract_stack())
    try:
        cfg, ignored = configure(given, done)
        if ignored and done is not None:
            warnings.warn(in_its_words(ignored_note(ignored, done)), stacklevel=2)
        with warnings_to(warn):
            summary: RunSummary = run(cfg, resume=done is not None)
        # where it is, whatever the working directory becomes (a notebook's os.chdir)
        summary = dataclasses.replace(summary, output=summary.output.absolute())
    except ZoplanError as exc:  # said in zoplan run's words: said again in the caller's
        # stopped by a signal (status 128 + its number): Python's Ctrl-C, a KeyboardInterrupt
        said = Stopped if exc.status > 128 else type(exc)
        raise said(
            in_its_words(exc.message), fix=None if exc.fix is None else in_its_words(exc.fix), status=exc.status
        ) from None
    return summary


def _numeric(name: str) -> bool:
    """Whether fine_tune's option ``name`` takes a number (int or float, or None)."""
    field = RunConfig.model_fields.get(name)
    return field is not None and set(typing.get_args(field.annotation) or (field.annotation,)) - {type(None)} <= {
        int,
        float,
    }


# a flag of zoplan run, and a number given to it ("--steps 3")
_FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9-]*)(?: (-?\d[\w.+-]*|[A-Z]\b))?")
# the command that continues a stopped run, and the call that does
_RESUME = re.compile(r"`zoplan run --resume (\S+) --steps (\d+)`")
# a command to type, which keeps its flags: in backquotes, or from "zoplan ..." or "torchrun ..."
# to the end of its clause
_COMMAND = re.compile(r"(`[^`]*`|\b(?:zoplan|torchrun) [^,;()]*)")


def in_its_words(text: str) -> str:
    """A message of zoplan run's in fine_tune's words: ``steps`` for ``--steps``, ``steps=3`` for
    ``--steps 3``, ``pins["perturbation"]`` for ``--pertp``; the flags of a command it gives to
    type stay as they are."""
    pins = {flag: f'pins["{pin}"]' for pin, flag in PIN_FLAGS.items()}
    names = (set(RunConfig.model_fields) - _NOT_OPTIONS) | _PARAMETERS

    def keyword(match: re.Match[str]) -> str:
        flag, value = "--" + match.group(1), match.group(2)
        name = pins.get(flag) or match.group(1).replace("-", "_")
        if flag not in pins and name not in names:
            return match.group(0)
        return name if value is None else f"{name}={value}"

    text = _RESUME.sub(lambda m: f"`fine_tune(resume={m.group(1)!r}, steps={m.group(2)})`", text)
    parts = _COMMAND.split(text)
    return "".join(part if i % 2 else _FLAG.sub(keyword, part) for i, part in enumerate(parts))


def _unknown_option(name: str, allowed: set[str]) -> ZoplanError:
    """The refusal of an option fine_tune does not have, with the one meant: a name known from
    elsewhere (``learning_rate``), a pin given on its own (``pertp=2``), a setting only a plan
    holds (``weight_decay``), or the closest of its own."""
    said = f"fine_tune() has no option {name!r}"
    fix = f"the options are zoplan run's, by their configuration names: {', '.join(sorted(allowed | _PARAMETERS))}"
    key = name.lower().replace("-", "_")
    if key in _PLAN_ONLY:
        return _plan_only(f"{said}: zoplan run takes it from a plan", key)
    pin = key if key in PIN_FLAGS else _PIN_ALIASES.get(key)
    if pin is not None:
        return ZoplanError(f'{said}: did you mean pins={{"{pin}": ...}}?', fix=fix)
    if key in _ALIASES:
        return ZoplanError(f"{said}: did you mean {_ALIASES[key]!r}?", fix=fix)
    return ZoplanError(said + did_you_mean(name, sorted(allowed | _PARAMETERS)), fix=fix)


def _plan_only(said: str, key: str) -> ZoplanError:
    """The refusal of a setting only a plan holds: ``said``, the zoplan plan flag that sets it, and
    how to run such a plan."""
    flag = _PLAN_ONLY[key]
    return ZoplanError(
        f"{said} (zoplan plan {flag})",
        fix=f'make a plan with it (zoplan plan {flag} ... -o plan.yaml) and run it: fine_tune(plan="plan.yaml", ...)',
    )


def _pins(value: object) -> Pins:
    """``fine_tune``'s ``pins`` (a dict of pins by name, or a ``layout.Pins``) as a Pins, every
    pin checked for its name, type and value; a bad one is a ZoplanError naming it as
    ``pins["name"]``."""
    if isinstance(value, Pins):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(Pins) if getattr(value, f.name) is not None}
    if not isinstance(value, Mapping):
        raise ZoplanError(
            f"pins must be a dict of zoplan run's pins by name, got {brief(value)} ({type(value).__name__})",
            fix='e.g. pins={"perturbation": 2, "micro_batch": 2}; the pins are ' + ", ".join(PIN_FLAGS),
        )
    checked: dict[str, Any] = {}
    for key, pin in value.items():
        where = f'pins["{key}"]' if isinstance(key, str) else f"pins[{brief(key)}]"
        if key not in PIN_FLAGS:
            raise _unknown_pin(key, where)
        if pin is not None:  # None: not pinned
            checked[key] = _pin(key, pin, where)
    return Pins(**checked)


def _check_devices(given: dict[str, Any]) -> None:
    """``pins["gpus"]`` names devices of the topology the run plans for (the search would say it
    in the command line's words, ``--gpus``)."""
    gpus = given["pins"].gpus
    if not gpus:
        return
    from zoplan.topology import load_topology

    topology = given.get("topology", default("topology"))
    machine = load_topology(topology)
    unknown = [g for g in gpus if g not in machine.gpus]
    if unknown:
        raise ZoplanError(
            f'pins["gpus"] names {", ".join(map(repr, unknown))}, not a device of topology {topology!r}',
            fix=f"name devices among {', '.join(machine.gpus)} (or give topology=... for another machine)",
        )


def _unknown_pin(key: object, where: str) -> ZoplanError:
    if key in _PLAN_ONLY:
        return _plan_only(f"{where} is not a pin of zoplan run: a plan holds it", str(key))
    name = str(key)
    alias = _PIN_ALIASES.get(name.lower().replace("-", "_"))
    hint = f": did you mean {alias!r}?" if alias is not None else did_you_mean(name, PIN_FLAGS)
    return ZoplanError(f"{where} is not a pin of zoplan run{hint}", fix="the pins are " + ", ".join(PIN_FLAGS))


def _pin(key: str, value: object, where: str) -> Any:
    """One pin's value, checked (and made plain: an int, a str, a tuple of names)."""
    got = f"got {brief(value)} ({type(value).__name__})"
    if key in _PIN_NUMBERS:
        least, most, sample = _PIN_NUMBERS[key]
        fix = f'e.g. pins={{"{key}": {sample}}}'
        if most == least + 1:
            allowed = f"{least} or {most}"
        else:
            allowed = f"from {least} to {most}" if most is not None else f"{least} or more"
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ZoplanError(f"{where} must be a whole number (an int), {allowed}, {got}", fix=fix)
        number = int(value)
        if number < least or (most is not None and number > most):
            raise ZoplanError(f"{where} must be {allowed}, got {number}", fix=fix)
        return number
    if key in _PIN_WORDS:
        words = _PIN_WORDS[key]
        allowed = " or ".join(map(repr, words)) if len(words) == 2 else "one of " + ", ".join(map(repr, words))
        fix = f"give {where} = {words[0]!r} (or leave the pin out: the planner chooses)"
        if not isinstance(value, str):
            raise ZoplanError(f"{where} must be a str, {allowed}, {got}", fix=fix)
        if value not in words:
            raise ZoplanError(f"{where} must be {allowed}, got {brief(value)}" + did_you_mean(value, words), fix=fix)
        return str(value)
    # gpus: the compute devices, in rank order
    example = 'e.g. ["rank0", "rank1"] (this machine\'s CPU ranks; zoplan topo show NAME lists a machine\'s)'
    if isinstance(value, str):  # "rank0,rank1", as on the command line
        names = [name.strip() for name in value.split(",") if name.strip()]
    elif isinstance(value, (list, tuple)):
        bad = [name for name in value if not isinstance(name, str) or not name.strip()]
        if bad:
            raise ZoplanError(
                f"{where} must list device names (non-empty strs), got {brief(bad[0])} ({type(bad[0]).__name__}) in it",
                fix=example,
            )
        names = [name.strip() for name in value]
    else:
        raise ZoplanError(f"{where} must be a list of device names, {got}", fix=example)
    if not names:
        raise ZoplanError(f"{where} names no device", fix=example)
    twice = next((name for i, name in enumerate(names) if name in names[:i]), None)
    if twice is not None:
        raise ZoplanError(f"{where} names {twice!r} twice", fix="name each compute device once, in rank order")
    return tuple(names)


def _check_micro_batch(given: dict[str, Any]) -> None:
    """A pinned micro-batch larger than the run's global batch (the one given, a recipe's or the
    default), in fine_tune's words; the rest of the pins' checks against the batch, the model and
    the machine are the planner's."""
    from zoplan.recipes import with_recipe

    micro = given["pins"].micro_batch
    batch = with_recipe(given).get("global_batch", default("global_batch"))
    if micro is not None and isinstance(batch, int) and not isinstance(batch, bool) and micro > batch:
        raise ZoplanError(
            f'pins["micro_batch"] {micro} is more than the global batch ({batch})',
            fix=f'use pins["micro_batch"] {batch} or less, or a larger global_batch',
        )
