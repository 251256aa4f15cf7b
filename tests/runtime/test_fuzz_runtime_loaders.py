"""Property-based fuzzing of the runtime's loaders (issue 5, item 6): the journal and the data.

The contract under test: ``zoplan.runtime.replay.read_journal`` and
``zoplan.runtime.data.load_examples`` either load a file or raise ``zoplan.errors.ZoplanError``
(which the CLI prints as one message with exit status 2). Never any other exception, never a hang
(each call runs under a SIGALRM time limit). Beyond that:

- a journal cut at ANY byte offset (a power loss mid-write) loads, and gives exactly the lines
  written in full before the cut: a torn last line is dropped by design;
- a bad line anywhere but last is a ZoplanError naming that line;
- what ``read_journal`` loads, ``replay`` can apply (to a two-parameter module): the loader is
  the only check between a user's journal and the update arithmetic;
- valid .jsonl and .csv files of arbitrary unicode text and labels load back exactly.

Inputs are generated journals (worker.py's line format) and data files, then mutated as JSON
trees (deleted keys, changed types, huge / negative / NaN numbers, unknown keys), as lines
(dropped, repeated, swapped, blank) and as bytes (truncated, inserted, non-UTF-8, BOM, CRLF), plus
hand-made nasty lines (deep nesting, integers of 5000 digits, NUL, huge fields).

Inputs tried by one full run (each call is counted in ``COUNTS``; ``test_zz_every_input_counted``
asserts the totals, so these numbers are real):

- ``read_journal``: at least 880 files (150 valid, 150 cut at a random offset, 130 with a bad
  non-last line, 300 mutated, 150 nasty), and ``replay`` on every one of those that loaded (at
  least 400: how many mutated journals still load depends on which project modules were imported
  before, since hypothesis mixes literals from the code under test into what it draws);
- ``load_examples``: at least 1000 files (.jsonl: 150 valid, 250 mutated, 100 nasty; .csv: 150
  valid, 250 mutated, 100 nasty);
- plus 5 ``zoplan replay tiny-opt BADJOURNAL -o X`` subprocesses (HF_HUB_OFFLINE=1).

Product bugs found are listed in ``KNOWN_BUGS``: the random tests tolerate exactly those
signatures (counted in ``KNOWN_HITS``) and each has a strict-xfail test with a minimal explicit
``@example``, so fixing a bug turns its xfail into a failure that asks to drop the marker.
"""

from __future__ import annotations

import unicodedata

import copy
import csv
import fnmatch
import io
import json
import math
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import fuzzkit
from fuzzkit import EXPLICIT_ONLY, REFUSED, fresh, fuzz_settings, max_message_chars, product_frame, time_limit, write
from hypothesis import assume, example, given
from hypothesis import strategies as st
from torch import nn

from zoplan.errors import ZoplanError
from zoplan.runtime.data import Example, load_examples
from zoplan.runtime.journal import FIELDS, read_journal
from zoplan.runtime.replay import replay


COUNTS: Counter[str] = Counter()
KNOWN_HITS: Counter[str] = Counter()
RAN: set[str] = set()
LOADED = [0]  # journals read_journal returned: each must have been replayed

N_J_VALID, N_J_CUT, N_J_BADLINE, N_J_MUTATED, N_J_NASTY = 150, 150, 130, 300, 150
MIN_REPLAYED = 400  # 444 to 491 seen, depending on what ran before (see the docstring)
N_D_VALID, N_D_MUTATED, N_D_NASTY = 150, 250, 100  # per format


# ----- known product bugs -------------------------------------------------------------------------
@dataclass(frozen=True)
class KnownBug:
    key: str
    where: str  # fnmatch pattern on the innermost product frame "file.py:function"
    kinds: tuple[type[BaseException], ...]
    report: str
    stage: str = "load"  # "load": the loader itself; "replay": applying what it loaded


KNOWN_BUGS = {
    bug.key: bug
    for bug in (
        KnownBug(
            "read_journal-not-utf8",
            "replay.py:read_journal",
            (UnicodeDecodeError,),
            "runtime/replay.py read_journal (line 33) reads with path.read_text() and catches only "
            "OSError: a journal with a byte that is not UTF-8 (b'\\xff') raises UnicodeDecodeError",
        ),
        KnownBug(
            "read_journal-step-types",
            "replay.py:read_journal",
            (TypeError,),
            "runtime/replay.py read_journal (lines 48-49) checks that steps are consecutive with "
            'range(steps[0], steps[0] + len(steps)) without checking their type: a "step" that is '
            "a string, a float, null, a list... raises TypeError",
        ),
        KnownBug(
            "read_journal-json-escapes",
            "replay.py:read_journal",
            (RecursionError, ValueError),
            "runtime/replay.py read_journal (line 43) catches JSONDecodeError, KeyError and "
            "TypeError, but json.loads raises RecursionError on deep nesting ('[' * 100000) and "
            "ValueError on an integer of more than 4300 digits: on any line, the last included",
        ),
        KnownBug(
            "read_journal-field-types",
            "*",
            (TypeError, ValueError, OverflowError, RuntimeError),
            "runtime/replay.py read_journal returns rows without checking the types of seed, "
            'projected_grad, lr and weight_decay: {"seed": "x"} (or a float seed, a string '
            "lr...) loads, then replay raises TypeError in runtime/perturb.py name_key (line 141) "
            "('unsupported operand type(s) for &: str and int'): a traceback from zoplan replay",
            stage="replay",
        ),
        KnownBug(
            "read_jsonl-json-escapes",
            "data.py:_read_jsonl",
            (RecursionError, ValueError),
            "runtime/data.py _read_jsonl (lines 216-217) catches only json.JSONDecodeError, but "
            "json.loads raises RecursionError on deep nesting ('[' * 100000) and ValueError on an "
            "integer of more than 4300 digits (a label of 5000 digits)",
        ),
    )
}


def known_bug(exc: BaseException, stage: str) -> KnownBug | None:
    where = product_frame(exc)
    for bug in KNOWN_BUGS.values():
        if bug.stage == stage and fnmatch.fnmatchcase(where, bug.where) and isinstance(exc, bug.kinds):
            return bug
    return None


# Bugs found by this suite and fixed since: their examples stay as regression tests, and the random
# tests no longer tolerate their signatures.
FIXED = {
    "read_journal-not-utf8",
    "read_journal-step-types",
    "read_journal-json-escapes",
    "read_journal-field-types",
    "read_jsonl-json-escapes",
}


def xfail_bug(key: str) -> pytest.MarkDecorator:
    if key in FIXED:
        return pytest.mark.regression  # a plain test now: it must keep passing
    return pytest.mark.xfail(strict=True, raises=AssertionError, reason=f"BUG: {KNOWN_BUGS[key].report}")


# ----- the contract -------------------------------------------------------------------------------
LAST_REFUSAL = [""]  # the message of the last ZoplanError that attempt() returned REFUSED for


def attempt(
    loader: str,
    call: Callable[[], Any],
    input_size: int,
    *,
    stage: str = "load",
    seconds: float = 20.0,
    tolerate_known: bool = True,
) -> Any:
    """The call's result, or REFUSED for a ZoplanError (or a known bug's failure)."""
    COUNTS[loader] += 1
    LAST_REFUSAL[0] = ""
    try:
        with time_limit(seconds):
            return call()
    except ZoplanError as exc:
        assert isinstance(exc.message, str) and exc.message.strip(), f"{loader}: empty message"
        assert len(str(exc)) <= max_message_chars(input_size), f"{loader}: message amplified: {str(exc)[:200]}"
        LAST_REFUSAL[0] = str(exc)
        return REFUSED
    except Exception as exc:  # noqa: BLE001 - the point: nothing but ZoplanError may escape
        bug = known_bug(exc, stage) if tolerate_known else None
        if bug is not None:
            KNOWN_HITS[bug.key] += 1
            return REFUSED
        raise AssertionError(
            f"{loader} raised {type(exc).__name__} at {product_frame(exc)}, not ZoplanError: {str(exc)[:300]}"
        ) from exc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-runtime-loaders")


# ----- mutations ----------------------------------------------------------------------------------
SPECIAL_NUMBERS = [
    0,
    -1,
    1,
    2,
    2**31,
    2**63,
    2**64 + 1,
    10**30,
    -(10**30),
    0.0,
    -0.0,
    1e-300,
    5e-324,
    0.5,
    1e300,
    1.7976931348623157e308,
    math.inf,
    -math.inf,
    math.nan,
]
SPECIAL_STRINGS = [
    "",
    " ",
    "x",
    "1",
    "0",
    "1.0",
    "null",
    "nan",
    "NaN",
    "true",
    "é",
    "日本",
    "\u2028",
    "\x00",
    "\x1c",
    "\ud800",
    "a" * 300,
    "step",
    "seed",
    "text",
    "label",
]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(SPECIAL_NUMBERS),
    st.integers(-(10**6), 10**6),
    st.floats(),
    st.sampled_from(SPECIAL_STRINGS),
    st.text(max_size=10),
)
KEYS = st.sampled_from(SPECIAL_STRINGS) | st.text(max_size=8)
VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3), max_leaves=6
)


def mutate_record(data: st.DataObject, record: dict) -> Any:
    """One edit of a JSON object: delete, retype or renumber a field, add one, or replace it all."""
    record = copy.deepcopy(record)
    op = data.draw(st.sampled_from(["delete", "replace", "number", "unknown_key", "whole", "wrap"]), label="op")
    keys = sorted(record, key=str)
    if op == "whole" or not keys:
        return data.draw(VALUES, label="record")
    key = data.draw(st.sampled_from(keys), label="key")
    if op == "delete":
        del record[key]
    elif op == "replace":
        record[key] = data.draw(VALUES, label="value")
    elif op == "number":
        record[key] = data.draw(st.sampled_from(SPECIAL_NUMBERS), label="number")
    elif op == "unknown_key":
        record[data.draw(KEYS, label="new key")] = data.draw(VALUES, label="value")
    elif op == "wrap":
        return data.draw(st.sampled_from([[record], {"record": record}, [record, record]]), label="wrap")
    return record


def dumps(value: Any, ensure_ascii: bool = True) -> str:
    """One JSON line; with ensure_ascii (the default, as worker.py writes) lone surrogates and
    line separators are escaped, so they cannot split or break the line."""
    return json.dumps(value, ensure_ascii=ensure_ascii)


INSERTS = [
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b'"',
    b"\\",
    b"\n",
    b"\r",
    b"\r\n",
    b"\x00",
    b"\xff",
    b"\xc3",
    b"\xef\xbb\xbf",
    b"\xe2\x80\xa8",
    b"\x1c",
    b"\x85",
    b"NaN",
    b"-Infinity",
    b"1e999",
    b"null",
    b"9" * 40,
    b" ",
    b"\t",
    b'","',
    b"\x0b",
]
BYTE_OPS = (
    "truncate",
    "insert",
    "overwrite",
    "delete_span",
    "dup_line",
    "drop_line",
    "swap_lines",
    "blank_line",
    "bom",
    "crlf",
    "latin1",
)


def mutate_bytes(data: st.DataObject, raw: bytes) -> bytes:
    return fuzzkit.mutate_bytes(data, raw, INSERTS, BYTE_OPS)


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


# ----- journals -----------------------------------------------------------------------------------
FINITE = st.floats(allow_nan=False, allow_infinity=False, width=64)
LOSS = st.floats(allow_infinity=True, allow_nan=True)


@st.composite
def journals(draw: Callable, min_lines: int = 1) -> list[dict]:
    """Lines as runtime/worker.py writes them (skipped steps: non-finite losses, gradient 0)."""
    first = draw(st.sampled_from([0, 1, 7, 1000]), label="first step")
    n = draw(st.integers(min_lines, 6), label="lines")
    lr, eps, wd = draw(FINITE.filter(lambda x: abs(x) < 1)), draw(FINITE), draw(st.sampled_from([0.0, 0.01]))
    rows = []
    for step in range(first, first + n):
        skipped = draw(st.booleans())
        rows.append(
            {
                "step": step,
                "seed": draw(st.integers(0, 2**63 - 1)),
                "loss_plus": draw(LOSS),
                "loss_minus": draw(LOSS),
                "projected_grad": 0.0 if skipped else draw(FINITE.filter(lambda x: abs(x) < 1e6)),
                "lr": lr,
                "eps": eps,
                "weight_decay": wd,
                "skipped": skipped,
            }
        )
    return rows


def journal_text(rows: list[Any]) -> str:
    return "".join(dumps(r) + "\n" for r in rows)


def expected_rows(rows: list[dict]) -> list[dict]:
    """What read_journal gives of each line: the fields replay needs, and what its projected
    gradient came from (journal.check_lines)."""
    kept = ("loss_plus", "loss_minus", "eps")
    return [{**{k: r[k] for k in FIELDS}, "skipped": r["skipped"], **{k: r[k] for k in kept if k in r}} for r in rows]


def as_text(rows: Any) -> str:
    """Rows compared as JSON text: a NaN loss (a skipped step's) equals itself there."""
    return json.dumps(rows, sort_keys=True)


def tiny_module() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2))


def check_journal(path: Path, *, tolerate_known: bool = True, replay_too: bool = True) -> Any:
    """read_journal: loads or ZoplanError; what loads must replay (or ZoplanError) on a tiny module."""
    size = path.stat().st_size
    rows = attempt("read_journal", lambda: read_journal(path), size, tolerate_known=tolerate_known)
    if rows is not REFUSED and replay_too:
        LOADED[0] += 1
        attempt("replay", lambda: replay(tiny_module(), rows), size, stage="replay", tolerate_known=tolerate_known)
    return rows


@fuzz_settings(N_J_VALID)
@given(rows=journals(), crlf=st.booleans(), trailing_blank=st.booleans())
def test_journal_valid_roundtrip(workdir: Path, rows: list[dict], crlf: bool, trailing_blank: bool) -> None:
    RAN.add("journal_valid")
    text = journal_text(rows) + ("\n" if trailing_blank else "")
    path = write(fresh(workdir, "journal.jsonl"), text.replace("\n", "\r\n") if crlf else text)
    loaded = check_journal(path, tolerate_known=False)
    assert as_text(loaded) == as_text(expected_rows(rows))


@fuzz_settings(N_J_CUT)
@given(rows=journals(), data=st.data())
def test_journal_cut_anywhere_drops_only_the_torn_last_line(
    workdir: Path, rows: list[dict], data: st.DataObject
) -> None:
    """A power loss mid-write: the file is any prefix of a good journal."""
    RAN.add("journal_cut")
    raw = journal_text(rows).encode()
    cut = data.draw(st.integers(0, len(raw)), label="cut")
    path = write(fresh(workdir, "journal.jsonl"), raw[:cut])
    whole = 0  # lines whose every character survived the cut (their newline may not)
    for row in rows:
        end = len(dumps(row))
        if end > cut:
            break
        whole += 1
        cut -= end + 1
    loaded = check_journal(path, tolerate_known=False)
    assert as_text(loaded) == as_text(expected_rows(rows[:whole]))


BAD_LINES = st.one_of(
    st.sampled_from(
        [
            '{"step": 1',
            "not json",
            "[]",
            "1",
            '"x"',
            "null",
            "{}",
            '{"step": 0}',
            "}",
            "{",
            '{"step": 0, "seed": 1, "projected_grad": 0.5, "lr": 0.1}',
        ]
    ),
    st.text(
        alphabet=st.characters(
            blacklist_characters="\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029", blacklist_categories=("Cs",)
        ),
        min_size=1,
        max_size=30,
    ).filter(
        lambda s: (
            s.strip()
            and not s.strip().startswith(
                ("{", "[", '"', "-", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "N", "I", "t", "f", "n")
            )
        )
    ),
)


@fuzz_settings(N_J_BADLINE)
@given(rows=journals(min_lines=2), data=st.data(), bad=BAD_LINES)
def test_journal_bad_line_before_the_last_is_an_error(
    workdir: Path, rows: list[dict], data: st.DataObject, bad: str
) -> None:
    RAN.add("journal_badline")
    lines = [dumps(r) for r in rows]
    index = data.draw(st.integers(0, len(lines) - 2), label="bad line")
    lines[index] = bad
    path = write(fresh(workdir, "journal.jsonl"), "\n".join(lines) + "\n")
    COUNTS["read_journal"] += 1
    with pytest.raises(ZoplanError, match=f":{index + 1}: not a journal line"):
        read_journal(path)


@fuzz_settings(N_J_MUTATED)
@given(rows=journals(), data=st.data(), how=st.sampled_from(["record", "record", "bytes"]))
def test_journal_mutations(workdir: Path, rows: list[dict], data: st.DataObject, how: str) -> None:
    RAN.add("journal_mutated")
    if how == "record":
        records: list[Any] = list(rows)
        index = data.draw(st.integers(0, len(records) - 1), label="line")
        records[index] = mutate_record(data, records[index])
        raw = journal_text(records).encode()
    else:
        raw = mutate_bytes(data, journal_text(rows).encode())
    check_journal(write(fresh(workdir, "journal.jsonl"), raw))


def nasty_journal(data: st.DataObject, rows: list[dict]) -> bytes:
    text = journal_text(rows)
    kind = data.draw(st.sampled_from(["fixed", "deep", "bigint", "field", "huge_line", "nul"]), label="kind")
    if kind == "fixed":
        return data.draw(
            st.sampled_from(
                [
                    b"",
                    b"\n\n\n",
                    b"\xef\xbb\xbf" + text.encode(),
                    b"\xff\n" + text.encode(),
                    text.encode("utf-16"),
                    b"\x00" * 10,
                    b"{}\n" * 3,
                    b"[]",
                    ("\u2028" + text).encode(),
                ]
            ),
            label="fixed",
        )
    line = data.draw(st.integers(0, len(rows)), label="at line")
    lines = text.splitlines()
    if kind == "deep":
        payload = deep(data.draw(st.integers(1, 100_000), label="depth"))
    elif kind == "bigint":
        payload = '{"step": ' + "9" * data.draw(st.integers(1, 6000), label="digits") + "}"
    elif kind == "field":
        row = dict(rows[min(line, len(rows) - 1)])
        row[data.draw(st.sampled_from(FIELDS))] = data.draw(
            st.sampled_from(["x", None, 1.5, [1], {"a": 1}, True, -1, 2**64, 10**100, "NaN"])
        )
        payload = dumps(row)
    elif kind == "huge_line":
        payload = dumps({**rows[0], "pad": "x" * data.draw(st.integers(1, 2_000_000), label="pad")})
    else:
        payload = dumps(rows[0]).replace(":", ":\x00", 1)
    return "\n".join(lines[:line] + [payload] + lines[line:]).encode() + b"\n"


@fuzz_settings(N_J_NASTY)
@given(rows=journals(), data=st.data())
def test_journal_nasty(workdir: Path, rows: list[dict], data: st.DataObject) -> None:
    RAN.add("journal_nasty")
    check_journal(write(fresh(workdir, "journal.jsonl"), nasty_journal(data, rows)))


GOOD_LINE = '{"step": 0, "seed": 1, "projected_grad": 0.5, "lr": 0.001, "weight_decay": 0.0}'
GOOD_NEXT = '{"step": 1, "seed": 2, "projected_grad": 0.5, "lr": 0.001, "weight_decay": 0.0}'


@xfail_bug("read_journal-not-utf8")
@EXPLICIT_ONLY
@example(raw=b"\xff" + GOOD_LINE.encode() + b"\n")
@given(raw=st.binary())
def test_bug_journal_not_utf8(workdir: Path, raw: bytes) -> None:
    path = write(fresh(workdir, "journal.jsonl"), raw)
    assert check_journal(path, tolerate_known=False) is REFUSED
    assert f"{path}:1: not a journal line (UnicodeDecodeError" in LAST_REFUSAL[0], LAST_REFUSAL[0]


@xfail_bug("read_journal-step-types")
@EXPLICIT_ONLY
@example(text=GOOD_LINE.replace('"step": 0', '"step": "0"') + "\n" + GOOD_NEXT + "\n")
@given(text=st.text())
def test_bug_journal_step_a_string(workdir: Path, text: str) -> None:
    """TypeError 'can only concatenate str (not "int") to str' in read_journal."""
    path = write(fresh(workdir, "journal.jsonl"), text)
    assert check_journal(path, tolerate_known=False) is REFUSED
    assert f"{path}:1: not a journal line ('step' must be an integer" in LAST_REFUSAL[0], LAST_REFUSAL[0]


@xfail_bug("read_journal-step-types")
@EXPLICIT_ONLY
@example(text=GOOD_LINE.replace('"step": 0', '"step": 0.5') + "\n" + GOOD_NEXT + "\n")
@given(text=st.text())
def test_bug_journal_step_a_float(workdir: Path, text: str) -> None:
    """TypeError "'float' object cannot be interpreted as an integer" in read_journal."""
    path = write(fresh(workdir, "journal.jsonl"), text)
    assert check_journal(path, tolerate_known=False) is REFUSED
    assert f"{path}:1: not a journal line ('step' must be an integer" in LAST_REFUSAL[0], LAST_REFUSAL[0]


@xfail_bug("read_journal-json-escapes")
@EXPLICIT_ONLY
@example(text=deep(100_000) + "\n" + GOOD_LINE + "\n")
@given(text=st.text())
def test_bug_journal_deep_nesting(workdir: Path, text: str) -> None:
    path = write(fresh(workdir, "journal.jsonl"), text)
    assert check_journal(path, tolerate_known=False) is REFUSED
    assert f"{path}:1: not a journal line (RecursionError" in LAST_REFUSAL[0], LAST_REFUSAL[0]


@xfail_bug("read_journal-json-escapes")
@EXPLICIT_ONLY
@example(text=GOOD_LINE.replace('"seed": 1', '"seed": ' + "1" * 4301) + "\n" + GOOD_NEXT + "\n")
@given(text=st.text())
def test_bug_journal_huge_integer(workdir: Path, text: str) -> None:
    path = write(fresh(workdir, "journal.jsonl"), text)
    assert check_journal(path, tolerate_known=False) is REFUSED
    assert f"{path}:1: not a journal line (ValueError" in LAST_REFUSAL[0], LAST_REFUSAL[0]


@xfail_bug("read_journal-field-types")
@EXPLICIT_ONLY
@example(text=GOOD_LINE.replace('"seed": 1', '"seed": "x"') + "\n")
@given(text=st.text())
def test_bug_journal_seed_a_string(workdir: Path, text: str) -> None:
    """read_journal loads it; replay then raises TypeError in runtime/perturb.py name_key."""
    path = write(fresh(workdir, "journal.jsonl"), text)
    assert check_journal(path, tolerate_known=False) is REFUSED
    assert f"{path}:1: not a journal line ('seed' must be an integer" in LAST_REFUSAL[0], LAST_REFUSAL[0]


@xfail_bug("read_journal-field-types")
@EXPLICIT_ONLY
@example(text=GOOD_LINE.replace('"lr": 0.001', '"lr": "0.001"') + "\n")
@given(text=st.text())
def test_bug_journal_lr_a_string(workdir: Path, text: str) -> None:
    """read_journal loads it; replay then raises TypeError in runtime/zo.py apply_update."""
    path = write(fresh(workdir, "journal.jsonl"), text)
    assert check_journal(path, tolerate_known=False) is REFUSED
    assert f"{path}:1: not a journal line ('lr' must be a finite number" in LAST_REFUSAL[0], LAST_REFUSAL[0]


# ----- data files ---------------------------------------------------------------------------------
# a text shows something: a character that is not a space, a control or a format character (a
# zero-width space): one of those alone is refused as empty
TEXTS = st.text(min_size=1, max_size=40).filter(
    lambda s: any(not c.isspace() and unicodedata.category(c) not in ("Cc", "Cf") for c in s)
)
LABELS = st.one_of(st.integers(0, 9), st.integers(0, 10**30))


@st.composite
def datasets(draw: Callable) -> tuple[list[str], list[int] | None]:
    texts = draw(st.lists(TEXTS, min_size=1, max_size=6), label="texts")
    labels = (
        draw(st.lists(LABELS, min_size=len(texts), max_size=len(texts)), label="labels")
        if draw(st.booleans(), label="labelled")
        else None
    )
    return texts, labels


def jsonl_text(texts: list[str], labels: list[int] | None, ensure_ascii: bool = True) -> str:
    records = [
        {"text": t} if labels is None else {"text": t, "label": l} for t, l in zip(texts, labels or [None] * len(texts))
    ]
    return "".join(dumps(r, ensure_ascii) + "\n" for r in records)


def csv_text(texts: list[str], labels: list[int] | None) -> str:
    # Python 3.10's csv module neither writes nor reads a NUL (the loader then says "line contains NUL")
    assume(sys.version_info >= (3, 11) or not any("\x00" in t for t in texts))
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["text"] if labels is None else ["text", "label"])
    for i, t in enumerate(texts):
        writer.writerow([t] if labels is None else [t, labels[i]])
    return out.getvalue()


def check_data(path: Path, *, tolerate_known: bool = True) -> Any:
    return attempt(
        "load_examples", lambda: load_examples(str(path)), path.stat().st_size, tolerate_known=tolerate_known
    )


def expected_examples(texts: list[str], labels: list[int] | None) -> tuple[list[Example], str]:
    return (
        [Example(t, None if labels is None else labels[i]) for i, t in enumerate(texts)],
        "lm" if labels is None else "classification",
    )


@fuzz_settings(N_D_VALID)
@given(dataset=datasets(), ensure_ascii=st.booleans())
def test_jsonl_valid_roundtrip(workdir: Path, dataset: tuple, ensure_ascii: bool) -> None:
    RAN.add("jsonl_valid")
    texts, labels = dataset
    path = write(fresh(workdir, "data.jsonl"), jsonl_text(texts, labels, ensure_ascii))
    assert check_data(path, tolerate_known=False) == expected_examples(texts, labels)


@fuzz_settings(N_D_VALID)
@given(dataset=datasets(), bom=st.booleans())
def test_csv_valid_roundtrip(workdir: Path, dataset: tuple, bom: bool) -> None:
    RAN.add("csv_valid")
    texts, labels = dataset
    raw = ("\ufeff" if bom else "") + csv_text(texts, labels)
    path = write(fresh(workdir, "data.csv"), raw)
    assert check_data(path, tolerate_known=False) == expected_examples(texts, labels)


@fuzz_settings(N_D_MUTATED)
@given(dataset=datasets(), data=st.data(), how=st.sampled_from(["record", "bytes"]))
def test_jsonl_mutations(workdir: Path, dataset: tuple, data: st.DataObject, how: str) -> None:
    RAN.add("jsonl_mutated")
    texts, labels = dataset
    if how == "record":
        records: list[Any] = [json.loads(line) for line in jsonl_text(texts, labels).splitlines()]
        index = data.draw(st.integers(0, len(records) - 1), label="line")
        records[index] = mutate_record(data, records[index])
        raw = "".join(dumps(r) + "\n" for r in records).encode()
    else:
        raw = mutate_bytes(data, jsonl_text(texts, labels, ensure_ascii=False).encode())
    check_data(write(fresh(workdir, "data.jsonl"), raw))


@fuzz_settings(N_D_MUTATED)
@given(dataset=datasets(), data=st.data(), how=st.sampled_from(["cell", "bytes"]))
def test_csv_mutations(workdir: Path, dataset: tuple, data: st.DataObject, how: str) -> None:
    RAN.add("csv_mutated")
    texts, labels = dataset
    if how == "cell":
        rows = list(csv.reader(io.StringIO(csv_text(texts, labels), newline="")))
        r = data.draw(st.integers(0, len(rows) - 1), label="row")
        op = data.draw(st.sampled_from(["set", "drop", "add", "empty_row"]), label="op")
        if op == "set" and rows[r]:
            rows[r][data.draw(st.integers(0, len(rows[r]) - 1))] = data.draw(
                st.sampled_from(
                    [
                        "",
                        " ",
                        "-1",
                        "1.5",
                        "1e3",
                        "0x1",
                        "+1",
                        "1_0",
                        "٣",
                        "nan",
                        "9" * 5000,
                        "label",
                        "text",
                        "\x00",
                        "a,b",
                        '"',
                        "\r\n",
                    ]
                )
                | st.text(max_size=8),
                label="cell",
            )
        elif op == "drop" and rows[r]:
            rows[r].pop()
        elif op == "add":
            rows[r].append(data.draw(st.text(max_size=5)))
        else:
            rows.insert(r, [])
        assume(sys.version_info >= (3, 11) or not any("\x00" in cell for row in rows for cell in row))  # (csv_text)
        out = io.StringIO()
        csv.writer(out).writerows(rows)
        raw = out.getvalue().encode("utf-8", "surrogatepass")
    else:
        raw = mutate_bytes(data, csv_text(texts, labels).encode("utf-8", "surrogatepass"))
    check_data(write(fresh(workdir, "data.csv"), raw))


def nasty_data(data: st.DataObject, suffix: str, dataset: tuple) -> bytes:
    texts, labels = dataset
    text = jsonl_text(texts, labels) if suffix == ".jsonl" else csv_text(texts, labels)
    kind = data.draw(st.sampled_from(["fixed", "deep", "bigint", "huge_field", "nul", "encoding"]), label="kind")
    if kind == "fixed":
        return data.draw(
            st.sampled_from(
                [
                    b"",
                    b"\n",
                    b"\xef\xbb\xbf",
                    b"text\n",
                    b"text,label\n",
                    b"label,text\n",
                    b"text,label\n,\n",
                    b'text\n"unterminated\n',
                    b"text\n\x00\n",
                    b'{"text": "a"}\n{"label": 1}\n',
                    b'{"text": "a", "label": 1}\n{"text": "b"}\n',
                    b'{"text": "a", "label": -1}\n',
                    b'{"text": "a", "label": true}\n',
                    b'{"text": "\\ud800"}\n',
                    b'{"text": " "}\n',
                ]
            ),
            label="fixed",
        )
    lines = text.splitlines()
    at = data.draw(st.integers(1 if suffix == ".csv" else 0, len(lines)), label="at")
    if kind == "deep":
        payload = deep(data.draw(st.integers(1, 100_000), label="depth"))
        payload = payload if suffix == ".jsonl" else f'"{payload}"'
    elif kind == "bigint":
        digits = "9" * data.draw(st.integers(1, 6000), label="digits")
        payload = '{"text": "a", "label": ' + digits + "}" if suffix == ".jsonl" else f"a,{digits}"
    elif kind == "huge_field":
        pad = "x" * data.draw(st.integers(1, 300_000), label="pad")
        payload = dumps({"text": pad}) if suffix == ".jsonl" else f'"{pad}"'
    elif kind == "nul":
        payload = lines[-1].replace("a", "a\x00", 1) + "\x00"
    else:
        return text.encode(
            data.draw(st.sampled_from(["utf-16", "utf-32", "latin-1"]), label="codec"), errors="replace"
        ) + "é".encode("latin-1")
    return "\n".join(lines[:at] + [payload] + lines[at:]).encode("utf-8", "surrogatepass") + b"\n"


@fuzz_settings(N_D_NASTY)
@given(dataset=datasets(), data=st.data())
def test_jsonl_nasty(workdir: Path, dataset: tuple, data: st.DataObject) -> None:
    RAN.add("jsonl_nasty")
    check_data(write(fresh(workdir, "data.jsonl"), nasty_data(data, ".jsonl", dataset)))


@fuzz_settings(N_D_NASTY)
@given(dataset=datasets(), data=st.data())
def test_csv_nasty(workdir: Path, dataset: tuple, data: st.DataObject) -> None:
    RAN.add("csv_nasty")
    check_data(write(fresh(workdir, "data.csv"), nasty_data(data, ".csv", dataset)))


@xfail_bug("read_jsonl-json-escapes")
@EXPLICIT_ONLY
@example(text=deep(100_000) + "\n")
@given(text=st.text())
def test_bug_jsonl_deep_nesting(workdir: Path, text: str) -> None:
    path = write(fresh(workdir, "data.jsonl"), text)
    assert check_data(path, tolerate_known=False) is REFUSED
    assert f"{path}:1: invalid JSON (RecursionError)" in LAST_REFUSAL[0], LAST_REFUSAL[0]


@xfail_bug("read_jsonl-json-escapes")
@EXPLICIT_ONLY
@example(text='{"text": "a", "label": ' + "1" * 4301 + "}\n")
@given(text=st.text())
def test_bug_jsonl_huge_label(workdir: Path, text: str) -> None:
    path = write(fresh(workdir, "data.jsonl"), text)
    assert check_data(path, tolerate_known=False) is REFUSED
    assert f"{path}:1: invalid JSON (ValueError)" in LAST_REFUSAL[0], LAST_REFUSAL[0]


# ----- zoplan replay on saved nasty journals ------------------------------------------------------
PLAN_BESIDE = "version: 1\nzoplan: 0.1.0\nmodel: {}\n"  # a plan.yaml that load_plan refuses
# id: (journal bytes, plan.yaml beside it or None, known bug or None)
REPLAY_CASES: dict[str, tuple[bytes, str | None, str | None]] = {
    "bad-middle-line": (f"{GOOD_LINE}\nnot json\n{GOOD_NEXT}\n".encode(), None, None),
    "bad-plan-beside": (f"{GOOD_LINE}\n{GOOD_NEXT}\n".encode(), PLAN_BESIDE, None),
    "not-utf8": (b"\xff" + GOOD_LINE.encode() + b"\n", None, "read_journal-not-utf8"),
    "step-string": (
        (GOOD_LINE.replace('"step": 0', '"step": "a"') + "\n" + GOOD_NEXT + "\n").encode(),
        None,
        "read_journal-step-types",
    ),
    "seed-string": ((GOOD_LINE.replace('"seed": 1', '"seed": "x"') + "\n").encode(), None, "read_journal-field-types"),
}


@pytest.fixture(scope="module", autouse=True)
def replay_runs(request: pytest.FixtureRequest, workdir: Path) -> dict[str, tuple[subprocess.Popen, Path]]:
    """Every case started in the background when this module's first test starts (each imports
    torch and transformers: ~5 s), beside the fuzz tests, which use one core. HOME is a temporary
    directory, so a tiny-opt that a case gets far enough to need is built there, not in the user's
    cache. Nothing is started when no CLI test was selected."""
    if not any(item.module is request.module and item.name.startswith("test_cli_") for item in request.session.items):
        yield {}
        return
    home = workdir / "home"
    home.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HOME": str(home), "COLUMNS": "160"}
    runs = {}
    for case, (journal, plan_yaml, _) in REPLAY_CASES.items():
        path = write(fresh(workdir, "journal.jsonl"), journal)
        if plan_yaml is not None:
            write(path.with_name("plan.yaml"), plan_yaml)
        out = path.with_name("rebuilt")
        runs[case] = (
            subprocess.Popen(
                [sys.executable, "-m", "zoplan.cli", "replay", "tiny-opt", str(path), "-o", str(out)],
                cwd=path.parent,
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            ),
            out,
        )
    yield runs
    for proc, _ in runs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    "case",
    [pytest.param(case, id=case, marks=[xfail_bug(bug)] if bug else []) for case, (_, _, bug) in REPLAY_CASES.items()],
)
def test_cli_replay_nasty_journal(replay_runs: dict, case: str) -> None:
    """``zoplan replay tiny-opt BADJOURNAL -o X``: exit status 2, one message, no traceback, and
    nothing written to X."""
    proc, out = replay_runs[case]
    stdout, stderr = proc.communicate(timeout=300)
    problem = f"exit {proc.returncode}\nstdout: {stdout[-2000:]}\nstderr: {stderr[-2000:]}"
    assert "Traceback" not in stdout + stderr, problem
    assert proc.returncode == 2, problem
    assert stderr.startswith("error: "), problem
    assert not out.exists() or not any(out.iterdir()), problem


# ----- the count is real --------------------------------------------------------------------------
FUZZ_TESTS = {
    "journal_valid",
    "journal_cut",
    "journal_badline",
    "journal_mutated",
    "journal_nasty",
    "jsonl_valid",
    "csv_valid",
    "jsonl_mutated",
    "csv_mutated",
    "jsonl_nasty",
    "csv_nasty",
}


def test_zz_every_input_counted() -> None:
    """Runs last (file order): the inputs the docstring promises were really tried."""
    if RAN != FUZZ_TESTS:
        pytest.skip(f"only some fuzz tests ran ({', '.join(sorted(RAN)) or 'none'})")
    expected = {
        "read_journal": N_J_VALID + N_J_CUT + N_J_BADLINE + N_J_MUTATED + N_J_NASTY,
        "replay": MIN_REPLAYED,
        "load_examples": 2 * (N_D_VALID + N_D_MUTATED + N_D_NASTY),
    }
    short = {k: (COUNTS[k], v) for k, v in expected.items() if COUNTS[k] < v}
    print(f"\ninputs tried: {dict(COUNTS)}; known-bug hits: {dict(KNOWN_HITS)}")
    assert not short, f"fewer inputs than promised (tried, promised): {short}"
    assert COUNTS["replay"] == LOADED[0], f"{LOADED[0]} journals loaded, {COUNTS['replay']} replayed"


for _key in FIXED:
    KNOWN_BUGS.pop(_key, None)
