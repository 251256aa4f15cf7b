"""The MeZO perturbation z: purity, slice independence, statistics, devices and golden values."""

from __future__ import annotations

import ast
import math
import os
import random
import subprocess
import sys
import zlib

import pytest

torch = pytest.importorskip("torch")

from zoplan.runtime.perturb import (  # noqa: E402  (torch must be importable first)
    name_key,
    normal,
    normal_like,
    normal_parts_,
    perturb_,
    step_seed,
    stream_words,
)

NAME = "model.layers.0.mlp.fc1.weight"
M32 = 0xFFFFFFFF
M64 = 0xFFFFFFFFFFFFFFFF


# ----- a pure-Python replay of the documented algorithm ----------------------------------------------
# Written from the module docstring only, so a change to the code that is not reflected in the
# documentation (or vice versa) fails here: the docstring is the public replay recipe.
def _sm64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _h32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & M32
    x ^= x >> 15
    x = (x * 0x735A2D97) & M32
    return x ^ (x >> 15)


def _ref_element(seed: int, name: str, i: int) -> tuple[int, int, float]:
    key = _sm64((seed & M64) ^ _sm64(zlib.crc32(name.encode("utf-8"))))
    hi, lo = i >> 32, i & M32
    base = key ^ ((hi * 0xD1B54A32D192ED03) & M64)
    w1, w2 = _sm64(base), _sm64((base + 0x9E3779B97F4A7C15) & M64)
    k0, k1, k2 = w1 & M32, w1 >> 32, w2 & M32
    a = _h32(_h32(lo ^ k0) ^ k1)
    b = _h32(a ^ k2)
    u1 = ((a >> 8) + 1) * 2.0**-24
    u2 = (b >> 8) * 2.0**-24
    return a, b, math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


def test_matches_documented_algorithm() -> None:
    indices = [0, 1, 2, 3, 1000, 2**32 - 1, 2**32, 2**32 + 1, 3 * 2**32 + 12345]
    for seed in (0, 1234, 2**63 - 1, -5):
        for i in indices:
            ra, rb, rz = _ref_element(seed, NAME, i)
            a, b = stream_words(seed, NAME, i, 1)
            assert (a.item(), b.item()) == (ra, rb), (seed, i)
            # float32 Box-Muller vs the double-precision formula: the float32 angle carries an
            # absolute error of ~4e-7 rad, times a radius of at most 5.8.
            assert normal(seed, NAME, i, 1).item() == pytest.approx(rz, rel=1e-6, abs=5e-6)


# ----- golden values: the public algorithm must never change silently ------------------------------
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


def test_golden_first_values() -> None:
    a, b = stream_words(1234, NAME, 0, 8)
    # The integer stream is exact on every device and machine.
    assert a.tolist() == GOLDEN_A
    assert b.tolist() == GOLDEN_B
    # The float transform may differ by a few ulps between math libraries (CPU ISA, CUDA).
    z = normal(1234, NAME, 0, 8)
    assert z.dtype == torch.float32
    assert z.tolist() == pytest.approx(GOLDEN_Z, rel=1e-6, abs=1e-6)


def test_golden_step_seeds() -> None:
    assert step_seed(0, 0) == 6017775124710473527
    assert step_seed(1234, 1) == 2402035077595190771
    assert step_seed(-1, 5) == 1923329087015097400


def test_step_seed_is_a_63_bit_pure_mix() -> None:
    seeds = [step_seed(42, s) for s in range(2000)]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2**63 for s in seeds)
    assert seeds == [step_seed(42, s) for s in range(2000)]
    assert step_seed(43, 0) != step_seed(42, 0)
    # A step seed is not trivially related to the run seed or the step.
    assert step_seed(0, 1) not in (0, 1)


# ----- purity and slice independence --------------------------------------------------------------
def test_slice_independence_bit_exact() -> None:
    n = 3 * 2**17 + 12345  # several CPU chunks plus a ragged tail
    full = normal(7, NAME, 0, n)
    rng = random.Random(0)
    for _ in range(40):
        a = rng.randrange(n)
        b = rng.randrange(a, min(n, a + rng.choice([1, 7, 100, 5000, n])) + 1)
        assert torch.equal(normal(7, NAME, a, b - a), full[a:b]), (a, b)
    # The docstring example.
    assert torch.equal(normal(7, NAME, 0, 10)[3:7], normal(7, NAME, 3, 4))


def test_many_parameters_drawn_at_once_equal_one_draw_each() -> None:
    # a block's small parameters packed into shared chunks, a large one cut across chunks, a
    # slice that starts mid-parameter, one across the 2**32 boundary, and gaps in the output
    sizes = [4096, 64, 1, 7, 3 * 2**17 + 5, 130, 2**17]
    rng = random.Random(3)
    parts, pos = [], 0
    for j, count in enumerate(sizes):
        first = rng.choice([0, 0, 11])
        parts.append((f"model.layers.{j}.w", first, count, pos))
        pos += count + rng.choice([0, 0, 3])
    parts.append(("model.layers.9.w", 2**32 - 4, 9, pos))
    pos += 9
    out = torch.full((pos + 2,), float("nan"))
    normal_parts_(out, 99, parts)
    expected = torch.full((pos + 2,), float("nan"))
    for name, first, count, at in parts:
        expected[at : at + count] = normal(99, name, first, count)
    assert torch.equal(out.isnan(), expected.isnan())  # the gaps are left alone
    assert torch.equal(out.nan_to_num(0.0), expected.nan_to_num(0.0))
    with pytest.raises(ValueError, match="outside the output"):
        normal_parts_(torch.empty(4), 1, [("w", 0, 5, 0)])
    with pytest.raises(TypeError, match="float32"):
        normal_parts_(torch.empty(4, dtype=torch.float64), 1, [("w", 0, 4, 0)])


def test_slices_across_the_2_32_boundary() -> None:
    start = 2**32 - 5
    z = normal(3, NAME, start, 10)
    assert torch.equal(normal(3, NAME, start, 5), z[:5])
    assert torch.equal(normal(3, NAME, 2**32, 5), z[5:])
    # The high word enters the key: element 2**32 + i is not element i again.
    assert not torch.equal(normal(3, NAME, 2**32, 64), normal(3, NAME, 0, 64))


def test_deterministic_across_calls_and_thread_counts() -> None:
    first = normal(11, NAME, 100, 300_000)
    assert torch.equal(first, normal(11, NAME, 100, 300_000))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(first, normal(11, NAME, 100, 300_000))
    finally:
        torch.set_num_threads(threads)


def test_deterministic_in_a_fresh_process() -> None:
    # Same values in a new interpreter: the name hash is crc32, not the salted hash().
    code = (
        "import torch; from zoplan.runtime.perturb import normal;"
        f"z = normal(99, {NAME!r}, 12345, 1000);"
        "print(z.view(torch.int32).tolist())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    )
    bits = ast.literal_eval(out.stdout.strip())
    assert bits == normal(99, NAME, 12345, 1000).view(torch.int32).tolist()


def test_different_seeds_and_names_give_different_streams() -> None:
    n = 2**16
    base = normal(5, NAME, 0, n).double()
    others = [
        normal(6, NAME, 0, n),
        normal(step_seed(5, 1), NAME, 0, n),
        normal(5, "model.layers.0.mlp.fc2.weight", 0, n),
        normal(5, "model.layers.1.mlp.fc1.weight", 0, n),
        normal(5, NAME + ".", 0, n),
    ]
    for other in others:
        other = other.double()
        assert not torch.equal(other, base)
        # Uncorrelated, not merely different: |corr| < 4 / sqrt(n).
        corr = ((base - base.mean()) * (other - other.mean())).mean() / (base.std() * other.std())
        assert abs(corr.item()) < 4 / math.sqrt(n)
    assert name_key(5, "a") != name_key(5, "b") != name_key(6, "b")


def test_streams_of_different_keys_are_not_permutations() -> None:
    # A hash with the key only XORed into the counter would give every key the same values in a
    # shuffled order over aligned power-of-two blocks; the sorted values would then coincide.
    n = 2**12
    x = normal(1, NAME, 0, n).sort().values
    y = normal(2, NAME, 0, n).sort().values
    assert not torch.equal(x, y)


def test_dtypes_cast_from_float32() -> None:
    z32 = normal(8, NAME, 10, 5000)
    assert torch.equal(normal(8, NAME, 10, 5000, dtype=torch.bfloat16), z32.to(torch.bfloat16))
    assert torch.equal(normal(8, NAME, 10, 5000, dtype=torch.float64), z32.double())
    assert normal(8, NAME, 10, 0).numel() == 0
    with pytest.raises(TypeError):
        normal(8, NAME, 0, 4, dtype=torch.int64)
    with pytest.raises(ValueError):
        normal(8, NAME, -1, 4)
    with pytest.raises(ValueError):
        normal(8, NAME, 2**63 - 2, 4)


def test_normal_like() -> None:
    z = normal(4, NAME, 0, 6 * 7)
    assert torch.equal(normal_like(42, 4, NAME), z)
    assert torch.equal(normal_like((6, 7), 4, NAME), z.view(6, 7))
    like = normal_like(torch.zeros(6, 7, dtype=torch.bfloat16), 4, NAME)
    assert like.shape == (6, 7) and like.dtype == torch.bfloat16
    assert torch.equal(like, z.view(6, 7).to(torch.bfloat16))
    assert normal_like(torch.zeros(6, 7), 4, NAME, dtype=torch.float64).dtype == torch.float64


# ----- statistics ---------------------------------------------------------------------------------
def test_statistics_of_2_22_samples() -> None:
    n = 2**22
    z32 = normal(2024, NAME, 0, n)
    assert torch.isfinite(z32).all()
    z = z32.double()
    mean = z.mean().item()
    c = z - mean
    var = (c * c).mean().item()
    kurt = (c**4).mean().item() / var**2
    assert abs(mean) < 4 / math.sqrt(n)
    assert abs(math.sqrt(var) - 1.0) < 0.01
    assert abs(kurt - 3.0) < 0.05  # standard error ~ sqrt(24 / n) = 0.0024
    skew = (c**3).mean().item() / var**1.5
    assert abs(skew) < 0.02  # standard error ~ sqrt(6 / n) = 0.0012
    # Tails: P(|z| > 4) = 6.334e-5, so ~266 expected with sd ~16; the 24-bit u1 caps |z| at 5.77.
    beyond4 = (z.abs() > 4).sum().item()
    expected = n * math.erfc(4 / math.sqrt(2))
    assert abs(beyond4 - expected) < 6 * math.sqrt(expected)
    assert z.abs().max().item() <= math.sqrt(48 * math.log(2)) + 1e-5
    # The CDF at a few points (binomial sd < 2.5e-4 each).
    for x in (-2.0, -1.0, 0.0, 0.5, 1.5):
        frac = (z < x).double().mean().item()
        assert abs(frac - 0.5 * math.erfc(-x / math.sqrt(2))) < 2e-3, x
    # Neighbouring elements are uncorrelated (a weak counter hash shows up here first).
    lag1 = (c[1:] * c[:-1]).mean().item() / var
    assert abs(lag1) < 4 / math.sqrt(n)


# ----- perturb_ -----------------------------------------------------------------------------------
def test_perturb_equals_adding_scaled_z() -> None:
    p = torch.randn(300, 700, generator=torch.Generator().manual_seed(0))
    expected = p.clone().view(-1).add_(normal(3, NAME, 0, p.numel()), alpha=1e-3).view(300, 700)
    perturb_(p, 3, NAME, 1e-3)
    assert torch.equal(p, expected)


def test_perturb_slice_with_offset_equals_whole_then_slice() -> None:
    whole = torch.randn(37, 10_000, generator=torch.Generator().manual_seed(1))
    perturbed = whole.clone()
    perturb_(perturbed, 9, NAME, 0.25)
    flat, pflat = whole.view(-1), perturbed.view(-1)
    rng = random.Random(2)
    bounds = sorted(rng.sample(range(1, flat.numel()), 5))
    # Rank-style disjoint slices that cover the whole tensor, each perturbed on its own.
    for a, b in zip([0, *bounds], [*bounds, flat.numel()]):
        part = flat[a:b].clone()
        perturb_(part, 9, NAME, 0.25, offset=a)
        assert torch.equal(part, pflat[a:b]), (a, b)
    # A slice perturbed in place inside the whole tensor (a view) works too.
    view_case = whole.clone()
    perturb_(view_case.view(-1)[1000:200_000], 9, NAME, 0.25, offset=1000)
    assert torch.equal(view_case.view(-1)[1000:200_000], pflat[1000:200_000])
    assert torch.equal(view_case.view(-1)[:1000], flat[:1000])


def test_perturb_non_contiguous_follows_row_major_order() -> None:
    base = torch.randn(50, 40, generator=torch.Generator().manual_seed(3))
    t = base.clone().t()  # non-contiguous (40, 50) view
    expected = base.t().contiguous()
    perturb_(expected, 2, NAME, 0.5)
    perturb_(t, 2, NAME, 0.5)
    assert torch.equal(t, expected)


def test_mezo_round_trip_fp32() -> None:
    p0 = torch.randn(200_000, generator=torch.Generator().manual_seed(4)) * 0.05
    p = p0.clone()
    eps = 1e-3
    perturb_(p, 77, NAME, eps)
    assert not torch.equal(p, p0)
    perturb_(p, 77, NAME, -2 * eps)
    perturb_(p, 77, NAME, eps)
    assert torch.allclose(p, p0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype,mant_bits", [(torch.bfloat16, 8), (torch.float16, 11)])
def test_perturb_low_precision_rounds_once(dtype: torch.dtype, mant_bits: int) -> None:
    n = 100_000
    eps = 1e-3
    p0 = (torch.randn(n, generator=torch.Generator().manual_seed(5)) * 0.05).to(dtype)
    z = normal(31, NAME, 0, n)
    exact = p0.float() + eps * z
    p = p0.clone()
    perturb_(p, 31, NAME, eps)
    # One rounding of the float32 sum: the nearest representable value ...
    assert torch.equal(p, exact.to(dtype))
    # ... never farther from the exact sum than the naive double-rounding low-precision add.
    naive = p0 + (eps * z).to(dtype)
    assert ((p.float() - exact).abs() <= (naive.float() - exact).abs() + 1e-12).all()
    # Restore: +eps then -eps comes back to within one rounding of each step.
    perturb_(p, 31, NAME, -eps)
    ulp_rel = 2.0 ** (1 - mant_bits)
    bound = ulp_rel * (p0.float().abs() + eps * z.abs()) + 1e-7
    assert ((p.float() - p0.float()).abs() <= bound).all()
    assert p.dtype == dtype


# ----- CPU and CUDA agree -------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine")
def test_cuda_matches_cpu() -> None:
    for start, count in [(0, 2**22 + 123), (2**32 - 1000, 5000), (777, 1)]:
        a_cpu, b_cpu = stream_words(42, NAME, start, count)
        a_gpu, b_gpu = stream_words(42, NAME, start, count, device="cuda")
        # The integer stream is identical: no signed overflow, same int64 ops.
        assert torch.equal(a_gpu.cpu(), a_cpu) and torch.equal(b_gpu.cpu(), b_cpu)
        z_cpu = normal(42, NAME, start, count)
        z_gpu = normal(42, NAME, start, count, device="cuda")
        assert z_gpu.device.type == "cuda" and torch.isfinite(z_gpu).all()
        # Only log/sqrt/cos of the two math libraries may differ, by a few float32 ulps.
        torch.testing.assert_close(z_gpu.cpu(), z_cpu, rtol=1e-6, atol=1e-6)
    # Slice independence holds on the device too.
    full = normal(42, NAME, 0, 10_000, device="cuda")
    assert torch.equal(normal(42, NAME, 1234, 5678, device="cuda"), full[1234 : 1234 + 5678])
    # perturb_ draws on the parameter's device.
    p_cpu = torch.randn(1000, 300, generator=torch.Generator().manual_seed(6))
    p_gpu = p_cpu.cuda()
    perturb_(p_cpu, 42, NAME, 1e-3, offset=500)
    perturb_(p_gpu, 42, NAME, 1e-3, offset=500)
    torch.testing.assert_close(p_gpu.cpu(), p_cpu, rtol=1e-6, atol=1e-8)
