"""Matrix products over few and many tokens: the rate a device reaches over M rows, fitted to the
cost model's ``rate(M) = peak * M / (M + half)`` (a topology's ``tflops`` and
``matmul_half_tokens``, docs/topologies.md).

For each M, ``F.linear`` of M tokens at a block's shapes (hidden -> ffn, ffn -> hidden, hidden ->
hidden; no bias), the median rate over the shapes; then a least-squares line through 1 / rate
against 1 / M gives 1 / peak (its intercept) and half / peak (its slope). On a GPU each timing is
synchronised and the rows go up to 8192 tokens (a GPU needs many more rows than a CPU core to
fill).

Usage: python -m bench.matmul_tokens [--device cuda] [--dtype bf16] [--hidden 2048 --ffn 8192] [--threads N] [--quick]
[--quick]   (bench/cpu_figures.py runs the CPU's fp32 fit at OPT-125m's shapes; bench/gpu_checks.sh
``matmul`` the GPU's at the OPT-1.3B and 2.7B shapes)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

CPU_TOKENS = (64, 128, 256, 512, 1024, 2048)
GPU_TOKENS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def linear_seconds(a: torch.Tensor, w: torch.Tensor, reps: int) -> float:
    """The median time of ``F.linear(a, w)`` over ``reps`` calls, after two warm-up calls."""
    cuda = a.is_cuda
    times = []
    for r in range(reps + 2):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        F.linear(a, w)
        if cuda:
            torch.cuda.synchronize()
        if r >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fit(rates: dict[int, float]) -> tuple[float, float]:
    """(peak, half) of ``rate(M) = peak * M / (M + half)`` through ``{M: rate}``: least squares on
    1 / rate = 1 / peak + (half / peak) / M. Half is 0 where the rate does not fall with fewer rows."""
    xs = [1 / m for m in rates]
    ys = [1 / r for r in rates.values()]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    intercept = my - slope * mx
    return 1 / intercept, max(0.0, slope / intercept)


def tokens_fit(
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    hidden: int = 768,
    ffn: int = 3072,
    tokens: tuple[int, ...] | None = None,
    quick: bool = False,
) -> tuple[float, float, dict[int, float]]:
    """Rates over M tokens at a block's shapes and their fit: (peak GFLOP/s, half in tokens,
    {M: GFLOP/s, the median over the shapes})."""
    tokens = tokens or (GPU_TOKENS if device != "cpu" else CPU_TOKENS)
    shapes = ((hidden, ffn), (ffn, hidden), (hidden, hidden))
    reps = 2 if quick else 5
    rates = {}
    for m in tokens:
        per_shape = []
        for k, n in shapes:
            a = torch.randn(m, k, device=device).to(dtype)
            w = torch.randn(n, k, device=device).to(dtype)
            per_shape.append(2 * m * k * n / linear_seconds(a, w, reps) / 1e9)
        rates[m] = statistics.median(per_shape)
    peak, half = fit(rates)
    return peak, half, rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: fp32 on a CPU, bf16 on a GPU")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--ffn", type=int, default=None, help="default: 4 x hidden")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (a CPU rank's one)")
    parser.add_argument("--quick", action="store_true")
    opts = parser.parse_args()
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "bench.matmul_tokens --device cuda needs a CUDA GPU (torch sees none here); --device cpu times the CPU"
        )
    torch.set_num_threads(opts.threads)
    dtype = opts.dtype or ("fp32" if opts.device == "cpu" else "bf16")
    ffn = opts.ffn or 4 * opts.hidden
    name = torch.cuda.get_device_name() if opts.device.startswith("cuda") else "cpu"
    peak, half, rates = tokens_fit(opts.device, DTYPES[dtype], opts.hidden, ffn, quick=opts.quick)
    print(f"{name}, {dtype}, shapes {opts.hidden} <-> {ffn}: GFLOP/s over M tokens (median of the shapes)")
    for m, r in rates.items():
        print(f"  M {m:5d}: {r:10.1f}   fit {peak * m / (m + half):10.1f}")
    print(
        f"fit: peak {peak:.1f} GFLOP/s, half {half:.1f} tokens (topology: tflops {peak / 1e3:.4f}, matmul_half_tokens {half:.1f})"
    )


if __name__ == "__main__":
    main()
