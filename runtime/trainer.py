"""``ZOTrainer``: a Hugging Face ``Trainer`` that trains with MeZO, for code that already uses one.

    from zoplan.runtime.trainer import ZOTrainer

    trainer = ZOTrainer(model=model, args=TrainingArguments("out", learning_rate=1e-6, max_steps=1000),
                        train_dataset=train, data_collator=collator, zo_eps=1e-3)
    trainer.train()

Everything of the Trainer stays: datasets and collators, the learning-rate schedule, logging,
evaluation, checkpoints, ``save_model``. Only the step changes: no backward pass and no
optimizer state; two forward passes at θ+εz and θ−εz (the model in eval mode: the same function
twice, no dropout), the projected gradient g = (L+ − L−) / 2ε, and the update
θ ← θ − lr·(g·z + wd·θ) (weight decay as ``zoplan run`` applies it: not on biases and norms).
z is zoplan's documented stream (runtime/perturb.py: a function of the step's seed and each
parameter's name, never stored), drawn where each parameter lives, the update the one
``zoplan replay`` applies (runtime/zo.py). The parameters perturbed are those that require a
gradient: freeze the others (or wrap the model with PEFT) to train a part of it.

This is the in-memory MeZO of one process (one CPU or GPU, the weights where the model puts
them); ``zoplan run`` (or ``fine_tune``) is the one that offloads and spreads a step over GPUs.
θ is perturbed in place (+ε, −2ε, +ε), as MeZO does: putting it back costs float rounding (a
few ulps of some elements a step), not a copy of the weights; so ``replay`` of ``zo_steps``
rebuilds the trained weights to within that rounding (each line names the parameters it
trained: the frozen ones stay as they are). Every checkpoint keeps ``zo_steps`` up to its step
(``zo_steps.jsonl``) and the settings z depends on (``zo_settings.json``): a resume takes them up,
so ``replay`` from the base weights still holds, and refuses another ``zo_seed`` or ``zo_eps``. A
step whose losses are not finite applies
no update (weight decay included: it is skipped, as ``zoplan run`` skips it; ``zo_max_nonfinite``
of them in a row stop the training), and a step cut short by an error puts the perturbation back.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import warnings
from pathlib import Path
from typing import Any, cast

import torch
from torch.nn import Parameter
from pydantic import ValidationError
from transformers import Trainer, TrainerCallback

from zoplan.errors import ZoplanError
from zoplan.fileio import brief
from zoplan.planfile import ZoSettings
from zoplan.runconfig import RunConfig, bound_said
from zoplan.runtime.hostcopy import DTYPES, decays
from zoplan.runtime.perturb import perturb_, step_seed
from zoplan.runtime.signals import deferred
from zoplan.runtime.zo import eps_note, update_tensor
from zoplan.records import diverged, unmoved

# a parameter's dtype as zoplan names it (the eps check's compute dtype)
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

# What ZOTrainer takes and what of TrainingArguments its step reads, checked with the bounds
# zoplan checks a plan's ZO settings (planfile.ZoSettings) and a run's options (RunConfig) by,
# strictly: a string or a bool is not a number here. Name -> (schema, its field, the fix).
_ARGUMENTS: dict[str, tuple[Any, str, str]] = {
    "zo_eps": (
        ZoSettings,
        "eps",
        "pass a positive finite float: zo_eps=1e-3 is MeZO's (1e-2 for LoRA, 1e-1 for a prefix)",
    ),
    "zo_seed": (
        ZoSettings,
        "seed",
        "pass a whole number from 0 to 2**63 - 1, or leave zo_seed out for TrainingArguments' seed",
    ),
    "zo_max_nonfinite": (RunConfig, "max_nonfinite", "pass a whole number, 1 or more (zoplan run's default is 5)"),
    "learning_rate": (
        ZoSettings,
        "lr",
        "give TrainingArguments a positive finite learning_rate: MeZO's is 1e-6 to 1e-7 for a full model "
        "(5e-5 for LoRA, 1e-3 for a prefix)",
    ),
    "weight_decay": (ZoSettings, "weight_decay", "give TrainingArguments a finite weight_decay, 0 (none) or more"),
}


def _problem(error: Any) -> str:
    """What a pydantic error says of a value, as zoplan words it (runconfig's "must be ...")."""
    bound = bound_said(error, lambda value: f"{value:g}" if isinstance(value, float) else str(value))
    if bound is not None:
        return bound
    kind = error["type"]
    if kind == "value_error":  # zoplan's own checks (fileio.Strict): their words
        return str(error["msg"]).removeprefix("Value error, ")
    if kind.startswith("float"):
        return "must be a number (an int or a float)"
    if kind.startswith("int"):
        return "must be a whole number (an int)"
    return "is not valid: " + str(error["msg"])


def _checked(name: str, value: object) -> Any:
    """``value`` of the ZOTrainer argument (or TrainingArguments field) ``name``, checked; a bad
    one is a ZoplanError naming it, what it must be and its fix."""
    schema, field, fix = _ARGUMENTS[name]
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = int(value)  # numpy's ints, too
    try:
        return getattr(schema.model_validate({field: value}, strict=True), field)
    except ValidationError as exc:
        what = name if name.startswith("zo_") else f"TrainingArguments.{name}"
        problem = _problem(exc.errors()[0])
        raise ZoplanError(f"{what} {problem}, got {brief(value)} ({type(value).__name__})", fix=fix) from None


# the prefix torch.compile puts before every parameter's name: z is drawn by name, so it is left
# out (a compiled model trains, and replays, as the same model uncompiled)
_COMPILED = "_orig_mod."


def _trainable(model: torch.nn.Module | None) -> list[tuple[str, Parameter]]:
    """The parameters a ZO step perturbs and updates: those that require a gradient, by the names
    of the model uncompiled; none is an error (a Trainer's own message would be torch's, about an
    optimizer), and so is one in half precision."""
    params = (
        []
        if model is None
        else [(name.replace(_COMPILED, ""), p) for name, p in model.named_parameters() if p.requires_grad]
    )
    if not params:
        raise ZoplanError(
            "the model has no parameter that requires a gradient: nothing to train",
            fix="unfreeze what should train (requires_grad_(True)), or wrap the model with PEFT "
            "(get_peft_model) to train an adapter",
        )
    half = next(((name, p.dtype) for name, p in params if p.dtype in (torch.bfloat16, torch.float16)), None)
    if half is not None:
        # (docs/runtime.md: on tiny-opt in bf16, 20 round trips alone moved 86.8% of the elements,
        # by up to 0.023)
        raise ZoplanError(
            f"the trainable parameter {half[0]} is {str(half[1]).removeprefix('torch.')}: ZOTrainer perturbs the "
            "weights in place (+eps, -2 eps, +eps a step), and in half precision that round trip moves them by "
            "about a unit in the last place each step, hundreds of times what an update moves them",
            fix="load the model in float32 (from_pretrained(..., dtype=torch.float32), torch_dtype= before "
            "transformers 4.56); TrainingArguments("
            "bf16=True) still computes in bf16",
        )
    return params


# what a checkpoint keeps of the ZO run besides the Trainer's own files: the settings z depends
# on, and zo_steps up to the checkpoint (a resume goes on with them: replay from the base still holds)
ZO_SETTINGS = "zo_settings.json"
ZO_STEPS = "zo_steps.jsonl"


class _KeepZoSteps(TrainerCallback):
    """Writes ``ZO_SETTINGS`` and ``ZO_STEPS`` into every checkpoint the Trainer saves."""

    def __init__(self, trainer: ZOTrainer) -> None:
        self.trainer = trainer

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not state.is_world_process_zero or not folder.is_dir():
            return
        t = self.trainer
        (folder / ZO_SETTINGS).write_text(json.dumps({"zo_seed": t.zo_seed, "zo_eps": t.zo_eps}) + "\n")
        rows = [{**row, "params": list(row["params"])} for row in t.zo_steps if row["step"] < state.global_step]
        (folder / ZO_STEPS).write_text("".join(json.dumps(row) + "\n" for row in rows))


# the names a caller may know for ZOTrainer's own settings (zoplan run's, MeZO's)
_ZO_NAMES = {
    "eps": "zo_eps",
    "epsilon": "zo_eps",
    "zo_epsilon": "zo_eps",
    "seed": "zo_seed",
    "max_nonfinite": "zo_max_nonfinite",
}


class ZOTrainer(Trainer):
    """``transformers.Trainer`` with MeZO's step (module docstring). ``zo_eps``: the perturbation
    scale ε; ``zo_seed``: the run's seed for z (default: ``args.seed``); ``zo_max_nonfinite``:
    steps in a row whose losses are not finite (each skipped: no update) after which the
    training stops with an error, as ``zoplan run --max-nonfinite``. The learning rate, its
    schedule and the weight decay are the TrainingArguments'. Every one is checked here, as zoplan
    checks its own: a bad one is a ``ZoplanError`` naming it."""

    def __init__(
        self,
        *args: Any,
        zo_eps: float = 1e-3,
        zo_seed: int | None = None,
        zo_max_nonfinite: int = 5,
        **kwargs: Any,
    ) -> None:
        # before the Trainer sets anything up (whose own refusal of a name is a bare TypeError)
        for given, meant in _ZO_NAMES.items():
            if given in kwargs:
                raise ZoplanError(
                    f"ZOTrainer has no argument '{given}': did you mean {meant}?", fix=f"pass {meant}=..."
                )
        self.zo_eps = float(_checked("zo_eps", zo_eps))
        seed = None if zo_seed is None else int(_checked("zo_seed", zo_seed))
        self.zo_max_nonfinite = int(_checked("zo_max_nonfinite", zo_max_nonfinite))
        super().__init__(*args, **kwargs)
        _checked("learning_rate", self.args.learning_rate)
        _checked("weight_decay", self.args.weight_decay)
        if self.args.gradient_accumulation_steps != 1:
            raise ZoplanError(
                f"gradient_accumulation_steps={self.args.gradient_accumulation_steps}: a ZO step uses its whole "
                "batch at once",
                fix="use gradient_accumulation_steps=1 and a larger per-device batch",
            )
        # settings a ZO step has no use for, said rather than left to look as if they worked
        fields = type(self.args).__dataclass_fields__
        optim = getattr(self.args.optim, "value", self.args.optim)
        if "optim" in fields and optim != fields["optim"].default:
            warnings.warn(
                f"optim={optim!r} is not used: a ZO step updates the weights by -lr (g z + weight_decay theta), "
                "with no optimizer state",
                stacklevel=2,
            )
        if getattr(self.args, "neftune_noise_alpha", None):
            warnings.warn(
                "neftune_noise_alpha adds no noise here: both forward passes of a ZO step run in eval mode (the "
                "same function at both points)",
                stacklevel=2,
            )
        self.zo_seed = int(self.args.seed) if seed is None else seed
        # each step's line as zoplan's journal holds it (seed, the two losses, projected gradient,
        # lr, eps, weight decay, skipped): zoplan.runtime.replay.replay(base_model, trainer.zo_steps)
        # rebuilds the weights from them
        self.zo_steps: list[dict[str, Any]] = []
        self._zo_names: tuple[str, ...] = ()  # the parameters trained, one tuple shared by the lines
        self._nonfinite_in_row = 0
        self._logged = 0  # the zo_steps already summed into a logged line
        self.add_callback(_KeepZoSteps(self))

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's, with ``zo_steps`` taken up from a checkpoint it resumes (``ZO_STEPS``), and
        a resume with another zo_seed or zo_eps than the checkpoint's run refused."""
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            checkpoint = get_last_checkpoint(self.args.output_dir)  # (None: the Trainer says so)
        if isinstance(checkpoint, (str, os.PathLike)):
            self._resume_zo(Path(checkpoint))
        before = len(self.zo_steps)
        self._eps_checked = False
        result = super().train(resume_from_checkpoint, *args, **kwargs)
        self._judge(self.zo_steps[before:])
        return result

    def _judge(self, rows: list[dict[str, Any]]) -> None:
        """What ``zoplan run`` says of a run's end, said of this ``train()``'s steps (``rows``): an
        error where it ends on steps whose losses were not finite (fewer in a row than
        zo_max_nonfinite) or on a held-out loss that is not (it returned as a success, and
        save_model wrote weights that give NaN); a warning where the loss rose (it diverged), or
        where no perturbation changed it (every g exactly 0)."""
        if not rows:
            return
        last = next((i for i, row in enumerate(reversed(rows)) if not row["skipped"]), len(rows))
        evals = [e["eval_loss"] for e in self.state.log_history if "eval_loss" in e]
        if last or (evals and not math.isfinite(evals[-1])):
            said = (
                f"the loss was not finite in any of the {len(rows)} step(s) this train() took: every update was "
                "skipped, nothing was trained"
                if last == len(rows)
                else f"its last {last} step(s) had losses that are not finite (their updates skipped)"
                if last
                else f"the last held-out loss is {evals[-1]}"
            )
            raise ZoplanError(
                f"training ended on weights whose loss is not finite: {said}; the trainer's model gives losses "
                "that are not finite (do not save it)",
                fix="train again with a lower learning_rate or zo_eps (MeZO's eps is 1e-3), or in a wider dtype "
                "(bf16 or fp32 instead of fp16); check the data's labels (every one -100: no loss)",
            )
        losses = [(r["loss_plus"] + r["loss_minus"]) / 2 for r in rows if not r["skipped"]]
        k = max(1, len(losses) // 10)
        rose = diverged(
            sum(losses[:k]) / k if losses else None,
            sum(losses[-k:]) / k if losses else None,
            *(evals[0], evals[-1]) if len(evals) > 1 else (None, None),
            window=k,
            weights="the trainer's weights",
        )
        if rose:
            warnings.warn(rose, stacklevel=3)
        if all(r["projected_grad"] == 0.0 for r in rows if not r["skipped"]):
            warnings.warn(unmoved(len(rows), "zo_eps (MeZO's: 1e-3)"), stacklevel=3)

    def _resume_zo(self, checkpoint: Path) -> None:
        settings, rows = checkpoint / ZO_SETTINGS, checkpoint / ZO_STEPS
        if not settings.is_file() or not rows.is_file():
            return  # a checkpoint without them (a plain Trainer's): zo_steps starts there (said at its first step)
        try:
            kept = json.loads(settings.read_text())
            lines = [json.loads(line) for line in rows.read_text().splitlines() if line.strip()]
        except (OSError, ValueError) as exc:
            raise ZoplanError(
                f"{checkpoint}: {ZO_SETTINGS} or {ZO_STEPS} cannot be read ({exc})",
                fix=f"resume from another checkpoint, or remove both files to resume with zo_steps from {checkpoint.name}",
            ) from None
        for name in ("zo_seed", "zo_eps"):
            if kept.get(name) != getattr(self, name):
                raise ZoplanError(
                    f"{checkpoint} was trained with {name}={kept.get(name)!r}, and this trainer has "
                    f"{name}={getattr(self, name)!r}: its steps would not go on with that run's perturbations",
                    fix=f"pass {name}={kept.get(name)!r}, as the run that saved the checkpoint",
                )
        names: dict[tuple[str, ...], tuple[str, ...]] = {}  # one tuple shared by the lines, as when trained
        for row in lines:
            row["params"] = names.setdefault(tuple(row["params"]), tuple(row["params"]))
        self.zo_steps = lines
        if lines:
            self._zo_names = lines[-1]["params"]

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """A training line tells the ZO step's figure, not the Trainer's: parameters never hold a
        gradient, so its ``grad_norm`` is always 0. ``projected_grad_abs`` is the mean |g| of the
        steps since the last line (g, the projected gradient: the step moves θ by lr·g·z);
        ``skipped_steps`` those of them whose losses were not finite. A line of skipped steps only
        says a loss of nan (the Trainer's filter of losses that are not finite logged 0.0 for
        them, which read as perfect training)."""
        if "loss" in logs:
            logs = dict(logs)
            logs.pop("grad_norm", None)
            since = self.zo_steps[self._logged :]
            new = [abs(r["projected_grad"]) for r in since if not r["skipped"]]
            self._logged = len(self.zo_steps)
            if new:
                logs["projected_grad_abs"] = sum(new) / len(new)
            skipped = sum(1 for r in since if r["skipped"])
            if skipped:
                logs["skipped_steps"] = skipped
                if skipped == len(since):
                    logs["loss"] = float("nan")
        super().log(logs, *args, **kwargs)

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """An optimizer without state, which the Trainer's learning-rate schedule drives: the
        parameters never hold a gradient, so its step changes nothing; the ZO update is applied in
        ``training_step`` with the schedule's current rate. A model with nothing to train is
        refused here, before the first step."""
        if self.optimizer is None:
            params = [p for _, p in _trainable(self.model if model is None else model)]
            self.optimizer = torch.optim.SGD(params, lr=self.args.learning_rate)
        return self.optimizer

    def _zo_lr(self) -> float:
        scheduler = getattr(self, "lr_scheduler", None)
        if scheduler is not None:
            return float(scheduler.get_last_lr()[0])
        return float(self.args.learning_rate)

    def _losses(
        self, model: torch.nn.Module, inputs: dict[str, Any], params: list[tuple[str, Parameter]], seed: int
    ) -> tuple[float, float]:
        """The losses at θ + εz and θ − εz, θ perturbed in place (+ε, −2ε, +ε); θ is put back
        (to float rounding) however the passes end."""
        eps = self.zo_eps
        at = [0.0] * len(params)  # where each parameter stands, in units of εz

        def move(to: float) -> None:
            for i, (name, p) in enumerate(params):
                if at[i] != to:
                    perturb_(p.data, seed, name, (to - at[i]) * eps)
                    at[i] = to

        try:
            with deferred():
                move(1.0)
            # each pass its own dict: the Trainer's compute_loss takes "labels" out of the one it is
            # given (label smoothing, compute_loss_func)
            loss_plus = float(cast(torch.Tensor, self.compute_loss(model, dict(inputs))))
            with deferred():
                move(-1.0)
            loss_minus = float(cast(torch.Tensor, self.compute_loss(model, dict(inputs))))
        finally:
            with deferred():
                move(0.0)
        return loss_plus, loss_minus

    @torch.no_grad()
    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        model.eval()  # the same function at both points: no dropout
        try:
            return self._zo_step(model, inputs)
        finally:
            model.train()  # as the Trainer's own step leaves it

    def _zo_step(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        inputs = self._prepare_inputs(inputs)
        params = _trainable(model)
        step = self.state.global_step
        if not self.zo_steps or step <= self.zo_steps[-1]["step"]:
            self._starting(step)
        seed = step_seed(self.zo_seed, step)
        eps = self.zo_eps
        if not getattr(self, "_eps_checked", True) and params:
            self._eps_checked = True  # (once a train(): on its first step's first trainable tensor)
            # the dtype the forward computes in: the weights', or autocast's (bf16=True, fp16=True)
            dtype = "bf16" if self.args.bf16 else "fp16" if self.args.fp16 else _DTYPE_NAMES.get(params[0][1].dtype)
            said = (
                eps_note(
                    params[0][1].data.flatten(),
                    dtype,
                    eps,
                    of="the first trained tensor's weights",
                    option="zo_eps",
                    where="",
                )
                if dtype
                else None
            )
            if said:
                warnings.warn(said, stacklevel=4)
        loss_plus, loss_minus = self._losses(model, inputs, params, seed)
        g = (loss_plus - loss_minus) / (2 * eps)
        # as zoplan run's engine: a step whose losses or gradient are not finite is skipped, its
        # update (weight decay included) not applied: θ keeps every bit
        finite = all(map(math.isfinite, (loss_plus, loss_minus, g)))
        # the step's line and its update go together: a Ctrl-C waits for both (replay of
        # zo_steps gives the weights)
        with deferred():
            self._apply(step, seed, params, loss_plus, loss_minus, g, finite)
        return torch.tensor((loss_plus + loss_minus) / 2, device=self.args.device)

    def _starting(self, step: int) -> None:
        """The first ZO step of a ``train()``: what ``zo_steps`` can replay from here, said where it
        is not the whole training from the base weights."""
        if self.zo_steps and step <= self.zo_steps[-1]["step"]:
            warnings.warn(
                f"train() starts again at step {step}, which zo_steps holds already: its steps draw the same "
                "perturbations as before (z depends on zo_seed and the step); pass resume_from_checkpoint to go on, "
                "or another zo_seed; zo_steps no longer replays from the base weights alone",
                stacklevel=4,
            )
        elif step > 0:
            warnings.warn(
                f"zo_steps starts at step {step} (training resumed from a checkpoint): replay(weights, zo_steps) "
                f"rebuilds the weights from the checkpoint's (step {step}), not from the base model's",
                stacklevel=4,
            )

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: the weights go back to the best checkpoint's, and so does
        ``zo_steps`` (its later steps are not in the weights any more)."""
        super()._load_best_model()
        best = self.state.best_model_checkpoint
        if best is not None and best.rstrip("/").rsplit("-", 1)[-1].isdigit():
            at = int(best.rstrip("/").rsplit("-", 1)[-1])
            self.zo_steps = [row for row in self.zo_steps if row["step"] < at]

    def _apply(
        self,
        step: int,
        seed: int,
        params: list[tuple[str, Parameter]],
        loss_plus: float,
        loss_minus: float,
        g: float,
        finite: bool,
    ) -> None:
        """Record step ``step`` in ``zo_steps`` and update ``params`` with it (a step whose
        losses are not finite: recorded as skipped, no update)."""
        eps = self.zo_eps
        lr, wd = self._zo_lr(), float(self.args.weight_decay)
        names = tuple(name for name, _ in params)
        if names != self._zo_names:
            self._zo_names = names
        self.zo_steps.append(
            {
                "step": step,
                "seed": seed,
                "params": self._zo_names,  # replay updates these only (a frozen parameter stays)
                "loss_plus": loss_plus,
                "loss_minus": loss_minus,
                "projected_grad": g if finite else 0.0,
                "lr": lr,
                "eps": eps,
                "weight_decay": wd,
                "skipped": not finite,
            }
        )
        if finite:
            self._nonfinite_in_row = 0
            for name, p in params:
                update_tensor(p.data, name, seed, g, lr, wd, decays(name, p))
        else:
            self._nonfinite_in_row += 1
            if self._nonfinite_in_row >= self.zo_max_nonfinite:
                raise ZoplanError(
                    f"the loss was not finite for {self._nonfinite_in_row} steps in a row (up to step {step}); "
                    "the updates of those steps were skipped",
                    fix="lower learning_rate or zo_eps, or check the data (zo_max_nonfinite allows more in a row)",
                )
