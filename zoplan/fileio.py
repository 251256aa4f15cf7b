"""Strict, versioned YAML files: one loader for topologies, plans and profiles.

Every file zoplan reads carries ``version:``; unknown keys fail with the key's path and the file
name. Only YAML's safe constructors are used: a file is data, never code. Work on a hostile file
is bounded before anything is built from it: a file larger than ``MAX_FILE_BYTES`` is not read,
and a YAML document nested deeper than ``MAX_YAML_DEPTH`` or holding more than ``MAX_YAML_NODES``
values once its aliases are expanded (a "billion laughs" of a few hundred bytes) is refused.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import reprlib
import secrets
import sys
import types
import typing
from pathlib import Path
from collections.abc import Callable
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from zoplan.errors import ZoplanError
from zoplan.limits import MAX_PLAN_BYTES

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """Base of every on-disk schema: unknown keys are errors, objects are immutable, and numbers
    are finite (an infinite memory or bandwidth breaks every computation downstream). A field of
    one of zoplan.vocab's kinds holds its plain string (a default must be one too). true and false
    are no numbers: YAML's ``yes`` where a count is meant (``steps: true`` trained one step,
    ``block_s: true`` read as a second) is refused, in a list or mapping of numbers too; and so is
    a control character in any text (names are printed to terminals)."""

    # protected_namespaces: fields such as model_dir are ours (pydantic before 2.10 warned of them
    # on every command, as if they shadowed its own model_* methods)
    model_config = ConfigDict(
        extra="forbid", frozen=True, allow_inf_nan=False, use_enum_values=True, protected_namespaces=()
    )

    @field_validator("*", mode="before")
    @classmethod
    def _fit_for_a_file(cls, value: Any, info: ValidationInfo) -> Any:
        if info.field_name is not None and _misplaced_bool(value, cls.model_fields[info.field_name].annotation):
            where = "" if isinstance(value, bool) else " (each value of it)"
            raise ValueError(f"must be a number{where}, not true or false")
        bad = _control_character(value)
        if bad is not None:  # (a name is printed: an escape sequence in it would drive the terminal)
            raise ValueError(f"holds the control character {bad!r}: names and texts are printed to terminals")
        return value


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _control_character(value: Any) -> str | None:
    """The first control character (other than a tab or a line break) in ``value``'s strings, or
    in a list's or mapping's keys and values."""
    if isinstance(value, str):
        found = _CONTROL.search(value)
        return found.group() if found else None
    if isinstance(value, (list, tuple)):
        return next((c for c in map(_control_character, value) if c is not None), None)
    if isinstance(value, dict):
        return next((c for c in map(_control_character, [*value, *value.values()]) if c is not None), None)
    return None


def _is_class(annotation: Any) -> bool:
    """``annotation`` is a class, not a parametrised generic (on Python 3.10 ``list[int]`` passes
    ``isinstance(..., type)``, and ``issubclass`` then raises)."""
    return isinstance(annotation, type) and typing.get_origin(annotation) is None


def _misplaced_bool(value: Any, annotation: Any) -> bool:
    """``value`` is, or holds in a list or a mapping's values, true or false where ``annotation``
    takes none (a nested schema checks its own fields)."""
    while typing.get_origin(annotation) is typing.Annotated:  # PositiveFloat and the like
        annotation = typing.get_args(annotation)[0]
    if annotation is bool or annotation is Any or isinstance(annotation, typing.TypeVar):
        return False
    if _is_class(annotation) and issubclass(annotation, BaseModel):
        return False
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union or origin is types.UnionType:
        options = [a for a in args if a is not type(None)]
        if isinstance(value, bool):
            return all(_misplaced_bool(value, a) for a in options)
        return any(_misplaced_bool(value, a) for a in options if typing.get_origin(a) in (list, tuple, dict))
    if origin is typing.Literal:
        return isinstance(value, bool) and value not in [a for a in args if isinstance(a, bool)]
    if isinstance(value, bool):  # (where a string, a path or a name is meant, pydantic says so itself)
        return _is_class(annotation) and issubclass(annotation, (int, float))
    if origin in (list, tuple) and isinstance(value, (list, tuple)) and args:
        items = args[:1] if origin is list or (len(args) == 2 and args[1] is Ellipsis) else args
        return any(_misplaced_bool(v, items[min(i, len(items) - 1)]) for i, v in enumerate(value))
    if origin is dict and isinstance(value, dict) and len(args) == 2:
        return any(_misplaced_bool(v, args[1]) for v in value.values())
    return False


# Every file zoplan reads is a few kilobytes, a few hundred values, six levels deep (a topology,
# a plan, a calibration profile, a model's config.json): these limits are far above any of them
MAX_FILE_BYTES = 1 << 20
MAX_YAML_DEPTH = 32
MAX_YAML_NODES = 100_000


# how a file of each kind is made, for the message of a missing one
_MAKE = {
    "profile": "make one on the machine with `zoplan calibrate -o PROFILE.yaml`, or check the path",
    "plan": "make one with `zoplan plan ... -o PLAN.yaml`, or check the path",
    "topology": "`zoplan topo list` names the bundled ones; `zoplan topo detect -o FILE.yaml` writes this machine's",
}


def read_bytes(path: Path, limit: int | None = None) -> bytes:
    """A file's bytes (at most ``limit``, when given). A named pipe nobody writes to reads as
    empty instead of waiting for ever (opening one blocks until a writer comes: ``mkfifo f.yaml``
    given as a plan hung every command); one being written (``<(cat plan.yaml)``) reads whole."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, flags)
    try:
        if flags != os.O_RDONLY:  # back to blocking reads: a pipe without a writer then reads as its end
            import fcntl

            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            fd = -1
            return f.read() if limit is None else f.read(limit)
    finally:
        if fd >= 0:
            os.close(fd)


class RepeatedKey(ValueError):
    """A JSON object that gives a key twice (``loads_json``)."""


def _no_repeated_json_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise RepeatedKey(f"the key '{short(key, 80)}' is given twice")
        seen[key] = value
    return seen


def loads_json(text: str) -> Any:
    """JSON as ``json.loads`` reads it, but an object that gives a key twice is refused
    (:class:`RepeatedKey`), as in every YAML file zoplan reads: json keeps the later value without
    a word (a config.json's tie_word_embeddings given twice, a run.json's steps)."""
    return json.loads(text, object_pairs_hook=_no_repeated_json_keys)


def read_text(path: Path, what: str, limit: int = MAX_FILE_BYTES) -> str:
    """A user's file as text; a missing, unreadable or oversized file is a message naming it.
    At most ``limit`` + 1 bytes are read, whatever the file (/dev/zero, a FIFO, a huge log)."""
    try:
        raw = read_bytes(path, limit + 1)
    except FileNotFoundError:
        raise ZoplanError(f"{what} file {path} does not exist", fix=_MAKE.get(what, "check the path")) from None
    except IsADirectoryError:
        raise ZoplanError(f"{what} file {path} is a directory", fix=f"give the {what} file's path") from None
    except OSError as exc:
        raise ZoplanError(f"cannot read {what} file {path}: {exc.strerror or exc}", fix="check the path") from None
    if len(raw) > limit:
        raise ZoplanError(
            f"{path}: the {what} file is larger than {limit // 1024} KiB, far more than any {what} file holds",
            fix=f"check that {path} is the {what} file meant",
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ZoplanError(
            f"{path} is not text (not UTF-8 at byte {exc.start}): not a {what} file",
            fix=f"check that {path} is the {what} file meant",
        ) from None


MAX_RECORD_LINE_BYTES = 1 << 20  # one line of a record zoplan writes (metrics, spans) is a few KiB


def read_jsonl(path: Path, *, max_bytes: int = 1 << 30, start: int = 0) -> tuple[list[dict[str, Any]], int]:
    """(the JSON objects of a file of lines that zoplan itself writes: metrics, spans; the offset
    after the last complete line). Work is bounded whatever the file holds: a line longer than
    ``MAX_RECORD_LINE_BYTES``, one that is not a JSON object or not UTF-8 (a crash cut it, someone
    edited it) is skipped, nothing past ``max_bytes`` is read, and an unterminated last line is left
    for a later read from the returned offset (a writer may be adding it)."""
    rows: list[dict[str, Any]] = []
    end = start
    try:
        with open(path, "rb") as f:
            f.seek(start)
            while end - start < max_bytes:
                line = f.readline(MAX_RECORD_LINE_BYTES + 1)
                if not line or (not line.endswith(b"\n") and len(line) <= MAX_RECORD_LINE_BYTES):
                    break  # the end, or a line still being written
                end += len(line)
                if len(line) > MAX_RECORD_LINE_BYTES:  # skip the rest of an overlong line
                    while line and not line.endswith(b"\n") and end - start < max_bytes:
                        line = f.readline(MAX_RECORD_LINE_BYTES)
                        end += len(line)
                    continue
                try:
                    row = json.loads(line)
                except (ValueError, RecursionError):
                    continue
                if isinstance(row, dict):
                    rows.append(row)
    except OSError as exc:
        raise ZoplanError(f"cannot read {path}: {exc}") from None
    return rows, end


# the Software text chunk of a PNG zoplan.sim.trace.plot_png draws: such a file may be drawn over again
PNG_SOFTWARE = "zoplan timeline"


def _yaml_keys(raw: bytes) -> set[str]:
    """The top-level keys of a YAML mapping (none when it is not one, or not YAML)."""
    try:
        data = yaml.load(raw.decode("utf-8"), Loader=BoundedLoader)  # (a safe loader, bounded)
    except Exception:  # (any text that is not a mapping zoplan could have written: not one of its files)
        return set()
    return {str(k) for k in data} if isinstance(data, dict) else set()


def _our_trace(raw: bytes) -> bool:
    """A Chrome trace zoplan wrote (zoplan.sim.trace: its ``otherData`` names the step's time, a
    merged trace's each group's), not another tool's (a torch profiler's trace has traceEvents too)."""
    if b'"otherData"' not in raw or b"step_time_ms" not in raw:  # (before parsing: a profiler's trace is big)
        return False
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return False
    if not isinstance(data, dict):  # (Chrome's array format: another tool's)
        return False
    other = data.get("otherData")
    return (
        isinstance(data.get("traceEvents"), list)
        and isinstance(other, dict)
        and any(isinstance(k, str) and (k == "step_time_ms" or k.endswith(".step_time_ms")) for k in other)
    )


def _has_keys(raw: bytes, keys: set[str]) -> bool:
    """A YAML mapping with ``keys`` at its top (each word looked for first: parsing a big file
    that lacks one would take seconds to refuse it)."""
    return all(f"{k}:".encode() in raw for k in keys) and keys <= _yaml_keys(raw)


# What makes an existing file one of zoplan's, which -o may write over; anything else may be a
# user's own (notes, a topology, another tool's trace), which a mistyped -o would replace. Read
# whole (a plan is at most MAX_PLAN_BYTES): a word in its first lines is not enough (a topology's
# comment "# PCIe layout: ..." passed for a plan's ``layout:``).
_OURS: dict[str, tuple[int, Callable[[bytes], bool]]] = {  # what: (bytes read at most, the test)
    "plan": (MAX_PLAN_BYTES + 1, lambda raw: _has_keys(raw, {"version", "model", "topology", "layout", "batch"})),
    "profile": (MAX_PLAN_BYTES + 1, lambda raw: _has_keys(raw, {"version", "machine", "model", "devices", "compute"})),
    "topology": (MAX_PLAN_BYTES + 1, lambda raw: _has_keys(raw, {"gpu_models", "sockets", "gpus", "links"})),
    "trace file": (1 << 28, _our_trace),  # (a big model's trace: a few megabytes; a bigger file is another's)
    # the Software text chunk of a PNG zoplan.sim.trace.plot_png draws: such a file may be drawn over again
    "PNG": (1 << 16, lambda raw: f"Software\x00{PNG_SOFTWARE}".encode() in raw),
}


def _stream_file(path: Path) -> str | None:
    """'stdout' or 'stderr' when ``path`` is the file this process prints to (-o /dev/stdout with
    the output redirected to a file: the messages would be written into the same file)."""
    try:
        st = path.stat()
    except OSError:
        return None
    for fd, name in ((1, "stdout"), (2, "stderr")):
        try:
            out = os.fstat(fd)
        except OSError:
            continue
        if (out.st_dev, out.st_ino) == (st.st_dev, st.st_ino):
            return name
    return None


def check_writable(path: Path, what: str) -> None:
    """Refuse a file that cannot be written before the work whose result it is (a validation run,
    say): its folder must exist and take the file, and an existing file must be one of ``what``'s
    (a plan written again: yes; someone's notes: no). Probed by opening it for appending, so an
    existing file is untouched and a new one is removed again."""
    if str(path) == "-":  # (it made a file named '-')
        raise ZoplanError(
            f"-o - would write the {what} into a file named '-', not to standard output", fix="give a file's path"
        )
    path = Path(path)
    if path.is_dir():
        raise ZoplanError(f"{what} {path} is a directory", fix="give a file's path")
    if path.exists() and not path.is_file():  # a named pipe would wait for a reader for ever
        raise ZoplanError(f"{what} {path} is not a regular file (a named pipe, a device)", fix="give a file's path")
    stream = _stream_file(path)
    if stream is not None:
        raise ZoplanError(
            f"{what} {path} is this command's {stream}: the {what} would be written over by the command's own messages",
            fix="write it to a file of its own (-o FILE), then read that file",
        )
    path = _written(path)  # through a link, the file it names: checked, and probed
    existed = path.exists()
    recognised = _OURS.get(what)
    if existed and recognised is not None and path.is_file() and path.stat().st_size > 0:
        limit, ours = recognised
        try:
            raw = read_bytes(path, limit)
        except (OSError, ZoplanError):
            raw = b""
        if not ours(raw):
            raise ZoplanError(
                f"{path} exists and is not a {what} zoplan wrote: it is not overwritten",
                fix="choose another path, or remove the file first",
            )
    # the file, and a file beside it: write_whole writes one there and puts it in the file's place
    # (a folder that took no new file failed only after the work, a validation run's minutes)
    probe = _beside(path)
    try:
        with path.open("ab"):
            pass
        with probe.open("xb"):
            pass
    except OSError as exc:
        raise ZoplanError(
            f"cannot write {what} {path}: {exc.strerror or exc}", fix=write_fix(exc, path.parent)
        ) from None
    finally:
        with contextlib.suppress(OSError):  # (a folder that is no folder: said above)
            probe.unlink(missing_ok=True)
            if not existed:
                path.unlink(missing_ok=True)


class _Refused(Exception):
    """A YAML document beyond the bounds: raised while composing, before anything is built
    (``fix``: what to do, where it is not the default of writing the values out plainly)."""

    def __init__(self, message: str, fix: str | None = None) -> None:
        super().__init__(message)
        self.fix = fix


class BoundedLoader(yaml.SafeLoader):  # type: ignore[misc]  # PyYAML has no type stubs here: its classes are Any
    """yaml.SafeLoader that refuses to compose a node nested deeper than ``MAX_YAML_DEPTH``."""

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:  # PyYAML's signature
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise _Refused(
                    f"at line {mark.line + 1}, column {mark.column + 1}: nested deeper than {MAX_YAML_DEPTH} levels"
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _expanded(node: yaml.Node) -> int:
    """How many values ``node`` holds once every alias is expanded, computed on the composed graph
    (each distinct node once), refusing beyond ``MAX_YAML_NODES`` values, ``MAX_YAML_DEPTH``
    levels or a node that contains itself."""
    memo: dict[int, tuple[int, int]] = {}
    active: set[int] = set()

    def measure(n: yaml.Node, depth: int) -> tuple[int, int]:
        key = id(n)
        if key in memo:
            size, height = memo[key]
        else:
            if key in active:
                raise _Refused("an alias refers to a value that contains it (a recursive alias)")
            active.add(key)
            size, height = 1, 0
            children = (
                [c for kv in n.value for c in kv]
                if isinstance(n, yaml.MappingNode)
                else n.value
                if isinstance(n, yaml.SequenceNode)
                else []
            )
            for child in children:
                s, h = measure(child, depth + 1)
                size, height = size + s, max(height, h + 1)
                if size > MAX_YAML_NODES:
                    raise _Refused(f"more than {MAX_YAML_NODES} values once its aliases are expanded")
            active.discard(key)
            memo[key] = size, height
        if depth + height > MAX_YAML_DEPTH:
            raise _Refused(f"nested deeper than {MAX_YAML_DEPTH} levels once its aliases are expanded")
        return size, height

    return measure(node, 0)[0]


def _no_repeated_keys(node: yaml.Node) -> None:
    """Refuse a mapping that gives a key twice: YAML keeps the later value without a word (a second
    ``gpus:`` block replaced the first). Merge keys (``<<``) may be overridden, as YAML means."""
    seen: set[int] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if isinstance(n, yaml.MappingNode):
            keys: set[str] = set()
            for key, value in n.value:
                if isinstance(key, yaml.ScalarNode) and key.value != "<<":
                    if key.value in keys:
                        raise _Refused(
                            f"at line {key.start_mark.line + 1}: the key '{key.value}' is given twice in one "
                            "mapping (the later would replace the earlier without a word)",
                            fix=f"give '{key.value}' once (merge the two into one)",
                        )
                    keys.add(key.value)
                todo += [key, value]
        elif isinstance(n, yaml.SequenceNode):
            todo += n.value


def parse_yaml(text: str) -> Any:
    """One YAML document, built with the safe constructors only once it is known to be bounded
    and to give no key twice. Raises what yaml.safe_load raises, or ``_Refused``."""
    loader = BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded(node)
        _no_repeated_keys(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load_yaml_text(text: str, where: Path | str) -> Any:
    """Parse YAML text, turning every failure into a message that names ``where``."""
    try:
        return parse_yaml(text)
    except _Refused as exc:
        raise ZoplanError(
            f"{where}: refused YAML: {exc}",
            fix=exc.fix or "write the values out plainly (zoplan's files need no deep nesting and no alias trees)",
        ) from None
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, RecursionError) as exc:
        # safe_load's constructors raise these for values such as 2001-02-30, '!!int abc' or
        # thousands of digits; deep nesting exhausts the recursion limit
        said = str(exc) or type(exc).__name__
        if "integer string conversion" in said:  # (Python's words, which differ by version, name sys calls)
            digits = sys.get_int_max_str_digits() if hasattr(sys, "get_int_max_str_digits") else 4300
            said = f"a whole number of more than {digits} digits"
        raise ZoplanError(f"{where}: invalid YAML: {short(said)}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ZoplanError(f"{where}: invalid YAML{at}: {problem}") from None


def read_yaml(path: Path, what: str, limit: int = MAX_FILE_BYTES) -> dict[str, Any]:
    """Parse a YAML mapping (of at most ``limit`` bytes), turning every failure into a message that
    names the file."""
    data = load_yaml_text(read_text(path, what, limit), path)
    if data is None:
        raise ZoplanError(f"{path}: the {what} file is empty")
    try:  # a YAML escape can produce a lone surrogate: no output stream can print it later
        json.dumps(data, ensure_ascii=False, default=str).encode("utf-8")
    except UnicodeEncodeError:
        raise ZoplanError(
            f"{path}: the {what} file holds an escape that is not a Unicode character "
            f"(a lone surrogate such as \\uD800)"
        ) from None
    except (ValueError, RecursionError):
        pass  # circular or deep aliases: left to validation, which reports them briefly
    if not isinstance(data, dict):
        raise ZoplanError(
            f"{path}: expected a mapping of keys at the top of the {what} file, found {type(data).__name__}"
        )
    return data


def check_version(data: dict[str, Any], path: Path | str, what: str, supported: tuple[int, ...]) -> None:
    version = data.get("version")
    if version is None:
        raise ZoplanError(
            f"{path}: missing 'version' in the {what} file", fix=f"add 'version: {supported[-1]}' at the top"
        )
    if isinstance(version, bool) or not isinstance(version, int) or version not in supported:
        raise ZoplanError(
            f"{path}: {what} version {brief(version)} is not supported "
            f"(this zoplan reads {', '.join(map(str, supported))})",
            fix="upgrade zoplan or rewrite the file in a supported version",
        )


# the top-level keys that tell the files zoplan reads apart, and where each comes from
_KEYS = {
    "plan": ("layout", "transfer", "batch"),
    "profile": ("devices", "compute", "machine"),
    "topology": ("gpu_models", "sockets"),
}
_WRITTEN_BY = {
    "plan": "give a plan file here (`zoplan plan ... -o PLAN.yaml` writes one)",
    "profile": "give a calibration profile here (`zoplan calibrate -o PROFILE.yaml` writes one)",
    "topology": "give a topology here: a bundled name (`zoplan topo list`) or a file (`zoplan topo detect` writes one)",
}


def validate(model: type[M], data: dict[str, Any], path: Path | str, what: str) -> M:
    """Validate ``data`` against a schema; the first error names its field path."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        other = [
            k for k, keys in _KEYS.items() if k != what and isinstance(data, dict) and all(x in data for x in keys)
        ]
        if other and what in _KEYS:  # (every field "missing" or "unknown" would say it less plainly)
            raise ZoplanError(f"{path} is a {other[0]} file, not a {what}", fix=_WRITTEN_BY[what]) from None
        raise ZoplanError(f"{path}: invalid {what}: {short(describe_validation_error(exc), 2000)}") from None
    except (UnicodeError, RecursionError) as exc:  # a message quoting an unencodable value
        raise ZoplanError(f"{path}: invalid {what}: {type(exc).__name__} in a value") from None


def brief(value: Any) -> str:
    """repr() bounded in depth and length: an aliased YAML tree is never expanded in full."""
    r = reprlib.Repr()
    r.maxstring = r.maxother = 80
    r.maxlevel, r.maxlist, r.maxdict = 2, 4, 4
    return r.repr(value)


def short(text: str, limit: int = 200) -> str:
    """User values quoted in messages are cut: a YAML alias tree of a few hundred bytes can expand
    to millions of items."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more characters)"


def describe_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(part) for part in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown key '{loc}' (remove it or check its spelling)")
        elif err["type"] == "missing":
            lines.append(f"missing field '{loc}'")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"field '{loc}': {msg}")
    more = len(exc.errors()) - len(lines)
    if more > 0:
        lines.append(f"and {more} more")
    return "; ".join(lines)


def content_hash(data: Any) -> str:
    """A short, stable hash of a JSON-able object (key order does not matter)."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()[:16]


def write_yaml(path: Path, data: dict[str, Any], header: str = "") -> None:
    write_whole(path, header + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100))


def _written(path: Path) -> Path:
    """The file a write of ``path`` goes into: through a symbolic link, the file it names
    (replacing the link would leave it a file of its own: as root, -o /dev/stdout replaced the
    system's link to fd 1). A loop of links stays a path: opening it says so."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _beside(target: Path) -> Path:
    """A temporary file's path next to ``target`` (a name of its own length: one derived from the
    target's made a 250-byte name too long)."""
    return target.with_name(f".zoplan-{os.getpid()}-{secrets.token_hex(4)}.tmp")


def write_whole_with(path: Path, write: Callable[[Path], object], what: str = "") -> None:
    """Write ``path`` whole or not at all: ``write`` writes a temporary file beside it, which then
    takes its place, so that a full disk leaves neither an empty or cut file nor a damaged earlier
    one (a profile calibrated again onto a full disk was left empty). A failure is a message that
    names the disk's state (``what``: the kind of file, for it)."""
    target = _written(path)
    tmp = _beside(target)
    try:
        write(tmp)
        tmp.replace(target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        named = f"{what} {path}" if what else str(path)
        raise ZoplanError(f"cannot write {named}: {exc.strerror or exc}", fix=write_fix(exc, target.parent)) from None


def write_whole(path: Path, text: str) -> None:
    """``text`` into ``path``, whole or not at all (write_whole_with)."""
    write_whole_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_fix(exc: OSError, folder: Path) -> str:
    """What to do about a write into ``folder`` that failed with ``exc``."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"free space on the disk that holds {folder} (or choose a folder on another), then run the same command again"
    if exc.errno == errno.EROFS:
        return f"{folder} is on a read-only file system: choose a folder on another"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR) and folder.is_file():
        return f"{folder} is a file, not a folder: choose a path in a folder"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR) and not folder.is_dir():
        return f"the folder {folder} does not exist: make it (mkdir -p {folder}) or choose another"
    if exc.errno == errno.ELOOP:
        return "the path's symbolic links form a loop: give the file's own path"
    return f"choose a folder you can write to, or make {folder} writable"
