"""The one configuration of a ``zoplan run``: every option, its type, bound and default, here only.

``zoplan run`` (and ``zoplan validate``, which runs a plan) builds a :class:`RunConfig` from what
the user gave, the launcher completes it (the model's directory, the device kind) and writes it
to ``OUTPUT/run.json`` before any rank starts; each rank reads that file and nothing else (apart
from ``--host-dir``, this launch's shared-memory folder, which is not a setting of the run).
``--resume`` reads it back: the settings that decide what is trained stay as recorded, the ones
that decide how the run goes on (its total steps, evaluation, snapshots, restarts, the nodes) take
the values given again, the rest keep the recorded ones.

The file is versioned: the ``{"model": ..., "data": ...}`` of zoplan 0.x (no version) is migrated
when read; a newer version is refused with a message.

No torch here: the command line checks a configuration before it loads the runtime.
"""

from __future__ import annotations

import re

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Final, Literal, Mapping, TypeVar

import annotated_types
from pydantic import Field, ValidationError, field_validator

from zoplan.errors import ZoplanError
from zoplan.fileio import (
    RepeatedKey,
    Strict,
    brief,
    describe_validation_error,
    loads_json,
    read_bytes,
    read_text,
    write_whole,
)
from zoplan.limits import (
    MAX_GLOBAL_BATCH,
    MAX_LORA_RANK,
    MAX_MEASURED_STEPS,
    MAX_NODES,
    MAX_PREFIX_TOKENS,
    MAX_SEQ_LEN,
    MAX_STEPS,
    MIN_SEQ_LEN,
)
from zoplan.layout import Pins
from zoplan.tuning import FULL, Tuning
from zoplan.vocab import Dtype, Method

if TYPE_CHECKING:  # (for the annotation only; the plan file's module is imported where a plan is read)
    from zoplan.planfile import Plan

RUN_CONFIG_VERSION: Final = 1
CONFIG_FILE = "run.json"  # in the run's output directory
C = TypeVar("C", bound=Strict)

# The settings that decide what is trained: a resumed run keeps them as recorded (given again,
# they are named as ignored). A plan file fixes the planning ones (PLANNED).
PLANNED = (
    "topology",
    "global_batch",
    "seq_len",
    "pins",
    "lr",
    "eps",
    "seed",
    "tuning",
    "lora_rank",
    "lora_alpha",
    "prefix_tokens",
)
FIXED_ON_RESUME = (
    "plan",
    "model",
    "data",
    *PLANNED,
    "eval_fraction",
    "eval_data",
    "prompt",
    "label_words",
    "recipe",
    "pad_to_seq_len",
)


FIELD_NAME = re.compile(r"\w+")  # what a classification prompt's {field} may name
PROMPT_FIX = (
    "a placeholder is a record field's name in braces, such as {text} or {premise}; write a literal brace as {{ or }}"
)


# where the terminal's locale is not UTF-8 (LC_ALL=C), Python reads a UTF-8 argument as bytes it
# cannot decode: the text was right, the locale was not
_LOCALE_HINT = (
    ""
    if sys.getfilesystemencoding().lower().replace("-", "") == "utf8"
    else " (this shell's locale is not UTF-8: run with PYTHONUTF8=1, or a UTF-8 LANG such as C.UTF-8)"
)


def enclosing_run(path: Path) -> Path | None:
    """The output directory of a run that ``path`` lies inside (a folder above it holding a run's
    run.json and plan.yaml), else None."""
    for parent in path.resolve().parents:
        if (parent / CONFIG_FILE).is_file() and (parent / "plan.yaml").is_file():
            return parent
    return None


def blank(text: str) -> bool:
    """Whether ``text`` shows nothing: spaces, control and format characters only (a zero-width
    space, a byte order mark): a record's empty text, which a model would read as nothing."""
    import unicodedata

    return all(c.isspace() or unicodedata.category(c) in ("Cc", "Cf") for c in text)


def unreadable(text: str) -> str | None:
    """Why ``text`` is no text a tokenizer can read, or None: it holds a lone surrogate (half of a
    JSON ``\\ud83d\\ude00`` pair, or a byte the command line's encoding could not decode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (
            f"holds {text[exc.start]!r} at character {exc.start + 1}, which is no character (half of a "
            "\\ud83d\\ude00-style escape pair, or a byte that is not UTF-8)"
        )
    return None


def prompt_fields(prompt: str) -> tuple[tuple[str, str | None], ...]:
    """A classification prompt as (literal text, the field that follows it or None) pieces.

    A prompt is written as a Python format string whose fields are the records' fields: ``{text}``,
    ``{premise}``, and ``{{`` and ``}}`` for literal braces; a field takes no format spec,
    conversion or index, and a lone brace is a ValueError (each used to leave its text in the
    model's input unfilled, or to fill a field meant as literal text)."""
    import string

    try:
        parsed = list(string.Formatter().parse(prompt))
    except ValueError as exc:  # a lone brace
        raise ValueError(str(exc).lower()) from None
    pieces = []
    for literal, name, spec, conversion in parsed:
        if name is not None and (not FIELD_NAME.fullmatch(name) or spec or conversion):
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise ValueError(f"{shown} is not a field zoplan can fill (no format, no index)")
        pieces.append((literal, name))
    return tuple(pieces)


class RunConfig(Strict):
    """A ``zoplan run``, as written to ``OUTPUT/run.json``."""

    version: Literal[1] = RUN_CONFIG_VERSION
    # --- what is trained
    plan: Path | None = None  # the user's plan file; None: planned for this machine
    model: str = "tiny-opt"  # a local directory (recorded absolute), a hub id or a tiny-* model
    # Bundled texts: a randomly initialised tiny model learns their next-token statistics under ZO
    # within a minute on a CPU, but not the sentiment labels (docs/results/runtime-cpu.md).
    data: str = "sentiment-text"
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)  # of the data, held out for evaluation
    eval_data: str | None = None  # held-out examples of their own: all of --data trains (eval_fraction unused)
    # classification (labelled data): the model reads the prompt with {text} filled in, and the loss
    # is the cross-entropy over the label words' logits at the next position (MeZO's SST-2 recipe by
    # default); label i is the i-th word, each read after a space
    prompt: str = "{text} It was"
    label_words: tuple[str, ...] = ("terrible", "great")
    # one of MeZO's tasks (zoplan.recipes): its prompt, label words and hyper-parameters, where
    # not given; recorded so that a resumed run keeps it
    recipe: str | None = None
    pad_to_seq_len: bool = False  # every batch of the planned shape, however short the data (validate)
    # --- planning, when no plan file is given
    topology: str = "cpu-local"  # the bundled CPU ranks of this machine
    global_batch: int = Field(8, ge=1, le=MAX_GLOBAL_BATCH)
    seq_len: int = Field(64, ge=MIN_SEQ_LEN, le=MAX_SEQ_LEN)
    pins: Pins = Pins()
    lr: float | None = Field(
        None, gt=0
    )  # None: the planner's (1e-6; 1e-3 for the tiny models), or MeZO's for an adapter
    eps: float | None = Field(None, gt=0)  # None: 1e-3, or MeZO's for an adapter (zoplan.tuning)
    # what is trained (zoplan.tuning): every weight, or LoRA / a prefix on read-only blocks
    tuning: Method = Method.FULL
    lora_rank: int = Field(FULL.lora_rank, ge=1, le=MAX_LORA_RANK)
    lora_alpha: float = Field(FULL.lora_alpha, gt=0)
    prefix_tokens: int = Field(FULL.prefix_tokens, ge=1, le=MAX_PREFIX_TOKENS)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    # --- how the run goes
    steps: int = Field(100, ge=1, le=MAX_STEPS)  # the run's total, resumed or not
    output: Path = Path("zoplan-run")
    # held-out evaluation: None, before the first step and after the last; N, every N steps too; 0: never
    eval_every: int | None = Field(None, ge=0)
    max_nonfinite: int = Field(5, ge=1)
    snapshot_every: int = Field(0, ge=0)  # 0: never
    snapshot_minutes: float = Field(0.0, ge=0.0)  # 0: never
    keep_snapshots: int = Field(2, ge=0)  # 0: all of them
    journal_sync_every: int = Field(1, ge=1)  # fsync the journal every N steps
    trace_steps: int = Field(8, ge=0)  # steps whose every span is kept
    quiet: bool = False
    # --- the machines
    nnodes: int = Field(1, ge=1, le=MAX_NODES)
    node_rank: int = Field(0, ge=0)
    master_addr: str = "127.0.0.1"
    master_port: int | None = Field(None, ge=1, le=65535)  # None: a free one (one machine)
    max_restarts: int = Field(0, ge=0)  # torchrun restarts crashed ranks; they resume from the journal
    # --- completed by the launcher before any rank starts
    model_dir: Path | None = None  # where the model's files are
    device: Literal["cpu", "cuda"] | None = None
    # the weights the run started from (zoplan.runtime.checkpoint.weights_stamp): a resume of
    # other weights is refused (None: a run.json written before this was recorded)
    model_weights: str | None = None
    # the examples of --data and --eval-data (zoplan.runtime.data.examples_stamp): a resume on
    # other examples is refused (None: not recorded)
    data_stamp: str | None = None
    eval_data_stamp: str | None = None
    # the plan.yaml the run wrote into its directory (plan_stamp): resumed or replayed, the run
    # reads its settings there, so one edited since is refused (None: not recorded)
    plan_stamp: str | None = None

    @field_validator("plan", "model", "data", "eval_data", "topology", "output", "master_addr", mode="before")
    @classmethod
    def _not_empty(cls, value: object) -> object:
        # an empty name or path ("" as an unset shell variable gives): as a path it would be the
        # current directory, where a run would then write
        if isinstance(value, str) and not value.strip():
            raise ValueError("is empty: give it a value, or leave it out for the default")
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, prompt: str) -> str:
        try:
            pieces = prompt_fields(prompt)
        except ValueError as exc:
            raise ValueError(f"{exc}: {PROMPT_FIX}") from None
        if not any(name is not None for _, name in pieces):
            raise ValueError(
                "the prompt needs a {text} placeholder, where each example's text goes (e.g. '{text} It was'), "
                "or the record fields it reads ('{premise} ... {hypothesis}')"
            )
        if any(name == "label" for _, name in pieces):
            raise ValueError(
                "{label} is the answer the model is to predict (its label word follows the prompt): a prompt "
                "reads the record's text or its other fields"
            )
        wrong = unreadable(prompt)
        if wrong is not None:
            raise ValueError(f"it {wrong}: give it in UTF-8{_LOCALE_HINT}")
        return prompt

    @field_validator("recipe")
    @classmethod
    def _recipe(cls, name: str | None) -> str | None:
        from zoplan.errors import ZoplanError
        from zoplan.recipes import recipe

        if name is not None:
            try:
                recipe(name)
            except ZoplanError as exc:
                raise ValueError(f"{exc.message}; {exc.fix}") from None
        return name

    @field_validator("label_words")
    @classmethod
    def _words(cls, words: tuple[str, ...]) -> tuple[str, ...]:
        words = tuple(w.strip() for w in words)
        if len(words) < 2 or not all(words) or len(set(words)) != len(words):
            raise ValueError("give two or more different label words, one per class (label 0 is the first)")
        for word in words:
            wrong = unreadable(word)
            if wrong is not None:
                raise ValueError(f"{word!r} {wrong}: give it in UTF-8{_LOCALE_HINT}")
        return words

    def to_tuning(self) -> Tuning:
        """What this run trains, as the planner counts it (zoplan.tuning)."""
        return Tuning(self.tuning, self.lora_rank, self.lora_alpha, self.prefix_tokens)

    def given(self, **changes: Any) -> RunConfig:
        """This configuration with ``changes``, checked as a new one is."""
        return make(**{**self.model_dump(exclude={"version"}), **changes})


class CalibrateConfig(Strict):
    """A ``zoplan calibrate``: what to time and where the profile goes; the launcher completes it
    and writes it into its scratch folder, where each rank reads it (as a run's ranks read
    ``run.json``)."""

    version: Literal[1] = RUN_CONFIG_VERSION
    model: str = "tiny-opt"  # its shape is timed (random weights)
    topology: str = "cpu-local"  # this machine
    micro_batch: int = Field(1, ge=1, le=MAX_GLOBAL_BATCH)  # sequences per micro-batch
    seq_len: int = Field(64, ge=MIN_SEQ_LEN, le=MAX_SEQ_LEN)
    dtype: Dtype | None = None  # None: fp32 on CPU ranks, bf16 on GPUs
    output: Path = Path("profile.yaml")
    steps: int = Field(20, ge=2, le=MAX_MEASURED_STEPS)  # engine steps timed per setting
    micro_batches: tuple[int, ...] = (1, 2)  # the counts timed: 1 and 2, more let a plan interpolate
    spans: Path | None = None  # keep every timed step: DIR/<setting>/spans-rank<R>.jsonl
    # --- completed by the launcher before any rank starts
    model_dir: Path | None = None
    device: Literal["cpu", "cuda"] | None = None
    block_params: int | None = None  # of the model: a block's slices are its parts
    layers: int = Field(4, ge=1)  # blocks of the timed model (the model's own shape, fewer layers)
    figures: Path | None = None  # the ranks' raw figures (JSON), which the launcher builds the profile from
    progress: Path | None = None  # what rank 0 is measuring, for the launcher's display
    host_root: Path | None = None  # the launch's shared-memory folder

    @field_validator("micro_batches")
    @classmethod
    def _counts(cls, counts: tuple[int, ...]) -> tuple[int, ...]:
        if not {1, 2} <= set(counts) or min(counts) < 1 or max(counts) > 999:
            raise ValueError("the counts timed must include 1 and 2, each from 1 to 999 (e.g. 1,2,4)")
        return tuple(sorted(set(counts)))


CALIBRATE_FILE = "calibrate.json"  # in calibrate's scratch folder


def make_calibration(**values: Any) -> CalibrateConfig:
    """A calibration's configuration from a user's values: a bad one is a ZoplanError naming the option."""
    return _checked(CalibrateConfig, values)


def write_calibration(config: CalibrateConfig, folder: Path) -> Path:
    return _write(config, folder / CALIBRATE_FILE)


def read_calibration(path: Path) -> CalibrateConfig:
    return CalibrateConfig.model_validate_json(read_text(path, CALIBRATE_FILE, limit=64 * 1024))


def default(name: str, config: type[Strict] = RunConfig) -> Any:
    """The default of a setting (for messages and help texts)."""
    return config.model_fields[name].default


def option(name: str, config: type[Strict] = RunConfig) -> dict[str, Any]:
    """``typer.Option`` keywords for a setting: its bounds and default shown, as declared here.
    The command line's options default to None (not given): a resumed run tells the ones given
    from the recorded ones."""
    field = config.model_fields[name]
    keywords: dict[str, Any] = {}
    for bound in field.metadata:
        if isinstance(bound, annotated_types.Ge):
            keywords["min"] = bound.ge
        elif isinstance(bound, annotated_types.Le):
            keywords["max"] = bound.le
    if isinstance(field.default, tuple):  # given on the command line comma-separated
        keywords["show_default"] = ",".join(map(str, field.default))
    elif field.default is not None and not isinstance(field.default, Pins):
        keywords["show_default"] = str(field.default)
    return keywords


# the settings of one kind of adapter: given for another kind of training, they would be ignored
ADAPTER_SETTINGS = {"lora_rank": "lora", "lora_alpha": "lora", "prefix_tokens": "prefix"}


def check_adapter_settings(given: Mapping[str, Any]) -> None:
    """Refuse an adapter's setting given for another kind of training (``--lora-rank`` without
    ``--tuning lora``): it would be ignored, and the run would train what the user did not ask for."""
    method = given.get("tuning") or "full"
    method = getattr(method, "value", method)  # (the command line's enum)
    for name, kind in ADAPTER_SETTINGS.items():
        if given.get(name) is not None and method != kind:
            trains = "every weight" if method == "full" else f"a {method} adapter"
            raise ZoplanError(
                f"{flag(name)} applies to --tuning {kind}, but the run trains {trains} (--tuning {method})",
                fix=f"add --tuning {kind}, or leave {flag(name)} out",
            )


def flag(name: str) -> str:
    """A setting as the command line gives it (the plan file is zoplan run's argument, not a flag)."""
    return "the plan file" if name == "plan" else "--" + name.replace("_", "-")


# each pin of ``zoplan run``'s plan (layout.Pins field) and its command-line flag
PIN_FLAGS = {
    "perturbation": "--pertp",
    "data": "--ddp",
    "slices": "--slices",
    "wire_dtype": "--wire-dtype",
    "gpus": "--gpus",
    "upload": "--upload",
    "resident": "--resident",
    "micro_batch": "--micro-batch",
}


def pin_flags(pins: Pins | None) -> list[str]:
    """The command-line flags of the pins set in ``pins``."""
    return [f for pin, f in PIN_FLAGS.items() if pins is not None and getattr(pins, pin) is not None]


def planned_flags(given: dict[str, Any]) -> list[str]:
    """The flags among ``given`` (RunConfig names; pins as a layout.Pins) that a plan file fixes."""
    flags = []
    for name in PLANNED:
        if name == "pins":
            flags += pin_flags(given.get("pins"))
        elif name in given:
            flags.append(flag(name))
    return flags


def make(**values: Any) -> RunConfig:
    """A configuration from a user's values: a bad one is a ZoplanError naming the option."""
    return _checked(RunConfig, values)


def _checked(config: type[C], values: dict[str, Any]) -> C:
    try:
        return config(**values)
    except ValidationError as exc:
        raise ZoplanError(_named(exc)) from None


_BOUNDS = {
    "greater_than_equal": "at least {ge}",
    "less_than_equal": "at most {le}",
    "greater_than": "more than {gt}",
    "less_than": "less than {lt}",
    "finite_number": "a finite number",
}


def bound_said(err: Mapping[str, Any], number: Callable[[Any], str] = str) -> str | None:
    """A pydantic error of a bound (or a non-finite number) as zoplan says it: "must be at least
    1", "must be a finite number", the bound written by ``number``; None for another kind of error."""
    bound = _BOUNDS.get(err["type"])
    return f"must be {bound.format(**{k: number(v) for k, v in err.get('ctx', {}).items()})}" if bound else None


def _named(exc: ValidationError) -> str:
    """The validation error with options spelled as the command line does (--eval-every)."""
    parts = []
    for err in exc.errors()[:3]:
        name = flag(str(err["loc"][0])) if err["loc"] else "(top level)"
        bound = bound_said(err)
        said = f" {bound}" if bound else ": " + err["msg"].removeprefix("Value error, ")
        parts.append(f"{name}{said}, got {brief(err.get('input'))}")
    return "; ".join(parts)


PLAN_FILE = "plan.yaml"  # in the run's output directory: the plan it runs


def plan_stamp(run_dir: Path) -> str:
    """The digest of a run directory's plan.yaml, as its bytes are."""
    import hashlib

    return "sha256:" + hashlib.sha256(read_bytes(run_dir / PLAN_FILE)).hexdigest()


def check_plan_unchanged(run_dir: Path, recorded: RunConfig) -> None:
    """Refuse a run directory whose plan.yaml is not the one its run wrote: ``--resume`` and
    ``zoplan replay`` take the run's settings from it (what is trained, the dtypes, lr, eps, the
    batch), and an edited copy went on as another run (a full run resumed as LoRA, its journal
    replayed in bf16), exit 0."""
    if recorded.plan_stamp is None or not (run_dir / PLAN_FILE).is_file():
        return  # (not recorded; a missing plan is refused where it is read)
    try:
        now = plan_stamp(run_dir)
    except OSError:
        return  # (refused where it is read, with the reason)
    if now != recorded.plan_stamp:
        raise ZoplanError(
            f"{run_dir / PLAN_FILE} is not the plan the run in {run_dir} started with: it was changed since "
            f"(its {CONFIG_FILE} records the plan it wrote), and the run's journal holds steps taken with "
            "the plan's settings (what is trained, its dtypes, learning rate, eps, batch)",
            fix=f"put back the plan the run wrote; to train with other settings, start a new run from the "
            f"run's weights once it has finished (zoplan run -m {run_dir / 'model'} --plan NEW.yaml ...)",
        )


def write(config: RunConfig, out: Path) -> Path:
    """``OUTPUT/run.json``."""
    return _write(config, out / CONFIG_FILE)


def _write(config: Strict, path: Path) -> Path:
    """A configuration as JSON, written whole or not at all (a crash leaves the previous one)."""
    write_whole(path, json.dumps(config.model_dump(mode="json"), indent=1) + "\n")
    return path


def planned_settings(plan: Plan) -> dict[str, Any]:
    """The settings a plan fixes (its batch, ZO settings and what is trained), as run.json names
    them: run.json then records what runs, not the defaults the plan overrides."""
    zo, tuning = plan.zo, plan.tuning
    return {
        "global_batch": plan.batch.global_batch,
        "seq_len": plan.batch.seq_len,
        "lr": zo.lr,
        "eps": zo.eps,
        "seed": zo.seed,
        "tuning": tuning.method,
        "lora_rank": tuning.lora_rank,
        "lora_alpha": tuning.lora_alpha,
        "prefix_tokens": tuning.prefix_tokens,
    }


def _planned_settings(run_dir: Path) -> dict[str, Any]:
    """What the plan in ``run_dir`` fixed, and its total steps, for a run.json that names only the
    model and data: its defaults would otherwise be recorded as what ran (a global batch of 8 for a
    run of 4). Nothing where the plan cannot be read (the resume reads it again, and says why)."""
    from zoplan.planfile import load_plan

    try:
        plan = load_plan(run_dir / PLAN_FILE)
    except ZoplanError:
        return {}
    return {**planned_settings(plan), "steps": plan.zo.steps}


def read(path: Path) -> RunConfig:
    """A run's configuration, migrated from an earlier version; a damaged one is a message."""
    fix = (
        "write it again with the --model and --data the run started with: "
        '{"model": "...", "data": "..."} is enough (the other settings take their defaults)'
    )
    try:
        data = loads_json(read_text(path, CONFIG_FILE, limit=64 * 1024))
    except RepeatedKey as exc:
        raise ZoplanError(f"{path} is damaged: {exc}", fix=fix) from None
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ZoplanError(f"{path} is damaged: it is not a JSON object", fix=fix) from None
    if not isinstance(data, dict):
        raise ZoplanError(f"{path} is damaged: it is not a JSON object", fix=fix)
    version = data.get("version", 0)
    if version == 0:  # zoplan 0.x: the model and data only
        if set(data) != {"model", "data"}:
            raise ZoplanError(
                f"{path} is damaged: it has no version and does not name just the run's model and data", fix=fix
            )
        data = {
            "version": RUN_CONFIG_VERSION,
            "model": data["model"],
            "data": data["data"],
            "output": str(path.parent),
            **_planned_settings(path.parent),
        }
    elif isinstance(version, bool) or not isinstance(version, int) or version > RUN_CONFIG_VERSION:
        raise ZoplanError(
            f"{path}: run configuration version {brief(version)} is not one this zoplan reads (1 and earlier)",
            fix="continue the run with the zoplan version that started it",
        )
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ZoplanError(f"{path} is damaged: {describe_validation_error(exc)}", fix=fix) from None
    except RecursionError:
        raise ZoplanError(f"{path} is damaged: nested too deeply", fix=fix) from None


def resumed(recorded: RunConfig, given: dict[str, Any]) -> tuple[RunConfig, list[str]]:
    """The configuration a ``--resume`` runs: ``given`` (the options on its command line) over the
    recorded one, except the settings that decide what is trained; returns it and the flags that
    were given but ignored for that reason."""
    ignored = [name for name in given if name in FIXED_ON_RESUME and given[name] != getattr(recorded, name)]
    kept = {"quiet": False, **{k: v for k, v in given.items() if k not in FIXED_ON_RESUME}}  # quiet: this display's
    return recorded.given(**kept), [flag(name) for name in ignored]
