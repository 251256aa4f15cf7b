"""Measure the figures that topologies/cpu-local.yaml cites, on the machine this runs on.

One thread per process, as a CPU rank runs:
- matmul rate per dtype: ``F.linear`` at the shapes of a small model's block (tokens 128 and 512;
  768 -> 3072, 3072 -> 768, 768 -> 768), the median; fp32 at those shapes over 64 to 2048 tokens,
  fitted to ``peak * M / (M + half)`` (the topology's ``tflops`` and ``matmul_half_tokens``);
  and 2048^3 for reference;
- copy bandwidth, one process alone and one per core at once (the memory bus);
- the runtime's own overheads: host time per tensor op of a block's forward (a tiny OPT block:
  its time over its aten op count), what an op of a once-a-step stage costs beyond that (the
  embedding's forward right after the blocks' and head's, against the same run hot), the
  next-token loss per logit (what the cost model's ``LOSS_BYTES`` stands for on a CPU rank), the z generator's fixed cost per call and cost per element
  (zoplan.runtime.perturb), one collective call between two gloo ranks, two ranks that compute
  and meet in lockstep through shared memory as the runtime's do before each whole block (how
  much slower each computes, and what each meeting costs), and the
  training loop's host work per step (tokenizing a batch of 4 texts, writing a journal line and
  syncing it to the disk); and a core's level-2 cache as /sys lists it (``cache_mib``).

Usage: python -m bench.cpu_figures [--quick] [--write FILE]   (needs torch and transformers;
prints one line per figure and the gpu_models entry of a CPU topology; ``--write`` also writes
topologies/cpu-local.yaml with these figures to FILE, a topology of this machine as measured now)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml
import torch.nn.functional as F

from bench.matmul_tokens import tokens_fit


def timed(fn, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def linear_gflops(dtype: torch.dtype, tokens: int, k: int, n: int, reps: int = 5) -> float:
    a, w = torch.randn(tokens, k).to(dtype), torch.randn(n, k).to(dtype)
    return 2 * tokens * k * n / timed(lambda: F.linear(a, w), reps) / 1e9


def model_shape_gflops(dtype: torch.dtype, quick: bool) -> float:
    shapes = [(t, k, n) for t in (128, 512) for k, n in ((768, 3072), (3072, 768), (768, 768))]
    if dtype != torch.float32:  # a CPU without bf16/fp16 instructions runs these far slower: fewer
        shapes = shapes[:2]
    return statistics.median(linear_gflops(dtype, *s, reps=2 if quick else 5) for s in shapes)


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


class _Count(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def tiny_opt(layers: int):
    """A random OPT model of the tiny-opt shape (width 64, ffn 128, 4 heads, vocab 1405) with
    ``layers`` blocks, in eval mode."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        hidden_size=64,
        ffn_dim=128,
        num_attention_heads=4,
        num_hidden_layers=layers,
        vocab_size=1405,
        word_embed_proj_dim=64,
    )
    return OPTForCausalLM(config).eval()


def tiny_block(sequences: int = 2, tokens: int = 64):
    """A tiny OPT block (width 64) and its inputs for a micro-batch of ``sequences`` x ``tokens``
    (default 2 x 64): (block, hidden, kwargs) as the runtime calls it."""
    model = tiny_opt(1)
    block = model.model.decoder.layers[0]
    box: dict = {}

    def hook(module, args, kwargs):
        box["args"], box["kwargs"] = args, dict(kwargs)

    block.register_forward_pre_hook(hook, with_kwargs=True)
    ids = torch.randint(0, 1000, (sequences, tokens))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    kwargs = box["kwargs"]
    hidden = box["args"][0] if box["args"] else kwargs.pop("hidden_states")
    return block, hidden, kwargs


def forward_op_us(reps: int) -> tuple[float, int]:
    """Host time per aten op of a tiny OPT block's forward (micro-batch 2 x 64 tokens, width 64):
    its arithmetic is negligible, so the time is dispatch and the modules' Python."""
    block, hidden, kwargs = tiny_block()
    with torch.no_grad():
        count = _Count()
        with count:
            block(hidden, **kwargs)
        seconds = statistics.median(timed(lambda: block(hidden, **kwargs), reps) for _ in range(5))
    return seconds / count.n * 1e6, count.n


def cold_op_us(reps: int) -> tuple[float, int]:
    """What a tensor op of a once-a-step stage costs beyond ``op_us``: a tiny OPT model's forward
    up to its first block (its embedding stage, micro-batch 2 x 64 tokens) run right after a pass
    of its 4 blocks and its head, as a step runs it, against the same forward run over and over;
    the difference per aten op of that forward."""
    model = tiny_opt(4)
    blocks = model.model.decoder.layers
    ids = torch.randint(0, 1000, (2, 64))
    hidden = torch.randn(2, 64, 64)

    class Stop(Exception):
        pass

    def stop(module, args, kwargs):
        raise Stop

    def embed() -> None:
        handle = blocks[0].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            model(input_ids=ids, use_cache=False)
        except Stop:
            pass
        finally:
            handle.remove()

    def rest() -> None:
        x = hidden
        for block in blocks:
            out = block(x)
            x = out[0] if isinstance(out, tuple) else out
        model.lm_head(model.model.decoder.final_layer_norm(x))

    with torch.no_grad():
        count = _Count()
        with count:
            embed()
        hot = statistics.median(timed(embed, reps) for _ in range(5))
        cold = []
        for _ in range(5):
            spent = 0.0
            for _ in range(reps):
                rest()
                t0 = time.perf_counter()
                embed()
                spent += time.perf_counter() - t0
            cold.append(spent / reps)
    return max(0.0, statistics.median(cold) - hot) / count.n * 1e6, count.n


def loss_ns(reps: int) -> float:
    """The next-token loss as the runtime computes it (runtime/data.py loss_terms: the shifted
    logits, cross_entropy summed) over fp32 logits of one sequence of 128 tokens and OPT's
    50272-word vocabulary (26 MB: beyond the caches, as a real model's logits are; small enough
    that the allocator keeps reusing its memory), nanoseconds a logit: what
    zoplan.sim.costs.LOSS_BYTES stands for on a CPU rank, at its copy rate."""
    import torch.nn.functional as F

    vocab, tokens = 50272, 128
    logits = torch.randn(1, tokens, vocab)
    labels = torch.randint(0, vocab, (1, tokens))

    def loss() -> None:
        predicted = logits[:, :-1, :].float().reshape(-1, vocab)
        F.cross_entropy(predicted, labels[:, 1:].reshape(-1), reduction="sum").item()

    return statistics.median(timed(loss, reps) for _ in range(5)) / ((tokens - 1) * vocab) * 1e9


def in_step_head_ns(reps: int, gflops: float) -> tuple[float, float]:
    """The LM head and the loss as a step runs them, right after the blocks' forward (a tiny OPT
    model of 4 blocks, micro-batch 16 x 128 tokens: 2.9 M fp32 logits, 11.5 MB, beyond a core's
    cache): nanoseconds a logit the head's matrix product takes beyond its FLOPs at ``gflops``
    (writing the logits: what zoplan.sim.costs.SPILL_BYTES stands for on a CPU rank, at its copy
    rate), and nanoseconds a logit of the loss over several sequences, as the runtime computes it
    (zoplan.runtime.data.loss_terms)."""
    from zoplan.runtime import data as zdata

    model = tiny_opt(4)
    vocab, width = model.config.vocab_size, model.config.hidden_size
    ids = torch.randint(0, vocab, (16, 128))
    ones = torch.ones_like(ids)
    batch, task = zdata.Batch(ids, ones, ones, ids, None, None, 16 * 127), zdata.Task("lm")
    logits_n = ids.numel() * vocab
    head, loss = [], []
    with torch.no_grad():
        for r in range(reps + 2):
            hidden = model.model.decoder(input_ids=ids, use_cache=False).last_hidden_state
            x = model.model.decoder.final_layer_norm(hidden)
            t0 = time.perf_counter()
            logits = model.lm_head(x)
            t1 = time.perf_counter()
            zdata.loss_terms(logits, batch, task)[0].item()
            t2 = time.perf_counter()
            if r >= 2:
                head.append(t1 - t0)
                loss.append(t2 - t1)
    flops_s = 2 * ids.numel() * width * vocab / (gflops * 1e9)
    return (
        max(0.0, statistics.median(head) - flops_s) / logits_n * 1e9,
        statistics.median(loss) / (16 * 127 * vocab) * 1e9,
    )


def z_cold_us(reps: int) -> float:
    """What a call of the z kernel costs more when a step makes it, right after a block's forward
    (micro-batch 16 x 128 tokens, whose activations and attention scores pass through more than a
    core's cache), than made over and over: the deferred update of a tiny OPT block
    (zoplan.runtime.zo update_range: 33 K parameters), as the runtime applies it between blocks."""
    from zoplan.runtime.hostcopy import block_layouts
    from zoplan.runtime.zo import update_range

    block, hidden, kwargs = tiny_block(16, 128)
    (layout,) = block_layouts(torch.nn.ModuleList([block]), "model.decoder.layers.", 1)
    flat = torch.randn(layout.padded)

    def update() -> None:
        update_range(flat, layout, 0, layout.numel, 7, 0.1, 1e-9, 0.0)

    with torch.no_grad():
        hot = statistics.median(timed(update, reps) for _ in range(5))
        cold = []
        for _ in range(5):
            spent = 0.0
            for _ in range(reps):
                block(hidden, **kwargs)
                t0 = time.perf_counter()
                update()
                spent += time.perf_counter() - t0
            cold.append(spent / reps)
    return max(0.0, statistics.median(cold) - hot) * 1e6


def z_figures(quick: bool) -> tuple[float, float, str]:
    """z as the runtime draws it on this CPU (the fused C kernel, or the torch path where none
    builds), as zoplan.sim.costs.z_draw_s models a call of n elements: fixed microseconds per
    call and nanoseconds per element; and which kernel that was."""
    from zoplan.runtime.perturb import kernels_label, normal

    def seconds(n: int, reps: int) -> float:
        return statistics.median(timed(lambda: normal(1, "w", 0, n), reps) for _ in range(3))

    fixed = seconds(64, 20)
    small = seconds(2**17, 5 if quick else 20)
    large = seconds(2**20, 2 if quick else 5)
    per_element = max(large - small, 0.0) / (2**20 - 2**17)
    return fixed * 1e6, per_element * 1e9, kernels_label("cpu")


BIG = 2**22  # float32 elements each rank gives a large all-gather (16 MiB)


def _gloo_rank(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    for n, reps, slot in ((16, 300, 0), (BIG, 10, 2)):
        x = torch.ones(n)
        out = [torch.empty(n) for _ in range(2)]
        for _ in range(3 if n == BIG else 20):
            dist.all_gather(out, x)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(reps):
            dist.all_gather(out, x)
        results[slot + rank] = (time.perf_counter() - t0) / reps
    dist.destroy_process_group()


def collective_figures() -> tuple[float, float]:
    """Between two gloo ranks on this machine (both idle otherwise): one small all-gather's
    microseconds, and the GB/s a large one brings each rank (the other rank's 16 MiB over its time,
    less the small one's)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Array("d", 4)
    procs = [ctx.Process(target=_gloo_rank, args=(r, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    small, big = max(results[:2]), max(results[2:])
    return small * 1e6, BIG * 4 / max(big - small, 1e-9) / 1e9


LOCKSTEP_BLOCKS = (1, 4)  # tiny blocks between two meetings: the figures' two points
LOCKSTEP_ROUNDS = 3  # the two points timed in turn this many times; each figure the median of its rounds


def _lockstep_rank(rank: int, folder: str, results, reps: int) -> None:
    from zoplan.runtime.meeting import NodeMeeting

    torch.set_num_threads(1)
    barrier = NodeMeeting(Path(folder) / "barrier", 2, rank)
    block, hidden, kwargs = tiny_block()
    with torch.no_grad():
        for r in range(LOCKSTEP_ROUNDS):
            for slot, blocks in enumerate(LOCKSTEP_BLOCKS):
                waited = [0.0]

                def meet() -> None:
                    for _ in range(blocks):
                        block(hidden, **kwargs)
                    t = time.perf_counter()
                    barrier.wait()
                    waited[0] += time.perf_counter() - t

                for _ in range(20):
                    meet()
                waited[0] = 0.0
                t0 = time.perf_counter()
                for _ in range(reps):
                    meet()
                at = (r * len(LOCKSTEP_BLOCKS) + slot) * 2 + rank
                results[2 * at] = (time.perf_counter() - t0) / reps
                results[2 * at + 1] = waited[0] / reps
    barrier.close()


def lockstep_figures(quick: bool) -> tuple[float, float]:
    """Two CPU ranks that compute and then meet as the runtime's ranks do before every whole block
    (zoplan.runtime.meeting.NodeMeeting, through shared memory): how much slower each computes than
    one process alone (the ratio of a tiny block's time in lockstep to its time alone: the slope
    of an iteration's time from 1 to 4 blocks between meetings), and what each meeting costs in
    microseconds (the time a rank spends in it with a block between meetings, the ranks' mean:
    waiting for the other rank's noise); each the median of ``LOCKSTEP_ROUNDS`` rounds (one alone
    swings widely)."""
    block, hidden, kwargs = tiny_block()
    with torch.no_grad():
        alone = statistics.median(timed(lambda: block(hidden, **kwargs), 50) for _ in range(5))
    ctx = mp.get_context("spawn")
    results = ctx.Array("d", 4 * len(LOCKSTEP_BLOCKS) * LOCKSTEP_ROUNDS)  # (iteration, wait) per rank
    reps = 100 if quick else 400
    with tempfile.TemporaryDirectory() as folder:
        procs = [ctx.Process(target=_lockstep_rank, args=(r, folder, results, reps)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
    factors, waits = [], []
    for r in range(LOCKSTEP_ROUNDS):

        def cell(slot: int, rank: int, what: int) -> float:
            return results[2 * ((r * len(LOCKSTEP_BLOCKS) + slot) * 2 + rank) + what]

        few, many = (max(cell(slot, 0, 0), cell(slot, 1, 0)) for slot in range(len(LOCKSTEP_BLOCKS)))
        factors.append((many - few) / (LOCKSTEP_BLOCKS[1] - LOCKSTEP_BLOCKS[0]) / alone)
        waits.append((cell(0, 0, 1) + cell(0, 1, 1)) / 2 * 1e6)
    return max(1.0, statistics.median(factors)), max(0.0, statistics.median(waits))


def loop_us() -> float:
    """A training step's host work: tokenize 4 texts to 64 tokens, write a journal line and sync it
    to the disk (``os.fsync``, as rank 0 of a run does every step by default: --journal-sync-every
    1), in the temporary folder's file system."""
    from zoplan.runtime.tiny import resolve_model
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("tiny-opt"))
    texts = [("a plain sentence about a film that was long and slow " * 4) + str(i) for i in range(4)]
    with tempfile.TemporaryDirectory() as tmp, open(os.path.join(tmp, "journal.jsonl"), "a") as journal:

        def step() -> None:
            tokenizer(texts, padding="max_length", truncation=True, max_length=64, return_tensors="pt")
            journal.write(
                json.dumps(
                    {"step": 1, "seed": 2**62, "loss_plus": 1.0, "loss_minus": 1.0, "projected_grad": 0.1, "lr": 1e-6}
                )
                + "\n"
            )
            journal.flush()
            os.fsync(journal.fileno())

        return statistics.median(timed(step, 50) for _ in range(5)) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a rough figure in ~30 s)")
    parser.add_argument("--write", type=Path, default=None, help="write cpu-local with these figures here")
    opts = parser.parse_args()
    torch.set_num_threads(1)
    rates = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        rates[name] = model_shape_gflops(dtype, opts.quick)
        print(
            f"matmul {name}, a small model's block shapes (median): {rates[name]:8.1f} GFLOP/s (1 thread)", flush=True
        )
    peak, half, by_tokens = tokens_fit(quick=opts.quick)  # fp32, OPT-125m's block shapes
    print(
        "matmul fp32 over M tokens (block shapes):  "
        + ", ".join(f"{m}: {r:.0f}" for m, r in by_tokens.items())
        + f" GFLOP/s; fitted peak * M / (M + half): peak {peak:.1f}, half {half:.1f} tokens",
        flush=True,
    )
    # the cost model's tflops are the rates of long products: fp32 the fit's; bf16 and fp16 their
    # medians at 128 tokens (model_shape_gflops) over the fit's share at 128, as fp32's half
    peaks = {"fp32": peak}
    peaks.update({k: v * (128 + half) / 128 for k, v in rates.items() if k != "fp32"})
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)  # one rank alone on the machine runs a thread per core
    together = model_shape_gflops(torch.float32, opts.quick)
    torch.set_num_threads(1)
    efficiency = min(1.0, max(0.0, (together / rates["fp32"] - 1) / (cores - 1))) if cores > 1 else 1.0
    print(
        f"matmul fp32 at the same shapes, {cores} threads:   {together:8.1f} GFLOP/s "
        f"(each extra thread adds {efficiency:.2f} of one)",
        flush=True,
    )
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    print(f"matmul fp32 2048^3 (reference):            {2 * n**3 / timed(lambda: a @ b, 3) / 1e9:8.1f} GFLOP/s")
    alone = copy_gbps(reps=3 if opts.quick else 10)
    print(f"copy 1 GiB, one process:                   {alone:8.2f} GB/s copied", flush=True)
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(cores), ctx.Array("d", cores)
    procs = [ctx.Process(target=copy_gbps, args=(barrier, results, i)) for i in range(cores)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    copies = list(results)
    print(
        f"copy 1 GiB, {cores} processes at once:        {sum(copies):8.2f} GB/s in total "
        f"({', '.join(f'{r:.2f}' for r in copies)})",
        flush=True,
    )
    op_us, ops = forward_op_us(20 if opts.quick else 100)
    print(f"forward: host time per tensor op:          {op_us:8.1f} us (tiny OPT block, {ops} aten ops)", flush=True)
    cold_us, cold_ops = cold_op_us(20 if opts.quick else 100)
    print(
        f"a once-a-step stage's op, beyond that:     {cold_us:8.1f} us (embedding after the blocks, {cold_ops} aten ops)"
    )
    per_logit = loss_ns(3 if opts.quick else 10)
    print(
        f"next-token loss, fp32 logits:              {per_logit:8.2f} ns a logit "
        f"({per_logit * 2 * alone:.1f} bytes at 2 x {alone:.2f} GB/s)",
        flush=True,
    )
    head_ns, loss_seq_ns = in_step_head_ns(
        5 if opts.quick else 20, peak * 2048 / (2048 + half)
    )  # the fit at its 2048 tokens
    print(
        f"LM head in a step, beyond its FLOPs:       {head_ns:8.2f} ns a logit "
        f"({head_ns * 2 * alone:.1f} bytes at 2 x {alone:.2f} GB/s)",
        flush=True,
    )
    print(
        f"loss of 16 sequences in a step:            {loss_seq_ns:8.2f} ns a logit "
        f"(beyond one sequence's: {(loss_seq_ns - per_logit) * 2 * alone:.1f} bytes)",
        flush=True,
    )
    call_us, z_ns, kernel = z_figures(opts.quick)
    print(f"z ({kernel}): per call, per element:  {call_us:8.1f} us, {z_ns:.2f} ns", flush=True)
    z_cold = z_cold_us(20 if opts.quick else 100)
    print(f"z call right after a block's forward:      {z_cold:8.1f} us more", flush=True)
    coll, coll_gbps = collective_figures()
    print(f"gloo all-gather of 16 floats, 2 ranks:     {coll:8.1f} us", flush=True)
    print(f"gloo all-gather of 16 MiB a rank, 2 ranks: {coll_gbps:8.2f} GB/s received a rank", flush=True)
    lockstep, wait = lockstep_figures(opts.quick)
    print(f"2 ranks in lockstep: compute x{lockstep:.2f}, each meeting (shared memory) {wait:8.1f} us", flush=True)
    loop = loop_us()
    print(f"loop host work per step:                   {loop:8.1f} us", flush=True)
    tflops = {k: round(v / 1e3, 4) for k, v in peaks.items()}
    figures = {
        "tflops": tflops,
        "hbm_gbps": round(2 * alone, 2),
        "matmul_efficiency": 1.0,
        "matmul_half_tokens": round(half, 1),
        "threads_efficiency": round(efficiency, 2),
        "op_us": round(op_us, 1),
        "cold_op_us": round(cold_us, 1),
        "z_call_us": round(call_us),
        "z_ns": round(z_ns, 2),
        "z_cold_us": round(z_cold),
        "collective_us": round(coll),
        "collective_gbps": round(coll_gbps, 2),
        "lockstep": round(lockstep, 2),
        "lockstep_wait_us": round(wait),
        "loop_us": round(loop),
    }
    from zoplan.topology.detect import read_l2_kib

    l2_kib = read_l2_kib(min(os.sched_getaffinity(0)))  # a fact of this CPU, where /sys lists it
    if l2_kib:
        figures["cache_mib"] = round(l2_kib / 1024, 3)
    print("\ngpu_models entry (a CPU rank):")
    for key, value in figures.items():
        print(f"    {key}: {value}")
    if opts.write is not None and round(efficiency, 2) <= 0:
        # a second thread that added nothing: other work held the other core while it was timed (a
        # topology needs a share above 0, and a figure from a busy minute would mislead a plan)
        raise SystemExit(
            f"not written: {opts.write}: a second thread added nothing to the matmul rate (other work on "
            "the machine?); measure again when it is idle"
        )
    if opts.write is not None:
        spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "topologies" / "cpu-local.yaml").read_text())
        if "cache_mib" not in figures:  # not listed here: not cpu-local's either
            spec["gpu_models"]["cpu-rank"].pop("cache_mib", None)
        spec["gpu_models"]["cpu-rank"].update(figures)
        spec["sockets"][0]["memory_gbps"] = round(sum(copies), 2)
        spec["sockets"][0]["cores"] = cores
        for link in spec["links"]:
            link["gbps"] = round(alone, 2)
        spec["description"] += f" (figures measured {time.strftime('%Y-%m-%d %H:%M')}, bench/cpu_figures.py)"
        opts.write.write_text(yaml.safe_dump(spec, sort_keys=False))
        print(f"wrote {opts.write}")


if __name__ == "__main__":
    main()
