"""The next-token loss's memory against the plan's figure for it (docs/results/runtime-cpu.md).

The plan counts, for one branch's head (``ModelShape.head_activation_bytes``), the micro-batch's
fp32 logits and the larger of their 2-byte cast and the log-softmax of the sequences the loss
takes at once. This measures what ``zoplan.runtime.data.loss_terms`` holds, as the engine calls
it: logits made in the compute dtype, cast to fp32, then the loss. Each case runs in a process of
its own: on a CPU the peak resident set above what the process held before the logits
(``ru_maxrss``); on a GPU ``torch.cuda.max_memory_allocated`` above the same point.

    python -m bench.loss_memory [--device cpu|cuda] [--vocab 32000] [--seq 512] [--micro-batch 1 4 16]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys

MiB = 2**20
SMALL = 16 * MiB  # what a case may hold beyond the plan's figure: its small tensors, pages


def measure(device: str, vocab: int, seq: int, micro_batch: int, dtype: str) -> dict[str, float]:
    """In this process: the loss of one random micro-batch, and what it held at its peak."""
    import torch

    from zoplan.models import PRESETS
    from zoplan.runtime import data as zdata

    torch.manual_seed(0)
    cuda = device == "cuda"
    labels = torch.randint(0, vocab, (micro_batch, seq), device=device)
    ones = torch.ones_like(labels)
    batch = zdata.Batch(ones, ones, ones, labels, None, None, micro_batch * (seq - 1))
    width = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    # once on a small input first: the code and kernels a first call loads are not the loss's data
    small = torch.randn(1, 8, vocab, device=device).to(width).float()
    small_batch = zdata.Batch(*[torch.ones_like(labels[:1, :8])] * 3, labels[:1, :8], None, None, 7)
    zdata.loss_terms(small, small_batch, zdata.Task("lm"))[0].item()
    del small
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # as the engine: the head's logits in the compute dtype, made fp32, then the loss
    logits = torch.randn(micro_batch, seq, vocab, device=device).to(width).float()
    loss, _ = zdata.loss_terms(logits, batch, zdata.Task("lm"))
    loss.item()
    if cuda:
        torch.cuda.synchronize()
        held = torch.cuda.max_memory_allocated() - before
    else:
        held = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    shape = dataclasses.replace(PRESETS["opt-125m"], vocab=vocab)
    return {"held": held, "planned": shape.head_activation_bytes(micro_batch, seq, dtype)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--dtype", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--measure", nargs=4, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.measure:  # one case, in a process of its own (run by main below)
        mb, dtype = int(opts.measure[2]), opts.measure[3]
        print(json.dumps(measure(opts.device, int(opts.measure[0]), int(opts.measure[1]), mb, dtype)))
        return
    print(f"the loss of {opts.seq} tokens of a {opts.vocab}-token vocabulary on {opts.device}", flush=True)
    print(f"{'micro-batch':>11} {'dtype':>5} {'logits MiB':>10} {'held MiB':>9} {'planned MiB':>11}", flush=True)
    over = 0
    for dtype in opts.dtype:
        for mb in opts.micro_batch:
            case = [str(opts.vocab), str(opts.seq), str(mb), dtype]
            cmd = [sys.executable, "-m", "bench.loss_memory", "--device", opts.device, "--measure", *case]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-2000:])
            got = json.loads(proc.stdout.strip().splitlines()[-1])
            logits = mb * opts.seq * opts.vocab * 4
            # the small tensors beside them (targets, each position's log-probability: kilobytes)
            # and the allocator's pages are the reserve's, not the head's
            beyond = got["held"] > got["planned"] + SMALL
            over += beyond
            print(
                f"{mb:>11} {dtype:>5} {logits / MiB:>10.1f} {got['held'] / MiB:>9.1f} {got['planned'] / MiB:>11.1f}"
                + (f"  over the plan by more than {SMALL // MiB} MiB" if beyond else ""),
                flush=True,
            )
    raise SystemExit(1 if over else 0)


if __name__ == "__main__":
    main()
