"""z of ``zoplan.runtime.perturb`` on the CPU at torch.randn's speed or better, fused with its use.

The torch path of ``perturb`` spends ~45 int64 tensor ops per element, most on z's integer
hashes. Here z is made in three passes over chunks of ``CHUNK`` elements, whose two float32
buffers stay in the cache:

1. a small C kernel (``perturb_cpu.c``: plain C without torch headers, called through ctypes on
   the tensors' data pointers) computes the words a, b and from them u1 and the angle (steps 2-5
   of the algorithm, up to the transcendental functions);
2. torch's own eager kernels, in place: ``sqrt(-2 * log(u1))`` and ``cos(angle)``;
3. a second C pass forms z and uses it at once: stores it, forms θ + s·ε·z for one or two signs
   from one draw, or applies MeZO's update, in one pass over the weights and with no buffer
   larger than a chunk.

The module has the interface of ``zoplan.runtime.perturb_triton`` that the runtime uses
(``normal_into``, ``axpy_normal_``, ``perturbed_into``, ``update_``, ``block_table``,
``perturbed_block_into``, ``update_block_``, and the checks ``stream_words`` and ``block_words``),
so ``perturb.fused_backend`` returns it for CPU tensors.

Exactness: the results are the torch path's bits, not approximately but exactly.

- The integers are computed in uint32/uint64 arithmetic (wrapping multiplies are the torch path's
  ``(x * C) & M32``), so the words equal ``perturb.stream_words``.
- ``u1 = ((a >> 8) + 1) * 2**-24`` is exact; ``angle = float(b >> 8) * ANGLE_SCALE`` is one
  float32 multiply, as the torch path's ``mul_``.
- log, sqrt and cos are torch's, whose bits differ from the C library's (torch's float32 sqrt on
  x86 is not even correctly rounded). torch computes them element by element the same wherever
  an element sits in the tensor (its kernels are vectorised to the last element; the tests check
  all 2**24 inputs of each), so the chunks need not be the torch path's.
- Every other multiply and add is one float32 operation in the torch path's order, with the
  Python scalars rounded to float32 first as torch rounds them. The C file is compiled with
  ``-ffp-contract=off`` so that no multiply-add is fused into an FMA (``-march=native`` alone would
  allow it), and without ``-ffast-math``. Casts to bf16/fp16 round to nearest even as torch's do.

Build: at first use the C file is compiled with the system compiler (``ZOPLAN_CC``, else ``CC``,
else ``cc``) into ``$XDG_CACHE_HOME/zoplan/kernels`` (default ``~/.cache/zoplan/kernels``) under a
name hashing the source, the flags and what ``-march=native`` means to that compiler on this CPU
(so machines sharing a home directory do not share a wrong binary): ~0.3 s once, then ~20 ms a
process to find it. It is written to a temporary file and renamed, so ranks that start together
never load a partial file. The first use in a process also checks a few thousand values against
the torch path. Without a working compiler (or if that check fails) one line on stderr says so
and ``perturb`` keeps its torch path: same values, slower. ``ZOPLAN_Z_KERNEL=torch`` forces the
torch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from zoplan.runtime import perturb as _ref

__all__ = [*_ref._FUSED_INTERFACE, "CHUNK", "available", "normal_block_into"]

LABEL = "C, one pass per block"  # perturb.kernels_label: what a rank's log line calls these kernels

# Elements per chunk: the two float32 chunk buffers (512 KiB; torch's log, sqrt and cos run on them
# in place) stay in the L2 cache, and the fixed cost of a chunk (two C calls and four torch ops,
# ~12 us) stays small next to its ~130 us of work.
CHUNK = 2**16

MODE_NORMAL, MODE_AXPY, MODE_PERTURBED, MODE_UPDATE = 0, 1, 2, 3
_DTYPES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
_SOURCE = Path(__file__).with_name("perturb_cpu.c")
_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared", "-std=c11"]
# target flags, the first the compiler accepts: this CPU's instructions (512-bit vectors where it
# has them: the integer hashes run ~1.5x faster than with 256-bit ones), else generic code
_TARGETS = (["-march=native", "-mprefer-vector-width=512"], ["-march=native"], [])


def _defines() -> list[str]:
    """The algorithm's constants, from ``perturb`` (hexadecimal floats are exact)."""
    return [
        f"-DZO_H32_C1={_ref._H32_C1:#x}u",
        f"-DZO_H32_C2={_ref._H32_C2:#x}u",
        f"-DZO_GOLDEN={_ref._GOLDEN:#x}ull",
        f"-DZO_HI_MUL={_ref._HI_MUL:#x}ull",
        f"-DZO_ANGLE_SCALE={_ref._ANGLE_SCALE.hex()}",
        f"-DZO_TWO_POW_M24={_ref._TWO_POW_M24.hex()}",
    ]


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "zoplan" / "kernels"


def _notice(message: str) -> None:
    message = " | ".join(line.strip() for line in message.splitlines() if line.strip())  # one line
    print(f"zoplan: {message}; z is drawn by the torch path (same values, slower)", file=sys.stderr, flush=True)


def _run_cc(cc: list[str], args: list[str], timeout: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([*cc, *args], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"cannot run the C compiler {shlex.join(cc)!r} ({exc})") from None


def _build() -> Path:
    """The compiled kernel for this machine: from the cache, else compiled now and cached. Each of
    ``_TARGETS`` in turn, until the compiler accepts it and builds the file; a target's binary is
    named by a hash of the source, the flags and what they mean to this compiler here (its
    predefined macros: version, instruction sets)."""
    cc = shlex.split(os.environ.get("ZOPLAN_CC") or os.environ.get("CC") or "cc")
    source = _SOURCE.read_bytes()
    cache = _cache_dir()
    error = "no target"
    for target in _TARGETS:
        probe = _run_cc(cc, [*target, "-E", "-dM", "-x", "c", os.devnull], 60)
        if probe.returncode != 0:
            error = f"the C compiler {shlex.join(cc)!r} does not work: {probe.stderr.strip()[-200:]}"
            continue
        flags = [*_FLAGS, *target, *_defines()]
        key = b"\0".join([source, " ".join(flags).encode(), probe.stdout.encode(), platform.machine().encode()])
        lib = cache / f"perturb_cpu-{hashlib.sha256(key).hexdigest()[:24]}.so"
        if lib.exists():
            return lib
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache, prefix=lib.name + ".", suffix=".tmp")
        os.close(fd)
        try:
            proc = _run_cc(cc, [*flags, "-o", tmp, str(_SOURCE), "-lm"], 300)
            if proc.returncode == 0:
                os.replace(tmp, lib)  # atomic: a rank starting now sees no file or a whole one
                return lib
            error = f"compiling {_SOURCE.name} failed: {proc.stderr.strip()[-300:]}"
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError(error)


def _bind(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    p, i64, u64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_int, ctypes.c_float
    lib.zo_words.argtypes = [p, i64, u64, i64, i64, p, p]
    lib.zo_words.restype = None
    lib.zo_words_int.argtypes = [p, i64, u64, i64, p, p]
    lib.zo_words_int.restype = None
    lib.zo_finish.argtypes = [p, i64, i64, i64, p, p, i32, p, i32, p, i32, p, i32, f32, f32, f32, i32]
    lib.zo_finish.restype = None
    return lib


_LIB: ctypes.CDLL | None = None


@functools.cache
def available() -> bool:
    """Whether the compiled kernel is usable in this process (compiled, loaded and checked against
    the torch path once); if not, says why on stderr, once."""
    global _LIB
    try:
        _LIB = _bind(_build())
    except Exception as exc:  # no compiler, a read-only cache, a failed compile or load
        _notice(f"the CPU z kernel is unavailable: {exc}")
        return False
    if not _self_check():
        _LIB = None
        _notice("the compiled CPU z kernel does not reproduce the torch path here")
        return False
    return True


def _self_check() -> bool:
    """A few thousand values of each kind of pass against the torch path, across a 2**32 boundary."""
    start, n, name = 2**32 - 1500, 3000, "zoplan.self_check"
    want = torch.empty(n)
    _ref._fill_normal(want, 1234, name, start)
    got = normal_into(torch.empty(n), 1234, name, start)
    x = torch.linspace(-1.0, 1.0, n)
    plus = perturbed_into(torch.empty(n, dtype=torch.bfloat16), x, 1234, name, start, 1e-3)
    updated = update_(x.clone(), 1234, name, start, 0.37, 1e-3, 0.1, True)
    return (
        torch.equal(got, want)
        and torch.equal(plus, (x + 1e-3 * want).to(torch.bfloat16))
        and torch.equal(updated, x - (want * 0.37 + x * 0.1) * 1e-3)
    )


# ----- tables ---------------------------------------------------------------------------------------
class BlockTable:
    """The ranges of parameters a flat buffer holds (see ``block_table``), as the kernel reads them:
    one row per range, its first element counted in the concatenation of all ranges."""

    __slots__ = ("device", "end", "numel", "nrows", "rows")

    def __init__(self, rows: list[list[int]], end: int) -> None:
        self.device = torch.device("cpu")
        # 8 int64 a row: vstart, pos, count, lo, hi, mix, decay, unused (perturb._block_rows)
        self.rows = torch.tensor(rows, dtype=torch.int64).view(-1)
        self.nrows = len(rows)
        self.end = end  # max position + 1 over the ranges: the smallest buffer the table fits
        self.numel = sum(r[2] for r in rows)  # elements covered


def block_table(parts, device: torch.device | str = "cpu") -> BlockTable:
    """The table of ``parts``: (name, first, count, pos, decay) tuples, each saying that elements
    first .. first + count - 1 (row-major) of parameter ``name`` sit at buffer[pos : pos + count]
    and whether weight decay applies to it. Ranges must not overlap in the buffer."""
    if torch.device(device).type != "cpu":
        raise ValueError(f"the CPU kernels serve CPU tensors, not {device}")
    rows, end = _ref._block_rows(parts, 2**32)
    vstart = 0
    for row in rows:  # each range's first element in the concatenation of the ranges
        row[0] = vstart
        vstart += row[2]
    return BlockTable(rows, end)


@functools.lru_cache(maxsize=1024)
def _tensor_table(name: str, start: int, count: int) -> BlockTable:
    """The table of one tensor holding elements start .. start + count - 1 (decay flag set: only
    the update reads it, and ``update_`` passes ``decay and wd`` for the whole tensor)."""
    return block_table([(name, start, count, 0, True)])


# ----- the passes -------------------------------------------------------------------------------------
def _run(
    mode: int,
    table: BlockTable,
    seed: int,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    w: torch.Tensor | None = None,
    params: tuple[float, float, float] = (0.0, 0.0, 0.0),
    decay: bool = False,
) -> None:
    """``mode`` over every range of ``table``, chunk by chunk; x, y, w are 1-D contiguous buffers of
    the dtypes in ``_DTYPES`` (y and w may be None)."""
    lib = _LIB
    assert lib is not None, "perturb_cpu used without available()"
    total = table.numel
    if total == 0:
        return
    chunk = min(CHUNK, total)
    scratch = torch.empty(2 * chunk, dtype=torch.float32)
    u, c = scratch[:chunk], scratch[chunk:]
    rows, nrows, s = table.rows.data_ptr(), table.nrows, seed & _ref._M64
    xp, xdt = x.data_ptr(), _DTYPES[x.dtype]
    yp, ydt = (y.data_ptr(), _DTYPES[y.dtype]) if y is not None else (None, 0)
    wp, wdt = (w.data_ptr(), _DTYPES[w.dtype]) if w is not None else (None, 0)
    up, cp = u.data_ptr(), c.data_ptr()
    p0, p1, p2 = params
    for v0 in range(0, total, chunk):
        n = min(chunk, total - v0)
        if n < chunk:
            u, c = u[:n], c[:n]
        lib.zo_words(rows, nrows, s, v0, n, up, cp)
        u.log_().mul_(-2.0).sqrt_()  # torch's own log, sqrt and cos: the torch path's float bits
        c.cos_()
        lib.zo_finish(rows, nrows, v0, n, up, cp, mode, xp, xdt, yp, ydt, wp, wdt, p0, p1, p2, int(decay))


def _check_float(t: torch.Tensor, what: str) -> None:
    _ref._check_float(t, what)
    if t.device.type != "cpu":
        raise ValueError(f"{what} is on {t.device}: the CPU kernels serve CPU tensors")


def _flat(t: torch.Tensor, *, read: bool) -> torch.Tensor:
    """``t`` as a 1-D buffer the kernels can use: ``t`` itself when contiguous and of a dtype they
    store, else a contiguous row-major copy (float32 for other dtypes: torch's casts then round
    as the torch path's do); ``read``: with t's values. Write back with ``_write_back``."""
    if t.is_contiguous() and t.dtype in _DTYPES:
        return t.view(-1)
    dtype = t.dtype if t.dtype in _DTYPES else torch.float32
    if read:
        return t.reshape(-1).to(dtype).contiguous()
    return torch.empty(t.numel(), dtype=dtype)


def _write_back(t: torch.Tensor, flat: torch.Tensor) -> None:
    if flat.data_ptr() != t.data_ptr() or flat.dtype != t.dtype:
        t.copy_(flat.view(t.shape))


def normal_into(out: torch.Tensor, seed: int, name: str, start: int = 0) -> torch.Tensor:
    """Fills ``out`` with z of elements start .. start + out.numel() - 1 of ``name`` (row-major),
    cast once from float32: ``perturb.normal``'s values. Returns ``out``."""
    _check_float(out, "out")
    flat = _flat(out, read=False)
    _run(MODE_NORMAL, _tensor_table(name, start, out.numel()), seed, flat)
    _write_back(out, flat)
    return out


def normal_block_into(out: torch.Tensor, table: BlockTable, seed: int) -> torch.Tensor:
    """Over each range of ``table``: ``out[range] := z`` of its parameter (``perturb.normal_parts_``
    in one pass). Elements outside the ranges are not touched. Returns ``out``."""
    _check_float(out, "out")
    _check_buffer(out, table, "out")
    flat = _flat(out, read=True)
    _run(MODE_NORMAL, table, seed, flat)
    _write_back(out, flat)
    return out


def axpy_normal_(x: torch.Tensor, seed: int, name: str, start: int, alpha: float) -> torch.Tensor:
    """Adds ``alpha * z`` to ``x`` in float32 (alpha rounded to float32, a multiply then an add,
    each rounded) and rounds the sum once to ``x.dtype``. Nothing happens at ``alpha == 0``.
    Returns ``x``."""
    _check_float(x, "x")
    if float(alpha) == 0.0:
        return x
    flat = _flat(x, read=True)
    _run(MODE_AXPY, _tensor_table(name, start, x.numel()), seed, flat, params=(float(alpha), 0.0, 0.0))
    _write_back(x, flat)
    return x


def perturbed_into(
    out: torch.Tensor, base: torch.Tensor, seed: int, name: str, start: int, alpha: float
) -> torch.Tensor:
    """Writes ``(base.float() + alpha * z).to(out.dtype)`` into ``out`` in one pass (the engine's
    resident parameters: master ± εz). Both hold the same number of elements, in row-major
    order, and ``out`` may be ``base``. Returns ``out``."""
    _check_float(out, "out")
    _check_float(base, "base")
    if out.numel() != base.numel():
        raise ValueError(f"out has {out.numel()} elements but base has {base.numel()}")
    b = _flat(base, read=True)
    flat = _flat(out, read=False) if out.data_ptr() != base.data_ptr() else b
    _run(MODE_PERTURBED, _tensor_table(name, start, out.numel()), seed, flat, b, params=(float(alpha), 0.0, 0.0))
    _write_back(out, flat)
    return out


def update_(
    x: torch.Tensor, seed: int, name: str, start: int, g: float, lr: float, wd: float, decay: bool
) -> torch.Tensor:
    """MeZO's step on ``x`` in place, in one pass: ``zo.apply_update``'s operations in its order
    (z * g, plus x * wd where ``decay and wd``, times lr, subtracted from x in float32), with the
    Python scalars rounded to float32 as torch rounds them. Returns ``x``."""
    _check_float(x, "x")
    flat = _flat(x, read=True)
    table = _tensor_table(name, start, x.numel())
    _run(MODE_UPDATE, table, seed, flat, params=(float(g), float(lr), float(wd)), decay=bool(decay and wd))
    _write_back(x, flat)
    return x


def stream_words(
    seed: int, name: str, start: int, count: int, *, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's integer words (a, b) for elements start .. start + count - 1 (int64 tensors
    in [0, 2**32)): what ``perturb.stream_words`` returns, for checks."""
    _ref._check_range(start, count)
    return block_words(_tensor_table(name, start, count), seed, count)


# ----- one pass over a flat buffer ----------------------------------------------------------------------
_check_buffer = _ref._check_buffer


def perturbed_block_into(outs, base: torch.Tensor, table: BlockTable, seed: int, alphas) -> list[torch.Tensor]:
    """A block's branches: over every range of ``table``, ``outs[k]`` gets
    ``(base.float() + alphas[k] * z).to(outs[k].dtype)``, for one or two outputs from a single
    draw of z and a single pass. What lies outside the ranges stays as it was; ``outs[0]`` (not
    ``outs[1]``) may be ``base``. Returns ``outs``."""
    outs, alphas = _ref._check_block_outputs(outs, base, table, alphas)
    if not table.numel:
        return outs
    b = _flat(base, read=True)
    flats = [b if out.data_ptr() == base.data_ptr() else _flat(out, read=True) for out in outs]
    second = flats[1] if len(flats) == 2 else None
    _run(MODE_PERTURBED, table, seed, flats[0], b, second, params=(alphas[0], alphas[-1], 0.0))
    for out, flat in zip(outs, flats):
        _write_back(out, flat)
    return outs


def update_block_(x: torch.Tensor, table: BlockTable, seed: int, g: float, lr: float, wd: float) -> torch.Tensor:
    """``update_`` on every range of ``table`` in a single pass, weight decay where the range's
    parameter has it (and ``wd`` is not 0). Returns ``x``."""
    _check_float(x, "x")
    _check_buffer(x, table, "x")
    if table.numel:
        flat = _flat(x, read=True)
        _run(MODE_UPDATE, table, seed, flat, params=(float(g), float(lr), float(wd)), decay=bool(wd))
        _write_back(x, flat)
    return x


def block_words(table: BlockTable, seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For checks of the key derivation: two int64 buffers of ``size`` elements with the words a
    and b over the ranges of ``table`` and zeros elsewhere."""
    a = torch.zeros(size, dtype=torch.int32)
    b = torch.zeros(size, dtype=torch.int32)
    _check_buffer(a, table, "the words buffer")
    if table.numel:
        assert _LIB is not None, "perturb_cpu used without available()"
        _LIB.zo_words_int(table.rows.data_ptr(), table.nrows, seed & _ref._M64, table.numel, a.data_ptr(), b.data_ptr())
    return a.to(torch.int64) & _ref._M32, b.to(torch.int64) & _ref._M32
