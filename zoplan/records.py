"""What a run writes beside its weights, one schema each, and the one way to write and read it.

- ``metrics.jsonl`` (rank 0): a :class:`TrainRow` per step, an :class:`EvalRow` per evaluation,
  a :class:`ResumedRow` where a start picked up a run;
- ``spans-rank<R>.jsonl`` (every rank): a :class:`SpanLine` per step (runtime/spans.py);
- ``error.json``: a rank's failure, :class:`RankError` (kind, message, fix), which ``zoplan run``
  shows as it is: never a text scraped from a log;
- the run summary that ``zoplan run`` prints and returns, :class:`RunSummary`, read from the
  metrics.

The journal has its own module (zoplan.runtime.journal: every line is checked before a resume
trusts it) and so has the run's configuration (zoplan.runconfig, ``run.json``, whose version
names this module's: ``RECORDS_VERSION``). Rows are strict: a row of the wrong shape (a crash
cut it, someone edited the file) is left out by the readers, never half-read. Numbers may be NaN
or infinite (a non-finite loss is what the run saw). No torch here: validate and the launcher
read these without it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final, Literal, Union

from pydantic import BaseModel, ConfigDict, Strict, ValidationError

from zoplan.errors import ZoplanError
from zoplan.fileio import read_jsonl, write_whole

RECORDS_VERSION: Final = 1
METRICS_FILE = "metrics.jsonl"
ERROR_FILE = "error.json"


class Row(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    def line(self) -> str:
        """The row as one line of its file (fields left unset are not written)."""
        return json.dumps(self.model_dump(exclude_none=True)) + "\n"


class TrainRow(Row):
    step: int
    loss: float  # the mean of the two branches' losses
    projected_grad: float
    step_time_s: float
    tokens_per_s: float
    elapsed_s: float
    nonfinite_total: int
    padding: float | None = None  # share of the step's positions that hold padding (zoplan validate)
    lr: float | None = None  # the step's learning rate


class StallCheck:
    """Says when a run's updates are too small to move its loss: in MeZO a step changes the loss,
    to first order, by -lr * g**2 (the update is -lr * g * z, and g estimates the loss's slope
    along z). Over the first ``steps`` steps those changes should add up to ``share`` of the
    loss for a model that learns within a few hundred steps; when they do not, the learning rate
    is likely too small for it. Measured over the first 20 steps, as a share of the first step's
    loss (docs/runtime.md): SmolLM2-135M on the bundled sentiment set 1.7% at lr 1e-6 (the
    default) and 15.7% at 1e-5; tiny-opt's default run (lr 1e-3) 5.0%. Hence 2.5%: a hint, not a
    verdict (g is noisy).

    When every step with finite losses had g exactly 0 (its losses at θ+εz and θ−εz equal), no
    perturbation changed the loss, whatever the learning rate: the warning then says that eps is
    below the precision of the compute dtype instead."""

    def __init__(self, steps: int = 20, share: float = 0.025, total: int | None = None) -> None:
        # a run of fewer steps (``total``) is judged after its last: only whether any perturbation
        # changed the loss (a certainty; the learning rate's hint needs its 20 steps of a noisy g)
        self.steps, self.share, self.total = steps, share, total
        self.short = total is not None and total < steps
        self.seen = 0
        self.drop = 0.0
        self.first_loss: float | None = None
        self.lr: float | None = None
        self.flat = 0  # steps with finite losses whose projected gradient was exactly 0
        self.moved = False  # a step with finite losses whose projected gradient was not 0

    def add(self, row: TrainRow) -> str | None:
        """The warning, once, at the ``steps``-th step of the run; else None. Only the run's first
        ``steps`` steps count: a resume's later steps (a loss long past its start) say nothing."""
        if row.lr is None or row.step >= self.steps:
            return None
        self.seen += 1
        self.first_loss = row.loss if self.first_loss is None else self.first_loss
        self.lr = row.lr
        if math.isfinite(row.projected_grad):
            self.drop += row.lr * row.projected_grad**2
        if math.isfinite(row.loss):  # a skipped step (non-finite losses) carries g = 0 too: not counted
            if row.projected_grad == 0.0:
                self.flat += 1
            else:
                self.moved = True
        if self.seen != (self.total if self.short else self.steps):
            return None
        if self.flat and not self.moved:  # g = (L+ - L-) / 2eps is exactly 0 only when L+ == L-
            return "warning: " + unmoved(
                self.seen, "--eps (left out, the default: 1e-3 for full-parameter tuning), or a plan made with one"
            )
        if self.short or self.first_loss is None or not math.isfinite(self.first_loss):
            return None
        if self.drop >= self.share * abs(self.first_loss):
            return None
        return (
            f"warning: in {self.steps} steps the updates add up to a first-order loss decrease of "
            f"{self.drop:.2g} (the sum of lr * g**2), {self.drop / abs(self.first_loss):.1%} of the loss "
            f"({self.first_loss:.4g}): the learning rate ({self.lr:g}) is likely too small for this model to "
            f"learn within a few hundred steps; try 10x (--lr {10 * self.lr:g}, or a plan made with it)"
        )


class EvalRow(Row):
    step: int  # -1: before the first step
    eval_loss: float
    eval_accuracy: float


class ResumedRow(Row):
    resumed_at: int  # steps done when this start picked up
    snapshot: str | None = None  # None: the base weights
    replayed: int  # journal steps replayed onto the snapshot (or the base weights)
    restart: int  # 0: a --resume; N: the N-th automatic restart after a crashed rank


class NoteRow(Row):
    """What the ranks found that the user should know and that changes no number: said by the
    launcher as a warning when it reads the row (examples cut to the sequence length)."""

    note: str


MetricsRow = Union[TrainRow, EvalRow, ResumedRow, NoteRow]


def _metrics_row(data: dict[str, Any]) -> MetricsRow | None:
    kind: type[MetricsRow] = (
        ResumedRow
        if "resumed_at" in data
        else EvalRow
        if "eval_loss" in data
        else NoteRow
        if "note" in data
        else TrainRow
    )
    try:
        return kind.model_validate(data)
    except ValidationError:
        return None


def read_metrics(path: Path, start: int = 0) -> tuple[list[MetricsRow], int]:
    """The rows of a metrics file from byte ``start`` (rows of another shape left out) and the
    offset after the last complete line: called again with it, only the new rows come back."""
    if not path.exists():
        return [], start
    try:
        dicts, offset = read_jsonl(path, start=start)
    except ZoplanError:
        if path.exists():
            raise
        return [], start  # removed since the look above (the run's directory, under a run that follows it)
    return [row for d in dicts if (row := _metrics_row(d)) is not None], offset


class SpanLine(Row):
    """One step of one rank: busy seconds per category, and every span for the first steps
    (``[stream, category, label, block, start_s, end_s]``, from the step's start)."""

    step: int
    wall_s: float
    totals: dict[str, float]
    host_totals: dict[str, float] | None = None  # CUDA: seconds the host spent issuing each category
    peak_bytes: int | None = None  # CUDA: the device's peak allocation since the run began
    # (a JSON array reads as the tuple: the one field not held to strict types)
    spans: list[Annotated[tuple[str, str, str, int, float, float], Strict(False)]] | None = None


def read_spans(path: Path) -> list[SpanLine]:
    out = []
    for data in read_jsonl(path)[0]:
        try:
            out.append(SpanLine.model_validate(data))
        except ValidationError:
            continue
    return out


class RankError(Row):
    """Why a rank stopped, for the user: what ``zoplan run`` prints (a ZoplanError's fields)."""

    version: Literal[1] = RECORDS_VERSION
    rank: int
    kind: Literal["error", "disk"]  # disk: the disk holding the output is full or read-only
    message: str
    fix: str | None = None


def write_error(out: Path, error: RankError) -> bool:
    """``error.json`` in the output directory, whole or not at all; False when it could not be
    written (a full disk: the launcher then names the disk from the log)."""
    try:
        write_whole(out / ERROR_FILE, error.line())
        return True
    except ZoplanError:
        return False


def write_rank_error(out: Path, error: RankError) -> bool:
    """``error.json`` for a rank that stops the run: rank 0's account first, else the first rank's
    to write one (``write_error``'s answer; True where another rank's account is kept)."""
    if error.rank != 0 and read_error(out) is not None:
        return True
    return write_error(out, error)


def read_error(out: Path) -> RankError | None:
    """The rank's error record, if one was written and reads whole (at most 64 KiB are read)."""
    try:
        with (out / ERROR_FILE).open("rb") as f:
            return RankError.model_validate_json(f.read(64 * 1024))
    except (OSError, ValidationError, ValueError):
        return None


def unmoved(steps: int, larger: str) -> str:
    """What to say where no perturbation of ``steps`` steps changed the loss (every g exactly 0);
    ``larger``: how to give a larger eps."""
    return (
        f"in {steps} steps no perturbation changed the loss: the projected gradient was exactly 0 on every "
        "step (the losses at +eps and -eps were equal), so nothing was learned; eps is below the precision "
        f"of the compute dtype (eps * z does not change the weights it is added to): try a larger {larger}"
    )


# the held-out loss this much above its start, or the training loss twice its start: the run
# went the wrong way (MeZO's loss falls slowly; a rise this large is a learning rate too large)
ROSE_HELD_OUT, ROSE_TRAINING = 1.10, 2.0


def diverged(
    first: float | None,
    last: float | None,
    before: float | None,
    after: float | None,
    window: int = 2,
    weights: str = "the weights written",
) -> str | None:
    """The warning for a run whose loss rose: the held-out loss from ``before`` to ``after``, or,
    without both of those, the training loss from ``first`` to ``last`` (means of its first and
    last ``window`` steps; single batches are too noisy to judge by) (lr 0.03 on tiny-opt: 7.6 ->
    419728, exit 0 and not a word; a script or ``fine_tune`` caller saw success)."""
    finite = [x is not None and math.isfinite(x) for x in (first, last, before, after)]
    held = finite[2] and finite[3]
    rose_held = held and after > before * ROSE_HELD_OUT and after - before > 1e-3  # type: ignore[operator]
    rose_train = (
        not held and window >= 2 and finite[0] and finite[1] and first > 0 and last > first * ROSE_TRAINING  # type: ignore[operator]
    )
    if not (rose_held or rose_train):
        return None
    which = (
        f"the held-out loss rose from {before:.4f} to {after:.4f}"
        if rose_held
        else f"the training loss rose from {first:.4f} to {last:.4f}"
    )
    return (
        f"{which}: the run diverged, most often from a learning rate too large for the model (or an eps "
        f"too large for its weights); {weights} are worse than those it started from: try a "
        "tenth of the learning rate"
    )


@dataclass
class RunSummary:
    """What a finished run did, from its metrics: ``zoplan run``'s closing lines."""

    output: Path
    steps: int
    first_loss: float | None  # mean over the first ``window`` steps (their finite losses; None: none)
    last_loss: float | None  # mean over the last ``window`` steps (likewise)
    eval: EvalRow | None  # the evaluation after the last step
    eval_before: EvalRow | None = None  # the evaluation before the first step
    window: int = 1
    skipped: int = 0  # steps whose loss was not finite: their updates were not applied
    first_step: int = 0  # the first step metrics.jsonl holds (0-based; later where its rows were lost)

    @property
    def model(self) -> Path:
        """The trained model's directory: ``AutoModelForCausalLM.from_pretrained(summary.model)``."""
        return self.output / "model"

    def lines(self) -> list[str]:
        """What the run did, as ``zoplan run`` closes: the losses, the held-out figures, what ran
        (from the run's plan.yaml) and what was written."""
        from zoplan.planfile import load_plan
        from zoplan.runconfig import CONFIG_FILE

        from zoplan.runconfig import RunConfig, read

        config: RunConfig | None
        try:
            config = read(self.output / CONFIG_FILE)
        except Exception:  # noqa: BLE001  (the summary says what it can)
            config = None

        def loss(x: float | None) -> str:
            return f"{x:.4f}" if x is not None else "not finite"

        first = (
            ("first step" if self.window == 1 else f"first {self.window} steps")
            if self.first_step == 0
            else f"step {self.first_step + 1}"
            + ("" if self.window == 1 else f"-{self.first_step + self.window}")
            + ", the first metrics.jsonl holds"
        )
        said = [
            f"trained {self.steps} step{'s' if self.steps != 1 else ''}: training loss {loss(self.first_loss)} "
            f"({first}) -> {loss(self.last_loss)} "
            f"({'last' if self.window == 1 else f'last {self.window}'})"
            + (f"; {self.skipped} step(s) skipped, their loss not finite (no update applied)" if self.skipped else "")
        ]
        evaluated = self.eval is not None or self.eval_before is not None
        if not evaluated and config is not None and config.eval_every != 0 and config.eval_data is None:
            # no example held out: the run evaluated nothing (not an evaluation of nothing, as zeros)
            fraction = config.eval_fraction
            said.append(
                "not evaluated: --eval-fraction 0 holds out no example"
                if fraction == 0
                else f"not evaluated: --eval-fraction {fraction:g} holds out no example (it rounds to none of "
                "the data); a larger --eval-fraction or --eval-data FILE gives a held-out evaluation"
            )
        if self.eval:
            before = self.eval_before
            said.append(
                f"held-out: loss {before.eval_loss:.4f} -> {self.eval.eval_loss:.4f}, accuracy "
                f"{before.eval_accuracy:.3f} -> {self.eval.eval_accuracy:.3f}"
                if before
                else f"held-out: loss {self.eval.eval_loss:.4f}, accuracy {self.eval.eval_accuracy:.3f}"
            )
        ran = load_plan(self.output / "plan.yaml")
        tuning = ran.tuning.to_tuning()
        name = config.recipe if config is not None else None
        said.append(
            f"with lr {ran.zo.lr:g} ({ran.zo.lr_schedule}), eps {ran.zo.eps:g}, {ran.batch.global_batch} "
            f"sequences x {ran.batch.seq_len} tokens a step, layout {ran.layout.perturbation}x{ran.layout.data} "
            f"(perturbation x data) on {ran.topology.name}"
            + (f", {ran.layout.nodes} nodes" if ran.layout.nodes > 1 else "")
            + (f", MeZO's {name} recipe" if name else "")
            + (f", {tuning.describe()} on read-only blocks" if tuning.frozen_base else "")
        )
        loads = "PeftModel.from_pretrained: an adapter" if tuning.frozen_base else "from_pretrained"
        said.append(
            f"wrote {self.output}/model ({loads}), journal.jsonl, metrics.jsonl, spans-rank*.jsonl "
            f"(zoplan validate reads them), plan.yaml, {CONFIG_FILE}"
        )
        return said

    def warnings(self) -> list[str]:
        """What the losses say went wrong (``diverged``)."""
        said = diverged(
            self.first_loss,
            self.last_loss,
            self.eval_before.eval_loss if self.eval_before else None,
            self.eval.eval_loss if self.eval else None,
            self.window,
        )
        return [said] if said else []

    def __str__(self) -> str:
        return "\n".join(self.lines())


def summarize(out: Path) -> RunSummary:
    rows = read_metrics(out / METRICS_FILE)[0]
    # one row per step: a step trained again after a resume (its journal line was lost) has a row
    # from each start, and the last one is the step the weights hold
    by_step = {r.step: r for r in rows if isinstance(r, TrainRow)}
    train = [by_step[step] for step in sorted(by_step)]
    # the evaluations before the first step (step -1) and after the last one trained, the last row
    # of each: an evaluation of another step (every N steps, or the end of an earlier start) is
    # neither, and is not reported as one
    evals = {r.step: r for r in rows if isinstance(r, EvalRow)}
    final = evals.get(train[-1].step) if train else None
    # single steps are noisy (a few sequences each): compare the means of the first and last tenth
    k = max(1, len(train) // 10)

    def mean(rows: list[TrainRow]) -> float | None:  # a skipped step's loss (not finite) says nothing
        finite = [r.loss for r in rows if math.isfinite(r.loss)]
        return sum(finite) / len(finite) if finite else None

    skipped = sum(not math.isfinite(r.loss) for r in train)
    # the steps done: the last one's number (rows of earlier steps may be gone: a metrics.jsonl
    # removed before a resume, whose rows then start where it picked up)
    steps = train[-1].step + 1 if train else 0
    first = train[0].step if train else 0
    return RunSummary(out, steps, mean(train[:k]), mean(train[-k:]), final, evals.get(-1), k, skipped, first)
