"""z for one streamed block on the CPU: one ``normal`` per parameter against ``normal_parts_``
(all of the block's parameters in shared chunks), for OPT block shapes (docs/results/runtime-cpu.md).

Both ways must give the same bits; the script checks that, then reports the median time per
block over ``--reps`` draws, on one thread as a rank runs.

Usage: python -m bench.block_z_cpu [--reps 50]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

# name: (hidden, ffn) of an OPT decoder layer: q, k, v, out (weight + bias), fc1, fc2 (weight +
# bias), two layer norms (weight + bias): 16 parameters
SHAPES = {"tiny-opt": (64, 128), "opt-125m": (768, 3072)}


def block_parts(hidden: int, ffn: int) -> list[tuple[str, int, int, int]]:
    sizes = [hidden * hidden, hidden] * 4 + [hidden, hidden, ffn * hidden, ffn, hidden * ffn, hidden, hidden, hidden]
    parts, pos = [], 0
    for j, count in enumerate(sizes):
        parts.append((f"model.decoder.layers.0.p{j}", 0, count, pos))
        pos += count
    return parts


def timed(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=50)
    opts = ap.parse_args()
    from zoplan.runtime.perturb import normal, normal_parts_

    torch.set_num_threads(1)
    for name, (hidden, ffn) in SHAPES.items():
        parts = block_parts(hidden, ffn)
        numel = sum(p[2] for p in parts)
        one_by_one = torch.empty(numel)
        together = torch.empty(numel)

        def each() -> None:
            for pname, first, count, pos in parts:
                one_by_one[pos : pos + count] = normal(7, pname, first, count)

        def parts_() -> None:
            normal_parts_(together, 7, parts)

        reps = opts.reps if numel < 10**6 else max(3, opts.reps // 10)
        t_each, t_parts = timed(each, reps), timed(parts_, reps)
        same = torch.equal(one_by_one, together)
        print(
            f"{name}: block of {numel} elements in {len(parts)} parameters: one normal per parameter "
            f"{t_each * 1e3:.2f} ms, normal_parts_ {t_parts * 1e3:.2f} ms ({t_each / t_parts:.2f}x), "
            f"same bits: {same}"
        )
        if not same:
            raise SystemExit("normal_parts_ differs from normal")


if __name__ == "__main__":
    main()
