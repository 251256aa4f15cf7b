"""``ZOTrainer``: a transformers Trainer whose step is MeZO's (no backward pass, no optimizer state)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

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


def trainer_for(model, tokenizer, out: Path, **args):
    from transformers import TrainingArguments, default_data_collator

    from zoplan.runtime.trainer import ZOTrainer

    zo_eps = args.pop("zo_eps", 1e-3)
    arguments = TrainingArguments(
        str(out),
        per_device_train_batch_size=8,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
        **args,
    )
    return ZOTrainer(
        model=model,
        args=arguments,
        train_dataset=lm_dataset(tokenizer),
        data_collator=default_data_collator,
        zo_eps=zo_eps,
    )


def test_the_trainer_learns_without_gradients_and_its_steps_replay(tiny_dirs, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zoplan.runtime.replay import replay

    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["tiny-opt"])
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["tiny-opt"], dtype=torch.float32)
    model.model.decoder.embed_positions.weight.requires_grad_(False)  # frozen: never perturbed or updated
    frozen = model.model.decoder.embed_positions.weight.clone()
    trainer = trainer_for(model, tokenizer, tmp_path, learning_rate=1e-3, max_steps=24, lr_scheduler_type="linear")
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 24 and sum(losses[-6:]) < sum(losses[:6])  # it learns
    assert all(p.grad is None for p in model.parameters())  # no backward pass ever ran
    assert torch.equal(model.model.decoder.embed_positions.weight, frozen)
    rows = trainer.zo_steps
    assert [r["step"] for r in rows] == list(range(24)) and len({r["seed"] for r in rows}) == 24
    assert rows[0]["lr"] == pytest.approx(1e-3) and rows[-1]["lr"] < rows[0]["lr"]  # the schedule drives the rate
    # the updates are the ones zoplan replay applies: base weights + these rows give the trained
    # weights, up to the rounding of the in-place perturbation (+eps, -2 eps, +eps: a few ulps of
    # float32 a step, ~1e-7 each near 1.0), far below one update (lr * g * z, ~1e-3)
    base = AutoModelForCausalLM.from_pretrained(tiny_dirs["tiny-opt"], dtype=torch.float32)
    base.model.decoder.embed_positions.weight.requires_grad_(False)
    replayed = dict(replay_trainable(base, rows, replay).named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, replayed[name], rtol=0, atol=2e-5, msg=name)


def replay_trainable(model, rows, replay):
    """``replay`` over the trainable parameters only (the frozen ones were never updated)."""
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    replay(model, rows)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in frozen:
                p.copy_(frozen[name])
    return model


def test_accumulated_gradients_and_a_bad_eps_are_refused(tiny_dirs, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zoplan.errors import ZoplanError

    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["tiny-opt"])
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["tiny-opt"])
    with pytest.raises(ZoplanError, match="gradient_accumulation_steps=2"):
        trainer_for(model, tokenizer, tmp_path, gradient_accumulation_steps=2, max_steps=1)
    with pytest.raises(ZoplanError, match="zo_eps 0 must be positive"):
        trainer_for(model, tokenizer, tmp_path, max_steps=1, zo_eps=0)


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
