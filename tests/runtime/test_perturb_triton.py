"""The fused Triton kernels of ``zoplan.runtime.perturb_triton`` against the torch reference path.

The integer words (a, b) must be bit-identical to ``perturb.stream_words``; z may differ from the
torch path's float32 Box–Muller only through log/cos (|diff| <= 1e-6); the fused epilogues must
round exactly like the torch expressions they replace, given the same z.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import random

import pytest

torch = pytest.importorskip("torch")

from zoplan.runtime import perturb as P  # noqa: E402  (torch must be importable first)
from zoplan.runtime.zo import apply_update  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
]

NAME = "model.layers.0.mlp.fc1.weight"
DEV = "cuda"

# (start, count): small and ragged ranges, a range across 2**32 (split on the host), ranges in
# later high words, and the very end of the index space, none of which allocates more than a few MB.
RANGES = [
    (0, 1),
    (0, 4097),
    (12345, 300_001),
    (2**32 - 5000, 10_000),
    (2**32, 777),
    (7 * 2**32 + 3, 2**20),
    (3 * 2**32 - 1, 2),
    (2**63 - 1000, 1000),
]
_rng = random.Random(0)
RANGES += [(_rng.randrange(2**44), _rng.randrange(1, 200_000)) for _ in range(4)]
RANGES += [(_rng.randrange(1, 2**10) * 2**32 - _rng.randrange(1, 50_000), 100_000) for _ in range(2)]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# One unit in the last place, relative, of each dtype (the rounding of a result can flip by one
# ulp when z differs from the torch path's z by a few float32 ulps).
ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


@pytest.fixture(scope="module")
def T():
    return importlib.import_module("zoplan.runtime.perturb_triton")


def torch_z(seed: int, start: int, count: int, name: str = NAME) -> torch.Tensor:
    """z from the torch reference path, on the GPU (bypassing normal()'s dispatch)."""
    out = torch.empty(count, dtype=torch.float32, device=DEV)
    P._fill_normal(out, seed, name, start)
    return out


def triton_z(T, seed: int, start: int, count: int, name: str = NAME) -> torch.Tensor:
    return T.normal_into(torch.empty(count, dtype=torch.float32, device=DEV), seed, name, start)


def _x(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=DEV).manual_seed(seed)
    return (torch.randn(n, generator=g, device=DEV) * 0.05).to(dtype)


# ----- the integer stream ---------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1234, 2**63 - 1, -5])
def test_words_bit_identical(T, seed: int) -> None:
    for start, count in RANGES:
        ra, rb = P.stream_words(seed, NAME, start, count, device=DEV)
        ta, tb = T.stream_words(seed, NAME, start, count, device=DEV)
        assert ta.dtype == torch.int64 and ta.device.type == torch.device(DEV).type
        assert torch.equal(ta, ra), (seed, start, count)
        assert torch.equal(tb, rb), (seed, start, count)


# The pinned public values of tests/runtime/test_perturb.py.
GOLDEN_A = [0x3C28289B, 0x86A97656, 0xFEF7619E, 0x39C189CB, 0x3A25741C, 0x1C87B16C, 0x4E0E9532, 0x63F05990]
GOLDEN_B = [0x0021404F, 0x37F9D7BF, 0x4E6A55A3, 0xC0A90F27, 0x9F938D61, 0x201F69E5, 0xF12C2D17, 0xDC19777A]
GOLDEN_Z = [
    1.701885461807251,
    0.22179119288921356,
    -0.031166624277830124,
    0.027968576177954674,
    -1.2300546169281006,
    1.4768221378326416,
    1.440319299697876,
    0.8727084398269653,
]


def test_words_golden(T) -> None:
    a, b = T.stream_words(1234, NAME, 0, 8, device=DEV)
    assert a.tolist() == GOLDEN_A and b.tolist() == GOLDEN_B


# ----- z ------------------------------------------------------------------------------------------
def test_normal_matches_torch_path(T) -> None:
    for seed in (0, 77, 2**63 - 1):
        for start, count in RANGES + [(0, 2**22 + 123)]:
            ref = torch_z(seed, start, count)
            got = triton_z(T, seed, start, count)
            assert torch.isfinite(got).all()
            diff = (got - ref).abs().max().item()
            assert diff <= 1e-6, (seed, start, count, diff)


def test_normal_matches_cpu(T) -> None:
    for start, count in [(0, 2**20), (2**32 - 3000, 6000), (2**63 - 10, 10)]:
        cpu = P.normal(5, NAME, start, count)
        got = triton_z(T, 5, start, count).cpu()
        assert (got - cpu).abs().max().item() <= 1e-6


def test_normal_golden(T) -> None:
    z = triton_z(T, 1234, 0, 8)
    assert z.tolist() == pytest.approx(GOLDEN_Z, rel=1e-6, abs=1e-6)


@pytest.mark.skipif(os.environ.get("ZOPLAN_PERTURB_TRITON") == "0", reason="dispatch disabled by env")
def test_normal_dispatches_to_triton_on_cuda(T) -> None:
    assert P._triton_backend() is T
    for start, count in RANGES[:6]:
        assert torch.equal(P.normal(9, NAME, start, count, device=DEV), triton_z(T, 9, start, count))
    # normal_like and the dtype argument go through the same path.
    z = triton_z(T, 9, 0, 6 * 7)
    assert torch.equal(P.normal_like((6, 7), 9, NAME, device=DEV), z.view(6, 7))
    assert torch.equal(P.normal(9, NAME, 0, 42, device=DEV, dtype=torch.bfloat16), z.to(torch.bfloat16))
    assert P.normal(9, NAME, 0, 0, device=DEV).numel() == 0
    with pytest.raises(ValueError):
        P.normal(9, NAME, 2**63 - 2, 4, device=DEV)
    with pytest.raises(ValueError):
        P.normal(9, NAME, -1, 4, device=DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_normal_into_dtypes_cast_from_float32(T, dtype: torch.dtype) -> None:
    for start, count in [(10, 5000), (2**32 - 100, 300)]:
        z32 = triton_z(T, 8, start, count)
        out = T.normal_into(torch.empty(count, dtype=dtype, device=DEV), 8, NAME, start)
        assert out.dtype == dtype
        assert torch.equal(out, z32.to(dtype))


def test_slice_independence_and_shapes(T) -> None:
    n = 3 * 2**17 + 12345
    full = triton_z(T, 7, 0, n)
    rng = random.Random(1)
    for _ in range(30):
        a = rng.randrange(n)
        b = rng.randrange(a, min(n, a + rng.choice([1, 7, 100, 5000, n])) + 1)
        assert torch.equal(triton_z(T, 7, a, b - a), full[a:b]), (a, b)
    # A 2-D tensor is filled in row-major order; a non-contiguous one too.
    m = T.normal_into(torch.empty(300, 700, device=DEV), 7, NAME, 0)
    assert torch.equal(m.view(-1), full[: 300 * 700])
    t = torch.empty(700, 300, device=DEV).t()
    T.normal_into(t, 7, NAME, 0)
    assert torch.equal(t, m)


def test_many_launches_equal_one(T, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tensors above _MAX_LAUNCH elements are split into several launches on sub-views.
    start, count = 2**32 - 50_000, 200_001
    one = triton_z(T, 3, start, count)
    x = _x(count, torch.bfloat16)
    upd = T.update_(x.clone(), 3, NAME, start, 2.0, 1e-2, 0.1, True)
    monkeypatch.setattr(T, "_MAX_LAUNCH", 4096 + 7)
    assert torch.equal(triton_z(T, 3, start, count), one)
    assert torch.equal(T.update_(x.clone(), 3, NAME, start, 2.0, 1e-2, 0.1, True), upd)
    a, b = T.stream_words(3, NAME, start, count, device=DEV)
    ra, rb = P.stream_words(3, NAME, start, count, device=DEV)
    assert torch.equal(a, ra) and torch.equal(b, rb)


# ----- fused epilogues --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_axpy_normal(T, dtype: torch.dtype) -> None:
    for start, count in [(0, 100_003), (2**32 - 30_000, 70_000), (5 * 2**32 + 11, 4096)]:
        for alpha in (1e-3, -2e-3, 0.37):
            x0 = _x(count, dtype, seed=start % 1000)
            got = T.axpy_normal_(x0.clone(), 11, NAME, start, alpha)
            # Bit-exact against the torch expression with the kernel's own z ...
            z = triton_z(T, 11, start, count)
            assert torch.equal(got, (x0.float() + alpha * z).to(dtype)), (start, alpha)
            # ... and within one rounding of it with the torch path's z.
            # (z differs by <= 1e-6, so the sum by <= |alpha| * 1e-6, plus one rounding.)
            ref = (x0.float() + alpha * torch_z(11, start, count)).to(dtype)
            torch.testing.assert_close(got, ref, rtol=ULP[dtype], atol=1e-9 + 2e-6 * abs(alpha))
    # perturb_ (the torch path) agrees to float32 rounding on float32 params.
    p = _x(50_000, torch.float32)
    q = p.clone()
    P.perturb_(p, 4, NAME, 1e-3, offset=123)
    T.axpy_normal_(q, 4, NAME, 123, 1e-3)
    torch.testing.assert_close(q, p, rtol=ULP[torch.float32], atol=1e-9 + 2e-9)
    # alpha == 0 is a no-op, like perturb_.
    x = _x(1000, dtype)
    assert torch.equal(T.axpy_normal_(x.clone(), 4, NAME, 0, 0.0), x)


def test_axpy_mezo_round_trip(T) -> None:
    p0 = _x(200_000, torch.float32, seed=4)
    p = p0.clone()
    T.axpy_normal_(p, 77, NAME, 0, 1e-3)
    assert not torch.equal(p, p0)
    T.axpy_normal_(p, 77, NAME, 0, -2e-3)
    T.axpy_normal_(p, 77, NAME, 0, 1e-3)
    assert torch.allclose(p, p0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_perturbed_into(T, base_dtype: torch.dtype, dtype: torch.dtype) -> None:
    for start, count in [(0, 65_537), (2**32 - 1000, 3000)]:
        base = _x(count, base_dtype, seed=1)
        z = triton_z(T, 21, start, count)
        for alpha in (1e-3, -1e-3):
            out = torch.empty(count, dtype=dtype, device=DEV)
            T.perturbed_into(out, base, 21, NAME, start, alpha)
            # engine._perturbed / _set_resident form exactly this expression.
            assert torch.equal(out, (base.float() + alpha * z).to(dtype)), (start, alpha)
            ref = (base.float() + alpha * torch_z(21, start, count)).to(dtype)
            torch.testing.assert_close(out, ref, rtol=ULP[dtype], atol=1e-9 + 2e-6 * abs(alpha))
    # Shapes: out and base only need the same number of elements; out may alias base.
    base = _x(40 * 50, base_dtype, seed=2).view(40, 50)
    z = triton_z(T, 21, 7, 2000).view(40, 50)
    expected = (base.float() + 0.5 * z).to(base_dtype)
    same = base.clone()
    T.perturbed_into(same, same, 21, NAME, 7, 0.5)
    assert torch.equal(same, expected)
    out_t = torch.empty(50, 40, dtype=dtype, device=DEV).t()
    T.perturbed_into(out_t, base, 21, NAME, 7, 0.5)
    assert torch.equal(out_t, (base.float() + 0.5 * z).to(dtype))
    with pytest.raises(ValueError):
        T.perturbed_into(torch.empty(10, device=DEV), torch.empty(11, device=DEV), 1, NAME, 0, 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decay,wd", [(True, 0.1), (False, 0.1), (True, 0.0)])
def test_update_matches_apply_update(T, dtype: torch.dtype, decay: bool, wd: float) -> None:
    for start, count in [(0, 100_000), (2**32 - 777, 2000), (9 * 2**32, 3333)]:
        for g, lr in ((3.7, 1e-2), (-0.25, 1e-4), (12.0, 1e-6)):
            x0 = _x(count, dtype, seed=3)
            got = T.update_(x0.clone(), 33, NAME, start, g, lr, wd, decay)
            expected = x0.clone()
            apply_update(expected, triton_z(T, 33, start, count), g, lr, wd, decay)
            assert torch.equal(got, expected), (start, g, lr)
            ref = x0.clone()
            apply_update(ref, torch_z(33, start, count), g, lr, wd, decay)
            torch.testing.assert_close(got, ref, rtol=ULP[dtype], atol=1e-9 + 2e-6 * abs(g * lr))


def test_update_non_contiguous_and_shaped(T) -> None:
    base = _x(60 * 70, torch.float32, seed=5).view(60, 70)
    z = triton_z(T, 2, 0, 60 * 70).view(60, 70)
    expected = base.clone()
    apply_update(expected, z, 1.5, 1e-3, 0.01, True)
    got = base.clone()
    T.update_(got, 2, NAME, 0, 1.5, 1e-3, 0.01, True)
    assert torch.equal(got, expected)
    # A transposed view follows its own row-major order, like perturb_.
    t = base.t().contiguous().t()  # non-contiguous, same values
    T.update_(t, 2, NAME, 0, 1.5, 1e-3, 0.01, True)
    assert torch.equal(t, expected)
    x = base.t()  # logical (70, 60) row-major order differs from storage
    ref = x.contiguous()
    apply_update(ref, triton_z(T, 2, 0, 60 * 70).view(70, 60), 1.5, 1e-3, 0.01, True)
    x_copy = base.clone().t()
    T.update_(x_copy, 2, NAME, 0, 1.5, 1e-3, 0.01, True)
    assert torch.equal(x_copy, ref)


def test_empty_and_errors(T) -> None:
    empty = torch.empty(0, device=DEV)
    T.normal_into(empty, 1, NAME, 0)
    T.update_(empty, 1, NAME, 0, 1.0, 1.0, 0.0, False)
    with pytest.raises(TypeError):
        T.normal_into(torch.empty(4, dtype=torch.int32, device=DEV), 1, NAME, 0)
    with pytest.raises(TypeError):
        T.axpy_normal_(torch.zeros(4, dtype=torch.int64, device=DEV), 1, NAME, 0, 1.0)
    with pytest.raises(ValueError):
        T.normal_into(torch.empty(4, device=DEV), 1, NAME, -1)
    with pytest.raises(ValueError):
        T.update_(torch.empty(4, device=DEV), 1, NAME, 2**63 - 2, 1.0, 1.0, 0.0, False)


def test_statistics(T) -> None:
    z = triton_z(T, 2024, 0, 2**22).double()
    assert abs(z.mean().item()) < 4 / 2**11
    assert abs(z.std().item() - 1.0) < 0.01
