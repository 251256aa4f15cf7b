"""The journal: one line per completed step, the record replay and --resume trust.

A line is one JSON object written by the rank that writes (``write_line``) before the step's update
is applied anywhere: step, seed, the two losses, the projected gradient, lr, eps, weight decay and
whether the step was skipped (non-finite losses). Readers (``read_journal``, ``parse_journal``:
``zoplan replay``, ``zoplan run --resume``, the snapshots' resume point) check every line for what
it means. This module imports no torch, so a damaged journal is refused in well under a second.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import IO

from zoplan.errors import ZoplanError
from zoplan.fileio import read_bytes
from zoplan.planfile import ZoSettings

FIELDS = ("step", "seed", "projected_grad", "lr", "weight_decay")


def read_journal(path: str | Path, *, first: int | None = None, warn: bool = True) -> list[dict]:
    """The journal's steps in order (from step ``first`` when given: 0 for a journal that starts
    from the base weights). A last line cut short (a power loss mid-write) is dropped with a
    warning (``warn`` False: silently, for a check the reading after it repeats); a bad line
    anywhere else is an error naming it."""
    path = Path(path)
    try:
        raw = journal_bytes(path)
    except OSError as exc:
        raise ZoplanError(
            f"cannot read journal {path}: {exc.strerror or exc}",
            fix="check that the file is there and readable (ls -l), or give the run's directory",
        ) from None
    return parse_journal(raw, path, first=first, warn=warn)[0]


def journal_bytes(path: Path) -> bytes:
    """A journal's bytes; one that is a named pipe is refused (a run's appends to it, and a
    resume's reading, would wait for the other end)."""
    if path.exists() and not path.is_file():
        raise ZoplanError(f"journal {path} is not a regular file (a named pipe, a device)", fix=cut_fix(path, 1))
    return read_bytes(path)


def parse_journal(
    raw: bytes, path: Path, *, first: int | None = None, keep_unterminated: bool = True, warn: bool = True
) -> tuple[list[dict], int]:
    """(the journal's rows, the length in bytes of the part they come from). Every line is checked
    for what it means (types, finite numbers, step numbers consecutive from ``first``); only the
    last line may be cut short, and only when the file does not end with a newline: it is left
    out (with ``keep_unterminated`` False, also when it parses: an append cut just before its
    newline). Anything else is a refusal naming the file and line, never a silent cut."""
    lines = raw.splitlines(keepends=True)
    rows: list[dict] = []
    good = 0
    for number, line in enumerate(lines, 1):
        unterminated = number == len(lines) and not line.endswith((b"\n", b"\r"))
        if not line.strip():
            good += len(line)
            continue
        try:
            try:
                row = json.loads(line.decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                if unterminated:  # a write cut short: only the last line, and only without its newline
                    if warn:
                        print(f"warning: {path}:{number}: dropped a torn last line", file=sys.stderr)
                    break
                raise
            row = journal_row(row)
        except (ValueError, KeyError, TypeError, RecursionError, UnicodeDecodeError) as exc:
            reason = str(exc) if isinstance(exc, (KeyError, TypeError)) else type(exc).__name__
            raise ZoplanError(
                f"{path}:{number}: not a journal line ({reason[:200]})", fix=cut_fix(path, number)
            ) from None
        if unterminated and not keep_unterminated:
            break
        expected = rows[-1]["step"] + 1 if rows else first
        if expected is not None and row["step"] != expected:
            what = "the first line" if not rows else f"line {number}"
            raise ZoplanError(
                f"{path}:{number}: {what} is step {row['step']}, expected step {expected} "
                "(the steps of a journal are consecutive" + (f", from {first})" if first is not None else ")"),
                fix=cut_fix(path, number) if rows else "give the whole journal: its first line is the run's first step",
            )
        rows.append(row)
        good += len(line)
    return rows, good


def cut_fix(path: Path, number: int) -> str:
    """What to do about a damaged line: the lines before it are intact."""
    if number <= 1:
        return f"{path} is damaged from its first line: restore it from a copy, or start a new run"
    return (
        f"restore {path} from a copy; or keep its first {number - 1} line(s), the steps before the "
        f"damage (`head -n {number - 1} {path} > journal.kept && mv journal.kept {path}`): "
        "a resumed run then trains the later steps again"
    )


def journal_row(row: object) -> dict:
    """The fields replay needs, with their types checked (a journal is user input)."""
    if not isinstance(row, dict):
        raise TypeError("not a JSON object")
    out = {k: row[k] for k in FIELDS}
    for key in ("step", "seed"):
        if not isinstance(out[key], int) or isinstance(out[key], bool) or not 0 <= out[key] < 2**63:
            raise TypeError(f"'{key}' must be an integer in [0, 2**63)")
    for key in ("projected_grad", "lr", "weight_decay"):
        value = out[key]
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or value != value
            or value in (float("inf"), float("-inf"))
        ):
            raise TypeError(f"'{key}' must be a finite number")
        out[key] = float(value)
    # A skipped step (non-finite losses) changed nothing. A finite step whose gradient is exactly
    # 0 still applied its weight decay, so it is replayed. Journals without the field: g == 0.
    skipped = row.get("skipped", out["projected_grad"] == 0.0)
    if not isinstance(skipped, bool):
        raise TypeError("'skipped' must be true or false")
    out["skipped"] = skipped
    # what the line's projected gradient was computed from (zoplan run's lines; for the check of
    # check_lines): kept where present and numbers
    for key in ("loss_plus", "loss_minus", "eps"):
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def check_lines(rows: list[dict], zo: ZoSettings, total_steps: int, path: Path) -> None:
    """Each line holds together with itself and its run's plan (``zo``, the run's ZO settings,
    over ``total_steps``): its seed is the step's (``step_seed``), its learning rate the schedule's
    at its step, its eps and weight decay the plan's, its projected gradient (L+ − L−) / 2ε of its
    own losses (0 where they are not finite), and it is marked skipped exactly then. A line edited
    by hand (a number changed, a field taken out, ``skipped`` flipped) would replay to weights no
    run trained; it is refused, named. Lines without their losses (ZOTrainer's, older runs') are
    checked as far as they go."""
    import math

    from zoplan.runtime.perturb import step_seed
    from zoplan.runtime.zo import learning_rate

    run_seed, eps, weight_decay = zo.seed, zo.eps, zo.weight_decay
    for number, row in enumerate(rows, 1):
        step = row["step"]
        problems = []
        if row["seed"] != step_seed(run_seed, step):
            problems.append(f"its seed {row['seed']} is not step {step}'s of the run's seed {run_seed}")
        lr = learning_rate(zo.lr, zo.lr_schedule, step, total_steps)
        if row["lr"] != lr:
            schedule = "" if zo.lr_schedule == "constant" else f" ({zo.lr_schedule} over {total_steps} steps)"
            problems.append(f"its learning rate {row['lr']!r} is not the plan's {lr!r} at step {step}{schedule}")
        if "loss_plus" in row and "loss_minus" in row and "eps" not in row:
            problems.append("it has its losses but not the eps their projected gradient was taken with")
        if row.get("eps", eps) != eps:
            problems.append(f"its eps {row['eps']!r} is not the plan's {eps!r}")
        if row["weight_decay"] != weight_decay:
            problems.append(f"its weight decay {row['weight_decay']!r} is not the plan's {weight_decay!r}")
        if "loss_plus" in row and "loss_minus" in row:
            lp, lm = row["loss_plus"], row["loss_minus"]
            g = (lp - lm) / (2 * row.get("eps", eps)) if math.isfinite(lp - lm) else math.nan
            finite = all(map(math.isfinite, (lp, lm, g)))
            if row["projected_grad"] != (g if finite else 0.0):
                problems.append(
                    f"its projected gradient {row['projected_grad']!r} is not (loss_plus - loss_minus) / 2 eps = "
                    f"{g if finite else 0.0!r}"
                )
            if row["skipped"] == finite:
                problems.append(
                    f"it says skipped: {str(row['skipped']).lower()}, but its losses are{' not' * (not finite)} finite"
                )
        if problems:
            raise ZoplanError(
                f"{path}: the line of step {step} does not hold together: {'; '.join(problems)} (edited by hand?)",
                fix=cut_fix(path, number),
            )


def write_line(journal: IO[str], record: dict, sync: bool) -> None:
    """Append one step's line; with ``sync``, flushed to the disk (the step survives a power
    loss). The journal file is line-buffered."""
    journal.write(json.dumps(record) + "\n")
    if sync:
        os.fsync(journal.fileno())
