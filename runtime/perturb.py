"""The MeZO perturbation z as a pure function of (step seed, parameter name, element index).

MeZO never stores z: every time a step needs it (perturb +εz, −2εz, restore, then the deferred
update −lr·g·z) it is drawn again from the step seed. This module is the one place that defines
z, so every layout (one rank, a perturbation pair, data-parallel replicas, ranks that each own a
slice of a block) regenerates exactly the same values, and a training run can be replayed from
the base weights plus its (seed, g, lr) journal.

This is public API, and the algorithm below is part of it: a run can be replayed outside zoplan
(in numpy, C, or on another framework) by reimplementing these few lines. Changing any constant
changes every trained model's replay, so ``tests/runtime/test_perturb.py`` pins golden values.

Algorithm
---------
All arithmetic is on unsigned integers; ``M32 = 2**32 - 1``, ``M64 = 2**64 - 1``,
``G = 0x9E3779B97F4A7C15``.

``splitmix64(x)`` is the first output of Vigna's SplitMix64 seeded with ``x``::

    z = (x + G) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)

``h32(x)`` is a 32-bit integer hash (the "splitmix32"/hash-prospector finaliser; both
multipliers are below 2**31, see "Devices" below)::

    x ^= x >> 16;  x = (x * 0x21F0AAAD) & M32
    x ^= x >> 15;  x = (x * 0x735A2D97) & M32
    x ^= x >> 15

1. Step seed: ``step_seed(run_seed, step) = splitmix64(splitmix64(run_seed & M64) ^ (step & M64)) >> 1``
   (63 bits, so it fits a signed 64-bit journal field; for one run, distinct steps give distinct
   seeds except with probability ~2**-63).
2. Stream key of a parameter: ``key = splitmix64((seed & M64) ^ splitmix64(crc32(name)))`` where
   ``crc32`` is ``zlib.crc32`` of the UTF-8 bytes of the name (stable across processes, unlike
   Python's ``hash()``). Two names with the same CRC-32 share a stream; for the few thousand
   parameter names of a model a collision is harmless (it only correlates two perturbations).
3. Element ``i`` (index into the row-major flattened parameter, ``0 <= i < 2**63``) is split into
   ``hi = i >> 32`` and ``lo = i & M32``. Per ``hi`` the round keys are the first two SplitMix64
   outputs of state ``base = key ^ ((hi * 0xD1B54A32D192ED03) & M64)``::

       w1 = splitmix64(base);  w2 = splitmix64((base + G) & M64)
       k0 = w1 & M32;  k1 = w1 >> 32;  k2 = w2 & M32

4. Two 32-bit words: ``a = h32(h32(lo ^ k0) ^ k1)``, ``b = h32(a ^ k2)``. The key enters between
   the two rounds of ``a`` so that streams of different keys are not index permutations of each
   other (with ``h32(lo ^ k0)`` alone, two keys would give the same values in shuffled order over
   every aligned block of 2**n elements, e.g. the same mean of z every step).
5. Box–Muller in float32, one normal per element, using both words::

       u1 = ((a >> 8) + 1) * 2**-24          # in (0, 1]: log(u1) is finite
       u2 = (b >> 8) * 2**-24                # in [0, 1)
       z  = sqrt(-2 * log(u1)) * cos((2*pi * 2**-24) * (b >> 8))

   where ``(a >> 8) + 1`` and ``b >> 8`` are converted exactly to float32, ``2*pi*2**-24`` is
   the float32 constant ``float32(2*pi) * 2**-24``, and every operation rounds to float32 in
   the order written. With 24-bit u1, |z| <= sqrt(48 ln 2) ≈ 5.77: the tail beyond that
   (probability ~8e-9) is cut, which is irrelevant for a perturbation direction.

Guarantees
----------
- Pure function: z[i] depends only on (seed, name, i); nothing is stored and no global RNG
  state is touched, so draws can happen in any order, on any rank, any number of times.
- Slice independence: ``normal(s, n, 0, N)[a:b]`` equals ``normal(s, n, a, b - a)`` bit for bit
  on the same device and thread settings; a rank can draw only its own slice of a block.
- Devices: the integer stream (a, b) is computed with int64 tensor ops whose every intermediate
  stays below 2**63 (32-bit values times constants below 2**31, then masked), so no signed
  overflow happens and CPU and CUDA produce identical integers. Only the float32 Box–Muller step
  (log, sqrt, cos of the respective device libraries) may differ by a few units in the last place
  (over 2**24 draws on an H200 against an x86 CPU: max abs difference 7.2e-7, 77% bit-equal).
- The requested dtype is produced by casting the float32 result (so float64 output carries
  float32 precision; bf16 output is rounded once).

Cost: the torch code of this module, the reference, spends about 45 elementwise tensor ops per
element, in chunks so temporary memory stays bounded for parameters of any size (CHUNK_CUDA
elements need ~150 MB of scratch): ~15 ns an element on one CPU thread, 5.4e9 values/s on an
H200 (memory-bound: each op is its own kernel). Fused kernels compute the same z where they can
(:func:`fused_backend`; ``normal`` uses them on CUDA and on the CPU, ``normal_parts_`` and
``perturb_`` on the CPU):

- CUDA: the Triton kernels of ``zoplan.runtime.perturb_triton`` when triton is importable (same
  integers, same float32 operations; ~2e11 values/s on an H200). ``ZOPLAN_PERTURB_TRITON=0``
  forces the torch path.
- CPU: ``zoplan.runtime.perturb_cpu``: the integer part compiled from C at first use, torch's own
  log, sqrt and cos on cache-sized chunks, so the torch path's bits exactly; ~2.1 ns an element on
  one thread (torch.randn: ~4.4 ns on the same machine, docs/results/runtime-cpu.md).
  ``ZOPLAN_Z_KERNEL=torch`` forces the torch path, which a machine without a C compiler uses.
"""

from __future__ import annotations

import functools
import math
import os
import zlib
from collections.abc import Sequence

import torch

__all__ = [
    "CHUNK_CPU",
    "CHUNK_CUDA",
    "kernels_label",
    "name_key",
    "normal",
    "normal_like",
    "normal_parts_",
    "perturb_",
    "step_seed",
    "stream_words",
]

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF
_GOLDEN = 0x9E3779B97F4A7C15
_HI_MUL = 0xD1B54A32D192ED03
# h32 multipliers: both < 2**31 so that (value < 2**32) * constant < 2**63 never overflows int64.
_H32_C1 = 0x21F0AAAD
_H32_C2 = 0x735A2D97
_TWO_POW_M24 = 2.0**-24
# float32(2*pi) * 2**-24 is exact in float32 (scaling by a power of two), so the constant is
# the same on every device.
_ANGLE_SCALE = float(torch.tensor(2.0 * math.pi, dtype=torch.float32).item()) * _TWO_POW_M24

# Elements per chunk. On CPU a chunk whose few int64 temporaries fit in the L2 cache is several
# times faster than a memory-bound 2**22 chunk, while still amortising the ~45 Python-level op
# calls. On CUDA a large chunk amortises kernel launches; 2**22 bounds temporaries to ~100 MB.
CHUNK_CPU = 2**17
CHUNK_CUDA = 2**22

_MAX_INDEX = 2**63


def _splitmix64(x: int) -> int:
    """First output of SplitMix64 seeded with ``x`` (exact, on Python ints)."""
    z = (x + _GOLDEN) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def step_seed(run_seed: int, step: int) -> int:
    """The seed of step ``step`` of a run seeded with ``run_seed``: a 63-bit pure mix of both.

    Any Python ints are accepted (taken modulo 2**64), so negative seeds work too.
    """
    return _splitmix64(_splitmix64(run_seed & _M64) ^ (step & _M64)) >> 1


def name_key(seed: int, name: str) -> int:
    """The 64-bit stream key of parameter ``name`` at step seed ``seed`` (step 2 of the algorithm)."""
    return _splitmix64((seed & _M64) ^ _splitmix64(zlib.crc32(name.encode("utf-8"))))


def _round_keys(key: int, hi: int) -> tuple[int, int, int]:
    """The three 32-bit round keys for elements whose index has high word ``hi``."""
    base = key ^ ((hi * _HI_MUL) & _M64)
    w1 = _splitmix64(base)
    w2 = _splitmix64((base + _GOLDEN) & _M64)
    return w1 & _M32, w1 >> 32, w2 & _M32


def _h32_(x: torch.Tensor, tmp: torch.Tensor) -> None:
    """In place: x = h32(x) for int64 x holding values in [0, 2**32); tmp is scratch of x's shape.

    Every product is (< 2**32) * (< 2**31) < 2**63, so int64 never overflows and the result is
    the same on every device.
    """
    torch.bitwise_right_shift(x, 16, out=tmp)
    x.bitwise_xor_(tmp)
    x.mul_(_H32_C1).bitwise_and_(_M32)
    torch.bitwise_right_shift(x, 15, out=tmp)
    x.bitwise_xor_(tmp)
    x.mul_(_H32_C2).bitwise_and_(_M32)
    torch.bitwise_right_shift(x, 15, out=tmp)
    x.bitwise_xor_(tmp)


def _words_(lo_start: int, keys: tuple[int, int, int], a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> None:
    """Fill a, b (int64, length n) with the words of elements lo_start .. lo_start + n - 1;
    t is int64 scratch of the same length."""
    n = a.numel()
    torch.arange(lo_start, lo_start + n, dtype=torch.int64, device=a.device, out=a)
    _rounds_(a, b, t, *keys)


def _rounds_(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor, k0, k1, k2) -> None:
    """Step 4 on the element indices in a: a, b = the two words. The round keys are ints, or
    int64 tensors of a's length holding each element's own keys (the same integers either way)."""
    a.bitwise_xor_(k0)
    _h32_(a, t)
    a.bitwise_xor_(k1)
    _h32_(a, t)
    torch.bitwise_xor(a, k2, out=b)
    _h32_(b, t)


def _segments(start: int, count: int, chunk: int) -> list[tuple[int, int]]:
    """Split [start, start + count) into (index, length) pieces of at most ``chunk`` elements that
    never cross a multiple of 2**32 (so the high word, hence the round keys, is constant)."""
    out: list[tuple[int, int]] = []
    i, end = start, start + count
    while i < end:
        boundary = ((i >> 32) + 1) << 32
        n = min(chunk, end - i, boundary - i)
        out.append((i, n))
        i += n
    return out


def _check_range(start: int, count: int) -> None:
    if start < 0 or count < 0:
        raise ValueError(f"start and count must be non-negative, got start={start}, count={count}")
    if start + count > _MAX_INDEX:
        raise ValueError(f"element indices must stay below 2**63, got end={start + count}")


# ----- what the fused backends (perturb_triton, perturb_cpu) share ----------------------------------
# The interface of a backend that fused_backend returns (the runtime and the tests use these names)
_FUSED_INTERFACE = (
    "BlockTable",
    "axpy_normal_",
    "block_table",
    "block_words",
    "normal_into",
    "perturbed_block_into",
    "perturbed_into",
    "stream_words",
    "update_",
    "update_block_",
)


@functools.lru_cache(maxsize=8192)
def _name_mix(name: str) -> int:
    """``splitmix64(crc32(name))`` (step 2 before the seed enters) as a signed int64."""
    mix = _splitmix64(zlib.crc32(name.encode("utf-8")))
    return mix - 2**64 if mix >= 2**63 else mix


def _block_rows(parts, piece: int) -> tuple[list[list[int]], int]:
    """The rows of a fused backend's block table for ``parts``, (name, first, count, pos, decay)
    tuples: one row ``[0, pos, count, lo, hi, mix, decay, 0]`` per piece of at most ``piece``
    elements of a range that does not cross a multiple of 2**32 (field 0 is the backend's to
    fill), and the smallest buffer length they fit. Empty ranges give no row."""
    rows: list[list[int]] = []
    end = 0
    for name, first, count, pos, decay in parts:
        _check_range(first, count)
        if pos < 0:
            raise ValueError(f"position of {name!r} must be non-negative, got {pos}")
        if count == 0:
            continue
        mix = _name_mix(name)
        for i, n in _segments(first, count, piece):
            rows.append([0, pos + (i - first), n, i & _M32, i >> 32, mix, int(bool(decay)), 0])
        end = max(end, pos + count)
    return rows, end


def _check_float(t: torch.Tensor, what: str) -> None:
    if not t.dtype.is_floating_point:
        raise TypeError(f"{what} must be a floating point tensor, got {t.dtype}")


def _check_buffer(t: torch.Tensor, table, what: str) -> None:
    """``t`` can hold the ranges of a backend's block ``table`` (its ``device`` and ``end``)."""
    if t.dim() != 1 or not t.is_contiguous():
        raise ValueError(f"{what} must be a 1-D contiguous buffer")
    if t.device != table.device:
        raise ValueError(f"{what} is on {t.device} but the table is on {table.device}")
    if t.numel() < table.end:
        raise ValueError(f"{what} has {t.numel()} elements but the table reaches {table.end}")


def _check_block_outputs(outs, base: torch.Tensor, table, alphas) -> tuple[list[torch.Tensor], list[float]]:
    """The outputs and alphas of a backend's ``perturbed_block_into``, checked: one or two
    floating point buffers, each with its alpha, of which only the first may be ``base``."""
    outs, alphas = list(outs), [float(a) for a in alphas]
    if len(outs) not in (1, 2) or len(alphas) != len(outs):
        raise ValueError(f"one or two outputs with one alpha each, got {len(outs)} and {len(alphas)}")
    for t, what in ((base, "base"), *((out, f"outs[{k}]") for k, out in enumerate(outs))):
        _check_float(t, what)
        _check_buffer(t, table, what)
    if len(outs) == 2 and outs[1].data_ptr() == base.data_ptr():
        raise ValueError("only outs[0] may alias base")
    return outs, alphas


class _Workspace:
    """Scratch buffers for one draw, allocated once and reused by every chunk."""

    def __init__(self, chunk: int, device: torch.device) -> None:
        self.a = torch.empty(chunk, dtype=torch.int64, device=device)
        self.b = torch.empty(chunk, dtype=torch.int64, device=device)
        self.t = torch.empty(chunk, dtype=torch.int64, device=device)
        self.f = torch.empty(chunk, dtype=torch.float32, device=device)
        self.keys: torch.Tensor | None = None  # per-element round keys, for fill_pieces

    def fill(self, out: torch.Tensor, lo_start: int, keys: tuple[int, int, int]) -> None:
        """Write z for elements lo_start .. into the contiguous float32 vector ``out``."""
        n = out.numel()
        a, b = self.a[:n], self.b[:n]
        _words_(lo_start, keys, a, b, self.t[:n])
        self._normal(out, a, b)

    def fill_pieces(self, out: torch.Tensor, pieces: list[tuple[int, int, tuple[int, int, int]]]) -> None:
        """Write z of several pieces ``(lo_start, count, round keys)``, back to back, into ``out``:
        the words of ``_words_`` with the keys and indices as per-element tensors."""
        n = out.numel()
        if self.keys is None:
            self.keys = torch.empty((3, self.a.numel()), dtype=torch.int64, device=self.a.device)
        a, b, t = self.a[:n], self.b[:n], self.t[:n]
        k0, k1, k2 = self.keys[0, :n], self.keys[1, :n], self.keys[2, :n]
        s = 0
        for lo, count, (r0, r1, r2) in pieces:
            torch.arange(lo, lo + count, dtype=torch.int64, device=a.device, out=a[s : s + count])
            k0[s : s + count].fill_(r0)
            k1[s : s + count].fill_(r1)
            k2[s : s + count].fill_(r2)
            s += count
        _rounds_(a, b, t, k0, k1, k2)
        self._normal(out, a, b)

    def _normal(self, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        """Box-Muller from the words (a and b are consumed)."""
        f = self.f[: out.numel()]
        # Radius from a: u1 = ((a >> 8) + 1) * 2**-24 in (0, 1]. Both steps are exact in float32
        # (values <= 2**24 and a power-of-two scale), so only log and sqrt round.
        a.bitwise_right_shift_(8).add_(1)
        out.copy_(a)
        out.mul_(_TWO_POW_M24).log_().mul_(-2.0).sqrt_()
        # Angle from b: (b >> 8) is exact in float32; one rounding for the scale, then cos.
        b.bitwise_right_shift_(8)
        f.copy_(b)
        f.mul_(_ANGLE_SCALE).cos_()
        out.mul_(f)


def _default_chunk(device: torch.device) -> int:
    return CHUNK_CPU if device.type == "cpu" else CHUNK_CUDA


def _fill_normal(out: torch.Tensor, seed: int, name: str, start: int) -> None:
    """Fill the 1-D contiguous tensor ``out`` (any float dtype) with z[start : start + len(out)]."""
    count = out.numel()
    _check_range(start, count)
    if count == 0:
        return
    device = out.device
    key = name_key(seed, name)
    chunk = min(_default_chunk(device), count)
    ws = _Workspace(chunk, device)
    direct = out.dtype == torch.float32
    stage = None if direct else torch.empty(chunk, dtype=torch.float32, device=device)
    for i, n in _segments(start, count, chunk):
        keys = _round_keys(key, i >> 32)
        j = i - start
        if direct:
            ws.fill(out[j : j + n], i & _M32, keys)
        else:
            assert stage is not None
            ws.fill(stage[:n], i & _M32, keys)
            out[j : j + n].copy_(stage[:n])


def normal_parts_(out: torch.Tensor, seed: int, parts: Sequence[tuple[str, int, int, int]]) -> None:
    """Fill the 1-D contiguous float32 tensor ``out`` with z of several parameters at once:
    for each part ``(name, first, count, pos)``, ``out[pos : pos + count]`` gets
    ``normal(seed, name, first, count)``, bit for bit.

    What it saves: ``normal`` spends ~25 tensor ops per call whatever the count, so drawing a
    block's 16 small parameters one by one costs 16 times that on a CPU (on a tiny model, most of
    a step). Here the parts are cut into pieces that share round keys and packed into chunks of
    up to ``CHUNK_CPU`` elements; the keys and element indices become per-element tensors, and the
    same integer and float32 operations as ``normal`` run once per chunk. Elementwise, nothing
    differs from ``normal`` (the same ops on the same values), so the result is the same."""
    if out.dtype != torch.float32 or out.dim() != 1 or not out.is_contiguous():
        raise TypeError("normal_parts_ fills a contiguous 1-D float32 tensor")
    for name, first, count, pos in parts:
        _check_range(first, count)
        if pos < 0 or pos + count > out.numel():
            raise ValueError(f"part {name!r} at {pos}..{pos + count} is outside the output ({out.numel()})")
    device = out.device
    fast = _cpu_kernels() if device.type == "cpu" else None
    if fast is not None:  # one pass over all the parts
        fast.normal_block_into(out, fast.block_table([(*part, False) for part in parts]), seed)
        return
    chunk = _default_chunk(device)
    pieces: list[tuple[int, int, int, tuple[int, int, int]]] = []  # (pos, lo, n, round keys)
    for name, first, count, pos in parts:
        key = name_key(seed, name)
        for i, n in _segments(first, count, chunk):
            pieces.append((pos + i - first, i & _M32, n, _round_keys(key, i >> 32)))
    total = sum(p[2] for p in pieces)
    if total == 0:
        return
    ws = _Workspace(min(chunk, total), device)
    batch: list[tuple[int, int, int, tuple[int, int, int]]] = []
    size = 0
    for piece in pieces + [None]:  # None flushes the last batch
        if piece is not None and size + piece[2] <= chunk:
            batch.append(piece)
            size += piece[2]
            continue
        if batch:
            _fill_batch(out, batch, size, ws)
        batch, size = ([piece], piece[2]) if piece is not None else ([], 0)


def _fill_batch(out: torch.Tensor, batch: list, n: int, ws: _Workspace) -> None:
    """One chunk of :func:`normal_parts_`: one piece as ``normal`` draws it, several with
    per-element keys, written in place when they lie back to back in ``out``."""
    if len(batch) == 1:
        pos, lo, count, keys = batch[0]
        ws.fill(out[pos : pos + count], lo, keys)
        return
    pieces = [(lo, count, keys) for _, lo, count, keys in batch]
    if all(nxt[0] == cur[0] + cur[2] for cur, nxt in zip(batch, batch[1:])):  # a block's parameters
        ws.fill_pieces(out[batch[0][0] : batch[0][0] + n], pieces)
        return
    z = torch.empty(n, dtype=torch.float32, device=out.device)
    ws.fill_pieces(z, pieces)
    s = 0
    for pos, _, count, _ in batch:
        out[pos : pos + count].copy_(z[s : s + count])
        s += count


def stream_words(
    seed: int, name: str, start: int, count: int, *, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two 32-bit words (a, b) of elements start .. start + count - 1, as int64 tensors.

    Exposed for replay checks and for testing that CPU and CUDA agree on the integer stream
    exactly; ``normal`` is what training uses.
    """
    _check_range(start, count)
    device = torch.device(device)
    a = torch.empty(count, dtype=torch.int64, device=device)
    b = torch.empty(count, dtype=torch.int64, device=device)
    key = name_key(seed, name)
    chunk = max(1, min(_default_chunk(device), count))
    t = torch.empty(chunk, dtype=torch.int64, device=device)
    for i, n in _segments(start, count, chunk):
        j = i - start
        _words_(i & _M32, _round_keys(key, i >> 32), a[j : j + n], b[j : j + n], t[:n])
    return a, b


def normal(
    seed: int,
    name: str,
    start: int,
    count: int,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """z[start : start + count] of the flattened parameter ``name`` at step seed ``seed``.

    Standard normal values, computed on ``device`` in float32 and returned as ``dtype``.
    Any slice can be drawn on its own: ``normal(s, n, 0, 10)[3:7]`` equals ``normal(s, n, 3, 4)``
    bit for bit on the same device.
    """
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating point type, got {dtype}")
    out = torch.empty(count, dtype=dtype, device=torch.device(device))
    kind = out.device.type
    fused = _triton_backend() if kind == "cuda" else _cpu_kernels() if kind == "cpu" else None
    if fused is not None:
        fused.normal_into(out, seed, name, start)
    else:
        _fill_normal(out, seed, name, start)
    return out


@functools.cache
def _load_triton():
    """The perturb_triton module, imported once; None when triton is missing, broken or older than
    3 (the torch path gives the same z, slower): triton 2.1, torch 2.1's, cannot build the launcher
    of these kernels ("sig_key = ," a SyntaxError at their first call, which no import catches)."""
    try:
        import triton

        if int(triton.__version__.split(".")[0]) < 3:
            return None
        from zoplan.runtime import perturb_triton

        return perturb_triton
    except Exception:
        return None


@functools.cache
def _load_cpu():
    """The perturb_cpu module once its compiled kernel is built, loaded and checked; None when it
    cannot be (no C compiler: it has said why on stderr; the torch path gives the same z, slower)."""
    try:
        from zoplan.runtime import perturb_cpu
    except Exception:
        return None
    return perturb_cpu if perturb_cpu.available() else None


def _cpu_kernels():
    """The fused kernels of ``zoplan.runtime.perturb_cpu`` for CPU tensors, or None: when the
    compiled kernel is unavailable, or ``ZOPLAN_Z_KERNEL=torch`` forces this module's torch code."""
    if os.environ.get("ZOPLAN_Z_KERNEL", "") == "torch":
        return None
    return _load_cpu()


def fused_backend(device: torch.device | str):
    """The module of fused kernels that serves tensors on ``device`` (the interface of
    ``zoplan.runtime.perturb_triton``), else None (then the torch code of this module, the
    reference, is used). Every backend gives the torch code's values (on CUDA up to log/cos of
    the two code generators, on the CPU bit for bit):

    - CUDA: ``zoplan.runtime.perturb_triton`` when triton is importable, unless
      ``ZOPLAN_PERTURB_TRITON=0``;
    - CPU: ``zoplan.runtime.perturb_cpu`` (z's integer part compiled from C at first use, torch's
      log, sqrt and cos) unless no C compiler works here or ``ZOPLAN_Z_KERNEL=torch``; but with
      ``ZOPLAN_PERTURB_TRITON=cpu`` and ``TRITON_INTERPRET=1`` (set before the process starts)
      ``perturb_triton`` through Triton's interpreter: slow, but it checks the GPU kernels' logic,
      and the engine's use of them, on a machine without a GPU."""
    kind = torch.device(device).type
    mode = os.environ.get("ZOPLAN_PERTURB_TRITON", "1")
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if kind == "cuda" and mode != "0" and not interpret:
        return _load_triton()
    if kind == "cpu":
        return _load_triton() if mode == "cpu" and interpret else _cpu_kernels()
    return None


def kernels_label(device: torch.device | str) -> str:
    """The kernels :func:`fused_backend` gives ``device``, in words (a rank's log line, the
    "measured with" row of a calibration): ``torch``, ``C, one pass per block`` (``perturb_cpu``),
    ``triton, one launch per block`` or ``triton interpreter, one launch per block``."""
    fused = fused_backend(device)
    if fused is None:
        return "torch"
    if hasattr(fused, "LABEL"):
        return fused.LABEL
    return (
        "triton interpreter, one launch per block"
        if getattr(fused, "_INTERPRET", False)
        else "triton, one launch per block"
    )


def _triton_backend():
    """The fused kernels for CUDA tensors (see :func:`fused_backend`), or None."""
    return fused_backend("cuda")


def normal_like(
    tensor_numel_or_shape: int | Sequence[int] | torch.Size | torch.Tensor,
    seed: int,
    name: str,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The whole z of a parameter, shaped like it.

    ``tensor_numel_or_shape`` is a numel (1-D result), a shape, or a tensor (its shape, and its
    device and dtype unless given). Element order is the row-major flattening of the shape.
    """
    if isinstance(tensor_numel_or_shape, torch.Tensor):
        shape = tuple(tensor_numel_or_shape.shape)
        device = tensor_numel_or_shape.device if device is None else device
        dtype = tensor_numel_or_shape.dtype if dtype is None else dtype
    elif isinstance(tensor_numel_or_shape, int):
        shape = (tensor_numel_or_shape,)
    else:
        shape = tuple(int(d) for d in tensor_numel_or_shape)
    numel = math.prod(shape)
    z = normal(
        seed,
        name,
        0,
        numel,
        device="cpu" if device is None else device,
        dtype=torch.float32 if dtype is None else dtype,
    )
    return z.view(shape)


def perturb_(param: torch.Tensor, seed: int, name: str, scale: float, *, offset: int = 0) -> None:
    """In place: ``param += scale * z`` with z drawn on ``param.device``.

    ``param`` holds the elements ``offset .. offset + param.numel() - 1`` of the flattened
    parameter ``name`` (in ``param``'s row-major order), so a rank that owns only a slice of a
    parameter or of a flattened block bucket perturbs or updates exactly that slice. The MeZO
    step is ``perturb_(p, s, n, +eps)``, ``perturb_(p, s, n, -2*eps)``, ``perturb_(p, s, n, +eps)``,
    and the update is ``perturb_(p, s, n, -lr * g)`` (weight decay is applied by the caller).

    For float32/float64 params the add is done in the param's dtype. For bf16/fp16 params the
    slice is upcast to float32, ``scale * z`` is added in float32 and the sum is rounded back
    once. Why: with eps = 1e-3 the perturbation is below half an ulp of bf16 for every |θ| above
    ~0.25 (bf16 keeps 8 significant bits), so rounding ``scale * z`` to bf16 first and then adding
    in bf16 rounds twice and loses most of it; one rounding of the exact float32 sum gives the
    nearest representable value. bf16 storage still quantises the perturbed weight: exact MeZO
    needs float32 weights on the compute device (bf16 may still be used on the wire).
    """
    if not param.dtype.is_floating_point:
        raise TypeError(f"perturb_ needs a floating point tensor, got {param.dtype}")
    count = param.numel()
    _check_range(offset, count)
    if count == 0 or scale == 0.0:
        return
    if not param.is_contiguous():
        # Work on a contiguous copy in row-major order and write it back; a view of the flattened
        # storage would not follow the logical element order.
        tmp = param.contiguous()
        perturb_(tmp, seed, name, scale, offset=offset)
        param.copy_(tmp)
        return
    flat = param.view(-1)
    device = param.device
    key = name_key(seed, name)
    chunk = min(_default_chunk(device), count)
    fast = _cpu_kernels() if device.type == "cpu" else None
    ws = _Workspace(chunk, device) if fast is None else None
    z = torch.empty(chunk, dtype=torch.float32, device=device)
    upcast = param.dtype in (torch.bfloat16, torch.float16)
    for i, n in _segments(offset, count, chunk):
        j = i - offset
        zc = z[:n]
        if ws is None:
            fast.normal_into(zc, seed, name, i)
        else:
            ws.fill(zc, i & _M32, _round_keys(key, i >> 32))
        part = flat[j : j + n]
        if upcast:
            acc = part.float()
            acc.add_(zc, alpha=scale)
            part.copy_(acc)
        else:
            part.add_(zc, alpha=scale)
