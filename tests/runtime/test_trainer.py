"""``ZOTrainer``: a transformers Trainer whose step is MeZO's (no backward pass, no optimizer state)."""

from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path

import pytest
import torch
from zoplan.runtime.checkpoint import dtype_kwarg

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("accelerate") is None, reason="transformers' Trainer needs accelerate"
)


def lm_dataset(tokenizer, n: int = 32) -> list[dict]:
    from zoplan.runtime.data import make_sentiment

    rows = []
    for record in make_sentiment(n, seed=5):
        ids = tokenizer(record["text"], truncation=True, max_length=24, padding="max_length")
        rows.append({**ids, "labels": [t if m else -100 for t, m in zip(ids["input_ids"], ids["attention_mask"])]})
    return rows


def trainer_for(model, tokenizer, out: Path, *, dataset: list[dict] | None = None, trainer=None, **args):
    """A ZOTrainer of ``model`` (``trainer``: a subclass of it) on ``dataset`` (default: the
    sentiment texts); ``zo_*`` arguments go to it, the rest to its TrainingArguments."""
    from transformers import TrainingArguments, default_data_collator

    from zoplan.runtime.trainer import ZOTrainer

    zo = {"zo_eps": 1e-3, **{name: args.pop(name) for name in list(args) if name.startswith("zo_")}}
    defaults = dict(
        per_device_train_batch_size=8,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
    )
    arguments = TrainingArguments(str(out), **{**defaults, **args})
    return (trainer or ZOTrainer)(
        model=model,
        args=arguments,
        train_dataset=lm_dataset(tokenizer) if dataset is None else dataset,
        data_collator=default_data_collator,
        **zo,
    )


def test_the_trainer_learns_without_gradients_and_its_steps_replay(tiny_dirs, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zoplan.errors import ZoplanError
    from zoplan.runtime.replay import replay

    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["tiny-opt"])
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["tiny-opt"], **dtype_kwarg(torch.float32))
    model.model.decoder.embed_positions.weight.requires_grad_(False)  # frozen: never perturbed or updated
    frozen = model.model.decoder.embed_positions.weight.clone()
    trainer = trainer_for(model, tokenizer, tmp_path, learning_rate=1e-3, max_steps=24, lr_scheduler_type="linear")
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 24 and sum(losses[-6:]) < sum(losses[:6])  # it learns
    # each line tells the step's projected gradient, not the Trainer's grad_norm (always 0 here)
    lines = [row for row in trainer.state.log_history if "loss" in row]
    assert all("grad_norm" not in row for row in lines), lines[0]
    assert [row["projected_grad_abs"] for row in lines] == [abs(r["projected_grad"]) for r in trainer.zo_steps]
    assert all(p.grad is None for p in model.parameters())  # no backward pass ever ran
    assert model.training  # as the Trainer leaves it (each step evaluates in eval mode)
    assert torch.equal(model.model.decoder.embed_positions.weight, frozen)
    rows = trainer.zo_steps
    assert [r["step"] for r in rows] == list(range(24)) and len({r["seed"] for r in rows}) == 24
    assert rows[0]["lr"] == pytest.approx(1e-3) and rows[-1]["lr"] < rows[0]["lr"]  # the schedule drives the rate
    # the updates are the ones zoplan replay applies: base weights + these rows give the trained
    # weights, up to the rounding of the in-place perturbation (+eps, -2 eps, +eps: a few ulps of
    # float32 a step, ~1e-7 each near 1.0), far below one update (lr * g * z, ~1e-3); the rows
    # name the parameters trained, so a base loaded afresh (nothing frozen) keeps the frozen one
    base = AutoModelForCausalLM.from_pretrained(tiny_dirs["tiny-opt"], **dtype_kwarg(torch.float32))
    assert all(r["params"] is rows[0]["params"] for r in rows)  # one tuple, not a list a step
    replayed = dict(replay(base, rows).named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, replayed[name], rtol=0, atol=2e-5, msg=name)
    assert torch.equal(replayed["model.decoder.embed_positions.weight"], frozen)
    # onto a model without a parameter the rows trained: refused, not skipped
    with pytest.raises(ZoplanError, match="of the journal trained 'model.decoder.embed_tokens.weight'"):
        replay(torch.nn.Linear(2, 2), rows)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (-0.0 is not 0.0, a NaN is itself)."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def bits_of(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def changed(model, before: dict[str, torch.Tensor]) -> list[str]:
    """The parameters of ``model`` whose bits differ from ``before``'s."""
    return [name for name, p in model.named_parameters() if not same_bits(p.detach(), before[name])]


def perturbed_and_back(weights: dict[str, torch.Tensor], seeds: list[int], eps: float) -> dict[str, torch.Tensor]:
    """``weights`` after the in-place perturbations of steps of ``seeds`` (+eps, -2 eps, +eps),
    with no update: what a skipped step leaves, to the bit (their float rounding only)."""
    from zoplan.runtime.perturb import perturb_

    out = {name: w.clone() for name, w in weights.items()}
    for seed in seeds:
        for scale in (eps, -2 * eps, eps):
            for name, w in out.items():
                perturb_(w, seed, name, scale)
    return out


def test_accumulated_gradients_and_a_bad_eps_are_refused(tiny_dirs, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zoplan.errors import ZoplanError

    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["tiny-opt"])
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["tiny-opt"])
    with pytest.raises(ZoplanError, match="gradient_accumulation_steps=2"):
        trainer_for(model, tokenizer, tmp_path, gradient_accumulation_steps=2, max_steps=1)
    with pytest.raises(ZoplanError, match="zo_eps must be more than 0, got 0"):
        trainer_for(model, tokenizer, tmp_path, max_steps=1, zo_eps=0)


@pytest.mark.parametrize(
    "given, said",
    [
        ({"zo_eps": float("inf")}, "zo_eps must be a finite number, got inf"),
        ({"zo_eps": float("nan")}, "zo_eps must be a finite number, got nan"),
        ({"zo_eps": "1e-3"}, r"zo_eps must be a number \(an int or a float\), got '1e-3' \(str\)"),
        ({"zo_eps": True}, r"zo_eps must be a number.*, got True \(bool\)"),
        ({"zo_eps": None}, r"zo_eps must be a number .*, got None"),
        ({"zo_eps": -1e-3}, "zo_eps must be more than 0, got -0.001"),
        ({"zo_seed": -1}, "zo_seed must be at least 0, got -1"),
        ({"zo_seed": 2**63}, "zo_seed must be less than 9223372036854775808"),
        ({"zo_seed": "7"}, r"zo_seed must be a whole number \(an int\), got '7' \(str\)"),
        ({"zo_seed": 1.5}, r"zo_seed must be a whole number \(an int\), got 1.5"),
        ({"zo_max_nonfinite": 0}, "zo_max_nonfinite must be at least 1, got 0"),
        ({"zo_max_nonfinite": 2.0}, r"zo_max_nonfinite must be a whole number"),
        # the settings of TrainingArguments the ZO step reads (TrainingArguments takes them as given)
        ({"learning_rate": float("inf")}, "TrainingArguments.learning_rate must be a finite number, got inf"),
        ({"learning_rate": -1e-3}, "TrainingArguments.learning_rate must be more than 0"),
        ({"learning_rate": "1e-3"}, r"TrainingArguments.learning_rate must be a number .*, got '1e-3' \(str\)"),
        ({"weight_decay": float("nan")}, "TrainingArguments.weight_decay must be a finite number, got nan"),
        ({"weight_decay": -0.1}, "TrainingArguments.weight_decay must be at least 0, got -0.1"),
    ],
    ids=lambda case: ",".join(f"{k}={v!r}" for k, v in case.items()) if isinstance(case, dict) else "",
)
def test_every_zo_setting_is_checked_up_front(tiny_dirs, tmp_path: Path, given: dict, said: str) -> None:
    """ZOTrainer's own arguments and what of TrainingArguments its step reads, checked when it is
    made with zoplan's bounds (those of a plan's ZO settings and of zoplan run's options): a bad
    one is a ZoplanError naming it and how to fix it, never NaN weights (zo_eps=inf) or a raw
    TypeError (zo_eps="1e-3")."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zoplan.errors import ZoplanError

    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["tiny-opt"])
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["tiny-opt"])
    with pytest.raises(ZoplanError, match=said) as caught:
        trainer_for(model, tokenizer, tmp_path, max_steps=1, **given)
    assert caught.value.fix


@pytest.mark.parametrize("given,meant", [("eps", "zo_eps"), ("seed", "zo_seed"), ("max_nonfinite", "zo_max_nonfinite")])
def test_a_zo_setting_under_another_name_gets_the_one_meant(tiny_dirs, tmp_path: Path, given: str, meant: str) -> None:
    """Transformers' Trainer would refuse it with a bare TypeError."""
    from transformers import TrainingArguments

    from zoplan.errors import ZoplanError
    from zoplan.runtime.trainer import ZOTrainer

    args = TrainingArguments(str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ZoplanError, match=f"ZOTrainer has no argument '{given}': did you mean {meant}"):
        ZOTrainer(model=torch.nn.Linear(2, 2), args=args, **{given: 1})


def test_numbers_of_numpy_are_numbers(tiny_dirs, tmp_path: Path) -> None:
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["tiny-opt"])
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["tiny-opt"])
    trainer = trainer_for(
        model,
        tokenizer,
        tmp_path,
        max_steps=1,
        zo_eps=np.float64(1e-2),
        zo_seed=np.int64(7),
        zo_max_nonfinite=np.int32(3),
    )
    assert (trainer.zo_eps, trainer.zo_seed, trainer.zo_max_nonfinite) == (1e-2, 7, 3)
    assert type(trainer.zo_eps) is float and type(trainer.zo_seed) is int


def test_a_model_with_nothing_to_train_is_refused_before_the_first_step(tiny_dirs, tmp_path: Path) -> None:
    """The ZoplanError, not torch's "optimizer got an empty parameter list" from the optimizer the
    Trainer makes first."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zoplan.errors import ZoplanError

    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["tiny-opt"])
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["tiny-opt"]).requires_grad_(False)
    trainer = trainer_for(model, tokenizer, tmp_path, max_steps=1)
    with pytest.raises(ZoplanError, match="no parameter that requires a gradient: nothing to train") as caught:
        trainer.train()
    assert "get_peft_model" in (caught.value.fix or "")


def unlabelled(tokenizer, n: int = 16) -> list[dict]:
    """Sequences with no token to predict (every label -100): their loss is 0 / 0, NaN."""
    return [{**row, "labels": [-100] * len(row["labels"])} for row in lm_dataset(tokenizer, n)]


def test_a_step_whose_loss_is_not_finite_applies_no_update(tiny_dirs, tmp_path: Path) -> None:
    """As zoplan run skips it: no update (its weight decay neither: 0.5 here moved weights by
    4.6e-4 before), the weights as the perturbation's round trip leaves them, a journal row with
    skipped: true and g 0."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["tiny-opt"])
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["tiny-opt"], **dtype_kwarg(torch.float32))
    before = bits_of(model)
    trainer = trainer_for(
        model, tokenizer, tmp_path, dataset=unlabelled(tokenizer), learning_rate=1e-2, weight_decay=0.5, max_steps=1
    )
    from zoplan.errors import ZoplanError

    with pytest.raises(ZoplanError, match="not finite in any of the 1 step"):  # (nothing trained: said)
        trainer.train()
    (row,) = trainer.zo_steps
    assert changed(model, perturbed_and_back(before, [row["seed"]], 1e-3)) == []
    assert row["skipped"] is True and row["projected_grad"] == 0.0 and math.isnan(row["loss_plus"])


def test_nonfinite_losses_in_a_row_stop_the_training(tiny_dirs, tmp_path: Path) -> None:
    """zoplan run's --max-nonfinite: so many skipped steps in a row are an error, not a run that
    ends normally having learnt nothing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zoplan.errors import ZoplanError

    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["tiny-opt"])
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["tiny-opt"], **dtype_kwarg(torch.float32))
    before = bits_of(model)
    trainer = trainer_for(
        model, tokenizer, tmp_path, dataset=unlabelled(tokenizer, 32), max_steps=4, zo_max_nonfinite=2
    )
    with pytest.raises(ZoplanError, match="the loss was not finite for 2 steps in a row \\(up to step 1\\)"):
        trainer.train()
    assert [r["skipped"] for r in trainer.zo_steps] == [True, True]
    assert changed(model, perturbed_and_back(before, [r["seed"] for r in trainer.zo_steps], 1e-3)) == []


def test_a_step_cut_short_leaves_the_weights_as_they_were(tiny_dirs, tmp_path: Path) -> None:
    """An error in the second forward pass (out of memory, Ctrl-C) does not leave θ perturbed:
    the perturbation is taken back, as at the end of a step (to its float rounding)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zoplan.runtime.perturb import step_seed
    from zoplan.runtime.trainer import ZOTrainer

    class Failing(ZOTrainer):
        calls = 0

        def compute_loss(self, *args, **kwargs):
            Failing.calls += 1
            if Failing.calls == 2:
                raise KeyboardInterrupt
            return super().compute_loss(*args, **kwargs)

    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["tiny-opt"])
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["tiny-opt"], **dtype_kwarg(torch.float32))
    before = bits_of(model)
    trainer = trainer_for(model, tokenizer, tmp_path, trainer=Failing, max_steps=1)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    seed = step_seed(trainer.zo_seed, 0)
    assert Failing.calls == 2 and changed(model, perturbed_and_back(before, [seed], 1e-3)) == []


@pytest.mark.parametrize("where", ["update", "restore"])
def test_ctrl_c_in_a_parameter_loop_waits_for_its_end(
    where: str, tiny_dirs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C that came while the update ran over the parameters left some updated and others not
    (56 of 69 differed from the replay of zo_steps, which had the step); one while a perturbation
    was taken back left a parameter perturbed. Now the loop ends first: the weights are the
    replay of zo_steps (update), or the step before's (restore), to their float rounding."""
    import signal
    import threading

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zoplan.runtime import trainer as zt
    from zoplan.runtime.perturb import step_seed
    from zoplan.runtime.replay import replay

    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["tiny-opt"])
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["tiny-opt"], **dtype_kwarg(torch.float32))
    before = bits_of(model)
    n = len(list(model.parameters()))
    # the call at which Ctrl-C comes: in step 2's update, or in step 0's perturbation taken back
    # (the third of its three moves over the parameters)
    name, at = ("update_tensor", 2 * n + n // 2) if where == "update" else ("perturb_", 2 * n + n // 2)
    real, calls = getattr(zt, name), [0]

    def interrupted(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at:
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(zt, name, interrupted)
    trainer = trainer_for(model, tokenizer, tmp_path, learning_rate=1e-3, max_steps=5)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert calls[0] == 3 * n, calls  # the loop ran to its end
    if where == "update":
        assert [r["step"] for r in trainer.zo_steps] == [0, 1, 2]
        base = AutoModelForCausalLM.from_pretrained(tiny_dirs["tiny-opt"], **dtype_kwarg(torch.float32))
        replayed = dict(replay(base, trainer.zo_steps).named_parameters())
        for pname, p in model.named_parameters():
            torch.testing.assert_close(p, replayed[pname], rtol=0, atol=2e-5, msg=pname)
    else:
        assert trainer.zo_steps == []
        assert changed(model, perturbed_and_back(before, [step_seed(trainer.zo_seed, 0)], 1e-3)) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_readme_trainer_example_runs(tiny_dirs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """README's Trainer block, given a tiny model, its dataset and collator, for 2 steps."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, default_data_collator

    from .test_api import python_blocks

    code = python_blocks()[1]
    assert "ZOTrainer(" in code and len(code.strip().splitlines()) <= 10
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["tiny-opt"])
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["tiny-opt"])
    before = model.lm_head.weight.clone()
    scope = {"model": model, "train": lm_dataset(tokenizer), "collator": default_data_collator}
    monkeypatch.chdir(tmp_path)
    code = code.replace("max_steps=1000", "max_steps=2, use_cpu=True, report_to=[]").replace("1e-6", "1e-3")
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["trainer"].state.global_step == 2 and not torch.equal(model.lm_head.weight, before)


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed")
@pytest.mark.parametrize("adapter", ["lora", "prefix"])
def test_zo_lora_and_prefix_train_only_the_adapter_and_load_with_peft(tiny_dirs, tmp_path: Path, adapter: str) -> None:
    """MeZO's parameter-efficient variants through PEFT: only the adapter's parameters are
    perturbed and updated (the base weights stay bit for bit), and the result loads with
    ``PeftModel.from_pretrained``."""
    from peft import LoraConfig, PeftModel, PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["tiny-opt"])
    config = (
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
        if adapter == "lora"
        else PrefixTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM")
    )
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dirs["tiny-opt"]), config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # MeZO's settings for each (docs/runtime.md): LoRA lr 5e-5 eps 1e-2, prefix lr 1e-3 eps 1e-1
    lr, eps = (5e-5, 1e-2) if adapter == "lora" else (1e-3, 1e-1)
    trainer = trainer_for(model, tokenizer, tmp_path, learning_rate=lr, max_steps=3, zo_eps=eps)
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable and 0 < len(trainable) < len(before)  # the adapter, all of it, only it
    trainer.save_model(str(tmp_path / "adapter"))
    again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dirs["tiny-opt"]), tmp_path / "adapter")
    mine, loaded = model.state_dict(), again.state_dict()
    assert mine.keys() == loaded.keys() and all(torch.equal(mine[k], loaded[k]) for k in mine)


def test_half_precision_weights_are_refused_since_the_in_place_perturbation_would_move_them(
    tiny_dirs, tmp_path: Path
) -> None:
    """A bf16 model: the +eps, -2 eps, +eps round trip moved most of the weights by far more than
    the updates (docs/runtime.md), without a word."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zoplan.errors import ZoplanError

    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["tiny-opt"])
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["tiny-opt"], **dtype_kwarg(torch.bfloat16))
    before = bits_of(model)
    trainer = trainer_for(model, tokenizer, tmp_path, max_steps=2)
    with pytest.raises(ZoplanError, match=r"is bfloat16: ZOTrainer perturbs the weights in place") as said:
        trainer.train()
    assert "dtype=torch.float32" in (said.value.fix or "") and changed(model, before) == []


def test_the_trainer_s_habits_keep_zo_steps_true(tiny_dirs, tmp_path: Path) -> None:
    """What a Trainer user does: label smoothing (its compute_loss took "labels" out of the
    inputs, so the second pass had none: a ValueError), load_best_model_at_end (the weights went
    back to a checkpoint while zo_steps kept every step: replay gave other weights), a second
    train() (the same perturbations again, without a word), a compiled model (z drawn under
    other names: other steps, and a replay onto the base refused)."""
    import warnings

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zoplan.runtime.replay import replay
    from zoplan.runtime.trainer import _trainable

    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["tiny-opt"])
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["tiny-opt"], **dtype_kwarg(torch.float32))
    data = lm_dataset(tokenizer)
    from transformers import TrainingArguments, default_data_collator

    from zoplan.runtime.trainer import ZOTrainer

    arguments = TrainingArguments(
        str(tmp_path),
        per_device_train_batch_size=8,
        report_to=[],
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
        learning_rate=1e-3,
        max_steps=6,
        label_smoothing_factor=0.1,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=True,  # the worst: an early checkpoint, so that steps come after it
    )
    trainer = ZOTrainer(
        model=model,
        args=arguments,
        train_dataset=data,
        eval_dataset=data[:8],
        data_collator=default_data_collator,
        zo_eps=1e-3,
    )
    trainer.train()
    best = int(trainer.state.best_model_checkpoint.rsplit("-", 1)[-1])
    assert best < 6 and [r["step"] for r in trainer.zo_steps] == list(range(best))
    base = AutoModelForCausalLM.from_pretrained(tiny_dirs["tiny-opt"], **dtype_kwarg(torch.float32))
    replayed = dict(replay(base, trainer.zo_steps).named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, replayed[name], rtol=0, atol=2e-5, msg=name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.args.load_best_model_at_end = False
        trainer.train()
    assert any("train() starts again at step 0" in str(w.message) for w in caught), [str(w.message) for w in caught]
    # a compiled model's parameters, by their uncompiled names
    wrapper = torch.nn.Module()
    wrapper._orig_mod = base
    assert [n for n, _ in _trainable(wrapper)] == [n for n, _ in _trainable(base)]


@pytest.mark.parametrize(
    ("given", "said"),
    [({"optim": "adafactor"}, "optim='adafactor' is not used"), ({"neftune_noise_alpha": 5.0}, "neftune")],
)
def test_settings_a_zo_step_has_no_use_for_are_said(tiny_dirs, tmp_path: Path, given: dict, said: str) -> None:
    """An optimizer choice or NEFTune noise was silently without effect."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["tiny-opt"])
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["tiny-opt"], **dtype_kwarg(torch.float32))
    with pytest.warns(UserWarning, match=said):
        trainer_for(model, tokenizer, tmp_path, max_steps=1, **given)


def test_a_resumed_training_takes_up_zo_steps_from_its_checkpoint(tiny_dirs, tmp_path: Path) -> None:
    """After resume_from_checkpoint, zo_steps held the resumed process's steps only:
    replay(base, zo_steps) gave other weights, and a resume with another zo_seed went on with
    other perturbations, without a word. A checkpoint now keeps them (zo_steps.jsonl, and the
    settings z depends on)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zoplan.errors import ZoplanError
    from zoplan.runtime.replay import replay
    from zoplan.runtime.trainer import ZO_STEPS

    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["tiny-opt"])

    def fresh():
        return AutoModelForCausalLM.from_pretrained(tiny_dirs["tiny-opt"], **dtype_kwarg(torch.float32))

    args = dict(learning_rate=1e-3, max_steps=4, save_strategy="steps", save_steps=2)
    whole = trainer_for(fresh(), tokenizer, tmp_path / "whole", **args)
    whole.train()
    assert (tmp_path / "whole" / "checkpoint-2" / ZO_STEPS).read_text().count("\n") == 2
    with pytest.raises(ZoplanError, match="was trained with zo_seed=42, and this trainer has zo_seed=7"):
        trainer_for(fresh(), tokenizer, tmp_path / "whole", zo_seed=7, **args).train(
            resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2")
        )
    resumed = trainer_for(fresh(), tokenizer, tmp_path / "whole", **args)
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    assert [r["step"] for r in resumed.zo_steps] == [0, 1, 2, 3]
    assert [r["seed"] for r in resumed.zo_steps] == [r["seed"] for r in whole.zo_steps]
    for (name, p), q in zip(resumed.model.named_parameters(), whole.model.parameters()):
        assert torch.equal(p, q), name  # (the Trainer's own resume: bit for bit)
    replayed = dict(replay(fresh(), resumed.zo_steps).named_parameters())
    for name, p in resumed.model.named_parameters():
        torch.testing.assert_close(p, replayed[name], rtol=0, atol=2e-5, msg=name)


def test_a_training_that_ends_badly_is_said_as_zoplan_run_says_it(tiny_dirs, tmp_path: Path) -> None:
    """ZOTrainer had none of zoplan run's checks of a run's end: a training ending on steps whose
    losses were not finite (fewer in a row than zo_max_nonfinite) returned as a success, its
    skipped steps logged as loss 0.0, and save_model wrote weights that give NaN; one that diverged
    (lr 0.03: 7.2 -> 181652), or whose eps moved nothing, said nothing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zoplan.errors import ZoplanError

    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["tiny-opt"])

    def fresh():
        return AutoModelForCausalLM.from_pretrained(tiny_dirs["tiny-opt"], **dtype_kwarg(torch.float32))

    trainer = trainer_for(fresh(), tokenizer, tmp_path / "nan", learning_rate=1.0, max_steps=14, zo_max_nonfinite=1000)
    with pytest.raises(ZoplanError, match="training ended on weights whose loss is not finite: its last"):
        trainer.train()
    skipped = [e for e in trainer.state.log_history if e.get("skipped_steps")]
    assert skipped and all(math.isnan(e["loss"]) for e in skipped if e["skipped_steps"] == 1)  # (never 0.0)
    trainer = trainer_for(fresh(), tokenizer, tmp_path / "up", learning_rate=0.03, max_steps=30)
    with pytest.warns(UserWarning, match="the run diverged"):
        trainer.train()
    trainer = trainer_for(fresh(), tokenizer, tmp_path / "flat", learning_rate=1e-3, max_steps=4, zo_eps=1e-12)
    with pytest.warns(UserWarning) as said:
        trainer.train()
    text = [str(w.message) for w in said]
    assert any("below the resolution of fp32" in t and "zo_eps" in t for t in text), text
    assert any("in 4 steps no perturbation changed the loss" in t for t in text), text
    trainer = trainer_for(fresh(), tokenizer, tmp_path / "fine", learning_rate=1e-3, max_steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a training that learns: nothing said
        trainer.train()
