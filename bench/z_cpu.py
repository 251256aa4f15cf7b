"""z on the CPU, one thread: nanoseconds per element of torch.randn, of the torch path's z
(``zoplan.runtime.perturb``'s reference), of the compiled kernel's z (``zoplan.runtime.perturb_cpu``),
and of z fused with its use: a block perturbed to both signs from one draw (θ + εz and θ − εz)
and MeZO's update θ ← θ − lr·(g·z + wd·θ), each against the torch path's way of computing the same
thing (docs/results/runtime-cpu.md).

Every variant runs once per round, the rounds interleaved, and the median over rounds is
reported. Before timing, the script checks that each kernel result equals the torch path's bit
for bit.

Usage: python -m bench.z_cpu [--elements 4194304] [--rounds 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from zoplan.runtime import perturb as P
from zoplan.runtime.zo import apply_update

NAME = "model.decoder.layers.0.fc1.weight"
SEED, EPS, G, LR, WD = 1234, 1e-3, 2.5, 1e-3, 0.1


def torch_path(fn):  # type: ignore[no-untyped-def]
    """``fn`` with ``perturb``'s torch path forced (ZOPLAN_Z_KERNEL=torch)."""

    def run():  # type: ignore[no-untyped-def]
        old = os.environ.get("ZOPLAN_Z_KERNEL")
        os.environ["ZOPLAN_Z_KERNEL"] = "torch"
        try:
            return fn()
        finally:
            if old is None:
                del os.environ["ZOPLAN_Z_KERNEL"]
            else:
                os.environ["ZOPLAN_Z_KERNEL"] = old

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=1 << 22)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from zoplan.runtime import perturb_cpu as C

    if not C.available():
        raise SystemExit("the compiled CPU kernel is unavailable here (see the line above)")
    n = args.elements
    theta = torch.randn(n, generator=torch.Generator().manual_seed(0)) * 0.05
    table = C.block_table([(NAME, 0, n, 0, True)])
    out, plus, minus, x = torch.empty(n), torch.empty(n), torch.empty(n), theta.clone()

    def torch_z() -> torch.Tensor:
        return P.normal(SEED, NAME, 0, n)

    def torch_perturbed() -> list[torch.Tensor]:  # the engine's torch path (ZOEngine._perturbed)
        z = torch.zeros(n)
        P.normal_parts_(z, SEED, [(NAME, 0, n, 0)])
        base = theta.float()
        return [(base + (s * EPS) * z).to(theta.dtype) for s in (1, -1)]

    def torch_update() -> torch.Tensor:  # zo.update_range's torch path, one parameter
        z = torch.empty(n)
        P.normal_parts_(z, SEED, [(NAME, 0, n, 0)])
        apply_update(x, z, G, LR, WD, True)
        return x

    variants = {
        "torch.randn": lambda: torch.randn(n, out=out),
        "z, torch path (perturb, ZOPLAN_Z_KERNEL=torch)": torch_path(torch_z),
        "z, compiled kernel (perturb_cpu.normal_into)": lambda: C.normal_into(out, SEED, NAME, 0),
        "θ ± εz, torch path (z, then two expressions)": torch_path(torch_perturbed),
        "θ ± εz, fused (perturbed_block_into, one draw)": lambda: C.perturbed_block_into(
            [plus, minus], theta, table, SEED, [EPS, -EPS]
        ),
        "update, torch path (z, then apply_update)": torch_path(torch_update),
        "update, fused (update_block_)": lambda: C.update_block_(x, table, SEED, G, LR, WD),
    }
    # the same bits, checked once
    assert torch.equal(C.normal_into(out, SEED, NAME, 0), torch_path(torch_z)())
    want = torch_path(torch_perturbed)()
    C.perturbed_block_into([plus, minus], theta, table, SEED, [EPS, -EPS])
    assert torch.equal(plus, want[0]) and torch.equal(minus, want[1])
    x.copy_(theta)
    want_x = torch_path(torch_update)().clone()
    x.copy_(theta)
    assert torch.equal(C.update_block_(x, table, SEED, G, LR, WD), want_x)
    print(f"same bits as the torch path: z, θ ± εz and the update ({n} elements)")
    # why sqrt stays torch's too: where its float32 sqrt is not the correctly rounded one, C's
    # sqrtf would change bits (float64 sqrt rounded to float32 is the correctly rounded result)
    r = torch.rand(n, generator=torch.Generator().manual_seed(1)) * 33
    differ = int((r.sqrt() != r.double().sqrt().float()).sum())
    print(f"torch's float32 sqrt differs from the correctly rounded one on {differ} of {n} inputs in [0, 33)")

    times: dict[str, list[float]] = {label: [] for label in variants}
    for _ in range(args.rounds):
        for label, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - t0)
    print(f"{args.threads} thread(s), {n} elements, median of {args.rounds} interleaved rounds:")
    for label, ts in times.items():
        print(f"  {label:50s} {statistics.median(ts) / n * 1e9:6.2f} ns an element")


if __name__ == "__main__":
    main()
