"""``zoplan run``: check everything a user can get wrong, then start torchrun and show progress.

All checks happen here, before any process starts or any file is written: the plan against the
model and the machine, the data, the batch shape, the output directory. The ranks then train
(worker.py); this process follows ``metrics.jsonl`` to draw the progress display.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Mapping, Sequence

from zoplan import runconfig
from zoplan.errors import Refused, ZoplanError
from zoplan.fileio import write_fix
from zoplan.models import TINY_LR, TINY_MODELS, ModelShape, load_model_shape, tiny_name
from zoplan.planfile import Plan, check_plan_matches, load_plan, write_plan
from zoplan.runconfig import RunConfig
from zoplan.recipes import recipe, with_recipe
from zoplan.tuning import default_eps, default_lr
from zoplan.records import (
    ERROR_FILE,
    EvalRow,
    NoteRow,
    ResumedRow,
    RunSummary,
    StallCheck,
    TrainRow,
    read_error,
    read_metrics,
    summarize,
)
from zoplan.runtime.checkpoint import check_model_dir, weights_stamp
from zoplan.runtime.signals import STOPPING, deferred, die_with_parent, signals_held
from zoplan.runtime.scratch import owned, owner_of, port_claimed, run_lock, shared_memory, sweep
from zoplan.runtime.watch import ProgressWatch
from zoplan.runtime.rankserver import SERVER_ENV, ServedProcess, request
from zoplan.topology import Machine, load_topology
from zoplan.topology.container import Limits, oom_kills, read_limits
from zoplan.sim.costs import gib
from zoplan.vocab import Meetings, local_meetings, run_meetings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_port_free(port: int) -> None:
    """Node 0's torchrun listens on ``port``: one in use would end the run with a rank's traceback."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a server does: a closed run's TIME_WAIT is no use
        try:
            s.bind(("", port))
        except OSError as exc:
            raise ZoplanError(
                f"--master-port {port} is in use on this machine ({exc.strerror or exc})",
                fix="choose another port (the same on every machine), or leave it out on a "
                "single machine: a free one is picked",
            ) from None


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _is_cpu_machine(machine) -> bool:
    return bool(machine.gpus) and all(machine.gpu_model(g).kind == "cpu" for g in machine.gpus)


# glibc's allocator returns a freed block of 128 KiB or more to the kernel at once, and the next
# allocation of that size takes fresh pages, zeroed by the kernel on first touch. A ZO step
# allocates and frees such temporaries all the time (z chunks, perturbed weights, logits): a CPU
# rank spent up to half its time in the kernel. Larger thresholds keep freed memory for reuse
# (measured: docs/results/runtime-cpu.md). Other C libraries ignore these variables.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**30)}


# set beside the OMP_NUM_THREADS=1 the ranks start with where the user set none: the rank then
# takes its share of the cores (zoplan.runtime.worker.threads_per_rank); without it, the user's
# OMP_NUM_THREADS is the rank's thread count
SHARE_THREADS_ENV = "ZOPLAN_SHARE_THREADS"
# on several machines: the file each node's first rank makes once every node has met and agreed
# (zoplan.runtime.worker.check_nodes_agree), and how long a launcher waits for it before saying so
NODES_MET_ENV = "ZOPLAN_NODES_MET"
NODES_NOTE_AFTER_S = 15.0  # (ZOPLAN_NODES_NOTE_AFTER_S, read as a run starts, for tests)


# how long a node waits for the others to come (torchrun's rendezvous: 900 s), in minutes
RENDEZVOUS_WAIT_MIN = 15
# what a rank's log says when a peer on another machine has not answered for torch.distributed's
# timeout (10 minutes: a rank of another node stopped by SIGSTOP, hung, or its machine gone quiet)
PEER_SILENT = (
    "Timed out waiting",
    "wait timeout after",
    "DistStoreError",
    "Timed out after",
)
# what a rank's collective says when a peer on another machine has gone (gloo's TCP pairs, NCCL)
PEER_LOST = (
    "Connection reset by peer",
    "Connection closed by peer",
    "Broken pipe",
    "Connection refused",
    "NCCL communicator was aborted",
    "remote process exited or there was a network error",
)


class NothingDone(Refused):
    """A new run stopped (a signal, Ctrl-C) or refused before anything worth keeping: before its
    first step, or on several machines before they met. What it wrote goes, so the same command
    runs again."""


def rank_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment of the rank processes (a user's own setting of a variable is kept): one
    thread each to start with where the user set no OMP_NUM_THREADS (a CPU rank then takes its
    share of the cores: zoplan.runtime.worker.threads_per_rank), unbuffered output, the allocator
    settings. Applied to its own result, it gives it again (the rank server compares them)."""
    env = {**MALLOC_ENV, **environ, "PYTHONUNBUFFERED": "1"}
    if "OMP_NUM_THREADS" not in environ:
        env.update({"OMP_NUM_THREADS": "1", SHARE_THREADS_ENV: "1"})
    return env


def cuda_env(machine_gpus: Sequence[str], local_gpus: Sequence[str], environ: Mapping[str, str]) -> dict[str, str]:
    """The environment that puts local rank k on ``local_gpus[k]``, a GPU of the topology.

    A topology lists a machine's GPUs in nvidia-smi's order (``zoplan topo import`` and ``detect``
    keep its GPU<N> numbering), so its i-th GPU is CUDA device i once ``CUDA_DEVICE_ORDER`` is
    ``PCI_BUS_ID``: CUDA's default order (fastest first) can differ from nvidia-smi's. A
    ``CUDA_VISIBLE_DEVICES`` set by the user is taken as the machine the topology describes: its
    i-th entry is the topology's i-th GPU. Each rank then uses ``cuda:<local rank>``, which is the
    GPU the plan placed it on (a plan that spreads its ranks over PCIe switches runs spread)."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    devices = [d.strip() for d in visible.split(",") if d.strip()] if visible is not None else None
    chosen = []
    for gpu in local_gpus:
        i = list(machine_gpus).index(gpu)
        if devices is None:
            chosen.append(str(i))
        elif i < len(devices):
            chosen.append(devices[i])
        else:
            raise ZoplanError(
                f"the plan places a rank on {gpu}, the topology's GPU number {i}, but "
                f"CUDA_VISIBLE_DEVICES={visible!r} lists {len(devices)} device(s)",
                fix="unset CUDA_VISIBLE_DEVICES, or list every GPU the topology describes",
            )
    return {
        "CUDA_DEVICE_ORDER": environ.get("CUDA_DEVICE_ORDER", "PCI_BUS_ID"),
        "CUDA_VISIBLE_DEVICES": ",".join(chosen),
    }


def check_gpus_here(machine, gpus: Sequence[str], device_names: Sequence[str]) -> list[str]:
    """Refuse a GPU plan this machine cannot run (fewer CUDA devices than the plan's GPUs need);
    return a warning for each device of another model than the topology's preset says: the plan
    runs, but its prediction is for other GPUs. ``device_names``: torch's names of this machine's
    devices, in the topology's order."""
    from zoplan.topology.presets import PRESETS
    from zoplan.topology.detect import gpu_preset_for

    fix = "plan for this machine: zoplan topo detect -o machine.yaml; zoplan plan -t machine.yaml ..."
    need = max(list(machine.gpus).index(g) for g in gpus) + 1
    if len(device_names) < need:
        raise ZoplanError(
            f"the plan runs on {', '.join(gpus)} of '{machine.name}', which needs {need} CUDA "
            f"device(s), but torch sees {len(device_names)} here",
            fix=fix,
        )
    warnings = []
    for g in gpus:
        planned = machine.gpu_model_name(g)
        name = device_names[list(machine.gpus).index(g)]
        if planned not in PRESETS:
            continue  # a GPU model the topology defines itself: nothing to compare with
        try:
            here = gpu_preset_for(name).name
        except ZoplanError:
            here = None  # a GPU no preset describes (a variant): certainly not the planned one
        if here != planned:
            warnings.append(
                f"the plan puts a rank on {g} ({planned} in '{machine.name}'), but that device "
                f"here is {name}: the run is not the one predicted ({fix})"
            )
    return warnings


def _device_names() -> list[str]:
    """torch's names of this machine's CUDA devices, asked in a child process: querying them here
    would keep a CUDA context (hundreds of MiB of GPU memory) in this process for the whole run."""
    code = (
        "import json, torch; print(json.dumps([torch.cuda.get_device_name(i) "
        "for i in range(torch.cuda.device_count())]))"
    )
    # numbered as nvidia-smi and the topologies number them (cuda_env), in the child only: this
    # process may be a user's own (fine_tune), whose later CUDA devices keep their numbers
    env = {**os.environ, "CUDA_DEVICE_ORDER": os.environ.get("CUDA_DEVICE_ORDER", "PCI_BUS_ID")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise ZoplanError(
            f"could not list the CUDA devices: {proc.stderr.strip()[-300:]}", fix="check the driver with nvidia-smi"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plan_gpus(plan: Plan) -> list[str]:
    """The GPU of each local rank, in local-rank order (every node has the same ranks)."""
    ranks = sorted((r for r in plan.layout.ranks if r.node == 0), key=lambda r: r.local_rank)
    return [r.gpu for r in ranks]


def prepare(cfg: RunConfig, resume: bool = False) -> tuple[RunConfig, Plan, Machine]:
    """Check everything, then write ``plan.yaml`` and ``run.json`` into the output directory;
    return the configuration the ranks read (completed: the model's directory, the device kind),
    the plan and its machine (read once)."""
    from zoplan.planfile import zo_settings
    from zoplan.planner import plan as make_plan
    from zoplan.runtime import data as zdata
    from zoplan.runtime.tiny import resolve_model

    out = cfg.output
    if resume:
        return _prepare_resume(cfg)
    parent = runconfig.enclosing_run(out)
    if parent is not None:  # (a finished run there replaces its model/, which held this run whole)
        raise ZoplanError(
            f"{out} is inside {parent}, the output directory of another run: that run writes its model/, "
            "snapshots/ and logs there, and removes what stands in their way",
            fix="choose an --output directory outside it",
        )
    if out.exists() and any(not p.name.startswith(".lock-node") for p in out.iterdir()):
        raise ZoplanError(
            f"output directory {out} is not empty: a previous run's output is not overwritten",
            fix="choose a new --output directory, remove the old one, or continue it with --resume",
        )
    plan = load_plan(cfg.plan) if cfg.plan is not None else None  # first: it needs no model
    if cfg.model in TINY_MODELS and Path(cfg.model).exists():
        warn(
            f"--model {cfg.model} is zoplan's built-in model of that name: {Path(cfg.model).resolve()} is not "
            f"read (--model ./{cfg.model} trains it)"
        )
    model_dir = resolve_model(cfg.model)
    config = model_dir / "config.json"
    shape = load_model_shape(str(config))
    check_model_dir(model_dir)  # weights present, whole, of the config's shape; a tokenizer
    if plan is not None:
        check_plan_matches(plan, shape=shape, plan_path=cfg.plan)
        from zoplan.planner import planned_machine

        machine = planned_machine(plan, cfg.plan)
        check_plan_matches(plan, machine=machine, plan_path=cfg.plan)
        from zoplan.sim.costs import Workload
        from zoplan.planner import check_fits

        workload = Workload(shape, plan.batch.global_batch, plan.batch.seq_len, plan.tuning.to_tuning())
        check_fits(machine, workload, plan.to_layout(), cfg.plan)
    else:
        # plan for this machine: the CPU ranks of cpu-local, unless a topology is named
        from zoplan.runtime.tiny import TINY

        tuning = cfg.to_tuning()
        lr = cfg.lr if cfg.lr is not None else (TINY_LR if cfg.model in TINY else default_lr(tuning))
        eps = cfg.eps if cfg.eps is not None else default_eps(tuning)
        zo = zo_settings(
            **{k: v for k, v in (("lr", lr), ("eps", eps), ("seed", cfg.seed)) if v is not None}, steps=cfg.steps
        )
        machine = load_topology(cfg.topology)
        # bf16 matrix products are slower than fp32 on CPUs (docs/results/cpu-figures.md)
        dtype = "fp32" if _is_cpu_machine(machine) else "bf16"
        # the host copy keeps the compute dtype unless pinned otherwise: resuming and replaying are
        # then bit-identical, and no update is lost to rounding the master weights
        pins = cfg.pins if cfg.pins.wire_dtype else dataclasses.replace(cfg.pins, wire_dtype=dtype)
        if cfg.nnodes > machine.spec.nodes:
            raise ZoplanError(
                f"--nnodes {cfg.nnodes}, but the topology '{machine.name}' is of {machine.spec.nodes} node(s)",
                fix=f"give --topology a topology file with the line `nodes: {cfg.nnodes}` (and a `network:` between them), "
                "or leave --nnodes out",
            )
        pins = dataclasses.replace(pins, nodes=cfg.nnodes)  # the run's machines, of the topology's nodes
        plan = make_plan(
            str(config),
            machine,
            global_batch=cfg.global_batch,
            seq_len=cfg.seq_len,
            pins=pins,
            dtype=dtype,
            top=1,
            zo=zo,
            tuning=tuning,
        ).plan
    device = _device_for(machine, plan)
    _check_nodes(plan, cfg)
    check_container_memory(plan, machine, shape)
    data = cfg.data
    if data == zdata.LONG_TEXT:  # written for this plan's sequence length, kept with the run
        with _new_run_writes(out):
            out.mkdir(parents=True, exist_ok=True)
            data = str(
                zdata.write_long_text(
                    out / f"{zdata.LONG_TEXT}.jsonl", plan.batch.seq_len, records=max(64, 2 * plan.batch.global_batch)
                )
            )
    examples, kind = zdata.load_examples(data)
    if cfg.recipe is not None and recipe(cfg.recipe).kind != kind:
        expected = recipe(cfg.recipe)
        raise ZoplanError(
            f"recipe {cfg.recipe} reads {expected.kind} records {expected.records}, but {data} is {zdata.a_set(kind)} "
            f"(records of {zdata.SHAPES[kind]})",
            fix="give data of the recipe's shape (`zoplan recipes list` shows the records each reads), or leave --recipe out",
        )
    fields = RunConfig.model_fields
    for name in ("prompt", "label_words"):  # a classification's: refused rather than ignored elsewhere
        if kind != "classification" and getattr(cfg, name) != fields[name].default:
            raise ZoplanError(
                f"--{name.replace('_', '-')} applies to classification (labelled) data, but {data} is {zdata.a_set(kind)} "
                f"(records of {zdata.SHAPES[kind]})",
                fix=f"leave out --{name.replace('_', '-')}, or give labelled data",
            )
    task = zdata.task_of(kind, cfg.prompt, cfg.label_words)  # the task the worker builds
    zdata.check_labels(examples, task, data)
    bare = cfg.prompt.rstrip(" \t")
    if kind == "classification" and bare != cfg.prompt:  # (a recipe's prompt may end in a newline)
        warn(
            f"--prompt {cfg.prompt!r} ends in a space, and each label word is read after a space of its own "
            f"({task.label_words[0]!r}): the model reads both (--prompt {bare!r} reads one)"
        )
    if len(examples) < plan.batch.global_batch:
        raise ZoplanError(
            f"{data} has {len(examples)} example{'s' if len(examples) != 1 else ''}, fewer than one global batch of "
            f"{plan.batch.global_batch}",
            fix=f"give at least {plan.batch.global_batch} examples, or plan a smaller --global-batch",
        )
    if cfg.eval_data is not None:  # held out in a set of its own: it must be of the task trained
        try:
            held, held_kind = zdata.load_examples(cfg.eval_data)
        except ZoplanError as exc:  # said as --eval-data's, not --data's
            raise ZoplanError(f"--eval-data: {exc.message}", fix=exc.fix) from None
        if held_kind != kind:
            raise ZoplanError(
                f"--eval-data {cfg.eval_data} is {zdata.a_set(held_kind)} (records of {zdata.SHAPES[held_kind]}), but "
                f"--data {data} is {zdata.a_set(kind)} (records of {zdata.SHAPES[kind]}): the evaluation measures the "
                "task that is trained",
                fix="give held-out examples of the same shape as the training data",
            )
        if not held:
            raise ZoplanError(
                f"--eval-data {cfg.eval_data} holds no examples",
                fix="give a file of held-out examples, or leave --eval-data out (--eval-fraction holds some of --data out)",
            )
        zdata.check_labels(held, task, cfg.eval_data)
        train = examples
    else:  # the ranks split --data so (the same seed): what is left to train must fill a batch
        train, held = zdata.split(examples, cfg.eval_fraction, plan.zo.seed)
        if len(train) < plan.batch.global_batch:
            keeps = (len(examples) - plan.batch.global_batch) / len(examples)
            raise ZoplanError(
                f"--eval-fraction {cfg.eval_fraction:g} holds out {len(held)} of the {len(examples)} examples of "
                f"{data}, which leaves {len(train)} to train on, fewer than one global batch of "
                f"{plan.batch.global_batch}: every batch would repeat them",
                fix=f"give more examples, a smaller --eval-fraction (at most {keeps:.3g} keeps a batch), "
                "or the held-out examples in a file of their own (--eval-data)",
            )
    seen = set(train)
    both = sum(1 for example in held if example in seen)
    if both * 10 >= len(held) > 0:  # (a few repeats, as public sets have, say nothing)
        warn(
            f"{both} of the {len(held)} held-out example(s) are also training examples (the same record "
            + (
                f"in --data and --eval-data {cfg.eval_data}"
                if cfg.eval_data is not None
                else f"more than once in {data}"
            )
            + "): the held-out loss and accuracy are not measured on unseen examples alone"
        )
    with _new_run_writes(out):
        out.mkdir(parents=True, exist_ok=True)
        write_plan(plan, out / "plan.yaml")
        # local paths absolute: `--resume` may be run from any directory
        cfg = cfg.given(
            model=_recorded(cfg.model, TINY_MODELS),
            data=_recorded(data, zdata.BUNDLED_DATA),
            eval_data=_recorded(cfg.eval_data, zdata.BUNDLED_DATA) if cfg.eval_data is not None else None,
            plan=Path(_recorded(str(cfg.plan))) if cfg.plan is not None else None,
            model_dir=model_dir.resolve(),
            device=device,
            model_weights=weights_stamp(model_dir),
            data_stamp=zdata.examples_stamp(examples),
            eval_data_stamp=zdata.examples_stamp(held) if cfg.eval_data is not None else None,
            plan_stamp=runconfig.plan_stamp(out),
        )
        runconfig.write(cfg, out)
    return cfg, plan, machine


# a disk with less room than this after a rank's crash is taken as its cause
NEARLY_FULL_BYTES = 1 << 20


def _free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return NEARLY_FULL_BYTES  # (unknown: not taken as full)


def _unwritable(out: Path, node: int) -> list[Path]:
    """What a resume of the run in ``out`` writes into, appends to or removes that this user
    cannot (the run started by another user; a file made read-only; a read-only file system): a
    rank failing on it said only "a rank exited without a message", after the resume had moved the
    run's model/ aside and rewritten its run.json."""
    folders = [out, out / "snapshots"]
    files = [out / name for name in ("journal.jsonl", "metrics.jsonl", f"worker-node{node}.log")]
    files += sorted(out.glob("spans-rank*.jsonl"))
    bad = [p for p in folders if p.is_dir() and not os.access(p, os.W_OK | os.X_OK)]
    return bad + [p for p in files if p.is_file() and not os.access(p, os.W_OK)]


@contextlib.contextmanager
def _new_run_writes(out: Path) -> Iterator[None]:
    """A new run's first files (plan.yaml, run.json): one that cannot be written (a full disk)
    refuses the run, and what it wrote goes (``run``), so that the same command runs again once
    the disk has room; a half-written directory refused both that command and a resume."""
    try:
        yield
    except NothingDone:
        raise
    except ZoplanError as exc:
        raise NothingDone(exc.message, fix=exc.fix, status=exc.status) from None
    except OSError as exc:
        raise NothingDone(f"cannot write into {out}: {exc.strerror or exc}", fix=write_fix(exc, out)) from None


def check_meetings_here(machine: Machine, gpus: Sequence[str], here: Meetings) -> list[str]:
    """A warning where the plan's CPU ranks meet otherwise than the topology says (its
    ``meetings``): the run is right, but its prediction charged other meetings. ``here``: how the
    ranks will meet on this machine (zoplan.vocab.run_meetings)."""
    said = {machine.gpu_model(g).meetings for g in gpus}
    if len(gpus) < 2 or said == {here}:
        return []
    why = (
        "ZOPLAN_MEETINGS=gloo"
        if here is Meetings.COLLECTIVE and local_meetings() is Meetings.SHARED_MEMORY
        else (f"this CPU ({platform.machine() or 'unknown'})")
    )
    words = {Meetings.SHARED_MEMORY: "shared memory", Meetings.COLLECTIVE: "collective calls"}
    return [
        f"'{machine.name}' says its CPU ranks meet through {' and '.join(sorted(words[m] for m in said))}, "
        f"but here ({why}) they meet through {words[here]}: the run is not the one predicted (set "
        f"`meetings: {here}` in the topology's CPU rank model and plan again)"
    ]


# where the launcher's warnings go: stderr (zoplan run), or the caller's (fine_tune: Python warnings)
_WARN: contextvars.ContextVar[Callable[[str], None] | None] = contextvars.ContextVar("zoplan_warn", default=None)


def warn(text: str) -> None:
    """A warning of the launcher's: ``warning: TEXT`` on stderr, or the hook ``warnings_to`` set."""
    hook = _WARN.get()
    if hook is None:
        print(f"warning: {text}", file=sys.stderr, flush=True)
    else:
        hook(text)


@contextlib.contextmanager
def warnings_to(hook: Callable[[str], None]) -> Iterator[None]:
    """Within it, the launcher's warnings go to ``hook`` (without the ``warning: `` prefix)."""
    token = _WARN.set(hook)
    try:
        yield
    finally:
        _WARN.reset(token)


def _device_for(machine: Machine, plan: Plan) -> str:
    """The ranks' device kind; a GPU plan is checked against the CUDA devices of this machine,
    a CPU plan's meetings against how its ranks will meet here."""
    if _is_cpu_machine(machine):
        for warning in check_meetings_here(machine, plan_gpus(plan), run_meetings(os.environ)):
            warn(warning)
        if os.environ.get("ZOPLAN_CUDA_GRAPHS") == "1":
            warn("ZOPLAN_CUDA_GRAPHS=1 has no effect on CPU ranks")
        return "cpu"
    if not _cuda_available():
        raise ZoplanError(
            f"the plan is for GPUs of '{machine.name}' but this machine has no CUDA device",
            fix="plan for this machine (omit the plan, or --topology cpu-local)",
        )
    for warning in check_gpus_here(machine, plan_gpus(plan), _device_names()):
        warn(warning)
    return "cuda"


def check_container_memory(plan: Plan, machine: Machine, shape: ModelShape, limits: Limits | None = None) -> None:
    """The host memory the plan needs on this machine against the memory limit of this process's
    container (zoplan.topology.container), which MemTotal and the topology file do not show: a plan
    that needs more was killed by the container's out-of-memory killer once the ranks had loaded.
    What must be held (the host copy of the weights, and each CPU rank's working set) beyond the
    limit is refused; what the plan also counts for each CPU rank's process and allocator
    (GPU_RESERVE_BYTES, generous for a small model) beyond it is said as a warning."""
    from zoplan.sim.costs import GPU_RESERVE_BYTES, StepCosts, Workload

    limits = read_limits() if limits is None else limits
    if limits.memory_bytes is None:
        return
    workload = Workload(shape, plan.batch.global_batch, plan.batch.seq_len, plan.tuning.to_tuning())
    costs = StepCosts(machine, workload, plan.to_layout())
    need = costs.ram_need_bytes()
    ranks = costs.cpu_ranks()
    held = need - GPU_RESERVE_BYTES * len(ranks)
    if costs.frozen:  # read-only blocks: often the checkpoint mapped, whose pages the kernel may evict
        held -= costs.host_memory_bytes()
    what = "the host copy of the weights" + (f" and its {len(ranks)} CPU rank(s)' working sets" if ranks else "")
    limit = f"this process's container allows {gib(limits.memory_bytes)} ({limits.memory_file})"
    advice = (
        "plan for what the container allows: `zoplan topo detect -o machine.yaml` reads its limit, then "
        "`zoplan plan -t machine.yaml -o plan.yaml` (fewer resident blocks, fewer ranks); or give the "
        "container more memory"
    )
    if held > limits.memory_bytes:
        raise ZoplanError(
            f"the plan needs {gib(held)} of host memory on this machine for {what}, but {limit}: its "
            "out-of-memory killer would stop the run once the ranks had loaded",
            fix=advice,
        )
    if need > limits.memory_bytes:
        warn(
            f"the plan counts {gib(need)} of host memory on this machine ({what}, {gib(held)}, and each CPU "
            f"rank's process), and {limit}: the ranks may be killed by its out-of-memory killer; {advice}"
        )


def _killed(
    who: str, signum: int, limits: Limits, killed_before: int | None, log_path: Path, held: str, resume: str
) -> ZoplanError:
    """Why ``who`` was killed by ``signum``, as far as it can be told: by the out-of-memory killer
    of this process's container when its count of kills (``limits``, read before the ranks started:
    ``killed_before``) has risen; else what a SIGKILL or SIGBUS most often means."""
    name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else f"signal {signum}"
    killed_now = oom_kills(limits)
    if signum == signal.SIGKILL and killed_now is not None and killed_now > (killed_before or 0):
        # the container's own killer, at its limit (the machine may have plenty)
        return ZoplanError(
            f"training stopped: {who} was killed by {name}, most likely by the out-of-memory killer of this "
            f"process's container at its memory limit of {gib(limits.memory_bytes or 0)} ({limits.memory_file}: "
            f"its count of such kills rose while the ranks ran; see {log_path}); {held}",
            fix="plan for what the container allows (`zoplan topo detect -o machine.yaml` reads its limit, then "
            "`zoplan plan -t machine.yaml -o plan.yaml`: fewer resident blocks or ranks), or give the container "
            f"more memory; then {resume}",
        )
    cause = (
        ", most often by the kernel's out-of-memory killer when the machine runs out of host memory "
        "(`dmesg | grep -i oom` shows it)"
        if signum == signal.SIGKILL
        else " (a file it had mapped changed or shrank under it: the model's checkpoint, replaced "
        "during the run, or shared memory)"
        if signum == signal.SIGBUS
        else ""
    )
    return ZoplanError(
        f"training stopped: {who} was killed by {name}{cause} (see {log_path}); {held}",
        fix=(
            f"free host memory (fewer ranks per machine, a smaller micro-batch, other jobs stopped), then {resume}"
            if signum == signal.SIGKILL
            else resume
        ),
    )


def _recorded(value: str, builtin: Collection[str] = ()) -> str:
    """A local file or directory as its absolute path; a name (hub id, built-in model or data) as
    given, ``builtin``'s names too where a file or folder of that name stands in the current
    directory: the run read the built-in (resolve_model and load_examples take a name first), which
    a resume must read again."""
    path = Path(value).expanduser()
    return str(path.resolve()) if value and value not in builtin and path.exists() else value


def resume_config(out: Path, given: dict) -> tuple[RunConfig, list[str]]:
    """The configuration ``zoplan run --resume OUT`` runs: the recorded one with the options given
    again (``runconfig.resumed``); also the flags given that a resumed run ignores."""
    if not (out / "plan.yaml").exists() or not (out / runconfig.CONFIG_FILE).exists():
        raise ZoplanError(
            f"{out} holds no run to resume (no plan.yaml and {runconfig.CONFIG_FILE})",
            fix="pass the --output directory of an earlier `zoplan run`",
        )
    return runconfig.resumed(runconfig.read(out / runconfig.CONFIG_FILE), {**given, "output": out})


def _prepare_resume(cfg: RunConfig) -> tuple[RunConfig, Plan, Machine]:
    """Continue the run in ``cfg.output`` with the plan, model and data it started with."""
    from zoplan.runtime.tiny import resolve_model

    out = cfg.output
    recorded = runconfig.read(out / runconfig.CONFIG_FILE)
    runconfig.check_plan_unchanged(out, recorded)  # (before its settings are read)
    if recorded.nnodes > 1 and cfg.node_rank != recorded.node_rank:
        # node 1's directory resumed as node 0 would train every step again from the base weights,
        # and node 0's (its journal) resumed as node 1 would leave its journal unread (first: the
        # checks below read the directory as this node's, and node 1's, with snapshots and no
        # journal, was said to have lost its journal)
        raise ZoplanError(
            f"{out} is node {recorded.node_rank}'s output directory of its run (its {runconfig.CONFIG_FILE}), "
            f"but --node-rank {cfg.node_rank} was given",
            fix=f"resume it on the machine that ran node {recorded.node_rank}, with --node-rank "
            f"{recorded.node_rank} (or without --node-rank)",
        )
    plan = load_plan(out / "plan.yaml")
    bad = _unwritable(out, cfg.node_rank)
    if bad:  # checked before the resume changes anything
        import getpass

        names = ", ".join(f"{p.name if p != out else p} ({owner_of(p)}'s)" for p in bad[:4])
        raise ZoplanError(
            f"cannot resume the run in {out}: this user ({getpass.getuser()}) cannot write "
            f"{names}{f' and {len(bad) - 4} more' if len(bad) > 4 else ''}, which the run writes into",
            fix="resume as the user who started the run, or make them writable (chmod u+w, or chown)",
        )
    from zoplan.runtime.journal import check_lines, journal_bytes, parse_journal
    from zoplan.runtime.snapshots import changed_since_written, snapshots

    # the journal is what the ranks will trust: checked here, before any rank starts (consecutive
    # steps from 0, finite numbers; only a torn last line may be left out)
    journal = out / "journal.jsonl"
    rows = (
        parse_journal(journal_bytes(journal), journal, first=0, keep_unterminated=False)[0] if journal.exists() else []
    )
    check_lines(rows, plan.zo, recorded.steps, journal)  # (what the ranks replay)
    done = len(rows)
    # the steps a finished run's ranks marked (read before they are cleared below): what model/ holds
    marked = [m.read_text().strip() for m in out.glob(finished_marker(cfg.node_rank, "*"))]
    finished_at = max((int(t) for t in marked if t.isdigit()), default=None)
    remains = [
        what
        for what, there in (
            ("a model/ of its final weights", (out / "model").is_dir()),
            ("snapshots", any((out / "snapshots").glob("step-*"))),
            (f"its ranks' marks of {finished_at} finished steps", finished_at is not None),
        )
        if there
    ]
    if cfg.node_rank == 0 and not journal.exists() and remains:
        # a resume would take it for a run of no step: train from the base weights again, remove
        # the snapshots as past the journal's end, and put its model aside as the weights of step 0
        raise ZoplanError(
            f"{journal} is gone, but {out} holds {' and '.join(remains)}: the journal is the run's record of "
            "its steps, and without it the run would start again from the base weights",
            fix=f"put the journal back and resume again; to train {out}'s run from its start again on purpose, "
            f"make it an empty file first (`: > {journal}`)",
        )
    # the steps the journal ends on that were skipped (losses not finite)
    skipped_at_end = next((i for i, row in enumerate(reversed(rows)) if not row["skipped"]), len(rows))
    if cfg.node_rank == 0 and cfg.steps == done and skipped_at_end:
        # (the ranks would find nothing to train and write the weights the run refused to write)
        raise ZoplanError(
            f"the run in {out} ended on {skipped_at_end} step(s) whose losses were not finite (their "
            "updates skipped): its weights give losses that are not finite, and no model/ is written of them",
            fix="start a new run with a lower --lr or --eps (MeZO's eps is 1e-3), or a wider dtype (bf16 or fp32 "
            "instead of fp16)",
        )
    if cfg.steps < done:
        raise ZoplanError(
            f"--steps {cfg.steps} is fewer than the {done} step(s) {out} has done already",
            fix=f"--steps is the run's total: give {done} or more (`zoplan replay {out} -o DIR` rebuilds "
            f"the weights of step {done})",
        )
    started = recorded.steps  # the total the run took its steps for
    if plan.zo.lr_schedule != "constant" and cfg.steps != started:
        # the schedule's rate at a step depends on the total: another one bends it mid-run
        raise ZoplanError(
            f"--steps {cfg.steps}: the run in {out} follows a {plan.zo.lr_schedule} learning-rate schedule over "
            f"{started} steps, and its {done} step(s) so far took their rates from it; another total would "
            "restart the schedule mid-run",
            fix=f"resume with --steps {started} (or leave --steps out); to train on, start a new run from its "
            f"weights once it has finished (zoplan run -m {out / 'model'} ...)",
        )
    _check_nodes(plan, cfg)
    from zoplan.planner import planned_machine

    machine = planned_machine(plan, out / "plan.yaml")
    device = _device_for(machine, plan)
    # what the run before left that would speak for this one: its error, and its ranks' marks of
    # a finished run (with them, this run failing at the same --steps would pass for finished)
    for stale in (ERROR_FILE, *(m.name for m in out.glob(finished_marker(cfg.node_rank, "*")))):
        (out / stale).unlink(missing_ok=True)
    model_dir = resolve_model(cfg.model)
    check_model_dir(model_dir)
    check_container_memory(plan, machine, load_model_shape(str(model_dir / "config.json")))
    if cfg.model_weights is not None and weights_stamp(model_dir) != cfg.model_weights:
        raise ZoplanError(
            f"the weights in {model_dir} are not the ones the run in {out} started from: its journal "
            "continues those, and would give a model that no run trained",
            fix=f"put back the checkpoint the run started from, or start a new run (zoplan run -m {cfg.model} ...)",
        )
    for field in ("data", "eval_data"):
        # a file the run keeps in its own directory (long-text's, written for its plan) is found
        # there when the directory has moved (the examples' fingerprint, checked below, says it is
        # the same)
        recorded = getattr(cfg, field)
        if recorded is not None and Path(recorded).is_absolute() and not Path(recorded).exists():
            kept = out / Path(recorded).name
            if kept.is_file():
                cfg = cfg.given(**{field: str(kept.resolve())})
    for option, recorded in (("--data", cfg.data), ("--eval-data", cfg.eval_data)):
        # a local file the run recorded (absolute) that is gone: said here, before the ranks start
        # (they would say "does not exist" with the fix of a new run's --data, which a resume ignores)
        if recorded is not None and Path(recorded).is_absolute() and not Path(recorded).exists():
            raise ZoplanError(
                f"{recorded}, the {option} the run in {out} trained with, is gone: a resume reads the same "
                "examples in the same order",
                fix=f"put the file back at {recorded}, unchanged, and resume again; or start a new run",
            )
    from zoplan.runtime import data as zdata

    for option, recorded, stamp in (
        ("--data", cfg.data, cfg.data_stamp),
        ("--eval-data", cfg.eval_data, cfg.eval_data_stamp),
    ):
        if recorded is None or stamp is None:
            continue
        try:
            examples, _ = zdata.load_examples(recorded)
        except ZoplanError as exc:
            raise ZoplanError(f"{option} of the run in {out}: {exc.message}", fix=exc.fix) from None
        if zdata.examples_stamp(examples) != stamp:
            raise ZoplanError(
                f"{recorded}, the {option} the run in {out} trained with, holds other examples than it did "
                f"({len(examples)} now): the journal's steps were taken on the examples it held, and a resume "
                "draws its batches from them in the same order",
                fix="put the file back as it was when the run started, and resume again; or start a new run",
            )
    # a damaged snapshot is named here, where the user reads (the ranks skip it too); one of a
    # step past the journal's end (the journal was cut back) holds steps the journal no longer
    # has: the run takes those steps again, and writes their snapshots again
    for torn in sorted((out / "snapshots").glob("step-*.tmp")):  # a snapshot whose writing was interrupted
        shutil.rmtree(torn, ignore_errors=True)
    dropped, lost = _cut_metrics(out / "metrics.jsonl", done) if cfg.node_rank == 0 else (0, None)
    if dropped:
        warn(
            f"{dropped} row(s) of {out / 'metrics.jsonl'} after the journal's end (step {done}) removed: the "
            "steps they describe are taken again"
        )
    if lost is not None:
        warn(
            f"the last row of {out / 'metrics.jsonl'}, about step {lost + 1}, was cut short when the run stopped "
            "and is removed: the file has no such row for that step (journal.jsonl holds the step itself)"
        )
    found = snapshots(out, check=True)
    for step, path in found:
        if step > done and cfg.node_rank == 0:
            warn(f"snapshot {path.name} removed: the journal ends at step {done}")
            shutil.rmtree(path)
    # the snapshot the ranks will load, checked against what was written (damage that keeps a
    # file's size and header, a flipped bit, loads without a word): a changed one is moved aside
    # (kept for a look at the disk), and the run resumes from the one before it (or the base
    # weights) and replays more of the journal, to the same bits. On another node than 0 (whose
    # journal says how far the run went), its newest.
    for step, path in reversed(found):
        if step > done and cfg.node_rank == 0:
            continue  # removed above
        wrong = changed_since_written(path)
        if wrong is None:
            break
        aside = path.with_name("damaged-" + path.name)  # (not a snapshot's name: never loaded)
        if aside.exists():
            shutil.rmtree(aside)
        path.rename(aside)
        warn(
            f"snapshot {path.name} left out and moved to {aside}: {wrong}; the run resumes from an earlier "
            "one, or the base weights, and replays the journal's steps after it (to the same bits)"
        )
    final = out / "model"
    if cfg.node_rank == 0 and cfg.steps > done and final.is_dir():
        # the finished run's weights, which the run written on from here makes out of date: kept
        # under the step they hold (its ranks' marks say which: past the journal's end where it
        # was cut back), never left as the weights of a run that went on
        held = finished_at if finished_at is not None else done
        kept = out / f"model-step{held}"
        if kept.exists():  # the same step's weights, moved aside before
            shutil.rmtree(final)
        else:
            final.rename(kept)
        warn(
            f"{final} held the weights of step {held}"
            + (f" (the journal now ends at step {done})" if held != done else "")
            + f": moved to {kept}; the run goes on to step {cfg.steps} and writes {final} when it finishes"
        )
    cfg = cfg.given(model_dir=model_dir.resolve(), device=device)
    runconfig.write(cfg, out)
    return cfg, plan, machine


def ignored_note(ignored: list[str], resume: Path) -> str:
    """What a resume says of the options it was given again and does not take (configure's ``ignored``)."""
    return (
        f"{', '.join(ignored)} ignored: the run in {resume} continues with the plan, model and data it "
        f"started with ({resume / runconfig.CONFIG_FILE})"
    )


def configure(given: dict[str, Any], resume: Path | None = None) -> tuple[RunConfig, list[str]]:
    """A run's configuration from the options a user gave (RunConfig's names; the pins as a
    ``layout.Pins``), checked as far as it can be before anything starts, and the command-line
    flags among them that ``resume`` (the run to continue) ignores. ``zoplan run`` and
    ``zoplan.runtime.fine_tune`` both start here."""
    if resume is None:  # a recipe's prompt, label words and hyper-parameters, where not given
        runconfig.check_adapter_settings(given)
        given = with_recipe(given)
    planned = runconfig.planned_flags(given)
    if given.get("plan") is not None and resume is None and planned:
        # the plan fixes these: taking them silently would run something else than asked
        raise ZoplanError(
            f"{', '.join(planned)} set what the plan {given['plan']} already fixes",
            fix="leave them out, or make a new plan with them: zoplan plan ... -o plan.yaml",
        )
    ignored: list[str] = []
    if resume is not None:
        output = given.get("output")
        if output is not None and Path(output) != Path(resume):
            raise ZoplanError(
                f"--output {output} and --resume {resume} name two runs",
                fix="--resume DIR continues the run in DIR: leave --output out",
            )
        cfg, ignored = resume_config(Path(resume), {k: v for k, v in given.items() if k != "output"})
        pinned = runconfig.pin_flags(given.get("pins"))
        ignored = [f for name in ignored for f in (pinned if name == "--pins" else [name])]
    else:
        cfg = runconfig.make(**given)
    if given.get("eval_data") is not None and given.get("eval_fraction") is not None:
        raise ZoplanError(
            "--eval-data and --eval-fraction both say what is held out",
            fix="--eval-data FILE evaluates on FILE (all of --data trains); --eval-fraction F holds out F of --data",
        )
    if cfg.nnodes > 1 and cfg.master_port is None:
        raise ZoplanError(
            "--nnodes > 1 needs --master-port (the same on every machine)",
            fix="add --master-port PORT, a port free on node 0's machine (--master-addr), on every node's command",
        )
    loopback = cfg.master_addr in ("localhost", "::1") or cfg.master_addr.startswith("127.")
    if cfg.nnodes == 1 and not loopback:
        # the ranks of one machine meet on it: another address is waited on until the collectives' timeout
        raise ZoplanError(
            f"--master-addr {cfg.master_addr} is node 0's address for a run of several machines, but this run "
            "has one (--nnodes 1): its ranks meet on this machine",
            fix="leave --master-addr out, or give --nnodes and --node-rank for a run over several machines",
        )
    if cfg.node_rank >= cfg.nnodes:
        raise ZoplanError(
            f"--node-rank {cfg.node_rank} is not one of the {cfg.nnodes} node(s): 0 .. {cfg.nnodes - 1}",
            fix=f"give each machine its own --node-rank from 0 to {cfg.nnodes - 1}"
            if cfg.nnodes > 1
            else "a run over several machines needs --nnodes N (the machines it spans, as many as its plan's "
            "nodes) and --master-port on each, with its own --node-rank from 0 to N - 1",
        )
    if cfg.plan is None and resume is None:  # before the runtime (torch) is even imported
        from zoplan.search import check_pins_range, check_workload

        check_workload(None, cfg.global_batch, cfg.seq_len)
        check_pins_range(cfg.pins, cfg.global_batch)
    elif cfg.plan is not None and resume is None:  # a bad plan file, too, is refused before torch is imported
        cfg = _as_planned(cfg, load_plan(cfg.plan), steps_given="steps" in given, model_given="model" in given)
    return cfg, ignored


def _check_nodes(plan: Plan, cfg: RunConfig) -> None:
    """The plan's node count is the run's --nnodes (a run planned here is planned for --nnodes)."""
    if plan.layout.nodes == cfg.nnodes:
        return
    raise ZoplanError(
        f"the plan {cfg.plan} spans {plan.layout.nodes} node(s) but --nnodes is {cfg.nnodes}",
        fix=f"run it with --nnodes {plan.layout.nodes} (one command on each machine), or plan for "
        f"{cfg.nnodes} node{'s' if cfg.nnodes > 1 else ''} (zoplan plan --nodes {cfg.nnodes} ...)",
    )


def _as_planned(cfg: RunConfig, plan: Plan, steps_given: bool, model_given: bool) -> RunConfig:
    """``cfg`` with what ``plan`` fixes (run.json then records what runs, not the defaults the
    plan overrides), the plan's steps as the run's total unless ``--steps`` was given, and the
    plan's model where it is a built-in one and ``--model`` was not given (else it must be)."""
    model = {}
    if not model_given:
        tiny = tiny_name(plan.model.name)
        if tiny is None:
            raise ZoplanError(
                f"{cfg.plan} is for model '{plan.model.name}': say where its weights are",
                fix="pass --model DIRECTORY (or hub id) of that model",
            )
        model = {"model": tiny}
    return cfg.given(
        **model,
        topology=plan.topology.source,
        **runconfig.planned_settings(plan),
        **({} if steps_given else {"steps": plan.zo.steps}),
    )


# the switches a user may set (docs/runtime.md), and the values each takes: another value was
# ignored without a word (ZOPLAN_MEETINGS=GLOO ran shared-memory meetings)
SWITCHES = {
    "ZOPLAN_MEETINGS": ("gloo",),
    "ZOPLAN_Z_KERNEL": ("torch",),
    "ZOPLAN_PERTURB_TRITON": ("0", "1", "cpu"),
    "ZOPLAN_CUDA_GRAPHS": ("0", "1"),
    "ZOPLAN_HOST_COPY": ("copy",),
}


def check_switches(environ: Mapping[str, str]) -> None:
    """Warn of a switch set to a value it does not take (it is ignored), and refuse a
    ``ZOPLAN_FAULTS`` the ranks could not read (they failed "without a message")."""
    for name, values in SWITCHES.items():
        given = environ.get(name, "")
        if given and given not in values:
            warn(f"{name}={given!r} is not a value zoplan knows ({', '.join(values)}, or unset): it is ignored")
    faults_given = environ.get("ZOPLAN_FAULTS", "")
    if faults_given:
        from zoplan.runtime import faults

        try:
            faults.check(faults_given)
        except ValueError as exc:
            raise ZoplanError(str(exc), fix="unset ZOPLAN_FAULTS (it injects faults for tests)") from None


def run(cfg: RunConfig, resume: bool = False) -> RunSummary:
    """Run a plan (``resume``: continue the run in ``cfg.output``; see ``resume_config``): the
    output directory is locked while the run uses it; a directory this call made is removed again
    when the run is refused before anything is written into it."""
    out = cfg.output
    made = not out.exists()
    # the folders above it this call makes (-o a/b/c): a refused run removes them too, if empty
    above = [p for p in out.absolute().parents if not p.exists()] if made else []
    if made and out.parts and out.parts[0].startswith("~"):  # quoted: the shell did not expand it
        warn(
            f"-o {out} makes a folder named '{out.parts[0]}' in {Path.cwd()}, not in a home folder (a shell expands "
            "~ only outside quotes)"
        )
    check_switches(os.environ)
    for base in (shared_memory(), Path(tempfile.gettempdir())):
        sweep(base)  # what launches killed earlier left behind (runtime/scratch.py)
    # node 0 listens on --master-port: held by this launch before it is found free (two launches
    # at once each found it free)
    port = cfg.master_port if cfg.node_rank == 0 else None
    claimed = port_claimed(port) if port is not None else None
    # a resume refused by its ranks leaves the run's record as it found it (the options given this
    # time were written for the ranks to read)
    record = out / runconfig.CONFIG_FILE
    recorded = record.read_bytes() if resume and record.is_file() else None
    stopped: list[int] = []  # SIGTERM and SIGHUP stop the run from here as Ctrl-C does
    try:
        with stop_signals(stopped), run_lock(out, cfg.node_rank, cfg.nnodes), claimed or contextlib.nullcontext():
            try:
                try:
                    if port is not None:
                        check_port_free(port)
                    return _run(cfg, resume)
                except KeyboardInterrupt:
                    _stop_taken()
                    # before the ranks started (the launch says what became of a started run): a
                    # SIGTERM there killed the launcher and left run.json and plan.yaml behind
                    signum = stopped[-1] if stopped else signal.SIGINT
                    name = signal.Signals(signum).name
                    if resume:
                        raise Refused(
                            f"stopped by {name} before the ranks started; the run in {out} is as it was",
                            fix=_resume_fix(cfg),
                            status=128 + signum,
                        ) from None
                    raise _nothing_done(out, signum, "before the first step") from None
            except BaseException as exc:
                if recorded is not None and isinstance(exc, Refused) and out.is_dir():
                    record.write_bytes(recorded)
                # removed while this run holds it: a launcher refused because another run holds
                # the directory never removes it (nor that run's lock) under that run
                locks = [p for p in out.iterdir() if p.name.startswith(".lock-node")] if out.is_dir() else []
                if made and out.is_dir() and len(locks) == len(list(out.iterdir())):
                    shutil.rmtree(out, ignore_errors=True)
                elif not resume and (
                    isinstance(exc, NothingDone)
                    or (
                        isinstance(exc, Refused)
                        and cfg.nnodes == 1  # (on several machines, node 0's journal holds the steps)
                        and not _journaled_steps(out / "journal.jsonl")
                    )
                ):
                    # a new run refused before its first step, by its ranks (label words the
                    # tokenizer splits, ...) or for shared memory: nothing of it is worth keeping,
                    # and the same command, corrected, runs again in the same directory
                    if made:
                        shutil.rmtree(out, ignore_errors=True)
                    else:
                        for p in set(out.iterdir()) - set(locks):
                            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                raise
    except BaseException:
        if made:  # the lock was not taken: the directory goes only if nothing at all is in it
            with contextlib.suppress(OSError):
                out.rmdir()
            for parent in above if not out.exists() else ():  # (nearest first; only an empty one goes)
                with contextlib.suppress(OSError):
                    parent.rmdir()
        raise


def _run(cfg: RunConfig, resume: bool) -> RunSummary:
    cfg, plan, machine = prepare(cfg, resume)
    port = cfg.master_port or _free_port()
    run_id = uuid.uuid4().hex[:12] if cfg.nnodes == 1 else f"{port}-{cfg.master_addr.replace('.', '_')}"
    with contextlib.ExitStack() as owned_here:
        # this launch's host copy (shared memory) and torchrun's and the ranks' temporary files:
        # removed when the launch ends; a killed launch's are swept by the next (runtime/scratch.py)
        # A stop (SIGTERM, Ctrl-C) is held back until both are this launch's to remove: one that came
        # between a folder's making and its owning left the folder behind.
        try:
            with signals_held():
                host_dir = owned_here.enter_context(owned(shared_memory(), f"{run_id}-node{cfg.node_rank}")) / "host"
                private_tmp = owned_here.enter_context(
                    owned(Path(tempfile.gettempdir()), f"tmp-{run_id}-node{cfg.node_rank}")
                )
        except ZoplanError as exc:  # (another launch of this node on the same port): no rank has started
            raise NothingDone(exc.message, fix=exc.fix, status=exc.status) from None
        return _launch(cfg, plan, machine, port, host_dir, private_tmp, resume)


def _launch(
    cfg: RunConfig, plan: Plan, machine: Machine, port: int, host_dir: Path, private_tmp: Path, resume: bool
) -> RunSummary:
    out = cfg.output
    per_node = plan.layout.world_size // plan.layout.nodes
    # the ranks read the run's configuration (run.json) and nothing else; the host copy's folder
    # is this launch's, not a setting of the run
    # absolute: a relative -o of "./-run" reached the ranks as "-run/run.json", an option to their parser
    worker_args = [str((out / runconfig.CONFIG_FILE).absolute()), "--host-dir", str(host_dir.absolute())]
    status = private_tmp / "ranks.json"  # each rank's exit (runtime/ranks.py), read on failure
    if cfg.nnodes == 1:  # forked from one process that has imported what a rank needs (runtime/ranks.py)
        cmd = [
            sys.executable,
            "-m",
            "zoplan.runtime.ranks",
            "--nproc",
            str(per_node),
            "--master-addr",
            cfg.master_addr,
            "--master-port",
            str(port),
            "--max-restarts",
            str(cfg.max_restarts),
            "--status",
            str(status),
            "--",
            *worker_args,
        ]
    else:  # torchrun's rendezvous spans the machines
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(per_node),
            "--nnodes",
            str(cfg.nnodes),
            "--node-rank",
            str(cfg.node_rank),
            "--max-restarts",
            str(cfg.max_restarts),
            "--master-addr",
            cfg.master_addr,
            "--master-port",
            str(port),
            "-m",
            "zoplan.runtime.worker",
            *worker_args,
        ]
    env = rank_env(os.environ)
    env["TMPDIR"] = str(private_tmp)
    met = private_tmp / "nodes-met" if cfg.nnodes > 1 else None
    if met is not None:
        env[NODES_MET_ENV] = str(met)
    if cfg.device == "cuda":
        env.update(cuda_env(machine.gpus, plan_gpus(plan), os.environ))
    try:
        log = open(out / f"worker-node{cfg.node_rank}.log", "a")
    except OSError as exc:  # (a resume checked it first: a new run's directory, changed meanwhile)
        raise NothingDone(
            f"cannot write {out / f'worker-node{cfg.node_rank}.log'}: {exc.strerror or exc}", fix=write_fix(exc, out)
        ) from None
    since = log.tell()  # what earlier launches wrote is not this launch's story
    limits = read_limits()  # a container's: its out-of-memory kills, counted from here
    killed_before = oom_kills(limits)
    stopped: list[int] = []
    try:
        with stop_signals(stopped), ranks_running(cmd, log, env) as proc:
            _follow(proc, out / "metrics.jsonl", cfg, met, port)
    except KeyboardInterrupt:
        _stop_taken()
        signum = stopped[0] if stopped else signal.SIGINT
        if _finished(out, cfg.node_rank, per_node, cfg.steps):
            # the ranks finished before they could be stopped (a supervisor that could not stop
            # them in time, a stop at the very end): the run is whole, nothing is left to resume
            log.close()
            warn(
                f"{signal.Signals(signum).name} came when the run had finished on every rank: its weights and "
                f"journal are complete"
            )
            return summarize(out)
        never_met = met is not None and not met.exists()
        if not resume and (never_met if met is not None else not _journaled_steps(out / "journal.jsonl")):
            raise _nothing_done(
                out,
                signum,
                "while waiting for the other node(s): they never all met" if never_met else "before the first step",
            ) from None
        after = (
            f" after {_journaled_steps(out / 'journal.jsonl')} completed step(s) of {cfg.steps}"
            if cfg.node_rank == 0
            else ""  # node 0 writes the journal
        )
        raise ZoplanError(
            f"stopped by {signal.Signals(signum).name}{after}; the ranks have stopped and "
            f"{_the_journal(cfg)} holds every completed step",
            fix=_resume_fix(cfg),
            status=128 + signum,
        ) from None
    finally:
        log.close()
    # The ranks have exited: a stop signal from here on has nothing to stop. Raised after this
    # point, its KeyboardInterrupt would reach run() as a stop "before the first step", which
    # removes what the run wrote: a finished run's model and journal.
    _stop_taken()
    if not (out / runconfig.CONFIG_FILE).is_file():  # rm -rf OUT while the ranks trained on
        raise ZoplanError(
            f"the output directory {out} was removed or emptied while the run went on (its "
            f"{runconfig.CONFIG_FILE} and journal are gone): what the ranks wrote after is no run to resume",
            fix=f"remove {out} and start the run again",
        )
    if proc.returncode != 0 and _finished(out, cfg.node_rank, per_node, cfg.steps):
        warn(
            f"the run's processes exited with status {proc.returncode} while shutting down, after "
            f"the run had finished on every rank (see {out / f'worker-node{cfg.node_rank}.log'})"
        )
    elif proc.returncode != 0:
        # a new run over several machines whose nodes never all met: nothing was trained, so what it
        # wrote goes and the same command (corrected) runs again (it found the directory not empty)
        never_met = not resume and met is not None and not met.exists()
        error = read_error(out)  # a rank's own account (records.RankError), as it wrote it
        if error is not None:
            if error.kind == "error" and never_met:  # (refused before they met: nodes started otherwise)
                raise NothingDone(error.message, fix=error.fix)
            raise (Refused if error.kind == "error" else ZoplanError)(error.message, fix=error.fix)
        done = _journaled_steps(out / "journal.jsonl")
        held = (
            f"the journal holds {done} completed step(s)" if cfg.node_rank == 0 else f"{_the_journal(cfg)} holds them"
        ) + ", none is lost"
        log_path = out / f"worker-node{cfg.node_rank}.log"
        resume = _resume_fix(cfg)  # (from here, what continues the run)
        if "No space left on device" in _log_tail(log_path, since):
            raise ZoplanError(
                f"training stopped: the disk holding {out} is full (see {log_path}); {held}",
                fix=f"free disk space, then {resume}",
            )
        if getattr(proc, "server_gone", False):
            raise ZoplanError(
                f"training stopped: the rank server {os.environ.get(SERVER_ENV)} that started this run's ranks "
                f"stopped, and they with it (see {log_path}); {held}",
                fix=f"{resume}, with the server running again (or without {SERVER_ENV}: the ranks start here)",
            )
        starter = "torchrun" if cfg.nnodes > 1 else "the rank supervisor (zoplan.runtime.ranks)"
        ended_by = _rank_signal(log_path, status, since)
        who = (
            f"{starter} (which stopped the ranks)"
            if proc.returncode < 0
            else "a rank"
            if ended_by is not None
            else None
        )
        if who is not None:
            signum = -proc.returncode if proc.returncode < 0 else ended_by or signal.SIGKILL
            raise _killed(who, signum, limits, killed_before, log_path, held, resume)
        tail = _log_tail(log_path, since)
        trouble = _nodes_trouble(cfg, log_path, tail, never_met, held, resume)
        if trouble is not None:
            raise trouble
        free = _free_bytes(out)
        if free < NEARLY_FULL_BYTES:  # too full for the ranks to write their error, or even their log
            raise ZoplanError(
                f"training stopped: the disk holding {out} is full ({free // 1024} KiB free: the ranks could "
                f"not write why they stopped; see {log_path}); {held}",
                fix=f"free disk space, then {resume}",
            )
        restarts = f"{resume}; --max-restarts N restarts crashed ranks automatically" if cfg.nnodes == 1 else resume
        failure = _raised(tail)
        if failure is not None:  # a traceback in the log: an exception zoplan does not expect
            raise ZoplanError(
                f"training stopped: a rank failed with {failure} ({starter.split(' (')[0]}'s exit status "
                f"{proc.returncode}; the traceback is in {log_path}); {held}",
                fix=f"{restarts}. The same failure again is a bug in zoplan or a library version it does not "
                f"support ({_libraries()}): report it with that log",
            )
        raise ZoplanError(
            f"training stopped: a rank exited without a message ({starter.split(' (')[0]}'s exit status "
            f"{proc.returncode}; see {log_path}); {held}",
            fix=restarts,
        )
    summary = summarize(out)
    if cfg.node_rank == 0:  # (node 0 keeps the metrics)
        for text in summary.warnings():
            warn(text)
    return summary


# The stop signals seen while a stop_signals block runs (the outermost one clears it), and whether
# the launch has taken its stop up (a KeyboardInterrupt caught by its own code, or the ranks gone):
# until then each stop signal raises KeyboardInterrupt, after it none does (they hurry stop_ranks).
# A raise can be lost: a handler that runs inside a fork's callbacks or a __del__ has its exception
# "ignored" by Python, so a first signal alone cannot be trusted to have stopped anything (the
# launcher forks within signals.deferred). "deferred": the handlers are being set back.
_STOPPING: list[int] = []
_STOP_BLOCKS = [0]
_STOP = {"taken": False, "deferred": False}


def _stop_taken() -> None:
    """The launch is stopping (or has nothing left to stop): later stop signals do not raise."""
    if threading.current_thread() is threading.main_thread() and _STOP_BLOCKS[0]:
        _STOP["taken"] = True


@contextlib.contextmanager
def stop_signals(stopped: list[int]):
    """SIGTERM and SIGHUP (a job scheduler, a closed terminal, ``kill PID``) stop a run as Ctrl-C
    does: the ranks are stopped and the user told how to resume, instead of the launcher vanishing
    and leaving torchrun and the ranks training. The signal's number is appended to ``stopped``.
    A stop signal interrupts (KeyboardInterrupt) until the launch has taken the stop up: a second
    Ctrl-C while the launcher stops its ranks and removes what it owns would cut that short,
    leaving ranks training on in a directory no lock holds any more; it makes ``stop_ranks`` kill
    them at once instead. A signal the caller ignores (nohup's SIGHUP) stays ignored."""

    def handler(signum, frame):
        stopped.append(signum)
        _STOPPING.append(signum)
        if not (_STOP["taken"] or _STOP["deferred"]):
            raise KeyboardInterrupt

    previous = {}
    main = threading.current_thread() is threading.main_thread()  # signals reach the main thread only
    if main:
        _STOP_BLOCKS[0] += 1
        for signum in STOPPING:
            # (None: a handler set outside Python, which cannot be set back from here)
            if signal.getsignal(signum) not in (signal.SIG_IGN, None):  # nohup's SIGHUP, a background job's SIGINT
                previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        was, _STOP["deferred"] = _STOP["deferred"], True  # (none raises half-restored)
        try:
            for signum, old in previous.items():
                signal.signal(signum, old)
        finally:
            _STOP["deferred"] = was
            if main:
                _STOP_BLOCKS[0] -= 1
                if not _STOP_BLOCKS[0]:
                    _STOPPING.clear()
                    _STOP["taken"] = False


# how long the rank supervisor (or torchrun) may take to stop its ranks on SIGTERM (it gives
# them GRACE_S itself) before it is killed: a supervisor stopped by SIGSTOP never takes it
STOP_WAIT_S = 45.0


def stop_ranks(proc: subprocess.Popen | ServedProcess, wait_s: float = STOP_WAIT_S) -> None:
    """SIGTERM to the rank supervisor, and SIGKILL if it has not exited ``wait_s`` later, or at
    once on a second stop signal (``stop_signals``): its ranks die with it. Returns only once it
    has exited: a launcher interrupted once must not wait for ever, nor leave ranks behind."""
    # (the stop signals are the main thread's: a launch in another thread is hurried by none)
    main = threading.current_thread() is threading.main_thread()
    seen = len(_STOPPING)
    _stop_taken()  # (called as a stop propagates: a signal from here hurries it)
    proc.terminate()
    deadline = time.monotonic() + wait_s
    while True:
        try:
            proc.wait(timeout=min(0.1, max(0.0, deadline - time.monotonic())))
            return
        except subprocess.TimeoutExpired:
            if time.monotonic() >= deadline or (main and len(_STOPPING) > seen):
                break
        except KeyboardInterrupt:
            # a stop signal while stopping for another cause (an error, which goes on being
            # raised: this stop is called from a ``finally``): it hurries the stop
            break
    with signals_held():  # (outside stop_signals a Ctrl-C still raises: not before the supervisor is gone)
        proc.kill()
        try:
            proc.wait(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:  # a process that SIGKILL does not end (a hung device, a server gone deaf)
            warn(f"the rank supervisor (pid {proc.pid}) did not exit after SIGKILL; it may be left behind")


@contextlib.contextmanager
def ranks_running(cmd: Sequence[str], log, env: Mapping[str, str]) -> Iterator[subprocess.Popen | ServedProcess]:
    """The ranks started (``start_ranks``) for the block, and stopped (``stop_ranks``) if it ends
    while they run: interrupted, or failed."""
    proc: subprocess.Popen | ServedProcess | None = None
    try:
        with deferred():  # (a signal in the fork's callbacks is raised once it has returned)
            proc = start_ranks(cmd, log, env)
        yield proc
    finally:
        if proc is not None and proc.poll() is None:
            stop_ranks(proc)


def start_ranks(cmd: Sequence[str], log, env: Mapping[str, str]) -> subprocess.Popen | ServedProcess:
    """The rank supervisor or torchrun (and through it the ranks), tied to this process's life.
    Where ``env`` names a rank server (runtime/rankserver.py), the server forks the supervisor."""
    server = env.get(SERVER_ENV)
    if server and list(cmd[1:3]) == ["-m", "zoplan.runtime.ranks"]:
        try:
            return request(server, cmd[3:], log.fileno(), env)
        except OSError as exc:
            warn(f"{SERVER_ENV}={server}: {exc}; starting the ranks without it")
    return subprocess.Popen(
        list(cmd),
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(env),
        preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
    )


def finished_marker(node: int, local_rank: int | str) -> str:
    """The file a rank writes in the output directory once the run is complete on every rank
    (``local_rank`` "*": a glob of the node's)."""
    return f".finished-node{node}-rank{local_rank}"


def _finished(out: Path, node: int, per_node: int, steps: int) -> bool:
    """Every rank of this node wrote its marker for a run of ``steps`` steps."""
    for local in range(per_node):
        marker = out / finished_marker(node, local)
        if not marker.exists() or marker.read_text().strip() != str(steps):
            return False
    return True


def _log_tail(log: Path, since: int = 0, size: int = 64 * 1024) -> str:
    """The end of ``log`` after byte ``since`` (where this launch began writing: a log appended
    to by earlier launches tells of their failures, not this one's)."""
    try:
        with log.open("rb") as f:
            f.seek(max(since, f.seek(0, os.SEEK_END) - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


# the last line of a Python traceback: the exception's (dotted) name and its message, after the
# prefix torchrun may give each line of a rank's output ("[rank1]:", "[default0]:")
_EXCEPTION_LINE = re.compile(r"^(?:\[[\w.-]+\]:\s?)?([A-Za-z_][\w.]*(?:Error|Exception|Failure)): (.+)$", re.M)


def _raised(tail: str) -> str | None:
    """``TypeError: the message`` of the first traceback in a log's ``tail``, if there is one (cut
    to 300 characters): the rank that failed first (the others then fail in their collectives,
    "Connection closed by peer", after it)."""
    if "Traceback (most recent call last)" not in tail:
        return None
    found = _EXCEPTION_LINE.search(tail, tail.index("Traceback (most recent call last)"))
    if found is None:
        return None
    name, message = found.groups()
    said = f"{name}: {message.strip()}"
    return said if len(said) <= 300 else said[:299] + "…"


def _libraries() -> str:
    """The versions a failure report needs: python, torch and transformers."""
    from importlib.metadata import PackageNotFoundError, version

    said = [f"python {platform.python_version()}"]
    for name in ("torch", "transformers"):
        try:
            said.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            pass
    return ", ".join(said)


def _rank_signal(log: Path, status: Path, since: int = 0) -> int | None:
    """The signal that ended a rank (SIGKILL first, of several; not SIGTERM): in the rank supervisor's record of
    the last attempt (one machine), or SIGKILL in torchrun's failure summary at the end of the log
    (several); None when no rank was ended by a signal."""
    from zoplan.runtime.ranks import read_status

    attempts = read_status(status)
    if attempts:
        # (not SIGTERM: the supervisor's own, that stops the other ranks when one has ended)
        exits = attempts[-1].get("exits", {}).values()
        signals = sorted({-code for code in exits if isinstance(code, int) and code < 0} - {signal.SIGTERM})
        return signal.SIGKILL if signal.SIGKILL in signals else signals[0] if signals else None
    tail = _log_tail(log, since)
    return signal.SIGKILL if "Signal 9 (SIGKILL)" in tail or "exitcode  : -9 " in tail else None


def _nodes_trouble(
    cfg: RunConfig, log_path: Path, tail: str, never_met: bool, held: str, resume: str
) -> ZoplanError | None:
    """Why a run over several machines ended without a rank's own word, from what its log says
    (``tail``): the nodes never all met (``never_met``: a new run; torchrun's rendezvous gives up
    after 900 s, the first meeting's store after 600 s), another node went quiet (a collective's
    10-minute timeout), or the connection to it was lost. None: on one machine, or none of these.
    Each was "a rank exited without a message" with a --resume fix, the cause only in the log."""
    if cfg.nnodes == 1:
        return None
    out = cfg.output
    if never_met:
        return NothingDone(
            f"the other node(s) of the run never all met (torchrun gave up waiting for them; see {log_path}): "
            f"nothing was trained, and what the run had written in {out} is removed",
            fix=f"start the same command on every node (--nnodes {cfg.nnodes}, each its own --node-rank, the "
            f"same --master-addr {cfg.master_addr} and --master-port), within a few minutes of one another",
        )
    if any(sign in tail for sign in PEER_SILENT):
        return ZoplanError(
            f"training stopped: another node of the run stopped answering for 10 minutes (a collective timed "
            f"out: one of its ranks stopped or hung, or its machine or the network went away; see "
            f"{log_path}); {held}",
            fix=f"find out what stopped the other node (its output, `ps` there), stop it, then {resume}",
        )
    if any(sign in tail for sign in PEER_LOST):
        return ZoplanError(
            f"training stopped: this node lost its connection to another node of the run (it stopped, "
            f"or the network between them failed; see its output, and {log_path}); {held}",
            fix=f"find out why the other node stopped, then {resume}",
        )
    return None


def _nothing_done(out: Path, signum: int, when: str) -> NothingDone:
    """A new run stopped by ``signum`` ``when`` (before its first step): what it wrote goes."""
    return NothingDone(
        f"stopped by {signal.Signals(signum).name} {when}; nothing was trained, and what the run had written in "
        f"{out} is removed",
        fix="run the same command again",
        status=128 + signum,
    )


def _resume_fix(cfg: RunConfig) -> str:
    """The command that continues a stopped run (on several machines: on every one of them)."""
    here = f"continue with `zoplan run --resume {cfg.output} --steps {cfg.steps}`"
    return here + (" here, and the same on every other node with its own directory" if cfg.nnodes > 1 else "")


def _the_journal(cfg: RunConfig) -> str:
    """Whose journal a node's messages speak of: rank 0 writes it, in node 0's output directory."""
    return "the journal" if cfg.node_rank == 0 else "node 0's journal (its output directory)"


def _cut_metrics(path: Path, done: int) -> tuple[int, int | None]:
    """Remove the rows of ``path`` (metrics.jsonl) about steps past a journal of ``done`` steps
    (cut back, or torn): the run takes those steps again, and its summary reads these rows; and
    an unterminated last line (the run was stopped as it wrote it: the next row would be joined to
    it, the progress would miss it). Returns how many rows were removed, and the step (0-based)
    of a cut-short row the journal holds (None without one: the file then lacks that step's row);
    the file is rewritten only if it changes."""
    if not path.exists():
        return 0, None
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1
    torn, raw = raw[end:], raw[:end]
    kept: list[bytes] = []
    dropped = 0
    for line in raw.splitlines(keepends=True):
        try:
            row = json.loads(line)
        except ValueError:
            kept.append(line)
            continue
        step = row.get("step") if isinstance(row, dict) else None
        at = row.get("resumed_at") if isinstance(row, dict) else None
        if (type(step) is int and step >= done) or (type(at) is int and at > done):
            dropped += 1  # a step's row (0-based), an evaluation after it, a start past the end
        else:
            kept.append(line)
    if dropped or torn:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(b"".join(kept))
        tmp.replace(path)
    begun = re.match(rb'\{"step": ?(\d+)', torn)  # a step's row, or an evaluation's after it
    lost = int(begun.group(1)) if begun else None
    return dropped, lost if lost is not None and lost < done else None


def _journaled_steps(journal: Path) -> int:
    if not journal.exists():
        return 0
    return journal.read_bytes().count(b"\n")


def _resumed_line(row: ResumedRow, max_restarts: int) -> str:
    """What a start that continues a run says: why it started again, and where it picked up."""
    source = f"snapshot {row.snapshot}" if row.snapshot else "the base weights"
    where = f"{row.resumed_at} step(s) done: {source} + {row.replayed} journal step(s) replayed"
    if row.restart > 0:
        return (
            f"a rank failed; every rank was restarted (restart {row.restart} of {max_restarts}), "
            f"resuming with {where}, no completed step lost"
        )
    return f"resuming with {where}"


def _waiting_note(cfg: RunConfig, port: int) -> str:
    """What a node says while the others have not all come (several machines)."""
    n, k = cfg.nnodes, cfg.node_rank
    if k == 0:
        addr = (
            "this machine's address"
            if cfg.master_addr.startswith("127.") or cfg.master_addr == "localhost"
            else cfg.master_addr
        )
        return (
            f"node 0 of {n}: waiting for the other node(s); start the same command on each with --nnodes {n} "
            f"--node-rank {1 if n == 2 else f'K (1 .. {n - 1})'} --master-addr {addr} --master-port {port} "
            f"(it waits up to {RENDEZVOUS_WAIT_MIN} minutes)"
        )
    return (
        f"node {k} of {n}: waiting for node 0 at {cfg.master_addr}:{port} and the other node(s); "
        f"start the same command there with --node-rank 0 (if a run there already has its node {k}, this "
        f"one is one too many: it only waits, and the run goes on without it; stop it with Ctrl-C; it waits "
        f"up to {RENDEZVOUS_WAIT_MIN} minutes)"
    )


def _follow(proc: subprocess.Popen, metrics: Path, cfg: RunConfig, met: Path | None = None, port: int = 0) -> None:
    """Draw step, loss, projected gradient, tokens/s and ETA while the ranks train; on several
    machines, say so when the nodes have not met within ``NODES_NOTE_AFTER_S`` (``met``: the
    file their first ranks make once they have), and when they then meet."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [
        TextColumn("step {task.completed}/{task.total}"),
        BarColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("g {task.fields[g]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        TimeRemainingColumn(),
    ]
    # a resumed run's earlier lines are not news (up to the last whole one: a cut-short last line
    # is removed before the ranks append)
    offset = metrics.read_bytes().rfind(b"\n") + 1 if metrics.exists() else 0
    stall = StallCheck(total=cfg.steps)  # a learning rate too small for the model, said early
    warnings = Console(stderr=True)
    try:  # (a test's setting: one that is no number is left out)
        after = float(os.environ.get("ZOPLAN_NODES_NOTE_AFTER_S", NODES_NOTE_AFTER_S))
    except ValueError:
        after = NODES_NOTE_AFTER_S
    note_at = time.monotonic() + after
    noted = False
    # a rank stopped or blocked: said, not waited on in silence
    still = ProgressWatch(metrics.parent, cfg.steps, cfg.nnodes)

    def warned(text: str) -> None:  # on stderr (stdout may be --json); fine_tune's: a Python warning
        if _WARN.get() is not None:
            warn(text.removeprefix("warning: "))
        else:
            warnings.print(text, soft_wrap=True, style="yellow")

    with Progress(*columns, disable=cfg.quiet or cfg.node_rank != 0, transient=False) as progress:
        # a resume starts at the steps its journal holds (it showed 0 until the ranks had loaded)
        journal = metrics.with_name("journal.jsonl")
        already = journal.read_bytes().count(b"\n") if journal.exists() else 0
        task = progress.add_task("train", total=cfg.steps, completed=already, loss="–", g="–", tps="–")
        while True:
            done = proc.poll() is not None
            if met is not None:
                if met.exists():
                    if noted:
                        warnings.print(f"node {cfg.node_rank} of {cfg.nnodes}: every node has come", soft_wrap=True)
                    met = None
                elif not noted and time.monotonic() >= note_at:
                    noted = True
                    warnings.print(_waiting_note(cfg, port), soft_wrap=True)
            rows, offset = read_metrics(metrics, start=offset)  # the complete rows written since the last look
            for row in rows:
                moved = (
                    still.progressed(row.step, row.step_time_s)
                    if isinstance(row, TrainRow)
                    else still.progressed()
                    if isinstance(row, EvalRow)
                    else None
                )
                if moved is not None and cfg.node_rank == 0:
                    warned(moved)
                if isinstance(row, TrainRow):
                    progress.update(
                        task,
                        completed=row.step + 1,
                        loss=f"{row.loss:.4f}",
                        g=f"{row.projected_grad:+.3g}",
                        tps=f"{row.tokens_per_s:.0f}",
                    )
                    warning = stall.add(row)
                    if warning is not None and cfg.node_rank == 0:
                        warned(warning)
                elif isinstance(row, ResumedRow) and not cfg.quiet:
                    progress.update(task, completed=row.resumed_at)
                    progress.console.print(_resumed_line(row, cfg.max_restarts), soft_wrap=True)
                elif isinstance(row, NoteRow) and cfg.node_rank == 0:
                    warned(row.note)
                elif isinstance(row, EvalRow) and not cfg.quiet:
                    progress.console.print(
                        f"step {row.step + 1}: eval loss {row.eval_loss:.4f}, accuracy {row.eval_accuracy:.3f}"
                    )
            if done:
                break
            standing = still.check() if cfg.node_rank == 0 else still.stuck_here()
            if standing is not None:
                warned(standing)
            time.sleep(0.2)
