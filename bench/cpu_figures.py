"""Measure the figures that topologies/cpu-local.yaml cites: one-thread matmul rate per dtype and
tensor copy bandwidth, alone and with one copy per core at once.

Usage: python bench/cpu_figures.py   (needs torch; prints one line per figure)
"""
from __future__ import annotations

import multiprocessing as mp
import time

import torch


def matmul_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 / ((time.perf_counter() - t0) / reps) / 1e9


def copy_gbps(barrier=None, results=None, index: int = 0, nbytes: int = 2**30, reps: int = 10) -> float:
    torch.set_num_threads(1)
    x = torch.empty(nbytes // 4)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    if barrier is not None:
        barrier.wait()  # every process copies in the same window
    t0 = time.perf_counter()
    for _ in range(reps):
        y.copy_(x)
    rate = nbytes * reps / (time.perf_counter() - t0) / 1e9
    if results is not None:
        results[index] = rate
    return rate


def main() -> None:
    torch.set_num_threads(1)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        print(f"matmul 2048^3 {str(dtype):15s} {matmul_gflops(dtype):8.1f} GFLOP/s (1 thread)")
    print(f"copy 1 GiB, one process      {copy_gbps():8.2f} GB/s copied")
    cores = mp.cpu_count()
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(cores), ctx.Array("d", cores)
    procs = [ctx.Process(target=copy_gbps, args=(barrier, results, i)) for i in range(cores)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    rates = list(results)
    print(f"copy 1 GiB, {cores} processes at once {sum(rates):8.2f} GB/s copied in total "
          f"({', '.join(f'{r:.2f}' for r in rates)})")


if __name__ == "__main__":
    main()
