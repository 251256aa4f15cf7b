"""One rank of a ``zoplan run``: started by torchrun, one process per device.

Loads the model once per machine into the shared host copy, builds the engine from the plan,
trains, and (rank 0) writes the journal, the metrics and the final weights. A user error becomes
``error.json`` in the output directory (zoplan.records.RankError), which the launcher prints; nothing here prints tracebacks
for bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from zoplan import records, runconfig
from zoplan.errors import ZoplanError
from zoplan.planfile import Plan, load_plan
from zoplan.records import EvalRow, NoteRow, RankError, ResumedRow, TrainRow
from zoplan.runconfig import RunConfig
from zoplan.topology.container import read_limits
from zoplan.vocab import DTYPE_BYTES
from zoplan.program import Kind
from zoplan.program import build as build_program
from zoplan.runtime import data as zdata
from zoplan.runtime import dist as zdist
from zoplan.runtime import faults, hostcopy
from zoplan.runtime import tuning as ztuning
from zoplan.runtime.adapters import Adapter, adapter_for
from zoplan.runtime.checkpoint import companion_files, dtype_kwarg, readable_as_umask, write_safetensors
from zoplan.runtime.engine import Engine
from zoplan.runtime.hostcopy import DTYPES, HostCopy
from zoplan.runtime.journal import write_line
from zoplan.runtime.launch import NODES_MET_ENV, SHARE_THREADS_ENV, finished_marker
from zoplan.runtime.scratch import shared_memory_is_short, short_of_shared_memory
from zoplan.runtime.perturb import step_seed
from zoplan.runtime.ranks import STOPPED
from zoplan.runtime.replay import replay, require_finite
from zoplan.runtime.spans import Spans
from zoplan.runtime.snapshots import (
    DISK_ERRNOS,
    DiskFull,
    cut_torn_tail,
    read_valid_journal,
    resume_point,
    write_snapshot,
)
from zoplan.runtime.zo import eps_note, learning_rate


@contextlib.contextmanager
def _blocks_detached(model: nn.Module, adapter: Adapter):
    """Whole-model operations (to(device), to_empty) must not touch the streamed blocks."""
    parent_path, attr = adapter.blocks_path.rsplit(".", 1)
    parent = model.get_submodule(parent_path)
    blocks = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList())
    try:
        yield blocks
    finally:
        setattr(parent, attr, blocks)


def load_model(
    model_dir: Path, plan: Plan, ctx: zdist.RankContext, root: Path, replay_rows: list[dict] | None = None
) -> tuple[nn.Module, Adapter, HostCopy]:
    """The model with its blocks in the host copy (streamed by the engine) and the rest on this
    rank's device. Read-only blocks are mapped from the checkpoint where it allows
    (``hostcopy.mappable``; ``ZOPLAN_HOST_COPY=copy`` copies them anyway), else one loader rank
    per machine copies every block into shared memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    adapter = adapter_for(config.model_type)
    dtype = DTYPES[plan.transfer.param_dtype]
    prefix = adapter.blocks_path + "."
    if plan.tuning.to_tuning().frozen_base and not replay_rows and os.environ.get("ZOPLAN_HOST_COPY") != "copy":
        mapped = _load_mapped(model_dir, config, adapter, plan, ctx)
        if mapped is not None:
            return _ready(mapped[0], adapter, ctx.device), adapter, mapped[1]
    if ctx.is_loader:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **dtype_kwarg(dtype))
        if replay_rows:
            # journal lines after the snapshot: the steps completed but not in the weights yet
            # (bit-identical to training when the host copy has the compute dtype, the default)
            replay(model, replay_rows)
        host = HostCopy.create(
            root,
            model,
            adapter.blocks(model),
            prefix,
            plan.transfer.slices_per_block,
            plan.transfer.wire_dtype,
            plan.transfer.param_dtype,
        )
        adapter.blocks(model).to("meta")  # the host copy holds the blocks now
        with _blocks_detached(model, adapter):
            model.to(ctx.device)
            if ctx.device.type == "cpu":
                # on the CPU the rest are still the checkpoint's pages (safetensors maps the
                # file): a file replaced in place during the run would change them, or end the
                # rank with SIGBUS. Their own memory instead (tied weights stay tied).
                with torch.no_grad():
                    for tensor in [*model.parameters(), *model.buffers()]:
                        if tensor.device.type == "cpu":
                            tensor.data = tensor.data.clone()
    zdist.barrier()
    if not ctx.is_loader:
        model = _on_meta(config, dtype)
        _resident_on(model, adapter, ctx.device)
        host = HostCopy.open(root, adapter.blocks(model), prefix)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in host.resident:
                    param.copy_(host.resident[name])
        return _ready(model, adapter, ctx.device), adapter, host
    return _ready(model, adapter, None), adapter, host


def _on_meta(config, dtype: torch.dtype) -> nn.Module:
    """The model's modules with no storage: shapes only."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, **dtype_kwarg(dtype))
    model.tie_weights()
    return model


def _resident_on(model: nn.Module, adapter: Adapter, device: torch.device) -> None:
    """Storage on ``device`` for everything but the streamed blocks (left on meta), to be filled."""
    with _blocks_detached(model, adapter):
        model.to_empty(device=device)
    model.tie_weights()


def _ready(model: nn.Module, adapter: Adapter, rebuild_on: torch.device | None) -> nn.Module:
    """For inference only; ``rebuild_on``: a model made on meta gets its computed buffers there."""
    if rebuild_on is not None and adapter.buffers_rebuild is not None:
        adapter.buffers_rebuild(model, rebuild_on)
    model.eval()
    model.requires_grad_(False)
    return model


def _load_mapped(
    model_dir: Path, config, adapter: Adapter, plan: Plan, ctx: zdist.RankContext
) -> tuple[nn.Module, HostCopy] | None:
    """Read-only blocks mapped from the checkpoint, and the resident parts read from it by every
    rank; None (and one line on rank 0 saying why) where the checkpoint's layout does not allow."""
    from safetensors import safe_open

    prefix = adapter.blocks_path + "."
    model = _on_meta(config, DTYPES[plan.transfer.param_dtype])
    blocks = adapter.blocks(model)
    mapping = hostcopy.mappable(model_dir, blocks, prefix, plan.transfer.slices_per_block, plan.transfer.wire_dtype)
    block_names = {f"{prefix}{i}." for i in range(len(blocks))}
    resident = [n for n, _ in model.named_parameters() if not any(n.startswith(b) for b in block_names)]
    if not isinstance(mapping, str):
        missing = [n for n in resident if n not in mapping.held]
        if missing:
            mapping = f"the checkpoint has no tensor {missing[0]}"
    if isinstance(mapping, str):
        if ctx.rank == 0:
            _log(f"host copy: copying the blocks into shared memory ({mapping})")
        return None
    host = HostCopy.map(mapping, blocks, prefix, plan.transfer.slices_per_block, plan.transfer.wire_dtype)
    _resident_on(model, adapter, ctx.device)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for path in sorted(set(mapping.held[n] for n in resident)):
            with safe_open(str(path), framework="pt") as f:
                for name in resident:
                    if mapping.held[name] == path:
                        params[name].copy_(f.get_tensor(name))
    if ctx.rank == 0:
        _log(f"host copy: the checkpoint's blocks mapped read-only from {model_dir} (no copy)")
    return model, host


def threads_per_rank(local_ranks: int) -> int:
    """CPU threads for each of ``local_ranks`` ranks on this machine: the user's own
    OMP_NUM_THREADS where it was set (a whole number from 1), else the cores this process may run
    on, or that a container's CPU quota lets it keep busy if fewer (threads past them wait their
    turn: 40% slower steps under a 1-core quota), shared evenly (zoplan.sim.costs.cpu_threads counts
    the same from the topology, which ``zoplan topo detect`` writes so)."""
    given = os.environ.get("OMP_NUM_THREADS", "").strip()
    if os.environ.get(SHARE_THREADS_ENV) != "1" and given.isdigit() and int(given) >= 1:
        return int(given)
    cores = read_limits().cores(len(os.sched_getaffinity(0)))
    return max(1, cores // max(1, local_ranks))


# the host copy's weights sampled to tell whether a run's updates changed them (of the first block)
WATCHED = 1 << 20
# a run of at least this many steps whose updates changed less than this share of them is told why
STALL_STEPS, UPDATES_CHANGED = 20, 0.05


def updates_note(before: torch.Tensor, after: torch.Tensor, plan: Plan, steps: int) -> str | None:
    """What to say where a whole run changed next to none of the host copy's weights: each update
    (lr * g * z) is below the spacing of the host copy's dtype around them and rounds away. With a
    bf16 host copy and lr 1e-8, 98% of the weights never moved; the learning rate's warning said
    "try 10x", which left 98% unmoved again: a host copy as wide as the compute dtype is the fix."""
    changed = float((before != after).float().mean()) if before.numel() else 1.0
    if changed >= UPDATES_CHANGED:
        return None
    wire, param = plan.transfer.wire_dtype, plan.transfer.param_dtype
    narrower = DTYPE_BYTES[wire] < DTYPE_BYTES[param]
    return (
        f"in {steps} steps the updates changed {changed:.1%} of the first block's weights in the host copy "
        f"({wire}): each update (lr * g * z, lr {plan.zo.lr:g}) is below the spacing of {wire} around those weights "
        "and rounds away, so the model written is nearly the one the run started from; "
        + (
            f"a host copy in {param} keeps them (--wire-dtype {param}, in a plan made with it)"
            if narrower
            else "a larger learning rate moves them (--lr, in a plan made with it)"
        )
    )


def write_weights(host: HostCopy, engine: Engine, model_dir: Path, target: Path, param_dtype: str) -> None:
    """Hugging Face layout in ``target``: config, tokenizer files and model.safetensors (loadable
    with ``from_pretrained``); an adapter run's adapter in PEFT's layout with the tokenizer files
    (zoplan.runtime.tuning). Call after ``engine.flush()``."""
    if engine.tuned is not None:
        host.check_unchanged()  # a mapped checkpoint (read-only blocks) is still what the adapter names
        require_finite(
            engine.tuned.tensors().items(),
            "the trained adapter",
            "lower --lr (an update overflowed the adapter); the journal and the snapshots written before are intact",
        )
        engine.tuned.save(target, model_dir)
        return

    dtype = DTYPES[param_dtype]
    # each tensor made as it is written (zoplan.runtime.checkpoint.write_safetensors): a block's
    # slots are views of the host copy (converted one at a time where the host copy is narrower);
    # a copy of every weight at once took the model's size again in host memory, which the plan
    # does not count
    state: dict[str, tuple[torch.dtype, tuple[int, ...], Callable[[], torch.Tensor]]] = {}
    for layout, flat in zip(host.layouts, host.blocks):
        for slot in layout.slots:
            view = flat[slot.offset : slot.offset + slot.numel].view(slot.shape)
            state[slot.name] = (dtype, tuple(slot.shape), lambda view=view: view.to(dtype))
    for name, value in engine.resident_state().items():
        state[name] = (dtype, tuple(value.shape), lambda value=value: value.detach().to("cpu", dtype))
    require_finite(
        ((name, make()) for name, (_, _, make) in state.items()),
        "the trained weights",
        "lower --lr (an update overflowed the weights); the journal and the snapshots written before are intact",
    )
    target.mkdir(parents=True, exist_ok=True)
    write_safetensors(target / "model.safetensors", state, metadata={"format": "pt"})
    for f in companion_files(model_dir):
        shutil.copy2(f, target / f.name)
    _config_says_dtype(target / "config.json", dtype)
    readable_as_umask(target)


def _config_says_dtype(config: Path, dtype: torch.dtype) -> None:
    """The trained weights' dtype in their config.json (the base's, copied): a bf16 checkpoint
    trained and written in fp32 kept "bfloat16", so from_pretrained without a dtype loaded it in
    bf16 and rounded the run's updates away."""
    if not config.is_file():
        return
    data = json.loads(config.read_text())
    name = str(dtype).removeprefix("torch.")
    keys = [k for k in ("torch_dtype", "dtype") if k in data]
    if all(data[k] == name for k in keys):
        return
    for key in keys:
        data[key] = name
    config.write_text(json.dumps(data, indent=2) + "\n")


def _log(line: str) -> None:
    """One line into the node's log (the ranks' stderr, one file): written by one call, so that
    ranks writing at once do not join their lines (two start lines were found run together)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def save_final(host: HostCopy, engine: Engine, model_dir: Path, out: Path, param_dtype: str, steps: int) -> None:
    tmp = out / "model.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    from safetensors import SafetensorError

    try:
        write_weights(host, engine, model_dir, tmp, param_dtype)
    except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as its own error
        shutil.rmtree(tmp, ignore_errors=True)  # room for error.json; nothing half-written left
        reason = getattr(exc, "strerror", None) or str(exc).rsplit(": ", 1)[-1]
        raise ZoplanError(
            f"writing the final weights into {out / 'model'} failed: {reason}; the journal holds all {steps} step(s)",
            fix=f"free disk space, then `zoplan run --resume {out} --steps {steps}` writes them "
            "(no step is trained again)",
        ) from None
    final = out / "model"
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


@dataclass
class Batcher:
    """Micro-batches of examples as the plan shapes them, every text tokenised once per run."""

    tokenizer: Any
    task: zdata.Task
    seq_len: int
    micro: int  # sequences per micro-batch
    pad: bool = False  # every micro-batch of the plan's shape (``pad_to_seq_len``), however short the texts
    tokens: zdata.Tokens = field(default_factory=dict)  # zdata.encode's cache

    def pretokenize(self, examples) -> None:
        zdata.pretokenize(examples, self.tokenizer, self.task, self.tokens, self.seq_len)

    def __call__(self, examples, every_choice: bool = False) -> list[dict]:
        """``every_choice``: a multiple choice's rows are all its choices (an evaluation scores
        them), else its right one (training)."""
        out = []
        for k in range(0, len(examples), self.micro):
            batch = zdata.encode(
                examples[k : k + self.micro],
                self.tokenizer,
                self.task,
                self.seq_len,
                cache=self.tokens,
                pad_to_max_len=self.pad,
                every_choice=every_choice,
            )
            out.append({"inputs": batch.model_inputs(), "batch": batch})
        return out


def padding_share(micro_batches: list[dict]) -> float:
    """The share of the micro-batches' positions that hold padding (``metrics.jsonl``'s
    ``padding``: zoplan validate says when batches were padded, a path the calibration does not time)."""
    positions = sum(mb["inputs"]["input_ids"].numel() for mb in micro_batches)
    return 1.0 - sum(mb["batch"].token_count for mb in micro_batches) / positions


def check_inputs(
    cfg: RunConfig,
    out: Path,
    examples: list[zdata.Example],
    held: list[zdata.Example] | None,
    model_dir: Path | None,
    done: int | None = None,
) -> None:
    """What the ranks read is what the launcher recorded in run.json: the examples of --data and
    --eval-data (read again here, seconds later, and again by a restart after a rank failed) and,
    where the weights come from the model directory (no snapshot, or a read-only base), its
    weights. A file changed meanwhile would train, exit 0, on other examples or weights than the
    run records; a resume would refuse it, and so does a start or a restart."""
    from zoplan.runtime.checkpoint import weights_stamp

    # ``done``: the steps the journal holds (None: not known); with none, on one machine, the
    # launcher removes what a new run had written (nothing is lost): the same command runs it again
    again = (
        "the same command once it is back as it was"
        if done == 0 and cfg.nnodes == 1
        else f"`zoplan run --resume {out}` once it is back as it was"
    )
    for option, path, stamp, now in (
        ("--data", cfg.data, cfg.data_stamp, examples),
        ("--eval-data", cfg.eval_data, cfg.eval_data_stamp, held),
    ):
        if stamp is not None and now is not None and zdata.examples_stamp(now) != stamp:
            raise ZoplanError(
                f"{path}, the {option} of the run in {out}, changed while the run started or went on "
                f"({len(now)} examples now): its steps are taken on the examples run.json records",
                fix=f"leave the file alone while a run uses it; continue with {again}, or start a new run",
            )
    if model_dir is not None and cfg.model_weights is not None and weights_stamp(model_dir) != cfg.model_weights:
        raise ZoplanError(
            f"the weights in {model_dir} changed while the run in {out} started or went on: its journal "
            "continues the weights it started from, and would give a model that no run trained",
            fix=f"put back the checkpoint the run started from and continue with {again}, or start a new run",
        )


# what every node of a run must have been started with alike (run.json's names; the plan holds the
# model's shape, the layout and the ZO hyper-parameters, seed included): what it trains on, and
# when the ranks meet for something other than a step (an evaluation, a snapshot, a stop for
# losses that are not finite): a node that meets at another step waits at a collective the
# others never reach
AGREED = (
    "steps",
    "model_weights",
    "data_stamp",
    "eval_data_stamp",
    "eval_fraction",
    "prompt",
    "label_words",
    "pad_to_seq_len",
    "eval_every",
    "snapshot_every",
    "snapshot_minutes",
    "max_nonfinite",
)


def check_nodes_agree(cfg: RunConfig, out: Path) -> None:
    """Every rank's settings against rank 0's, before any step: nodes started with another plan,
    model, data or --steps trained on, exit 0, as if they agreed (a seed apart: other weights), or
    waited at a collective the others never reach. Every rank sees every rank's, so all refuse."""
    planned = load_plan(out / "plan.yaml").model_dump(mode="json")
    for ref in ("topology", "profile"):  # where each node keeps its files is its own
        if isinstance(planned.get(ref), dict):
            planned[ref].pop("source", None)
    what = json.dumps(planned, sort_keys=True).encode()
    # the plan's small sections whole (a node planned with another --seed or --lr is named by it,
    # not as "the plan"), the rest (a rank table of up to 4096 entries) by its digest
    sections = {k: planned.get(k) for k in ("zo", "batch", "tuning", "transfer")}
    mine = {"plan": hashlib.sha256(what).hexdigest(), **{k: getattr(cfg, k) for k in AGREED}}
    rows = zdist.gather_objects((cfg.node_rank, (mine, sections)))
    node0, (first, first_sections) = rows[0]
    for node, (theirs, their_sections) in rows:
        differ = [k for k in mine if theirs[k] != first[k]]
        if differ:
            named = [
                f"the plan's {section}.{key} {value!r} (node {node0}: {first_sections[section].get(key)!r})"
                for section, part in their_sections.items()
                if isinstance(part, dict) and isinstance(first_sections.get(section), dict)
                for key, value in sorted(part.items())
                if first_sections[section].get(key) != value
            ]
            said = ", ".join(
                (", ".join(named) if named else "the plan")
                if k == "plan"
                else f"{runconfig_flag(k)} {theirs[k]!r} (node {node0}: {first[k]!r})"
                for k in differ
            )
            raise ZoplanError(
                f"node {node} was started otherwise than node {node0}: {said}",
                fix="start every node with the same plan, model, data and options (only --node-rank differs)",
            )


def runconfig_flag(name: str) -> str:
    """The option a run.json setting comes from (``data_stamp``: the examples of --data)."""
    names = {
        "model_weights": "the weights of --model",
        "data_stamp": "the examples of --data",
        "eval_data_stamp": "the examples of --eval-data",
    }
    return names.get(name) or runconfig.flag(name)


def train(cfg: RunConfig, out: Path, host_dir: Path) -> None:
    """Train the run whose configuration is ``out/run.json`` (the launcher completed it)."""
    from transformers import AutoTokenizer

    plan = load_plan(out / "plan.yaml")
    model_dir = cfg.model_dir
    assert model_dir is not None and cfg.device is not None, "the launcher completes the configuration"
    if cfg.device == "cpu":  # the cores this machine's ranks share: a rank alone takes them all
        torch.set_num_threads(threads_per_rank(len(plan.to_layout().gpus)))
    ctx = zdist.init(plan, cfg.device)
    check_nodes_agree(cfg, out)
    if ctx.local_rank == 0 and os.environ.get(NODES_MET_ENV):  # for the launcher (several machines)
        Path(os.environ[NODES_MET_ENV]).touch()
    # where to start: after the last complete journal line, from the newest snapshot before it.
    # Rank 0 keeps the journal; every node's first rank writes the snapshots and a prefix's initial
    # values into its own output directory (the machines need not share a disk), so each node
    # starts from its own (whether an earlier start saved those values: read before anyone writes)
    # (saved on every node, or made again on all: making them is a collective)
    prefix_saved = zdist.all_reduce_sum([0.0 if (out / ztuning.PREFIX_INIT).exists() else 1.0])[0] == 0
    if ctx.nodes == 1:
        box: list[Any] = [resume_point(out) if ctx.rank == 0 else None]
        zdist.broadcast_object(box, src=0)
        rp = box[0]
    else:
        box = [read_valid_journal(out / "journal.jsonl") if ctx.rank == 0 else None]
        zdist.broadcast_object(box, src=0)
        rp = resume_point(out, box[0])
    # weights from the newest snapshot, if any; config and tokenizer files always from the model
    # directory (older snapshots are pruned while the run goes on)
    tuning = plan.tuning.to_tuning()
    if tuning.frozen_base:  # the base as it is; a snapshot holds the adapter, the journal its updates
        model, adapter, host = load_model(model_dir, plan, ctx, host_dir)
    else:
        model, adapter, host = load_model(rp.base or model_dir, plan, ctx, host_dir, rp.replay)
    tuned = ztuning.build(model, adapter, tuning, plan.zo.seed, ctx.device, ctx.signs)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples, kind = zdata.load_examples(cfg.data)
    held = zdata.load_examples(cfg.eval_data)[0] if cfg.eval_data is not None else None
    check_inputs(
        cfg, out, examples, held, model_dir if tuning.frozen_base or rp.base is None else None, done=rp.next_step
    )
    task = zdata.task_of(kind, cfg.prompt, cfg.label_words)
    if held is not None:  # every example of --data trains; the held-out set is its own
        train_set, eval_set = examples, held
        held_out = f"from {cfg.eval_data}"
    else:
        train_set, eval_set = zdata.split(examples, cfg.eval_fraction, plan.zo.seed)
        held_out = f"{cfg.eval_fraction:g} of the data"
    if ctx.rank == 0:
        _log(
            f"rank 0: {len(train_set)} training examples, {len(eval_set)} held out ({held_out})"
            + ("" if eval_set else ": nothing is evaluated")
        )
    batcher = Batcher(tokenizer, task, plan.batch.seq_len, plan.batch.micro_batch, cfg.pad_to_seq_len)
    batcher.pretokenize(train_set)
    layout = plan.to_layout()
    engine = Engine(
        model,
        adapter,
        host,
        ctx,
        eps=plan.zo.eps,
        program=build_program(
            layout, layers=len(host.layouts), block_params=host.layouts[0].numel, frozen=tuning.frozen_base
        ),
        rank=layout.gpus[ctx.local_rank],
        spans=Spans(ctx.device, out / f"spans-rank{ctx.rank}.jsonl", keep_steps=cfg.trace_steps),
        tuned=tuned,
        barrier=zdist.exchange_barrier(ctx, host_dir.parent),
        world_sum=zdist.world_sum(ctx, host_dir.parent),
    )
    if tuned is not None:  # the adapter where the run starts: its initial values, a snapshot's, the journal's updates
        if rp.base is None or not prefix_saved:
            # a prefix's initial values gone from a node's directory (`zoplan replay` starts from
            # them) are made again, the same, before its snapshot is loaded: on every rank alike
            # (making them is a collective), whichever snapshot each node resumes from
            tuned.initialise(out, engine.base_forward, ctx.local_rank == 0, prefix_saved, agree=rank0s)
        if rp.base is not None:
            tuned.load(rp.base)
        tuned.replay(rp.replay)
    # the training loop's own host work (next batch, journal line): the program's host op
    host_op = engine.op_span if ctx.signs else (lambda kind: contextlib.nullcontext())
    # one line per rank in worker-node<N>.log: what ran where, with which perturbation kernels
    threads = torch.get_num_threads()
    _log(
        f"rank {ctx.rank}: {ctx.role} on {ctx.device} ({threads} thread{'s' if threads != 1 else ''}), signs {ctx.signs}, "
        "perturbation kernels: "
        f"{engine.kernels}, prefetch {engine.prefetch}, resident blocks {sorted(engine.kept)} holding "
        f"{sum(t.numel() for t in engine.kept.values())} elements here"
        + (", blocks as CUDA graphs from the second step" if engine.graphs is not None else "")
    )

    def loss_fn(logits, mb):
        return zdata.loss_terms(logits, mb["batch"], task)

    steps = cfg.steps
    writer = ctx.rank == 0
    if writer:
        cut_torn_tail(out / "metrics.jsonl")
    journal = open(out / "journal.jsonl", "a", buffering=1) if writer else None
    metrics = open(out / "metrics.jsonl", "a", buffering=1) if writer else None
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if writer and rp.next_step == 0 and restart == 0:  # a new run: what a row of the plan's length cuts
        head = train_set[: zdata.PRETOKENIZED]  # (those tokenised already)
        cut = zdata.cut_examples(head, tokenizer, task, batcher.tokens, plan.batch.seq_len)
        if cut:
            said = zdata.cut_note(cut, len(head), task, plan.batch.seq_len, first=len(head) < len(train_set))
            metrics.write(NoteRow(note=said).line())
        if not tuning.frozen_base and host.blocks:
            said = eps_note(host.blocks[0], plan.transfer.param_dtype, plan.zo.eps)
            if said:
                metrics.write(NoteRow(note=said).line())
        if tuning.frozen_base and host.rounded:  # the adapter learns on the base as the run holds it
            wire = plan.transfer.wire_dtype
            metrics.write(
                NoteRow(
                    note=f"the adapter is trained and evaluated on the base model's blocks rounded to {wire} (the "
                    f"host copy's dtype, --wire-dtype {wire}; the checkpoint holds wider values): loaded onto "
                    f"{model_dir} its figures differ slightly; load it onto the base rounded the same way to "
                    f"reproduce them, or plan with --wire-dtype {plan.transfer.param_dtype}"
                ).line()
            )
    # a sample of the first block's host copy as a new run starts: how much of it the run's updates
    # changed is said at its end where it is next to nothing (updates under the host copy's spacing)
    watched = (
        host.blocks[0][:WATCHED].clone()
        if writer and rp.next_step == 0 and restart == 0 and not tuning.frozen_base and host.blocks
        else None
    )
    if writer and (rp.next_step > 0 or restart > 0):
        # where this start picks up (after --resume, or after torchrun restarted crashed ranks,
        # before the first step's journal line too): the progress display says so, and
        # metrics.jsonl keeps it
        resumed = ResumedRow(
            resumed_at=rp.next_step,
            snapshot=rp.base.name if rp.base is not None else None,
            replayed=len(rp.replay),
            restart=restart,
        )
        metrics.write(resumed.line())
        _log(
            f"rank 0: resuming after step {rp.next_step}: "
            f"{'snapshot ' + resumed.snapshot if resumed.snapshot else 'the base model'} + {resumed.replayed} "
            f"journal step(s) replayed (restart {resumed.restart})"
        )
    nonfinite_in_row = nonfinite_total = 0
    held_out = (0.0, 0.0)  # the last held-out loss and accuracy (none measured: finite)
    tokens_per_step = plan.batch.global_batch * plan.batch.seq_len
    t_start = time.perf_counter()
    last_snapshot = time.monotonic()
    try:
        # 0: never (None: before and after; N: every N steps too); no held-out example: never either
        # (the run's summary says so), rather than rows of zeros for an evaluation of nothing
        evaluating = cfg.eval_every != 0 and len(eval_set) > 0
        if rp.next_step == 0 and evaluating:
            # the held-out loss before any update: the baseline the final evaluation is read against
            evaluate(engine, eval_set, batcher, ctx, -1, metrics)
        for step in range(rp.next_step, steps):
            # a step's time and spans run from its batch to its journal line: the training loop's
            # own host work ("loop") is part of every step, as the planner counts it
            t0 = time.perf_counter()
            engine.spans.begin(step)
            mine: list = []
            with host_op(Kind.HOST):
                if ctx.replica is not None:
                    shard = zdata.batches(
                        train_set, plan.batch.global_batch, plan.zo.seed, step, ctx.replica, ctx.replicas
                    )
                    mine = batcher(shard)
            seed = step_seed(plan.zo.seed, step)
            lr = learning_rate(plan.zo.lr, plan.zo.lr_schedule, step, steps)
            result = engine.step(mine, seed, lr, plan.zo.weight_decay, loss_fn)
            faults.hit("kill", ctx.rank, step)
            faults.hit("exit", ctx.rank, step)
            faults.hit("raise", ctx.rank, step)
            if result.finite:
                nonfinite_in_row = 0
            else:
                nonfinite_in_row += 1
                nonfinite_total += 1
            if writer:
                with host_op(Kind.HOST):
                    write_line(
                        journal,
                        {
                            "step": step,
                            "seed": seed,
                            "loss_plus": result.loss_plus,
                            "loss_minus": result.loss_minus,
                            "projected_grad": result.projected_grad,
                            "lr": lr,
                            "eps": plan.zo.eps,
                            "weight_decay": plan.zo.weight_decay,
                            "skipped": not result.finite,
                        },
                        sync=(step + 1) % cfg.journal_sync_every == 0,
                    )
            engine.spans.end()
            dt = time.perf_counter() - t0
            if writer:
                metrics.write(
                    TrainRow(
                        step=step,
                        loss=(result.loss_plus + result.loss_minus) / 2,
                        projected_grad=result.projected_grad,
                        step_time_s=dt,
                        tokens_per_s=tokens_per_step / dt,
                        elapsed_s=time.perf_counter() - t_start,
                        nonfinite_total=nonfinite_total,
                        padding=padding_share(mine) if mine else None,
                        lr=lr,
                    ).line()
                )
            if nonfinite_in_row >= cfg.max_nonfinite:
                raise ZoplanError(
                    f"the loss was not finite for {nonfinite_in_row} steps in a row (up to step {step}); "
                    f"the updates of those steps were skipped",
                    fix="lower --lr or --eps, or check the data",
                )
            if step + 1 == steps and nonfinite_in_row == steps - rp.next_step:
                # fewer steps than --max-nonfinite, every one skipped: nothing was trained (exit 0 said
                # "3 step(s) skipped" over the weights it started from)
                raise ZoplanError(
                    f"the loss was not finite in any of the {nonfinite_in_row} step(s) this run took (steps "
                    f"{rp.next_step} to {step}): every update was skipped, nothing was trained",
                    fix="lower --lr or --eps (MeZO's eps is 1e-3), or check the data",
                )
            if evaluating and (cfg.eval_every and (step + 1) % cfg.eval_every == 0 or step + 1 == steps):
                engine.flush()
                if step + 1 == steps:  # the last: of the weights as written (resident blocks rounded)
                    engine.resident_as_saved()
                held_out = evaluate(engine, eval_set, batcher, ctx, step, metrics)
            due = bool(cfg.snapshot_every and (step + 1) % cfg.snapshot_every == 0)
            if cfg.snapshot_minutes:
                # the clock is rank 0's: every rank must take the same decision
                late = time.monotonic() - last_snapshot >= cfg.snapshot_minutes * 60 if ctx.rank == 0 else False
                due = due or zdist.all_reduce_sum([1.0 if late else 0.0])[0] > 0
            if due and step + 1 < steps:
                snapshot(engine, host, model_dir, out, step + 1, plan, ctx, cfg.keep_snapshots)
                last_snapshot = time.monotonic()
        if evaluating and rp.next_step >= steps > 0:
            # nothing left to train (a restart after the last step's journal line): the final
            # evaluation, which the step's end may not have reached, is made here
            engine.flush()
            engine.resident_as_saved()
            held_out = evaluate(engine, eval_set, batcher, ctx, steps - 1, metrics)
        if nonfinite_in_row or not math.isfinite(held_out[0]):
            # a run that ends on steps skipped for losses not finite, or whose weights give a held-out
            # loss that is not: weights no one can use (fp16 activations overflowing), which exit 0
            # wrote as the run's model
            last = f"its last {nonfinite_in_row} step(s) had losses that are not finite (their updates skipped)"
            raise ZoplanError(
                "the run ended on weights whose loss is not finite: "
                + (last if nonfinite_in_row else f"the held-out loss after step {steps - 1} is {held_out[0]}")
                + "; no model/ is written",
                fix="start again with a lower --lr or --eps (MeZO's eps is 1e-3), or a wider dtype (bf16 or fp32 "
                "instead of fp16)",
            )
        engine.flush()
        engine.sync_resident_blocks_to_host()
        zdist.barrier()
        if watched is not None and steps >= STALL_STEPS:
            said = updates_note(watched, host.blocks[0][: watched.numel()], plan, steps)
            if said:
                metrics.write(NoteRow(note=said).line())
        if writer:
            save_final(host, engine, model_dir, out, plan.transfer.param_dtype, steps)
        zdist.barrier()
        # the run is complete on every rank: a rank that dies while shutting down (a rare gloo
        # teardown abort) no longer turns a finished run into a failed one (launch.py reads these)
        (out / finished_marker(ctx.node, ctx.local_rank)).write_text(str(steps))
        faults.hit("abort-at-exit", ctx.rank)
    finally:
        engine.spans.close()
        if journal:
            journal.close()
            metrics.close()
        if ctx.is_loader:
            host.remove()


def rank0s(values: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``values`` on every rank."""
    box = [values]
    zdist.broadcast_object(box, src=0)
    return box[0]


def write_error(out: Path, exc: ZoplanError, rank: int, kind: str = "error") -> None:
    """error.json: the message the launcher shows when the ranks stop (a full disk may refuse it
    too: the launcher then names the disk from the log)."""
    if not records.write_rank_error(out, RankError(rank=rank, kind=kind, message=exc.message, fix=exc.fix)):
        _log(f"error: {exc.message}")


def snapshot(engine: Engine, host: HostCopy, model_dir: Path, out: Path, step: int, plan: Plan, ctx, keep: int) -> None:
    """Every rank flushes; every node's first rank writes its node's host copy into its own output
    directory (the nodes' copies are the same to the bit); a failure stops every rank, with the
    writer's message on its node and a pointer to it on the others."""
    engine.flush()
    engine.sync_resident_blocks_to_host()
    zdist.barrier()
    error: ZoplanError | None = None
    if ctx.local_rank == 0:
        try:
            write_snapshot(
                out,
                step,
                lambda d: write_weights(host, engine, model_dir, d, plan.transfer.param_dtype),
                keep,
                ctx.rank,
            )
        except ZoplanError as exc:
            error = exc
            # on disk before any rank learns of it: the first rank to exit makes torchrun stop
            # the others, possibly before this one reaches its own error handler
            write_error(out, exc, ctx.rank, kind="disk" if isinstance(exc, DiskFull) else "error")
    if zdist.all_reduce_sum([1.0 if error else 0.0])[0] > 0:
        raise error or ZoplanError(
            f"writing the snapshot of step {step} failed on "
            + (
                "rank 0 (see error.json)"
                if ctx.nodes == 1
                else "another node (see the error.json of its output directory)"
            )
        )


def evaluate(engine: Engine, eval_set, batcher: Batcher, ctx, step: int, metrics) -> tuple[float, float]:
    """The held-out loss and accuracy (the same on every rank) as an ``EvalRow`` (rank 0 writes
    it); called only with held-out examples (``evaluating`` in ``train``: an empty set's loss is
    not 0)."""
    mine: list = []
    if ctx.replica is not None:
        per = -(-len(eval_set) // ctx.replicas)
        shard = eval_set[ctx.replica * per : (ctx.replica + 1) * per]
        mine = batcher(shard, every_choice=True) if shard else []
    task = batcher.task
    stats = engine.evaluate(
        mine,
        lambda logits, mb: zdata.loss_terms(logits, mb["batch"], task),
        lambda logits, mb: zdata.accuracy(logits, mb["batch"], task),
    )
    if metrics is not None:
        metrics.write(EvalRow(step=step, eval_loss=stats[0], eval_accuracy=stats[1]).line())
    return stats


def main(argv: list[str] | None = None) -> None:
    """One rank: ``argv`` as on the command line (the rank supervisor, runtime/ranks.py, passes it
    to a forked child; torchrun starts ``python -m zoplan.runtime.worker``)."""
    parser = argparse.ArgumentParser(description="one rank of zoplan run (started by torchrun or runtime/ranks.py)")
    parser.add_argument("config", type=Path, help="the run's configuration, OUTPUT/run.json (zoplan.runconfig)")
    parser.add_argument(
        "--host-dir", type=Path, required=True, help="this launch's host copy on this machine (zoplan run removes it)"
    )
    args = parser.parse_args(argv)
    out = args.config.parent
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0" and records.read_error(out) is not None:
        # An earlier attempt of this launch stopped itself (error.json, which the launcher removes
        # when it starts, says why). The rank supervisor never restarts such a stop; torchrun (runs
        # of several machines) restarts any failed attempt, and a restart would only hide it: the
        # counts start again, and a run of nothing but skipped steps would end with exit 0.
        raise SystemExit(STOPPED)
    # a rank whose torchrun is gone (killed) stops at once instead of training on, orphaned: the
    # journal holds every completed step
    from zoplan.runtime.signals import die_with_parent

    die_with_parent(signal.SIGKILL)
    if "RANK" in os.environ:  # zoplan-rank<N> in ps and top (the rank supervisor names its ranks itself)
        from zoplan.runtime.scratch import RANK_NAME, name_process

        name_process(f"{RANK_NAME}{os.environ['RANK']}")
    try:
        train(runconfig.read(args.config), out, args.host_dir)
    except (ZoplanError, OSError) as exc:
        kind = "disk" if isinstance(exc, DiskFull) else "error"
        if isinstance(exc, OSError):
            if exc.errno not in DISK_ERRNOS:
                raise
            if shared_memory_is_short(args.host_dir, out):  # the ranks' small files after the host copy
                kind, exc = "error", short_of_shared_memory(args.host_dir)
            else:
                kind = "disk"
                exc = ZoplanError(
                    f"the disk holding {out} is full or read-only ({exc.strerror}); the journal holds every "
                    "completed step",
                    fix=f"free disk space, then `zoplan run --resume {out}`",
                )
        write_error(out, exc, int(os.environ.get("RANK", "0")), kind)  # rank 0's account first, else the first one's
        raise SystemExit(STOPPED) from None  # the supervisor does not restart it
    finally:
        zdist.shutdown()


if __name__ == "__main__":
    main()
