"""Per-parameter against one-launch-per-block perturbation kernels on a GPU (docs/results/runtime-gpu.md).

For the block shapes of OPT-1.3B, 2.7B and 6.7B (bf16 buffers, as the engine holds them) it times
what the engine does to one streamed block per step, both ways:
- per parameter: ``perturbed_into`` for each parameter and sign, ``update_`` for each parameter;
- per block: one ``perturbed_block_into`` for both signs, one ``update_block_``;
reporting the host time to issue the launches and the GPU time, and checks that both ways give
the same bits.

Usage (on a GPU machine with triton, zoplan installed with the runtime extra):
    python -m bench.block_kernels [--out DIR] [--reps 50] [--shapes opt-1.3b,opt-2.7b,opt-6.7b]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

SHAPES = {"opt-1.3b": (2048, 8192, 32), "opt-2.7b": (2560, 10240, 32), "opt-6.7b": (4096, 16384, 32)}
EPS, SEED = 1e-3, 1234


def opt_block(hidden: int, ffn: int, heads: int) -> nn.ModuleList:
    from transformers import OPTConfig
    from transformers.models.opt.modeling_opt import OPTDecoderLayer

    config = OPTConfig(hidden_size=hidden, ffn_dim=ffn, num_attention_heads=heads, num_hidden_layers=1)
    with torch.device("meta"):
        return nn.ModuleList([OPTDecoderLayer(config, layer_idx=0)])


def timed(fn, reps: int) -> tuple[float, float]:
    """(host seconds to issue one call, GPU seconds per call), medians over ``reps`` calls."""
    fn()
    torch.cuda.synchronize()
    host, gpu = [], []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        e0.record()
        fn()
        e1.record()
        host.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        gpu.append(e0.elapsed_time(e1) / 1e3)
    return sorted(host)[reps // 2], sorted(gpu)[reps // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    opts = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/block_kernels.py needs a CUDA GPU")
    from zoplan.runtime import perturb_triton as T
    from zoplan.runtime.hostcopy import block_layouts
    from zoplan.runtime.zo import layout_table

    dev = torch.device("cuda", torch.cuda.current_device())
    rows = []
    print(f"{torch.cuda.get_device_name(dev)}; torch {torch.__version__}; triton {T.triton.__version__}")
    for name in opts.shapes.split(","):
        layout = block_layouts(opt_block(*SHAPES[name]), "model.decoder.layers.", 1)[0]
        theta = (torch.randn(layout.padded, device=dev) * 0.02).to(torch.bfloat16)
        plus, minus = torch.empty_like(theta), torch.empty_like(theta)
        work = theta.clone()
        table = layout_table(T, layout, 0, layout.numel, dev)

        def per_param() -> None:
            for s, out in ((1, plus), (-1, minus)):
                for slot in layout.slots:
                    r = slice(slot.offset, slot.offset + slot.numel)
                    T.perturbed_into(out[r], theta[r], SEED, slot.name, 0, s * EPS)
            for slot in layout.slots:
                T.update_(
                    work[slot.offset : slot.offset + slot.numel], SEED + 1, slot.name, 0, 0.5, 1e-7, 0.0, slot.decay
                )

        def per_block() -> None:
            T.perturbed_block_into([plus, minus], theta, table, SEED, [EPS, -EPS])
            T.update_block_(work, table, SEED + 1, 0.5, 1e-7, 0.0)

        # the same bits both ways (update from the same starting buffer)
        work.copy_(theta)
        per_param()
        ref = (plus.clone(), minus.clone(), work.clone())
        work.copy_(theta)
        per_block()
        equal = all(torch.equal(a[: layout.numel], b[: layout.numel]) for a, b in zip(ref, (plus, minus, work)))
        (hp, gp), (hb, gb) = timed(per_param, opts.reps), timed(per_block, opts.reps)
        row = {
            "shape": name,
            "params": layout.numel,
            "tensors": len(layout.slots),
            "bit_equal": equal,
            "per_param_host_ms": hp * 1e3,
            "per_param_gpu_ms": gp * 1e3,
            "per_block_host_ms": hb * 1e3,
            "per_block_gpu_ms": gb * 1e3,
        }
        rows.append(row)
        print(
            f"{name}: {layout.numel / 1e6:.1f}M parameters in {len(layout.slots)} tensors; bit-equal {equal}; "
            f"per parameter: host {hp * 1e3:.3f} ms, GPU {gp * 1e3:.3f} ms; "
            f"per block: host {hb * 1e3:.3f} ms, GPU {gb * 1e3:.3f} ms",
            flush=True,
        )
        theta = plus = minus = work = None  # this shape's buffers go before the next one's
    if opts.out:
        opts.out.mkdir(parents=True, exist_ok=True)
        (opts.out / "block_kernels.json").write_text(json.dumps(rows, indent=1))
    if not all(r["bit_equal"] for r in rows):
        raise SystemExit("the block kernels differ from the per-parameter kernels")


if __name__ == "__main__":
    main()
