"""Rebuild trained weights from the base weights and the journal alone (no data needed).

Every line of ``journal.jsonl`` is one step's (seed, projected gradient, lr, weight decay); the
update it stands for is a pure function of those and the parameter names (zoplan.runtime.zo), so
applying the lines in order to the base weights reproduces the run. Skipped steps (non-finite
loss) carry a projected gradient of 0 and change nothing. What the updates apply to (every weight,
or a LoRA or prefix adapter) and the dtypes the run kept each part in are not in the journal but
in the run's ``plan.yaml``: ``replay_to`` refuses a journal without it beside.

A journal line is about 210 bytes (JSON with full-precision floats; 1055 bytes for the 5 steps of
`zoplan run --steps 5`), so a 20,000-step run's journal is ~4.2 MB, against 2.6 GB for one bf16
snapshot of a 1.3B-parameter model.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers.utils import logging as hf_logging

from zoplan.errors import ZoplanError
from zoplan.runconfig import enclosing_run
from zoplan.runtime.checkpoint import dtype_kwarg, readable_as_umask
from zoplan.runtime.hostcopy import DTYPES, decays
from zoplan.runtime.journal import check_lines, read_journal
from zoplan.runtime.scratch import live_run_in
from zoplan.runtime.zo import update_tensor


def require_finite(tensors, what: str, fix: str) -> None:
    """Weights that are not finite are never written under a name a user would load."""
    for name, value in tensors:
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ZoplanError(
                f"{what}: '{name}' holds values that are not finite (NaN or inf); nothing was written", fix=fix
            )


@torch.no_grad()
def replay(model: nn.Module, journal: list[dict]) -> nn.Module:
    """Apply every journal line's update to ``model`` in place, in step order: to every
    parameter, or to those a line names (``params``: ZOTrainer's lines, where frozen parameters
    were not trained)."""
    params = dict(model.named_parameters())
    for row in journal:
        if row.get("skipped", row["projected_grad"] == 0.0):
            continue
        trained = params.items()
        if row.get("params") is not None:
            missing = [name for name in row["params"] if name not in params]
            if missing:
                raise ZoplanError(
                    f"step {row.get('step')} of the journal trained '{missing[0]}', which the model does not have",
                    fix="replay onto the model that was trained, wrapped as it was (e.g. with the same PEFT adapter)",
                )
            trained = [(name, params[name]) for name in row["params"]]
        for name, param in trained:
            update_tensor(
                param, name, row["seed"], row["projected_grad"], row["lr"], row["weight_decay"], decays(name, param)
            )
    return model


def replay_to(
    base: str, journal_path: Path, out: Path, *, dtype: str | None = None, device: str = "cpu", quiet: bool = False
) -> int:
    """``zoplan replay``: base weights + journal -> a Hugging Face directory (an adapter run's
    adapter, in PEFT's layout), as the run's ``plan.yaml`` beside the journal says: what was trained
    and, unless ``dtype`` is given, the dtypes each part was kept and updated in. A journal without
    its plan is refused (its lines do not say either), and so is a base model directory that
    ``zoplan run`` would refuse (missing, truncated or mismatched weights, no tokenizer). Returns
    the number of steps replayed. ``quiet``: without transformers' progress bars for loading and
    writing the one model (the command line says what it wrote)."""
    if device not in ("cpu", "cuda"):
        raise ZoplanError(
            f"--device {device!r} is not cpu or cuda", fix="--device cpu, or --device cuda on a machine with a GPU"
        )
    if device == "cuda" and not torch.cuda.is_available():
        raise ZoplanError(
            "replay cannot reach a GPU: torch sees no CUDA device here",
            fix="replay on the CPU (--device cpu): the same updates, in the same dtype",
        )
    _check_not_a_runs(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "is a file" if not out.is_dir() else "is not empty"
        raise ZoplanError(
            f"output {out} {what}: replay writes a model directory there", fix="choose a new -o directory"
        )
    journal = read_journal(journal_path, first=0)
    plan_path = journal_path.parent / "plan.yaml"
    from zoplan import runconfig

    # a run's directory: its record (read once), and its plan as it wrote it
    record = journal_path.parent / runconfig.CONFIG_FILE
    config = runconfig.read(record) if record.is_file() else None
    if config is not None:
        runconfig.check_plan_unchanged(journal_path.parent, config)
    if not plan_path.exists():
        # the journal's lines hold seeds, projected gradients, learning rates and weight decays only:
        # replayed as a full fp32 run, a LoRA, prefix or bf16 run would give other weights, with exit 0
        raise ZoplanError(
            f"{journal_path} has no plan.yaml beside it: the journal does not record what its run trained "
            "(every weight, or a LoRA or prefix adapter) nor the dtypes it kept the weights in, so replaying "
            "it without the run's plan could rebuild other weights than the run's",
            fix=f"put the run's plan.yaml next to the journal ({plan_path}), or replay the run's directory "
            "(zoplan replay RUN_DIR -o DIR, or zoplan replay BASE_MODEL RUN_DIR/journal.jsonl -o DIR)",
        )
    made = not out.exists()
    try:  # before hours of replay: a directory that cannot be made is refused now
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ZoplanError(
            f"cannot create the output directory {out}: {exc.strerror or exc}", fix="choose a writable -o directory"
        ) from None
    hide = quiet and hf_logging.is_progress_bar_enabled()
    if hide:
        hf_logging.disable_progress_bar()
    try:
        return _replay_into(base, journal_path, journal, config, out, dtype, device)
    except BaseException:
        _clear(out, made)
        raise
    finally:
        if hide:  # as it was: replay_to may run inside a user's own program
            hf_logging.enable_progress_bar()


# what a run writes in its output directory, and removes or moves aside when it finds it there
# (a finished run's model/ moved aside on resume, an old model.tmp removed, damaged snapshots)
_RUNS_OWN = re.compile(r"model|model\.tmp|model-step\d+|snapshots|damaged-.*")


def _check_not_a_runs(out: Path) -> None:
    """Refuse a replay into a place a run writes: anywhere in a run's output directory while it
    trains (it removes what stands in its way when it writes model/), or where a finished run
    keeps its own model/, model-stepN/ or snapshots/."""
    run = enclosing_run(out)
    if run is None:
        return
    pid = live_run_in(run)
    if pid is not None:
        raise ZoplanError(
            f"{out} is inside {run}, the output directory of a run that is training now (pid {pid}): it writes "
            "its model/ there when it ends, and removes what stands in its way",
            fix=f"replay into a directory outside it (zoplan replay {run} -o DIR replays the steps journaled so far)",
        )
    first = out.resolve().relative_to(run).parts[0]
    if _RUNS_OWN.fullmatch(first):
        where = f"is {run}'s own {first}/" if out.resolve() == run / first else f"is inside {run}/{first}/"
        raise ZoplanError(
            f"{out} {where}, which the run in {run} writes: a resume moves it aside or replaces it",
            fix=f"replay into a directory outside it, e.g. -o {run}-replayed",
        )


def _clear(out: Path, made: bool) -> None:
    """Nothing half-written is left under a name a user would load: a directory replay made goes,
    one given empty is emptied again."""
    if made:
        shutil.rmtree(out, ignore_errors=True)
        return
    for entry in out.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _check_weights(model_dir: Path, run_dir: Path, config) -> None:
    """The base weights are the ones the run started from, where its run.json beside the journal
    (``config``; None: a journal and its plan, copied alone) recorded them
    (zoplan.runtime.checkpoint.weights_stamp): a journal replayed onto other weights of the same
    shape gives a model no run trained."""
    from zoplan import runconfig
    from zoplan.runtime.checkpoint import weights_stamp

    recorded = config.model_weights if config is not None else None  # (None too in an older run.json)
    if recorded is not None and weights_stamp(model_dir) != recorded:
        raise ZoplanError(
            f"the weights in {model_dir} are not the ones the run in {run_dir} started from "
            f"({run_dir / runconfig.CONFIG_FILE}): replaying its journal onto them gives a model that no run trained",
            fix="replay onto the checkpoint the run started from",
        )


def _total_steps(config, plan) -> int:
    """The total the run took its steps for (its learning-rate schedule's): its run.json's, else
    the plan's (a journal replayed from a folder that holds only the plan beside it)."""
    return config.steps if config is not None else plan.zo.steps


def _replay_into(
    base: str, journal_path: Path, journal: list[dict], config, out: Path, dtype: str | None, device: str
) -> int:
    from zoplan.models import load_model_shape
    from zoplan.planfile import load_plan
    from zoplan.runtime.checkpoint import check_model_dir
    from zoplan.runtime.tiny import resolve_model

    plan_path = journal_path.parent / "plan.yaml"  # there: replay_to refuses a journal without it
    plan = load_plan(plan_path)  # before the model: it may need building
    check_lines(journal, plan.zo, _total_steps(config, plan), journal_path)
    model_dir = resolve_model(base)
    # the checks `zoplan run` makes of its model: a truncated or mismatched checkpoint is a
    # message, not transformers' traceback (nor weights missing from it started at random)
    check_model_dir(model_dir)
    # the journal's updates are per parameter name and size: on another model they would
    # change a different set of weights without a word
    shape = load_model_shape(str(model_dir / "config.json"))
    differences = plan.model_shape().differences(shape)
    if differences:
        raise ZoplanError(
            f"{journal_path} was written by a run of model '{plan.model.name}' ({plan_path}), "
            f"but the base model given is '{shape.name}': {', '.join(differences)}",
            fix="replay onto the base weights that run started from",
        )
    _check_weights(model_dir, journal_path.parent, config)  # the same shape: the same weights?
    if plan.tuning.to_tuning().frozen_base:  # the journal's updates are the adapter's
        if dtype is not None:  # an adapter trains and is written in fp32, whatever the weights' dtype
            raise ZoplanError(
                f"--dtype {dtype} sets the dtype a full run's weights are replayed in, but {journal_path} is of a "
                f"{plan.tuning.method} run: its adapter is replayed and written as it trained, in fp32",
                fix="leave --dtype out",
            )
        return _replay_adapter(plan, model_dir, journal, journal_path.parent, out, device)
    # as the run kept them: the parameters outside the blocks (embeddings, final norm, head) and the
    # blocks kept on the devices (resident) in the compute dtype; a streamed block, updated in the
    # compute dtype and stored in the host copy's (wire) dtype after every step, in the narrower of
    # the two. The blocks are written from the host copy (resident ones rounded into it at the end),
    # everything in the compute dtype, as the run writes them. --dtype replays and writes
    # everything in that one dtype instead.
    wire = dtype or plan.transfer.wire_dtype
    param = dtype or plan.transfer.param_dtype
    stored = param if wire == "fp32" else wire
    resident = set(plan.resident_blocks)
    from transformers import AutoModelForCausalLM, AutoTokenizer  # after the checks: its import takes seconds

    from zoplan.runtime.adapters import adapter_for

    model = AutoModelForCausalLM.from_pretrained(model_dir, **dtype_kwarg(DTYPES[param])).to(device)
    blocks = adapter_for(model.config.model_type).blocks(model)
    with torch.no_grad():
        for i, block in enumerate(blocks):
            block.to(DTYPES[wire])  # the host copy made from the base weights
            block.to(DTYPES[param if i in resident else stored])
        replay(model, journal)
        for i, block in enumerate(blocks):
            if i in resident:
                block.to(DTYPES[wire])  # into the host copy at the end of the run
            block.to(DTYPES[param])
    require_finite(
        model.named_parameters(),
        f"the weights replayed from {journal_path}",
        "replay in the dtype the run trained in (--dtype, default the run's own); a journal "
        "whose updates overflow in it cannot give a usable model",
    )
    from safetensors import SafetensorError

    try:
        model.save_pretrained(out)
        try:
            AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
        except (OSError, ValueError):
            for f in model_dir.glob("*token*"):
                shutil.copy2(f, out / f.name)
        readable_as_umask(out)
    except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as its own error
        raise ZoplanError(
            f"writing the replayed weights into {out} failed: {getattr(exc, 'strerror', None) or exc}",
            fix="free disk space or choose another -o directory, and replay again",
        ) from None
    return len(journal)


def _replay_adapter(plan, model_dir: Path, journal: list[dict], run_dir: Path, out: Path, device: str) -> int:
    """An adapter run (zoplan.runtime.tuning): its initial adapter (LoRA's a function of the run's
    seed, a prefix's saved in ``run_dir``) with the journal's updates, written as the run writes it;
    the base weights are not read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from zoplan.runtime.adapters import adapter_for
    from zoplan.runtime.tuning import build

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):  # the modules' shapes only
        model = AutoModelForCausalLM.from_config(config)
    tuned = build(
        model, adapter_for(config.model_type), plan.tuning.to_tuning(), plan.zo.seed, torch.device(device), ()
    )
    assert tuned is not None  # an adapter plan builds an adapter
    tuned.load_initial(run_dir)
    tuned.replay(journal)
    require_finite(
        tuned.tensors().items(),
        "the adapter replayed from the journal",
        "a journal whose updates overflow the adapter cannot give a usable one",
    )
    tuned.save(out, model_dir)
    return len(journal)
