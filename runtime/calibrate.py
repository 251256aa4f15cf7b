"""``zoplan calibrate``: measure this machine with the runtime's own code paths (torchrun entry).

One process per device (GPU, or CPU rank), as in training. Each rank:

1. builds a model of the given shape with a few blocks (``--layers``, default 4: the config with
   fewer layers, random weights) and its host copy, exactly as a training run's loader does;
   several blocks, because a block's time in a long run includes what one block alone hides (on
   CUDA, uploads overlap compute and the host's kernel issue can become the limit);
2. copy rates: the host copy -> device and device -> host copies the engine does, each rank alone
   (the others wait), then all ranks at once (shared links and memory buses show up); on CUDA
   also both directions at once, sampled now and again after each round of step 4 (the median:
   a host link's rate dips for a second now and then, and one sample can fall in a dip);
3. the block all-gather among all ranks at two sizes -> latency and bandwidth, the same among
   the first k ranks for k = 2 .. all but one (the smaller groups a plan's movers can form),
   and the loss-scalar all-reduce latency;
4. the engine itself (``Engine.step``) for a few steps on that model, all ranks at once as in
   training, with 1 and 2 branches and 1 and 2 micro-batches: its spans give the block compute
   (perturbation + forward), the deferred update, embedding and head times (per block: the
   step's total over the blocks); and the perturbation alone (theta + eps z of one block).
   Each rank times these settings on its own blocks, the ranks meeting once a step;
5. with several ranks, the same engine steps (one branch, two micro-batches) with every rank
   moving slices and all-gathering them before each block, as PertP and data-parallel layouts
   run: the all-gather's in-step wait and the loss all-reduce, and the block compute, embedding
   and head in that lockstep (CPU ranks share cores, and compute slower so).

Rank 0 writes the figures as JSON to ``--output``; the planner (zoplan/profile.py) turns them into
a profile file.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import torch

from zoplan import records
from zoplan.errors import ZoplanError
from zoplan.records import RankError
from zoplan.runconfig import CalibrateConfig

from zoplan.layout import Layout
from zoplan.program import Program
from zoplan.program import build as build_program
from zoplan.runtime import dist as zdist
from zoplan.runtime.engine import Engine
from zoplan.runtime.hostcopy import DTYPES, HostCopy
from zoplan.runtime.scratch import (
    before_measuring,
    live_launches,
    measured_beside,
    owned,
    shared_memory,
    shared_memory_is_short,
    short_of_shared_memory,
)
from zoplan.runtime.spans import Spans

REPEAT_S = 0.3  # each copy measurement runs at least this long
ROUNDS = 4  # the engine settings take turns this many times (_engine_times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _copy_gbps(dst: torch.Tensor, src: torch.Tensor, device: torch.device) -> float:
    """Bytes per second of ``dst.copy_(src)`` as the engine issues it (non-blocking on CUDA)."""
    dst.copy_(src, non_blocking=device.type == "cuda")
    _sync(device)
    n, t0 = 0, time.perf_counter()
    while True:
        dst.copy_(src, non_blocking=device.type == "cuda")
        n += 1
        if n % 4 == 0:
            _sync(device)
            if time.perf_counter() - t0 >= REPEAT_S:
                break
    return n * src.numel() * src.element_size() / (time.perf_counter() - t0) / 1e9


def _duplex_gbps(dst: torch.Tensor, src: torch.Tensor, device: torch.device) -> float | None:
    """Bytes per second, both directions summed, of a block uploaded (``src`` to ``dst``) and one
    written back at once, on two CUDA streams as the engine's upload and offload streams overlap
    them. None on the CPU, where a rank's copies run one after the other. The write-back source is
    a device copy of ``dst``, which holds ``src``'s values: it rewrites ``src`` with its own bytes."""
    if device.type != "cuda":
        return None
    back = dst.clone()
    up, down = torch.cuda.Stream(device), torch.cuda.Stream(device)
    torch.cuda.synchronize(device)
    n, t0 = 0, time.perf_counter()
    while True:
        with torch.cuda.stream(up):
            dst.copy_(src, non_blocking=True)
        with torch.cuda.stream(down):
            src.copy_(back, non_blocking=True)
        n += 1
        if n % 4 == 0:
            torch.cuda.synchronize(device)
            if time.perf_counter() - t0 >= REPEAT_S:
                break
    elapsed = time.perf_counter() - t0
    del back
    return 2 * n * src.numel() * src.element_size() / elapsed / 1e9


class _DuplexSamples:
    """``_duplex_gbps`` taken at several moments of a calibration (all ranks at once, as a step's
    copies run), reported as the median of the samples: on the H200 machine of
    docs/results/fidelity.md, six one-window samples ranged 87-98 GB/s where the runs' own
    uploads and write-backs moved at a steady ~97. Between samples the engine's updates rewrite
    the host copy, so each sample first brings the device copy up to date (the write-back
    rewrites the host copy with its own bytes, not with older ones)."""

    def __init__(self, dst: torch.Tensor, src: torch.Tensor, device: torch.device) -> None:
        self.dst, self.src, self.device = dst, src, device
        self.rates: list[float] = []

    def sample(self) -> None:
        zdist.barrier()
        self.dst.copy_(self.src)
        _sync(self.device)
        rate = _duplex_gbps(self.dst, self.src, self.device)
        if rate is not None:
            self.rates.append(rate)

    @property
    def gbps(self) -> float | None:
        return statistics.median(self.rates) if self.rates else None


def _timed(fn, device: torch.device, repeat: int) -> float:
    """Median seconds of ``fn`` (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _calibration_model(model_dir: Path, dtype: torch.dtype, layers: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    from zoplan.runtime.adapters import adapter_for
    from zoplan.runtime.checkpoint import dtype_kwarg

    config = AutoConfig.from_pretrained(model_dir)
    config.num_hidden_layers = max(1, min(layers, config.num_hidden_layers))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, **dtype_kwarg(dtype))
    return model, adapter_for(config.model_type), config


def _loss(logits: torch.Tensor, mb: dict) -> tuple[torch.Tensor, float]:
    labels = mb["labels"]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
    return loss, float(labels.numel())


def measure(args: CalibrateConfig) -> dict:
    device_kind = args.device
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_kind == "cpu":
        torch.set_num_threads(1)
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    zdist.init_calibration(world, rank, device_kind)
    dtype = DTYPES[args.dtype]
    model, adapter, config = _calibration_model(Path(args.model_dir), dtype, args.layers)
    blocks = adapter.blocks(model)
    block_params = sum(p.numel() for p in blocks[0].parameters())
    root = Path(args.host_root) / f"rank{rank}"  # in the launch's own folder (runtime/scratch.py)
    # sliced into one slice per rank: the in-situ all-gather below exchanges them
    host = HostCopy.create(root, model, blocks, adapter.blocks_path + ".", world, args.dtype, args.dtype, copies=world)
    try:
        figures = _measure_with(args, model, adapter, host, device, rank, world, block_params, config)
    finally:
        host.remove()
    return figures


def _phase(args, rank: int, text: str) -> None:
    """Rank 0 tells the launcher's progress display what is being measured."""
    if rank == 0 and args.progress:
        Path(args.progress).write_text(text)


def _measure_with(args, model, adapter, host, device, rank, world, block_params, config) -> dict:
    cuda = device.type == "cuda"
    _phase(args, rank, "host <-> device copies, each device alone")
    src = host.blocks[0]
    if cuda:
        host.pin_for_cuda()  # as the engine does
    dst = torch.empty_like(src, device=device)
    # 2. copies: alone, rank by rank, then all at once
    alone = {}
    for r in range(world):
        zdist.barrier()
        if r == rank:
            alone = {"h2d_gbps": _copy_gbps(dst, src, device), "d2h_gbps": _copy_gbps(src, dst, device)}
    zdist.barrier()
    _phase(args, rank, "host <-> device copies, all devices at once")
    together_h2d = _copy_gbps(dst, src, device)
    zdist.barrier()
    together_d2h = _copy_gbps(src, dst, device)
    zdist.barrier()
    duplex = _DuplexSamples(dst, src, device) if cuda else None
    if duplex is not None:
        _phase(args, rank, "host <-> device copies, both directions at once")
        duplex.sample()  # again after each round of engine steps
    # 3. collectives among all ranks
    gather: dict = {}
    groups: list[dict] = []
    scalar_s = 0.0
    lockstep: dict = {}
    if world > 1:
        _phase(args, rank, f"all-gather and all-reduce among {world} ranks")
        gather = _gather_figures(args, device, world, zdist.world_group(), world)
        scalar_s = _timed(lambda: zdist.all_reduce_sum([0.0, 1.0, 2.0, 3.0]), device, 30)
        # the smaller groups a plan's movers can form: the first k ranks, while the others wait
        for k in range(2, world):
            _phase(args, rank, f"all-gather among {k} of {world} ranks")
            group = zdist.new_group(list(range(k)))  # every rank takes part in creating it
            if rank < k:
                groups.append(_gather_figures(args, device, k, group, k))
            zdist.barrier()
    adapter.blocks(model).to("meta")  # the host copy holds the blocks now
    from zoplan.runtime.worker import _blocks_detached

    with _blocks_detached(model, adapter):
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    compute = _engine_times(
        args, model, adapter, host, device, rank, world, between_rounds=duplex.sample if duplex is not None else None
    )
    if world > 1:
        # the all-gather and the loss all-reduce inside real steps, where each waits for the
        # slowest rank's compute before it (jitter a back-to-back loop does not see)
        insitu = compute.pop("exchange")
        gather["in_step_us"] = insitu["exchange"] * 1e6
        scalar_s = insitu["scalar"]
        # the same steps' compute, as a layout whose compute ranks all-gather each block runs it
        lockstep = insitu["lockstep"]
    # CPU ranks meeting before whole blocks: the wait at a meeting, and the loss sum after them
    meeting = compute.pop("meeting", None)
    from zoplan.runtime.perturb import kernels_label

    kernels = kernels_label(device)
    return {
        "rank": rank,
        "device": str(device),
        "torch": torch.__version__,
        "kernels": kernels,
        "alone": alone,
        "together": {
            "h2d_gbps": together_h2d,
            "d2h_gbps": together_d2h,
            "duplex_gbps": duplex.gbps if duplex is not None else None,
            "duplex_samples_gbps": duplex.rates if duplex is not None else [],
        },
        "allgather": gather,
        "allgather_groups": groups,
        "scalar_latency_us": scalar_s * 1e6,
        "block_params": block_params,
        "compute": compute,
        "lockstep": lockstep,
        "meeting": {"wait_s": meeting["exchange"], "scalar_s": meeting["scalar"]} if meeting else None,
    }


def _program(rank: int, world: int, exchange: bool, dtype: str, layers: int) -> Program:
    """The step program a calibration engine runs: this rank computes, its block sliced in one
    slice per rank; in the exchange setting every rank moves and all-gathers them (the others
    stand in the program as the movers they are), else this rank moves them all alone."""
    me = f"rank{rank}"
    movers = tuple(f"rank{k}" for k in range(world)) if exchange else (me,)
    layout = Layout(
        perturbation=1,
        data=1,
        compute_gpus=(me,),
        upload="sliced",
        movers=movers,
        slices_per_block=world,
        wire_dtype=dtype,
        param_dtype=dtype,
        micro_batch=1,
        prefetch=1,
    )
    return build_program(layout, layers=layers, block_params=1)


def _whole_program(world: int, dtype: str, layers: int) -> Program:
    """The calibration's whole-block setting: every rank a compute rank of one data-parallel
    layout (both branches on its share of the batch), each uploading whole blocks and meeting the
    others before every one, as the CPU ranks of a 1xN or 2x1 whole-block run do."""
    ranks = tuple(f"rank{k}" for k in range(world))
    layout = Layout(
        perturbation=1,
        data=world,
        compute_gpus=ranks,
        upload="whole",
        movers=ranks,
        slices_per_block=1,
        wire_dtype=dtype,
        param_dtype=dtype,
        micro_batch=1,
        prefetch=1,
    )
    return build_program(layout, layers=layers, block_params=1)


def _gather_figures(args, device: torch.device, ranks: int, group, slices: int) -> dict:
    """Latency and bandwidth of the all-gather among ``ranks`` (this rank one of them), each
    contributing one slice of a block cut in ``slices``: timed back to back at 256 elements and
    at that slice."""
    times = {}
    for n in (256, max(257, int(args.block_params / slices))):
        mine = torch.ones(n, dtype=DTYPES[args.dtype], device=device)
        parts = [torch.empty_like(mine) for _ in range(ranks)]
        times[n] = _timed(lambda: zdist.all_gather_into(parts, mine, group), device, 20)
    (n0, t0), (n1, t1) = sorted(times.items())
    per_byte = max((t1 - t0) / ((n1 - n0) * mine.element_size() * (ranks - 1)), 1e-15)
    return {"ranks": ranks, "latency_us": max(t0, 1e-7) * 1e6, "gbps": 1e-9 / per_byte}


def _engine_times(args, model, adapter, host, device, rank, world, between_rounds=None) -> dict:
    """Span totals of Engine.step per (branches, micro-batches), per block (medians); with
    several ranks also the ``exchange`` setting, where all ranks move slices and all-gather them
    (PertP-like: one branch each).

    The settings take turns in ``ROUNDS`` rounds, each a fresh engine that warms up for one
    untimed step and is then timed for its share of the steps: a slow stretch of the machine
    (a shared or virtual one's) then falls on every setting alike instead of on one.
    ``between_rounds``, if given, is called after each round (with no engine step in flight)."""
    vocab = model.get_output_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(rank)
    loop = _TrainingLoop(args, rank)
    settings = [(b, m, f"{b}x{m}") for b in (1, 2) for m in args.micro_batches]
    if world > 1:
        settings.append((1, 2, "exchange"))
    if world > 1 and device.type == "cpu":
        # CPU ranks of whole-block layouts meet through shared memory before every block: the wait
        settings.append((2, 2, "meeting"))
    blocks_n = len(host.layouts)
    # the loss scalars summed, and whole blocks met before, as a run's ranks do (on CPU, through
    # shared memory)
    scalar_sum = zdist.node_sum(device, rank, world, Path(args.host_root))
    meet = zdist.node_barrier(device, rank, world, Path(args.host_root))
    state = {}
    for branches, micro, key in settings:
        # waiting for the slowest rank is skewed (rare long waits): more steps for the exchange,
        # and the mean, which is what a step's sum of waits adds up to
        steps = args.steps * 2 if key == "exchange" else args.steps
        # --spans: every timed step kept (and the first warm-up), in the runtime's
        # spans-rank<R>.jsonl schema
        kept = Path(args.spans) / key / f"spans-rank{rank}.jsonl" if args.spans else None
        if kept is not None:
            kept.parent.mkdir(parents=True, exist_ok=True)
            kept.unlink(missing_ok=True)
        mbs = []
        for _ in range(micro):
            ids = torch.randint(0, vocab, (args.micro_batch, args.seq_len), generator=gen)
            mbs.append({"inputs": {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, "labels": ids.to(device)})
        shares = [steps // ROUNDS + (r < steps % ROUNDS) for r in range(ROUNDS)]
        state[key] = {
            "spans": Spans(device, kept, keep_steps=steps + 1),
            "mbs": mbs,
            "rows": [],
            "step": 0,
            "shares": shares,
            "last": max(r for r in range(ROUNDS) if shares[r]),
        }
    engine = None
    for round_ in range(ROUNDS):
        for branches, micro, key in settings:
            st = state[key]
            if not st["shares"][round_]:
                continue
            _phase(
                args,
                rank,
                f"engine steps: {branches} branch(es), {micro} micro-batch(es)"
                + (", all ranks all-gathering" if key == "exchange" else "")
                + (", whole blocks, all ranks meeting before each" if key == "meeting" else "")
                + f" (round {round_ + 1} of {ROUNDS})",
            )
            exchange, whole = key == "exchange", key == "meeting"
            ctx = zdist.RankContext(
                rank=0,
                world=1,
                node=0,
                local_rank=0,
                device=device,
                role="compute",
                signs=(1, -1) if branches == 2 else (1,),
                replica=0,
                replicas=1,
                mover_index=rank if exchange else 0,
                movers=world if exchange else 1,
                compute_index=rank if whole else 0,
                computes=world if whole else 1,
                exchange_group=zdist.world_group() if exchange else None,
            )
            engine = None  # the previous engine's buffers go before this one's come
            spans = st["spans"]
            engine = Engine(
                model,
                adapter,
                host,
                ctx,
                program=_whole_program(world, args.dtype, blocks_n)
                if whole
                else _program(rank, world, exchange, args.dtype, blocks_n),
                rank=f"rank{rank}",
                eps=1e-3,
                spans=spans,
                barrier=meet,
            )
            # the first round's warm-up step is kept with the timed ones, the later ones are not timed
            for i in range(st["shares"][round_] + 1):
                step = st["step"]
                timed = i > 0 or round_ == 0
                if timed:
                    spans.begin(step)
                    st["step"] += 1
                with spans.span("compute", "loop", "batch", -1):
                    loop.batch(step, micro)  # timed only: the steps run on the random tokens above
                engine.forward_losses(st["mbs"], 1000 + step, [_loss])
                with spans.span("compute", "scalar", "loss all-reduce", 1):
                    scalar_sum([0.0, 0.0, 0.0, 0.0])
                with spans.span("compute", "loop", "journal", blocks_n + 2):
                    loop.journal(step)
                engine.pending = engine.pending or _pending(step)
                if not timed:
                    continue
                spans_totals = spans.end()
                # for the record: the block compute's GPU and host seconds before they are combined
                split = {
                    "compute_gpu": spans_totals.get("compute", 0.0),
                    "compute_host": spans.host_totals.get("compute", 0.0),
                }
                # a stage lasts at least as long as the host takes to issue it (CUDA: kernel
                # launches and Python; in a long run nothing else hides that time)
                for cat, host_s in spans.host_totals.items():
                    if cat in ("compute", "embed", "head", "update"):
                        spans_totals[cat] = max(spans_totals.get(cat, 0.0), host_s)
                if i >= 1:  # an engine's first step warms up and has no update to apply
                    st["rows"].append({**spans_totals, **split})
            if key == "1x1" and round_ == st["last"]:
                theta = torch.empty(host.layouts[0].padded, dtype=engine.dtype, device=device)
                theta.copy_(host.blocks[0])  # block 0's weights on the device, as an upload leaves them
                params = host.layouts[0].numel
                st["perturb_s_per_param"] = _timed(lambda: engine._perturbed(0, theta, 7, (1,)), device, 5) / params
        if between_rounds is not None:
            _sync(device)
            between_rounds()
    engine = None
    out = {}
    for _, _, key in settings:
        st = state[key]
        st["spans"].close()
        rows = st["rows"]
        average = statistics.mean if key in ("exchange", "meeting") else statistics.median
        out[key] = {
            cat: average(r.get(cat, 0.0) for r in rows) / (blocks_n if cat in PER_BLOCK else 1)
            for cat in (
                "h2d",
                "update",
                "d2h",
                "embed",
                "compute",
                "head",
                "exchange",
                "scalar",
                "loop",
                "compute_gpu",
                "compute_host",
            )
        }
        if key == "exchange":  # the compute of these steps, as the independent settings take it (medians)
            out[key]["lockstep"] = {
                cat: statistics.median(r.get(cat, 0.0) for r in rows) / (blocks_n if cat in PER_BLOCK else 1)
                for cat in ("compute", "embed", "head")
            }
        if "perturb_s_per_param" in st:
            out[key]["perturb_s_per_param"] = st["perturb_s_per_param"]
    return out


PER_BLOCK = (
    "h2d",
    "update",
    "d2h",
    "compute",
    "exchange",
    "compute_gpu",
    "compute_host",
)  # once per block; the rest once per step


class _TrainingLoop:
    """The training loop's own host work between two steps, as runtime/worker.py does it: the
    micro-batches of a step assembled from pre-tokenised texts with the model's tokenizer (random
    words, long enough to fill the sequence), and rank 0's journal line, written and synced (in
    a temporary directory: the run's output directory is not known yet)."""

    def __init__(self, args, rank: int) -> None:
        from transformers import AutoTokenizer

        from zoplan.runtime import data as zdata
        from zoplan.runtime.worker import Batcher

        self.args, self.rank = args, rank
        self.tokenizer = None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
        except Exception:  # a checkpoint without a tokenizer: its runs cannot start anyway
            print("calibrate: the model directory has no tokenizer; batch assembly is not timed", flush=True)
        self.task = zdata.Task("lm")
        words = "the model reads a long text one block after another and the loss falls".split()
        rng = random.Random(rank)
        self.examples = [
            zdata.Example(" ".join(rng.choice(words) for _ in range(args.seq_len)))
            for _ in range(64 * args.micro_batch)
        ]
        self.batcher = Batcher(self.tokenizer, self.task, args.seq_len, args.micro_batch)
        if self.tokenizer is not None:
            self.batcher.pretokenize(self.examples)
        self.journal_file = None
        if rank == 0:
            self.journal_file = tempfile.NamedTemporaryFile(
                "a", suffix=".jsonl", prefix="zoplan-calibrate-journal-", buffering=1
            )

    def batch(self, step: int, micro_batches: int) -> None:
        if self.tokenizer is None:
            return
        from zoplan.runtime import data as zdata

        n = micro_batches * self.args.micro_batch
        self.batcher(zdata.batches(self.examples, n, 0, step, 0, 1))

    def journal(self, step: int) -> None:
        if self.journal_file is None:
            return
        from zoplan.runtime.journal import write_line

        write_line(
            self.journal_file,
            {
                "step": step,
                "seed": 1234567890 + step,
                "loss_plus": 2.0,
                "loss_minus": 2.0,
                "projected_grad": 0.0,
                "lr": 1e-6,
                "eps": 1e-3,
                "weight_decay": 0.0,
                "skipped": False,
            },
            sync=True,
        )


def _pending(step: int):
    from zoplan.runtime.engine import Pending

    return Pending(seed=2000 + step, g=0.0, lr=0.0, wd=0.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="zoplan calibrate (one rank; started by runtime/ranks.py)")
    parser.add_argument("config", type=Path, help="the calibration's configuration (zoplan.runconfig.CalibrateConfig)")
    args = parser.parse_args(argv)
    from zoplan.runconfig import read_calibration

    cfg = read_calibration(args.config)
    assert cfg.figures is not None, "the launcher completes the configuration"
    try:
        try:
            try:
                figures = measure(cfg)
            except OSError:  # the small files after the host copies, in a full shared memory
                if cfg.host_root is None or not shared_memory_is_short(cfg.host_root, cfg.figures.parent):
                    raise
                raise short_of_shared_memory(cfg.host_root) from None
        except ZoplanError as exc:  # said as it is by the launcher (shared memory too small, ...)
            rank = int(os.environ.get("RANK", "0"))
            records.write_rank_error(
                cfg.figures.parent, RankError(rank=rank, kind="error", message=exc.message, fix=exc.fix)
            )
            raise SystemExit(1) from None
        from zoplan.runtime import faults

        faults.hit("kill", figures["rank"], 0)  # (as the kernel's out-of-memory killer does, once measured)
        rows = zdist.gather_objects(figures)
        if figures["rank"] == 0:
            cfg.figures.write_text(json.dumps(rows, indent=1))
        zdist.barrier()
        # every rank is past the barrier, so the figures file is complete: a rank that then dies
        # while shutting down (a rare gloo teardown abort) no longer spoils the calibration
        Path(f"{cfg.figures}.done-rank{figures['rank']}").write_text("ok")
        faults.hit("abort-at-exit", figures["rank"])
    finally:
        zdist.shutdown()


if __name__ == "__main__":
    main()


# ----- the launcher (``zoplan calibrate``) ---------------------------------------------------------


def _check_spans_folder(folder: Path) -> None:
    """--spans names a folder the ranks write into (made if missing): one this user cannot make or
    write, or a file, failed in the ranks after seconds of measuring."""
    if folder.exists() and not folder.is_dir():
        raise ZoplanError(f"--spans {folder} is a file, not a folder", fix="name a folder (it is made if missing)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ZoplanError(
            f"cannot make the --spans folder {folder}: {exc.strerror or exc}", fix="name a folder you can write"
        ) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ZoplanError(f"cannot write into the --spans folder {folder}", fix="name a folder you can write")


def calibrate(cfg: CalibrateConfig, quiet: bool = False):
    """Measure this machine (one process per device of ``cfg.topology``) and write a profile to
    ``cfg.output``: the micro-batch counts ``cfg.micro_batches`` timed (1 and 2 at least; more
    let a plan with many micro-batches interpolate instead of extrapolating); ``cfg.spans``: a
    directory that keeps every timed engine step, ``<setting>/spans-rank<R>.jsonl``."""
    import sys

    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from zoplan.fileio import check_writable
    from zoplan.models import load_model_shape
    from zoplan.profile import build_profile, write_profile
    from zoplan.runconfig import write_calibration
    from zoplan.runtime.launch import (
        _free_port,
        _is_cpu_machine,
        check_switches,
        cuda_env,
        rank_env,
        ranks_running,
        stop_signals,
    )
    from zoplan.runtime.tiny import resolve_model
    from zoplan.search import check_workload
    from zoplan.topology import load_topology

    check_switches(os.environ)
    machine = load_topology(cfg.topology)
    if machine.spec.nodes > 1:
        raise ZoplanError(
            f"'{machine.name}' spans {machine.spec.nodes} nodes: calibrate one node's topology",
            fix="calibrate with the topology of one of its nodes (this file without its nodes:, network: and "
            "price_per_hour_usd: settings): that profile serves this file's plans too",
        )
    cpu = _is_cpu_machine(machine)
    n = len(machine.gpus)
    if not cpu:
        if not torch.cuda.is_available():
            raise ZoplanError(
                f"calibration cannot reach a GPU: '{machine.name}' describes GPUs, but torch sees no CUDA device here",
                fix="run it on the GPU machine, or calibrate a CPU topology (--topology cpu-local)",
            )
        if torch.cuda.device_count() < n:
            raise ZoplanError(
                f"'{machine.name}' has {n} GPUs but torch sees {torch.cuda.device_count()} here",
                fix="calibrate on the machine the topology describes (zoplan topo detect)",
            )
    check_writable(cfg.output, "profile")  # before the minutes of measuring, not after them
    dtype = cfg.dtype or ("fp32" if cpu else "bf16")
    if cfg.spans is not None:  # the ranks write there: refused now, not after they have measured
        _check_spans_folder(Path(cfg.spans))
    model_dir = resolve_model(cfg.model)
    shape = load_model_shape(str(model_dir / "config.json"))
    check_workload(shape, 1, cfg.seq_len)  # (an OPT has no position past its last: the ranks failed with IndexError)
    # the ranks' host copies (shared memory) and every temporary file of torchrun and the ranks:
    # removed when calibrate ends; a killed calibrate's are swept by the next launch
    tag = uuid.uuid4().hex[:12]
    with (
        owned(shared_memory(), f"calibrate-{tag}") as shm,
        owned(Path(tempfile.gettempdir()), f"calibrate-tmp-{tag}") as work,
    ):
        raw, progress_file, log = work / "figures.json", work / "progress.txt", work / "calibrate.log"
        ranks_cfg = cfg.model_copy(
            update=dict(
                dtype=dtype,
                model_dir=model_dir,
                device="cpu" if cpu else "cuda",
                block_params=shape.block_params(),
                figures=raw,
                progress=progress_file,
                host_root=shm,
                spans=Path(cfg.spans).resolve() if cfg.spans is not None else None,
            )
        )
        # forked from one process that has imported what a rank needs (runtime/ranks.py); each
        # reads the configuration, nothing else
        cmd = [
            sys.executable,
            "-m",
            "zoplan.runtime.ranks",
            "--module",
            "zoplan.runtime.calibrate",
            "--model-dir",
            str(model_dir),
            "--nproc",
            str(n),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(_free_port()),
            "--max-restarts",
            "0",  # a calibration measures; a rank that fails spoils its figures
            "--",
            str(write_calibration(ranks_cfg, work)),
        ]
        env = rank_env(os.environ)
        env["TMPDIR"] = str(work)
        if not cpu:  # rank k measures the topology's GPU k
            env.update(cuda_env(machine.gpus, machine.gpus, os.environ))
        # a calibration measures the machine: what runs beside it takes part of it
        beside, warning = before_measuring("calibrate", cpu, own=(shm, work))
        if warning:
            print(warning, file=sys.stderr)
        with (
            open(log, "w") as f,
            Progress(
                SpinnerColumn(),
                TextColumn("calibrating {task.description}"),
                TimeElapsedColumn(),
                disable=quiet,
                transient=True,
            ) as bar,
        ):
            task = bar.add_task("(starting ranks)")
            stopped: list[int] = []
            try:
                # SIGTERM and SIGHUP stop the ranks as Ctrl-C does
                with stop_signals(stopped), ranks_running(cmd, f, env) as proc:
                    polls = 0
                    while proc.poll() is None:
                        if progress_file.exists():
                            bar.update(task, description=progress_file.read_text())
                        time.sleep(0.2)
                        polls += 1
                        if polls % 5 == 0:  # a launch started meanwhile measures beside it too
                            beside.update(live_launches(own=(shm, work)))
            except KeyboardInterrupt:  # said with the signal's own status, as zoplan run does (143 for SIGTERM)
                signum = stopped[-1] if stopped else signal.SIGINT
                raise ZoplanError(
                    f"calibration stopped by {signal.Signals(signum).name}: the ranks have stopped, and no profile "
                    "was written",
                    fix="run the same command again",
                    status=128 + signum,
                ) from None
        done = all(Path(f"{raw}.done-rank{r}").exists() for r in range(n))
        if proc.returncode != 0 and done and raw.exists():
            print(
                f"warning: a calibration rank exited with status {proc.returncode} after every rank had "
                "finished measuring; the figures are complete",
                file=sys.stderr,
            )
        elif proc.returncode != 0 or not raw.exists():
            kept = Path(f"{cfg.output}.log")  # the scratch folder goes: the log is kept beside the profile's path
            shutil.copyfile(log, kept)
            said = records.read_error(work)
            if said is not None:  # a rank's own account
                raise ZoplanError(said.message, fix=f"{said.fix} (log: {kept})" if said.fix else f"see {kept}")
            text = log.read_text(errors="replace")
            if "exitcode: -9 (SIGKILL)" in text:  # (the rank supervisor's record of a rank's end)
                raise ZoplanError(
                    "calibration failed: a rank was killed by SIGKILL, most often by the kernel's out-of-memory "
                    "killer when the machine runs out of host memory (`dmesg | grep -i oom` shows it)",
                    fix=f"calibrate a smaller --micro-batch or --seq-len, with other jobs stopped (log: {kept})",
                )
            causes = [
                l.strip()
                for l in text.splitlines()
                if "Error" in l and "ChildFailedError" not in l and not l.startswith("  File")
            ]
            raise ZoplanError(
                f"calibration failed (exit status {proc.returncode})" + (f": {causes[-1][:500]}" if causes else ""),
                fix=f"see {kept}",
            )
        rows = json.loads(raw.read_text())
        profile = build_profile(
            rows,
            machine,
            shape,
            micro_batch=cfg.micro_batch,
            seq_len=cfg.seq_len,
            dtype=dtype,
            device=rows[0]["device"] if cpu else torch.cuda.get_device_name(0),
        )
        write_profile(profile, cfg.output)
        warning = measured_beside(beside, "calibrate", own=(shm, work))
        if warning:
            print(warning, file=sys.stderr)
        return profile
