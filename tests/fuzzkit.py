"""What the fuzzing suites share (tests/test_fuzz_loaders.py and tests/test_fuzz_cli.py for the
planner, tests/runtime/test_fuzz_runtime_loaders.py and test_fuzz_commands.py for the runtime):
hypothesis settings, the time limit that turns a hang into a failure, the frame a failure came
from, per-example files, and a command run as the console script runs it.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import signal
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path

from hypothesis import HealthCheck, Phase, settings

import zoplan

REPO = Path(__file__).resolve().parents[1]
PRODUCT_DIRS = (Path(zoplan.__file__).resolve().parent, (REPO / "runtime").resolve())
REFUSED = object()  # what a fuzz call returns when the loader refused its input with a message


def fuzz_settings(n: int, *, shrink: bool = True) -> settings:
    """``n`` examples, derandomized: every run tries the same inputs, so counts can be asserted.
    Without ``shrink`` a failing example is reported as found (whole commands: each try of a
    shrink may cost the command's time limit, and their inputs are a few options anyway)."""
    phases = list(Phase) if shrink else [p for p in Phase if p is not Phase.shrink]
    return settings(
        max_examples=n,
        deadline=None,
        database=None,
        derandomize=True,
        phases=phases,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )


EXPLICIT_ONLY = settings(phases=[Phase.explicit], deadline=None, database=None)


class Hang(Exception):
    """A loader that did not answer within its time limit."""


@contextmanager
def time_limit(seconds: float):
    def on_alarm(signum, frame):
        raise Hang(f"no answer within {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def max_message_chars(input_size: int) -> int:
    """Messages quote user input (names, keys, up to five field errors), so they may grow with the
    input, but only linearly: anything longer was amplified (expanded YAML aliases)."""
    return 8 * input_size + 4096


def product_frame(exc: BaseException) -> str:
    """The innermost frame in zoplan's own code that the exception passed through."""
    where = "?"
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        path = Path(frame.f_code.co_filename).resolve()
        if any(path.is_relative_to(d) for d in PRODUCT_DIRS):
            where = f"{path.name}:{frame.f_code.co_name}"
    return where


_serial = itertools.count()


def fresh(root: Path, name: str) -> Path:
    """A new empty directory for one example (hypothesis reuses module fixtures)."""
    d = root / f"x{next(_serial)}"
    d.mkdir()
    return d / name


def write(path: Path, content: bytes | str) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def mutate_bytes(data, raw: bytes, inserts: list[bytes], ops: tuple[str, ...]) -> bytes:
    """Apply 1..3 random byte-level edits drawn from ``ops`` (cuts at any offset, even inside a
    UTF-8 sequence); ``inserts`` are the fragments the format's parser cares about."""
    from hypothesis import strategies as st

    for op in data.draw(st.lists(st.sampled_from(ops), min_size=1, max_size=3), label="byte ops"):
        pos = data.draw(st.integers(0, len(raw)), label="offset")
        lines = raw.split(b"\n")
        line = data.draw(st.integers(0, max(len(lines) - 1, 0)), label="line")
        if op == "truncate":
            raw = raw[:pos]
        elif op == "insert":
            raw = raw[:pos] + data.draw(st.sampled_from(inserts) | st.binary(min_size=1, max_size=6)) + raw[pos:]
        elif op == "overwrite":
            raw = raw[:pos] + data.draw(st.binary(min_size=1, max_size=4)) + raw[pos + 1 :]
        elif op == "delete_span":
            raw = raw[:pos] + raw[pos + data.draw(st.integers(1, 40)) :]
        elif op == "dup_line":
            raw = b"\n".join(lines[: line + 1] + lines[line:])
        elif op == "drop_line":
            raw = b"\n".join(lines[:line] + lines[line + 1 :])
        elif op == "swap_lines":
            other = data.draw(st.integers(0, max(len(lines) - 1, 0)))
            lines[line], lines[other] = lines[other], lines[line]
            raw = b"\n".join(lines)
        elif op == "blank_line":
            raw = b"\n".join(lines[:line] + [data.draw(st.sampled_from([b"", b" ", b"\t", b"\r"]))] + lines[line:])
        elif op == "indent":
            lines[line] = b"\t" + lines[line]
            raw = b"\n".join(lines)
        elif op == "bom":
            raw = b"\xef\xbb\xbf" + raw
        elif op == "crlf":
            raw = raw.replace(b"\n", b"\r\n")
        elif op == "latin1":
            raw = raw.decode("utf-8", "replace").encode("latin-1", "replace") + b"\xe9"
        else:
            raise ValueError(f"unknown byte op {op!r}")
    return raw


def console(args: list[str], limit: float = 60) -> tuple[int, str]:
    """``zoplan ARGS`` as the console script runs it (``zoplan.cli.main``, in this process):
    (exit status, stdout + stderr). No answer within ``limit`` seconds raises Hang."""
    from zoplan import cli

    code, text, argv = 0, io.StringIO(), sys.argv
    sys.argv = ["zoplan", *args]
    try:
        with time_limit(limit), contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
            cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
    return code, text.getvalue()
