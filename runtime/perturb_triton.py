"""Fused Triton kernels for the MeZO perturbation z of ``zoplan.runtime.perturb``.

``zoplan.runtime.perturb`` defines z (its module docstring is the public algorithm) and computes
it with ~45 int64 torch ops, each its own CUDA kernel: memory-bound at ~5.4e9 values/s on an
H200. The kernels here compute the same thing in one pass per element, with the arithmetic the
runtime needs fused in, so z is never written to memory:

- :func:`normal_into`     ``out[j] = z[start + j]``  (any float ``out`` dtype, cast once from float32)
- :func:`axpy_normal_`    ``x += alpha * z``         in place (the perturbation, alpha = s * eps)
- :func:`perturbed_into`  ``out = base + alpha * z`` (theta + s*eps*z formed out of place)
- :func:`update_`         MeZO's update exactly as ``zoplan.runtime.zo.apply_update`` rounds it
- :func:`stream_words`    the integer words (a, b), as ``perturb.stream_words`` returns them

All take ``(seed, name, start)``: ``start`` is the flattened index of the tensor's first element
(row-major order), exactly like ``perturb.normal``'s ``start`` and ``perturb_``'s ``offset``.

The engine keeps a transformer block as one flat buffer holding a dozen or more parameters. One
launch per parameter costs more host time than the GPU spends on a small block, so the block
kernels cover every parameter range of a buffer in **one launch**:

- :func:`block_table`          the ranges' geometry, on the device, built once per buffer layout
- :func:`perturbed_block_into` ``outs[k] = base + alphas[k] * z`` for one or two alphas, z drawn once
- :func:`update_block_`        ``update_`` over every range, each with its own weight-decay flag
- :func:`block_words`          the words (a, b) of every range (a check of the key derivation)

They give exactly the bits of the per-parameter kernels: the same element code runs, and the
stream and round keys (steps 2-3 of ``perturb``'s algorithm) are derived inside the kernel, in
uint64 arithmetic, from the step seed and a per-name constant ``splitmix64(crc32(name))`` stored
in the table. So nothing seed-dependent crosses PCIe and the table is built once per layout.

Exactness
---------
- The integer stream is computed in ``uint32`` (Triton's ``uint32`` multiply wraps mod 2**32,
  which is the torch path's ``(x * C) & M32`` on int64; ``>>`` on unsigned types is a logical
  shift), so ``a`` and ``b`` are bit-identical to ``perturb.stream_words`` on any device.
  The stream key and the per-high-word round keys (k0, k1, k2) are computed on the host with
  ``perturb``'s own functions; a range crossing a multiple of 2**32 is split on the host, so
  inside one launch the high word is constant and ``lo`` fits ``uint32``.
- Box–Muller is done in float32 in the documented order, with CUDA's precise ``logf``/``cosf``
  (libdevice ``__nv_logf``/``__nv_cosf``, the same math library torch's CUDA kernels use),
  IEEE ``sqrt`` (``sqrt_rn``; ``tl.sqrt`` is an approximation), and every multiply/add written
  as an explicitly rounded ``mul.rn``/``add.rn``/``sub.rn`` so that no multiply-add is contracted
  into an FMA: each operation rounds to float32 exactly like the torch path's separate kernels.
  The fused epilogues therefore round exactly like ``base.float() + alpha * z`` and
  ``apply_update`` do (scalars are rounded to float32 first, as torch does with Python scalars).
  Differences against the torch path could only come from log/cos of the two code generators;
  the tests bound them (|diff| <= 1e-6). Measured on an H200 (torch 2.11+cu130, triton 3.6) over
  2**26 values: z, ``update_`` and ``perturbed_into`` (float32 and bf16) are 100% bit-equal to the
  torch path on the same GPU (also with FP fusion or libdevice flush-to-zero switched on, and
  with tl.log/tl.cos instead of libdevice); against the CPU path max |diff| = 7.2e-7.

Speed (H200, 2**26 elements): z 0.34 ms = 196e9 values/s (torch path: 12.4 ms, 5.4e9/s, 36x);
``update_``/``axpy_normal_`` on float32 ~1.5 TB/s of x traffic, ``perturbed_into`` fp32 -> bf16
~1.36 TB/s. The kernels are bound by the log/cos arithmetic, not by memory.

Element indices inside one launch are at most ``_MAX_LAUNCH`` (2**30), so int32 offsets never
overflow; larger tensors are processed in several launches on sub-views.

``TRITON_INTERPRET=1`` runs the kernels with Triton's CPU interpreter on CPU tensors (used to
check the integer logic without a GPU); there libdevice is unavailable and numpy's log/cos are
used instead, so only the integer words are exact in that mode.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from zoplan.runtime import perturb as _ref

__all__ = [*_ref._FUSED_INTERFACE]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if not _INTERPRET:
    from triton.language.extra.cuda import libdevice
else:  # pragma: no cover - the interpreter has no extern (libdevice) calls
    libdevice = None

_BLOCK = 1024
_NUM_WARPS = 4
# Elements per launch: keeps every in-kernel offset well inside int32 (and is a multiple of
# _BLOCK). A launch never crosses a multiple of 2**32 either (perturb._segments splits there).
_MAX_LAUNCH = 2**30
# Host-side integers in [0, 2**32) are passed biased by 2**32 so Triton always types them as
# int64 (values below 2**31 would otherwise be typed int32, and 1 specialised as a constant),
# giving one compiled variant; the kernel truncates them to uint32, dropping the bias.
_BIAS = 2**32

# Compile options: libdevice is linked without flush-to-zero (torch's CUDA kernels do not flush
# denormals). FP fusion only matters inside libdevice's log/cos, since every multiply/add of ours
# is an explicitly rounded libdevice call that is never contracted.
_OPTIONS: dict = {} if _INTERPRET else {"enable_fp_fusion": False, "enable_reflect_ftz": False}
# libdevice log/cos and explicitly rounded arithmetic; False (forced in the interpreter) uses
# tl.log/tl.cos and plain operators.
_PRECISE = not _INTERPRET

MODE_NORMAL = 0
MODE_AXPY = 1
MODE_PERTURBED = 2
MODE_UPDATE = 3
MODE_WORDS = 4

_H32_C1: tl.constexpr = tl.constexpr(_ref._H32_C1)
_H32_C2: tl.constexpr = tl.constexpr(_ref._H32_C2)
_TWO_POW_M24: tl.constexpr = tl.constexpr(_ref._TWO_POW_M24)
_ANGLE_SCALE: tl.constexpr = tl.constexpr(_ref._ANGLE_SCALE)


@triton.jit
def _h32(x):
    """h32 on uint32: multiplies wrap mod 2**32, shifts are logical."""
    x = x ^ (x >> 16)
    x = x * tl.full(x.shape, _H32_C1, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full(x.shape, _H32_C2, tl.uint32)
    x = x ^ (x >> 15)
    return x


@triton.jit
def _mul(x, y, PRECISE: tl.constexpr):
    if PRECISE:
        return libdevice.mul_rn(x, y)
    else:
        return x * y


@triton.jit
def _add(x, y, PRECISE: tl.constexpr):
    if PRECISE:
        return libdevice.add_rn(x, y)
    else:
        return x + y


@triton.jit
def _sub(x, y, PRECISE: tl.constexpr):
    if PRECISE:
        return libdevice.sub_rn(x, y)
    else:
        return x - y


@triton.jit
def _box_muller(a, b, PRECISE: tl.constexpr):
    """z from the words, rounding like the torch path: u1 = ((a >> 8) + 1) * 2**-24 (exact),
    r = sqrt(-2 * log(u1)); angle = float(b >> 8) * ANGLE_SCALE (one rounding); z = r * cos(angle)."""
    u1 = _mul(((a >> 8) + 1).to(tl.float32), tl.full(a.shape, _TWO_POW_M24, tl.float32), PRECISE)
    if PRECISE:
        lg = libdevice.log(u1)
    else:
        lg = tl.log(u1)
    r = tl.sqrt_rn(_mul(lg, tl.full(a.shape, -2.0, tl.float32), PRECISE))
    ang = _mul((b >> 8).to(tl.float32), tl.full(a.shape, _ANGLE_SCALE, tl.float32), PRECISE)
    if PRECISE:
        c = libdevice.cos(ang)
    else:
        c = tl.cos(ang)
    return _mul(r, c, PRECISE)


@triton.jit
def _words(lo, k0, k1, k2):
    """Step 4 of the algorithm: the words (a, b) of the elements whose low index words are lo."""
    a = _h32(_h32(lo ^ k0) ^ k1)
    b = _h32(a ^ k2)
    return a, b


@triton.jit
def _store_words(a_ptrs, b_ptrs, a, b, mask):
    """MODE_WORDS: the words, as int32 bit patterns."""
    tl.store(a_ptrs, a.to(tl.int32, bitcast=True), mask=mask)
    tl.store(b_ptrs, b.to(tl.int32, bitcast=True), mask=mask)


@triton.jit
def _perturbed_value(base, z, alpha, PRECISE: tl.constexpr):
    """base + alpha * z, each operation rounded to float32 (no FMA)."""
    return _add(base, _mul(z, alpha, PRECISE), PRECISE)


@triton.jit
def _updated_value(xf, z, g, lr, wd, decay, DECAY: tl.constexpr, PRECISE: tl.constexpr):
    """zo.apply_update's rounding: step = z * g; [step = step + xf * wd where decay]; xf - step * lr."""
    step = _mul(z, g, PRECISE)
    if DECAY:
        step = tl.where(decay, _add(step, _mul(xf, wd, PRECISE), PRECISE), step)
    return _sub(xf, _mul(step, lr, PRECISE), PRECISE)


@triton.jit(do_not_specialize=["n", "lo_start", "k0", "k1", "k2", "alpha", "lr", "wd"])
def _zo_kernel(
    x_ptr,  # out / in-place tensor (MODE_WORDS: a as int32)
    y_ptr,  # base (MODE_PERTURBED) / b as int32 (MODE_WORDS); unused otherwise
    n,
    lo_start,  # biased by 2**32
    k0,  # biased by 2**32
    k1,  # biased by 2**32
    k2,  # biased by 2**32
    alpha,  # alpha (AXPY, PERTURBED) or g (UPDATE), float32
    lr,
    wd,
    MODE: tl.constexpr,
    DECAY: tl.constexpr,
    PRECISE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    lo = lo_start.to(tl.uint32) + offs.to(tl.uint32)
    a, b = _words(lo, k0.to(tl.uint32), k1.to(tl.uint32), k2.to(tl.uint32))
    if MODE == 4:
        _store_words(x_ptr + offs, y_ptr + offs, a, b, mask)
    else:
        z = _box_muller(a, b, PRECISE)
        if MODE == 0:
            tl.store(x_ptr + offs, z.to(x_ptr.dtype.element_ty), mask=mask)
        elif MODE == 1:
            x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
            res = _perturbed_value(x, z, alpha, PRECISE)
            tl.store(x_ptr + offs, res.to(x_ptr.dtype.element_ty), mask=mask)
        elif MODE == 2:
            base = tl.load(y_ptr + offs, mask=mask).to(tl.float32)
            res = _perturbed_value(base, z, alpha, PRECISE)
            tl.store(x_ptr + offs, res.to(x_ptr.dtype.element_ty), mask=mask)
        else:
            # zo.apply_update: xf = x.float(); step = z * g; [step = step + xf * wd];
            # x = xf - step * lr
            xf = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
            res = _updated_value(xf, z, alpha, lr, wd, True, DECAY, PRECISE)
            tl.store(x_ptr + offs, res.to(x_ptr.dtype.element_ty), mask=mask)


# ----- one launch per flat buffer ------------------------------------------------------------------
# A table row (int64 fields) describes one range of one parameter inside a flat buffer:
_ROW = 8
_T_TILE0 = 0  # first program (tile of _BLOCK elements) of the range, counted over the whole table
_T_POS = 1  # position of the range's first element in the buffer
_T_COUNT = 2  # elements (at most _MAX_LAUNCH)
_T_LO = 3  # low word of the first element's index in its parameter
_T_HI = 4  # high word of that index (constant over the range)
_T_MIX = 5  # splitmix64(crc32(name)), as a signed int64
_T_DECAY = 6  # 1 if weight decay applies to the parameter
# Rows per launch: each program finds its row by comparing its id with every row's first tile.
_MAX_ROWS = 1024


def _signed64(x: int) -> int:
    x &= _ref._M64
    return x - 2**64 if x >= 2**63 else x


_GOLDEN_S: tl.constexpr = tl.constexpr(_signed64(_ref._GOLDEN))
_HI_MUL_S: tl.constexpr = tl.constexpr(_signed64(_ref._HI_MUL))
_SM1_S: tl.constexpr = tl.constexpr(_signed64(0xBF58476D1CE4E5B9))
_SM2_S: tl.constexpr = tl.constexpr(_signed64(0x94D049BB133111EB))


@triton.jit
def _c64(c: tl.constexpr):
    """The uint64 constant whose two's complement int64 value is ``c``."""
    return tl.full([], c, tl.int64).to(tl.uint64, bitcast=True)


@triton.jit
def _splitmix64(x):
    """``perturb._splitmix64`` on uint64: multiplies and adds wrap mod 2**64, shifts are logical."""
    z = x + _c64(_GOLDEN_S)
    z = (z ^ (z >> 30)) * _c64(_SM1_S)
    z = (z ^ (z >> 27)) * _c64(_SM2_S)
    return z ^ (z >> 31)


@triton.jit(do_not_specialize=["nrows", "seed_lo", "seed_hi", "alpha", "alpha2", "lr", "wd"])
def _zo_block_kernel(
    x_ptr,  # out (PERTURBED), in-place buffer (UPDATE), a as int32 (WORDS)
    y_ptr,  # base (PERTURBED) / b as int32 (WORDS); unused otherwise
    w_ptr,  # second out (PERTURBED with TWO)
    table_ptr,
    nrows,
    seed_lo,  # low and high 32-bit words of seed mod 2**64, each biased by 2**32
    seed_hi,
    alpha,  # alpha (PERTURBED) or g (UPDATE), float32
    alpha2,  # the second output's alpha (PERTURBED with TWO)
    lr,
    wd,
    MODE: tl.constexpr,
    TWO: tl.constexpr,
    DECAY: tl.constexpr,
    PRECISE: tl.constexpr,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, ROWS)
    first_tiles = tl.load(table_ptr + rows * 8, mask=rows < nrows, other=2**62)
    row = table_ptr + (tl.sum((first_tiles <= pid).to(tl.int32), axis=0) - 1).to(tl.int64) * 8
    tile0 = tl.load(row + 0)
    pos = tl.load(row + 1)
    count = tl.load(row + 2)
    lo_start = tl.load(row + 3)
    hi = tl.load(row + 4)
    mix = tl.load(row + 5)
    # Steps 2-3 of the algorithm, per range: the stream key, then the round keys of its high word.
    seed = (seed_hi.to(tl.uint32).to(tl.uint64) << 32) | seed_lo.to(tl.uint32).to(tl.uint64)
    key = _splitmix64(seed ^ mix.to(tl.uint64, bitcast=True))
    base_key = key ^ (hi.to(tl.uint64, bitcast=True) * _c64(_HI_MUL_S))
    w1 = _splitmix64(base_key)
    w2 = _splitmix64(base_key + _c64(_GOLDEN_S))
    k0 = w1.to(tl.uint32)
    k1 = (w1 >> 32).to(tl.uint32)
    k2 = w2.to(tl.uint32)
    offs = (pid - tile0).to(tl.int32) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < count
    a, b = _words(lo_start.to(tl.uint32) + offs.to(tl.uint32), k0, k1, k2)
    at = pos + offs.to(tl.int64)
    if MODE == 4:
        _store_words(x_ptr + at, y_ptr + at, a, b, mask)
    else:
        z = _box_muller(a, b, PRECISE)
        if MODE == 2:
            base = tl.load(y_ptr + at, mask=mask).to(tl.float32)
            if TWO:
                res2 = _perturbed_value(base, z, alpha2, PRECISE)
                tl.store(w_ptr + at, res2.to(w_ptr.dtype.element_ty), mask=mask)
            res = _perturbed_value(base, z, alpha, PRECISE)
            tl.store(x_ptr + at, res.to(x_ptr.dtype.element_ty), mask=mask)
        else:
            # as _zo_kernel's MODE_UPDATE, with the decay flag of the range's parameter
            xf = tl.load(x_ptr + at, mask=mask).to(tl.float32)
            res = _updated_value(xf, z, alpha, lr, wd, tl.load(row + 6) != 0, DECAY, PRECISE)
            tl.store(x_ptr + at, res.to(x_ptr.dtype.element_ty), mask=mask)


# ----- host side ------------------------------------------------------------------------------------
def _run(
    mode: int,
    x: torch.Tensor,
    y: torch.Tensor | None,
    seed: int,
    name: str,
    start: int,
    *,
    alpha: float = 0.0,
    lr: float = 0.0,
    wd: float = 0.0,
    decay: bool = False,
) -> None:
    """Launch ``mode`` over the 1-D contiguous ``x`` (and ``y``), element j being index start + j."""
    count = x.numel()
    _ref._check_range(start, count)
    if count == 0:
        return
    key = _ref.name_key(seed, name)
    alpha, lr, wd = float(alpha), float(lr), float(wd)
    dev_ctx = torch.cuda.device(x.device) if x.device.type == "cuda" else _nullctx()
    with dev_ctx:
        hi_cached, keys = -1, (0, 0, 0)
        for i, n in _ref._segments(start, count, _MAX_LAUNCH):
            hi = i >> 32
            if hi != hi_cached:
                keys, hi_cached = _ref._round_keys(key, hi), hi
            j = i - start
            xs = x[j : j + n]
            ys = y[j : j + n] if y is not None else xs
            grid = (triton.cdiv(n, _BLOCK),)
            _zo_kernel[grid](
                xs,
                ys,
                n,
                (i & _ref._M32) + _BIAS,
                keys[0] + _BIAS,
                keys[1] + _BIAS,
                keys[2] + _BIAS,
                alpha,
                lr,
                wd,
                MODE=mode,
                DECAY=bool(decay),
                PRECISE=_PRECISE,
                BLOCK=_BLOCK,
                num_warps=_NUM_WARPS,
                **_OPTIONS,
            )


class _nullctx:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None


_check_float = _ref._check_float


def normal_into(out: torch.Tensor, seed: int, name: str, start: int = 0) -> torch.Tensor:
    """``out`` (row-major) := z[start : start + out.numel()], computed in float32 and cast once to
    ``out.dtype``. Returns ``out``."""
    _check_float(out, "out")
    if out.is_contiguous():
        _run(MODE_NORMAL, out.view(-1), None, seed, name, start)
    else:
        tmp = torch.empty(out.shape, dtype=out.dtype, device=out.device)
        _run(MODE_NORMAL, tmp.view(-1), None, seed, name, start)
        out.copy_(tmp)
    return out


def axpy_normal_(x: torch.Tensor, seed: int, name: str, start: int, alpha: float) -> torch.Tensor:
    """In place: ``x := x + alpha * z`` in float32 (``x.float() + float32(alpha) * z``, each
    operation rounded, no FMA), rounded once to ``x.dtype``; z is never materialised.
    ``alpha == 0`` is a no-op. Returns ``x``."""
    _check_float(x, "x")
    if float(alpha) == 0.0:
        return x
    if x.is_contiguous():
        _run(MODE_AXPY, x.view(-1), None, seed, name, start, alpha=alpha)
    else:
        tmp = x.contiguous()
        _run(MODE_AXPY, tmp.view(-1), None, seed, name, start, alpha=alpha)
        x.copy_(tmp)
    return x


def perturbed_into(
    out: torch.Tensor, base: torch.Tensor, seed: int, name: str, start: int, alpha: float
) -> torch.Tensor:
    """``out := (base.float() + alpha * z).to(out.dtype)`` without materialising z: bit-equal to
    the torch expression ``(base.float() + alpha * normal(...)).to(out.dtype)`` given the same z.
    ``out`` and ``base`` must have the same number of elements (row-major order); ``out`` may
    be ``base`` itself. Returns ``out``."""
    _check_float(out, "out")
    _check_float(base, "base")
    if out.numel() != base.numel():
        raise ValueError(f"out has {out.numel()} elements but base has {base.numel()}")
    if out.device != base.device:
        raise ValueError(f"out is on {out.device} but base is on {base.device}")
    b = base if base.is_contiguous() else base.contiguous()
    if out.is_contiguous():
        _run(MODE_PERTURBED, out.view(-1), b.view(-1), seed, name, start, alpha=alpha)
    else:
        tmp = torch.empty(out.shape, dtype=out.dtype, device=out.device)
        _run(MODE_PERTURBED, tmp.view(-1), b.view(-1), seed, name, start, alpha=alpha)
        out.copy_(tmp)
    return out


def update_(
    x: torch.Tensor, seed: int, name: str, start: int, g: float, lr: float, wd: float, decay: bool
) -> torch.Tensor:
    """In place, MeZO's update rounded exactly like ``zoplan.runtime.zo.apply_update``::

        xf = x.float(); step = z * g; if decay and wd: step = step + xf * wd
        x = (xf - step * lr).to(x.dtype)

    with g, lr, wd rounded to float32 (as torch does with Python scalars). Returns ``x``."""
    _check_float(x, "x")
    dec = bool(decay and wd)
    if x.is_contiguous():
        _run(MODE_UPDATE, x.view(-1), None, seed, name, start, alpha=g, lr=lr, wd=wd, decay=dec)
    else:
        tmp = x.contiguous()
        _run(MODE_UPDATE, tmp.view(-1), None, seed, name, start, alpha=g, lr=lr, wd=wd, decay=dec)
        x.copy_(tmp)
    return x


def stream_words(
    seed: int, name: str, start: int, count: int, *, device: torch.device | str = "cuda"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Debug/check kernel: the words (a, b) of elements start .. start + count - 1 as int64 tensors
    in [0, 2**32), like ``perturb.stream_words`` (which they must equal bit for bit)."""
    _ref._check_range(start, count)
    device = torch.device(device)
    a = torch.empty(count, dtype=torch.int32, device=device)
    b = torch.empty(count, dtype=torch.int32, device=device)
    _run(MODE_WORDS, a, b, seed, name, start)
    return a.to(torch.int64) & _ref._M32, b.to(torch.int64) & _ref._M32


# ----- one launch per flat buffer: host side ----------------------------------------------------------
class BlockTable:
    """The geometry of the parameter ranges held by one flat buffer, on one device.

    It depends on the layout only (never on the step seed), so it is built once and reused by
    every launch over buffers of that layout. ``end`` is the smallest buffer length it fits."""

    __slots__ = ("device", "end", "launches", "numel")

    def __init__(
        self, device: torch.device, end: int, numel: int, launches: list[tuple[torch.Tensor, int, int]]
    ) -> None:
        self.device = device
        self.end = end  # max position + 1 over the ranges
        self.numel = numel  # elements covered
        self.launches = launches  # (rows on the device, row count, programs) per launch


def block_table(parts, device: torch.device | str) -> BlockTable:
    """The table for ``parts``: (name, first, count, pos, decay) tuples, each saying that elements
    first .. first + count - 1 (row-major) of parameter ``name`` sit at buffer[pos : pos + count]
    and whether weight decay applies to it. Ranges must not overlap in the buffer."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    rows, end = _ref._block_rows(parts, _MAX_LAUNCH)
    numel = sum(r[_T_COUNT] for r in rows)
    launches = []
    for g in range(0, len(rows), _MAX_ROWS):
        group, tiles = rows[g : g + _MAX_ROWS], 0
        for r in group:
            r[_T_TILE0] = tiles
            tiles += triton.cdiv(r[_T_COUNT], _BLOCK)
        t = torch.tensor(group, dtype=torch.int64).view(-1)
        launches.append((t.to(device), len(group), tiles))
    return BlockTable(device, end, numel, launches)


def _rows_pow2(n: int) -> int:
    """Rows loaded by every program: a power of two >= n (at least 16, so few variants compile)."""
    r = 16
    while r < n:
        r *= 2
    return r


_check_buffer = _ref._check_buffer


def _run_block(
    mode: int,
    x: torch.Tensor,
    y: torch.Tensor | None,
    w: torch.Tensor | None,
    table: BlockTable,
    seed: int,
    *,
    alpha: float = 0.0,
    alpha2: float = 0.0,
    lr: float = 0.0,
    wd: float = 0.0,
    decay: bool = False,
) -> None:
    s = seed & _ref._M64
    dev_ctx = torch.cuda.device(x.device) if x.device.type == "cuda" else _nullctx()
    with dev_ctx:
        for rows, nrows, tiles in table.launches:
            _zo_block_kernel[(tiles,)](
                x,
                y if y is not None else x,
                w if w is not None else x,
                rows,
                nrows,
                (s & _ref._M32) + _BIAS,
                (s >> 32) + _BIAS,
                float(alpha),
                float(alpha2),
                float(lr),
                float(wd),
                MODE=mode,
                TWO=w is not None,
                DECAY=bool(decay),
                PRECISE=_PRECISE,
                BLOCK=_BLOCK,
                ROWS=_rows_pow2(nrows),
                num_warps=_NUM_WARPS,
                **_OPTIONS,
            )


def perturbed_block_into(outs, base: torch.Tensor, table: BlockTable, seed: int, alphas) -> list[torch.Tensor]:
    """For each range of ``table``: ``outs[k][range] := (base.float() + alphas[k] * z).to(dtype)``
    with one or two outputs in one launch, z drawn once. Bit-equal to ``perturbed_into`` per
    parameter. Elements of the buffers outside the table's ranges are not touched. ``outs[0]``
    may be ``base`` itself. Returns ``outs``."""
    outs, alphas = _ref._check_block_outputs(outs, base, table, alphas)
    if table.numel:
        _run_block(
            MODE_PERTURBED,
            outs[0],
            base,
            outs[1] if len(outs) == 2 else None,
            table,
            seed,
            alpha=alphas[0],
            alpha2=alphas[-1],
        )
    return outs


def update_block_(x: torch.Tensor, table: BlockTable, seed: int, g: float, lr: float, wd: float) -> torch.Tensor:
    """In place, ``update_`` over every range of ``table`` in one launch, each range with its own
    parameter's decay flag (``decay and wd``, as ``update_``). Returns ``x``."""
    _check_float(x, "x")
    _check_buffer(x, table, "x")
    if table.numel:
        _run_block(MODE_UPDATE, x, None, None, table, seed, alpha=g, lr=lr, wd=wd, decay=bool(wd))
    return x


def block_words(table: BlockTable, seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Debug/check kernel: buffers of ``size`` elements holding, over each range of ``table``, the
    words (a, b) as int64 in [0, 2**32) (zero elsewhere): a check of the in-kernel key derivation."""
    a = torch.zeros(size, dtype=torch.int32, device=table.device)
    b = torch.zeros(size, dtype=torch.int32, device=table.device)
    _check_buffer(a, table, "the words buffer")
    if table.numel:
        _run_block(MODE_WORDS, a, b, None, table, seed)
    return a.to(torch.int64) & _ref._M32, b.to(torch.int64) & _ref._M32
