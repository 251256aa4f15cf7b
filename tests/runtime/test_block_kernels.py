"""The one-launch-per-block kernels of ``zoplan.runtime.perturb_triton``.

On a GPU with triton they run on CUDA tensors. Without a GPU, ``test_fused_interpreter.py`` runs
this file in a fresh pytest process with ``TRITON_INTERPRET=1`` (Triton reads it when the kernels
are defined), which runs them on CPU tensors; otherwise the file is skipped. Under the interpreter
the kernels use numpy's log/cos, so z matches the torch path only to float32 rounding; the integer
words, and the block kernels against the per-parameter kernels, must match bit for bit everywhere.
"""

from __future__ import annotations

import importlib.util
import os
import random

import pytest

torch = pytest.importorskip("torch")

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if not INTERPRETED and not torch.cuda.is_available():
    pytest.skip("needs CUDA, or TRITON_INTERPRET=1 (see test_fused_interpreter.py)", allow_module_level=True)
DEV = torch.device("cpu" if INTERPRETED else "cuda")

from zoplan.runtime import perturb as P  # noqa: E402
from zoplan.runtime import perturb_triton as T  # noqa: E402
from zoplan.runtime.hostcopy import BlockLayout, Slot  # noqa: E402
from zoplan.runtime.zo import apply_update, fused_kernels, layout_table, update_range  # noqa: E402


def _z(seed: int, name: str, first: int, count: int) -> torch.Tensor:
    """z from the torch reference path on DEV (bypassing normal()'s dispatch to the kernels)."""
    out = torch.empty(count, dtype=torch.float32, device=DEV)
    P._fill_normal(out, seed, name, first)
    return out


SEEDS = [0, 1234, 2**63 - 1, -5, 2**64 - 1, 2**32 + 7]


def _parts(rng: random.Random, n: int, *, far: bool) -> list[tuple[str, int, int, int, bool]]:
    """n ranges packed into one buffer, ragged sizes, some starting just below a multiple of 2**32
    (split into two rows) or high in the index space."""
    parts, pos = [], rng.randrange(0, 5)
    for k in range(n):
        count = rng.choice([1, 2, 700, 1024, 1025, 3001])
        first = rng.choice([0, 0, rng.randrange(10_000)])
        if far and k % 3 == 1:
            first = rng.choice([2**32 - count // 2, 7 * 2**32 + 5, 2**63 - count])
        parts.append((f"model.layers.{k % 4}.p{k}.weight", first, count, pos, k % 2 == 0))
        pos += count + rng.randrange(0, 3)
    return parts


def test_block_words_equal_the_reference_stream() -> None:
    rng = random.Random(0)
    for n in (1, 5, 17):  # 17 ranges with splits: past the 16 rows of the smallest variant
        parts = _parts(rng, n, far=True)
        table = T.block_table(parts, DEV)
        size = table.end + 3
        for seed in SEEDS:
            a, b = T.block_words(table, seed, size)
            for name, first, count, pos, _ in parts:
                ra, rb = P.stream_words(seed, name, first, count, device=DEV)
                assert torch.equal(a[pos : pos + count], ra), (n, seed, name, first)
                assert torch.equal(b[pos : pos + count], rb), (n, seed, name, first)


def test_more_rows_than_one_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(T, "_MAX_ROWS", 3)
    parts = _parts(random.Random(1), 8, far=False)
    table = T.block_table(parts, DEV)
    assert len(table.launches) == 3
    a, _ = T.block_words(table, 9, table.end)
    for name, first, count, pos, _ in parts:
        assert torch.equal(a[pos : pos + count], P.stream_words(9, name, first, count, device=DEV)[0]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_kernels_equal_the_per_parameter_kernels(dtype: torch.dtype) -> None:
    parts = _parts(random.Random(2), 6, far=True)
    table = T.block_table(parts, DEV)
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(table.end, generator=g) * 0.05).to(DEV)
    plus, minus = torch.zeros(table.end, dtype=dtype, device=DEV), torch.zeros(table.end, dtype=dtype, device=DEV)
    T.perturbed_block_into([plus, minus], base, table, 77, [1e-3, -1e-3])
    one = torch.zeros(table.end, dtype=dtype, device=DEV)
    T.perturbed_block_into([one], base, table, 77, [-1e-3])
    x0 = (torch.randn(table.end, generator=g) * 0.05).to(DEV, dtype)
    x = T.update_block_(x0.clone(), table, 5, 3.7, 1e-2, 0.1)
    covered = torch.zeros(table.end, dtype=torch.bool, device=DEV)
    for name, first, count, pos, decay in parts:
        r = slice(pos, pos + count)
        covered[r] = True
        for out, alpha in ((plus, 1e-3), (minus, -1e-3), (one, -1e-3)):
            want = T.perturbed_into(torch.empty(count, dtype=dtype, device=DEV), base[r], 77, name, first, alpha)
            assert torch.equal(out[r], want), (name, alpha)
        assert torch.equal(x[r], T.update_(x0[r].clone(), 5, name, first, 3.7, 1e-2, 0.1, decay)), name
        # and within float32 rounding of the torch reference path (numpy's log/cos here)
        z = _z(77, name, first, count)
        torch.testing.assert_close(plus[r], (base[r] + 1e-3 * z).to(dtype), rtol=2.0**-7, atol=1e-8)
    # elements between the ranges are left alone
    assert not plus[~covered].any() and torch.equal(x[~covered], x0[~covered])
    # no weight decay at wd = 0 even where the flag is set
    y = T.update_block_(x0.clone(), table, 5, 3.7, 1e-2, 0.0)
    name, first, count, pos, _ = parts[0]
    assert torch.equal(
        y[pos : pos + count], T.update_(x0[pos : pos + count].clone(), 5, name, first, 3.7, 1e-2, 0.0, False)
    )


def test_layout_table_follows_the_engine_ranges() -> None:
    """update_range's fused path (one launch over a slice of a block) against the torch path."""
    shapes = [("w1", (30, 40), True), ("b1", (40,), False), ("norm.weight", (40,), False), ("w2", (40, 25), True)]
    slots, off = [], 0
    for local, shape, decay in shapes:
        numel = 1
        for s in shape:
            numel *= s
        slots.append(Slot(f"model.layers.3.{local}", local, off, numel, shape, decay))
        off += numel
    layout = BlockLayout(3, tuple(slots), off, -(-off // 4) * 4)
    flat0 = (torch.randn(layout.padded) * 0.05).to(DEV)
    for start, end in ((0, layout.numel), (layout.padded // 4, 2 * layout.padded // 4), (1234, 1300)):
        table = layout_table(T, layout, start, end, DEV)
        assert layout_table(T, layout, start, end, DEV) is table  # built once
        assert table.numel == end - start
        got = flat0.clone()
        T.update_block_(got, table, 11, 2.0, 1e-3, 0.1)
        want = flat0.clone()
        for slot, first, count, pos in layout.segments(start, end):
            x = want[start + pos : start + pos + count]
            x.copy_(T.update_(x.clone(), 11, slot.name, first, 2.0, 1e-3, 0.1, slot.decay))
        assert torch.equal(got, want), (start, end)
        ref = flat0.clone()
        for slot, first, count, pos in layout.segments(start, end):
            apply_update(
                ref[start + pos : start + pos + count], _z(11, slot.name, first, count), 2.0, 1e-3, 0.1, slot.decay
            )
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-9)
    # where the runtime uses the kernels (CUDA; the CPU with ZOPLAN_PERTURB_TRITON=cpu), update_range does
    setting = os.environ.get("ZOPLAN_PERTURB_TRITON", "")
    uses = setting == "cpu" if INTERPRETED else setting != "0"  # perturb.fused_backend's rule
    assert (fused_kernels(flat0) is T) == uses
    if uses:
        got = flat0.clone()
        update_range(got, layout, 0, layout.numel, 11, 2.0, 1e-3, 0.1)
        want = T.update_block_(flat0.clone(), layout_table(T, layout, 0, layout.numel, DEV), 11, 2.0, 1e-3, 0.1)
        assert torch.equal(got, want)


def test_bad_buffers_are_refused() -> None:
    table = T.block_table([("a", 0, 10, 5, True)], DEV)
    assert table.end == 15
    with pytest.raises(ValueError, match="reaches 15"):
        T.update_block_(torch.zeros(14, device=DEV), table, 1, 1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="1-D contiguous"):
        T.update_block_(torch.zeros(20, 2, device=DEV).t(), table, 1, 1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="one or two outputs"):
        T.perturbed_block_into([torch.zeros(15, device=DEV)] * 3, torch.zeros(15, device=DEV), table, 1, [1.0] * 3)
    with pytest.raises(ValueError, match="only outs"):
        base = torch.zeros(15, device=DEV)
        T.perturbed_block_into([torch.zeros(15, device=DEV), base], base, table, 1, [1.0, -1.0])
    with pytest.raises(TypeError):
        T.update_block_(torch.zeros(15, dtype=torch.int32, device=DEV), table, 1, 1.0, 1.0, 0.0)
    with pytest.raises(ValueError):
        T.block_table([("a", 2**63 - 1, 2, 0, False)], DEV)
    empty = T.block_table([("a", 0, 0, 0, False)], DEV)
    assert empty.numel == 0 and T.update_block_(torch.ones(3, device=DEV), empty, 1, 1.0, 1.0, 0.0).eq(1).all()
