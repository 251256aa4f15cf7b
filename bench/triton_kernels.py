"""The fused Triton kernels (zoplan.runtime.perturb_triton) on one CUDA device: a self-check
against the torch path (bit-equality of the integer words, the z values under each compiler
option, the fused update and perturbation), then their speed against torch's.

Usage (needs a GPU): python -m bench.triton_kernels [log2(count), default 26]
"""

from __future__ import annotations

import sys

import torch

from zoplan.runtime import perturb
from zoplan.runtime import perturb_triton as T


def run(log2n: int = 26) -> None:
    from zoplan.runtime.perturb import normal
    from zoplan.runtime.zo import apply_update

    dev = torch.device("cuda")
    n = 2**log2n
    name, seed = "model.layers.0.mlp.fc1.weight", 1234
    print(f"device: {torch.cuda.get_device_name(dev)}; torch {torch.__version__}; triton {T.triton.__version__}")

    def timed(fn, reps: int = 10) -> float:
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            torch.cuda.synchronize()
            times.append(e0.elapsed_time(e1) / 1e3)
        return sorted(times)[len(times) // 2]

    # Integer words: bit-identical, including a range across 2**32.
    for start in (0, 2**32 - n // 2, 5 * 2**40 + 17):
        ra, rb = perturb.stream_words(seed, name, start, n, device=dev)
        ta, tb = T.stream_words(seed, name, start, n, device=dev)
        print(f"words start={start}: a equal={torch.equal(ra, ta)} b equal={torch.equal(rb, tb)}")
        del ra, rb, ta, tb

    ref = torch.empty(n, dtype=torch.float32, device=dev)
    perturb._fill_normal(ref, seed, name, 0)
    cpu = perturb.normal(seed, name, 0, 2**22)  # CPU reference on a prefix
    out = torch.empty_like(ref)
    saved = (dict(T._OPTIONS), T._PRECISE)
    variants = [
        ("default (libdevice, no fp fusion, no ftz)", saved[0], True),
        ("libdevice, fp fusion on", {**saved[0], "enable_fp_fusion": True}, True),
        ("libdevice, ftz on", {**saved[0], "enable_reflect_ftz": True}, True),
        ("tl.log/tl.cos", saved[0], False),
    ]
    for label, opts, precise in variants:
        T._OPTIONS, T._PRECISE = opts, precise
        T.normal_into(out, seed, name, 0)
        d = (out - ref).abs()
        dc = (out[: 2**22].cpu() - cpu).abs()
        print(
            f"z {label}: vs torch-cuda max|d|={d.max().item():.3g} bit-equal={(out == ref).float().mean().item():.6f};"
            f" vs cpu max|d|={dc.max().item():.3g} bit-equal={(out[: 2**22].cpu() == cpu).float().mean().item():.4f}"
        )
    T._OPTIONS, T._PRECISE = saved
    # Fused epilogues against the torch expressions fed with the torch path's z.
    m = 2**22
    zr = ref[:m]
    for dt in (torch.float32, torch.bfloat16):
        x0 = (torch.randn(m, device=dev) * 0.05).to(dt)
        r = x0.clone()
        apply_update(r, zr, 3.7, 1e-2, 0.1, True)
        u = T.update_(x0.clone(), seed, name, 0, 3.7, 1e-2, 0.1, True)
        p_ref = (x0.float() + 1e-3 * zr).to(dt)
        p = T.perturbed_into(torch.empty_like(x0), x0, seed, name, 0, 1e-3)
        for label, got, want in (("update_", u, r), ("perturbed_into", p, p_ref)):
            d = (got.float() - want.float()).abs().max().item()
            eq = (got == want).float().mean().item()
            print(f"{label} {dt} vs torch path: max|d|={d:.3g} bit-equal={eq:.6f}")
    sys.stdout.flush()

    t_torch = timed(lambda: perturb._fill_normal(ref, seed, name, 0), reps=5)
    t_tri = timed(lambda: T.normal_into(out, seed, name, 0))
    print(
        f"z 2**{log2n}: torch {t_torch * 1e3:.2f} ms ({n / t_torch / 1e9:.2f} Gvals/s), triton "
        f"{t_tri * 1e3:.3f} ms ({n / t_tri / 1e9:.1f} Gvals/s), x{t_torch / t_tri:.0f}"
    )

    for dt in (torch.float32, torch.bfloat16):
        x = (torch.randn(n, device=dev) * 0.05).to(dt)
        es = x.element_size()
        t = timed(lambda: T.update_(x, seed, name, 0, 0.5, 1e-7, 0.1, True))
        print(f"update_ {dt}: {t * 1e3:.3f} ms, {2 * n * es / t / 1e9:.0f} GB/s (read+write x)")
        t = timed(lambda: T.axpy_normal_(x, seed, name, 0, 1e-3))
        print(f"axpy_normal_ {dt}: {t * 1e3:.3f} ms, {2 * n * es / t / 1e9:.0f} GB/s")
        t = timed(lambda: apply_update(x, normal(seed, name, 0, n, device=dev), 0.5, 1e-7, 0.1, True), reps=5)
        print(f"  torch: apply_update(x, normal(...)) {dt} (normal dispatched to triton): {t * 1e3:.3f} ms")
    base = torch.randn(n, device=dev) * 0.05
    for dt in (torch.float32, torch.bfloat16):
        o = torch.empty(n, dtype=dt, device=dev)
        t = timed(lambda: T.perturbed_into(o, base, seed, name, 0, 1e-3))
        print(f"perturbed_into fp32 base -> {dt}: {t * 1e3:.3f} ms, {n * (4 + o.element_size()) / t / 1e9:.0f} GB/s")
        t = timed(lambda: (base + 1e-3 * ref).to(dt), reps=5)
        print(f"  torch (base + alpha*z).to({dt}) with z given: {t * 1e3:.3f} ms")
    t = timed(lambda: base.mul_(1.0))
    print(f"reference: torch in-place fp32 mul_ (pure bandwidth): {2 * n * 4 / t / 1e9:.0f} GB/s")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log2_count", type=int, nargs="?", default=26, help="elements: 2 to this power (default 26)")
    count = parser.parse_args().log2_count
    if not torch.cuda.is_available():
        raise SystemExit("bench.triton_kernels needs a CUDA GPU (torch sees none here)")
    run(count)
