"""torch.compile's CPU code for z against the documented generator (runtime/perturb.py) and
torch.randn, one thread: why the CPU's fused z (runtime/perturb_cpu.py) keeps torch's eager log,
sqrt and cos.

It compiles z's own integer hashes and float32 Box-Muller (the same operations, in the same order,
as ``zoplan.runtime.perturb.normal``), checks whether the compiled values are the documented ones
bit for bit (and whether the eager form of the same function is), and times each per element.
A compiled z that is not bit for bit the documented one cannot replace it: every journal's replay
would change.

Usage: python -m bench.z_compile [--elements 4194304] [--repeat 5]
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import tempfile
import time

import torch

from zoplan.runtime import perturb as P

M32 = 0xFFFFFFFF


def _h32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * P._H32_C1) & M32
    x = x ^ (x >> 15)
    x = (x * P._H32_C2) & M32
    return x ^ (x >> 15)


def z_of(idx: torch.Tensor, k0: int, k1: int, k2: int) -> torch.Tensor:
    a = _h32(_h32(idx ^ k0) ^ k1)
    b = _h32(a ^ k2)
    radius = (((a >> 8) + 1).to(torch.float32) * P._TWO_POW_M24).log().mul(-2.0).sqrt()
    return radius * ((b >> 8).to(torch.float32) * P._ANGLE_SCALE).cos()


def best_of(repeat: int, fn) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=1 << 22)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    # torch.compile's cache (some 150 MB) in a folder of its own, not /tmp/torchinductor_USER for good
    cache = tempfile.mkdtemp(prefix="zoplan-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    atexit.register(shutil.rmtree, cache, True)
    torch.set_num_threads(1)
    n, seed, name = args.elements, 1234, "model.decoder.layers.0.fc1.weight"
    keys = P._round_keys(P.name_key(seed, name), 0)
    idx = torch.arange(0, n, dtype=torch.int64)
    documented = P.normal(seed, name, 0, n)
    compiled = torch.compile(z_of, dynamic=False)
    t0 = time.perf_counter()
    got = compiled(idx, *keys)
    print(f"compile and first call: {time.perf_counter() - t0:.1f} s")
    differ = got != documented
    print(f"eager form == documented z: {torch.equal(z_of(idx, *keys), documented)}")
    print(
        f"compiled == documented z: {torch.equal(got, documented)} ({int(differ.sum())} of {n} elements "
        f"differ, by at most {(got - documented).abs().max().item():.3g})"
    )
    out = torch.empty(n)
    for label, fn in (
        ("torch.randn", lambda: torch.randn(n, out=out)),
        ("perturb.normal (documented z, perturb_cpu where it builds)", lambda: P.normal(seed, name, 0, n)),
        ("torch.compile of z", lambda: compiled(idx, *keys)),
    ):
        print(f"{label}: {best_of(args.repeat, fn) / n * 1e9:.2f} ns an element (best of {args.repeat})")


if __name__ == "__main__":
    main()
