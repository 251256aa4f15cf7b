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
θ is perturbed in place (+ε, −2ε, +ε), as MeZO does: restoring it costs float rounding, not memory.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import Trainer

from zoplan.errors import ZoplanError
from zoplan.runtime.hostcopy import decays
from zoplan.runtime.perturb import perturb_, step_seed
from zoplan.runtime.zo import update_tensor


class ZOTrainer(Trainer):
    """``transformers.Trainer`` with MeZO's step (module docstring). ``zo_eps``: the perturbation
    scale ε; ``zo_seed``: the run's seed for z (default: ``args.seed``). The learning rate, its
    schedule and the weight decay are the TrainingArguments'."""

    def __init__(self, *args: Any, zo_eps: float = 1e-3, zo_seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not zo_eps > 0:
            raise ZoplanError(f"zo_eps {zo_eps} must be positive", fix="MeZO's is 1e-3")
        if self.args.gradient_accumulation_steps != 1:
            raise ZoplanError(
                f"gradient_accumulation_steps={self.args.gradient_accumulation_steps}: a ZO step uses its whole "
                "batch at once",
                fix="use gradient_accumulation_steps=1 and a larger per-device batch",
            )
        self.zo_eps = float(zo_eps)
        self.zo_seed = int(self.args.seed if zo_seed is None else zo_seed)
        # each step's (seed, projected gradient, lr, weight decay), as zoplan's journal holds them:
        # zoplan.runtime.replay.replay(base_model, trainer.zo_steps) rebuilds the weights from them
        self.zo_steps: list[dict[str, Any]] = []

    def create_optimizer(self):  # type: ignore[override]
        """An optimizer without state, which the Trainer's learning-rate schedule drives: the
        parameters never hold a gradient, so its step changes nothing; the ZO update is applied in
        ``training_step`` with the schedule's current rate."""
        if self.optimizer is None:
            trainable = [p for p in self.model.parameters() if p.requires_grad]
            self.optimizer = torch.optim.SGD(trainable, lr=self.args.learning_rate)
        return self.optimizer

    def _zo_lr(self) -> float:
        scheduler = getattr(self, "lr_scheduler", None)
        if scheduler is not None:
            return float(scheduler.get_last_lr()[0])
        return float(self.args.learning_rate)

    @torch.no_grad()
    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:  # type: ignore[override]
        model.eval()  # the same function at both points: no dropout
        inputs = self._prepare_inputs(inputs)
        params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not params:
            raise ZoplanError("the model has no parameter that requires a gradient: nothing to train")
        seed = step_seed(self.zo_seed, self.state.global_step)
        eps = self.zo_eps

        def shift(scale: float) -> None:
            for name, p in params:
                perturb_(p.data, seed, name, scale)

        shift(eps)
        loss_plus = float(self.compute_loss(model, inputs))
        shift(-2 * eps)
        loss_minus = float(self.compute_loss(model, inputs))
        shift(eps)
        g = (loss_plus - loss_minus) / (2 * eps)
        if not (math.isfinite(loss_plus) and math.isfinite(loss_minus)):
            g = 0.0  # a non-finite loss changes nothing (zoplan run skips such a step too)
        lr, wd = self._zo_lr(), float(self.args.weight_decay)
        self.zo_steps.append(
            {"step": self.state.global_step, "seed": seed, "projected_grad": g, "lr": lr, "weight_decay": wd}
        )
        for name, p in params:
            update_tensor(p.data, name, seed, g, lr, wd, decays(name, p))
        return torch.tensor((loss_plus + loss_minus) / 2, device=self.args.device)
