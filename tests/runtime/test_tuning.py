"""Adapters on read-only blocks (zoplan.runtime.tuning): LoRA computes what PEFT's LoRA computes,
trains the same adapter in every layout, runs its read-only step program op by op, resumes and
replays bit for bit, and is saved in PEFT's layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zoplan.runtime.launch import run
from zoplan.runconfig import make
from zoplan.tuning import Tuning

from tests.runtime.test_layouts import assert_ran_its_program, cpu_topology, planned

STEPS = 3
LORA = Tuning("lora", lora_rank=4, lora_alpha=8.0)


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "adapter_model.safetensors"))


def train(plan_path: Path, model_dir: Path, out: Path, steps: int = STEPS, **extra) -> dict[str, torch.Tensor]:
    run(make(plan=plan_path, model=str(model_dir), steps=steps, output=out, quiet=True, **extra))
    return adapter(out)


@pytest.mark.parametrize("family", ["tiny-opt", "tiny-llama"])
def test_lora_computes_what_peft_computes(family: str, tiny_dirs) -> None:
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from zoplan.runtime.adapters import adapter_for
    from zoplan.runtime.tuning import LoRA

    model_dir = tiny_dirs[family]
    ours = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    lora = LoRA(ours, adapter_for(ours.config.model_type), LORA, seed=5, device=torch.device("cpu"), signs=(1, -1))
    with torch.no_grad():  # B is zero at the start: give it values, so that LoRA changes the output
        lora.master.add_(torch.randn(lora.numel, generator=torch.Generator().manual_seed(0)) * 0.05)
    theirs = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    ).eval()
    # our names are PEFT's saved ones: its own loader takes the tensors as they are
    result = set_peft_model_state_dict(theirs, {n: t.clone() for n, t in lora.tensors().items()})
    assert not result.unexpected_keys
    ids = torch.randint(4, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()(input_ids=ids).logits
        lora.select(None)
        mine = ours(input_ids=ids).logits
        peft = theirs(input_ids=ids).logits
        assert not torch.allclose(mine, base, atol=1e-4)
        torch.testing.assert_close(mine, peft, rtol=1e-5, atol=1e-5)
        # a branch's copy is the master moved by +-eps z, the same z for both
        lora.perturb(seed=7, eps=1e-2)
        diff_plus, diff_minus = lora.copies[1] - lora.master, lora.master - lora.copies[-1]
        torch.testing.assert_close(diff_plus, diff_minus, rtol=0, atol=1e-6)
        assert 0.005 < diff_plus.abs().mean() < 0.02


def test_lora_trains_the_same_adapter_in_every_layout_on_read_only_blocks(tiny_dirs, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = tiny_dirs["tiny-llama"]
    four = cpu_topology(tmp_path, 4)
    layouts = {
        "1x1-whole": dict(perturbation=1, data=1, gpus=("rank0",), upload="whole", resident=0),
        "2x1-sliced4-prefetch2": dict(
            perturbation=2, data=1, upload="sliced", movers="compute", slices=4, resident=0, prefetch=2
        ),
        "1x2-whole-resident": dict(perturbation=1, data=2, upload="whole", resident=2, prefetch=2),
        "1x1-relay": dict(perturbation=1, data=1, gpus=("rank0",), upload="sliced", movers="all", slices=4, resident=1),
    }
    trained = {}
    for name, pins in layouts.items():
        topo = cpu_topology(tmp_path, 2) if name == "1x1-relay" else four
        plan_path = planned(tmp_path, model_dir, topo, name, tuning=LORA, **pins)
        trained[name] = train(plan_path, model_dir, tmp_path / name)
        # the blocks are only read: the program has no update, barrier or write-back, and the
        # runtime ran exactly that program
        assert_ran_its_program(plan_path, tmp_path / name)
        spans = (tmp_path / name / "spans-rank0.jsonl").read_text()
        assert '"d2h"' not in spans and '"update ' not in spans, name
        assert not (tmp_path / name / "model" / "model.safetensors").exists()  # the adapter alone
    first = trained["1x1-whole"]
    assert any(n.endswith("lora_B.weight") and t.abs().max() > 0 for n, t in first.items())  # it trained
    for name, weights in trained.items():
        assert weights.keys() == first.keys()
        for n in first:
            torch.testing.assert_close(weights[n], first[n], rtol=1e-5, atol=1e-7, msg=f"{name}: {n}")

    # PEFT loads it onto the base model, and transformers alone does too (peft installed)
    out = tmp_path / "1x1-whole" / "model"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["base_model_name_or_path"] == str(model_dir)
    ids = torch.randint(4, 200, (1, 10), generator=torch.Generator().manual_seed(2))
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        before = base(input_ids=ids).logits
        via_peft = PeftModel.from_pretrained(base, out).eval()(input_ids=ids).logits
        direct = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(input_ids=ids).logits
    assert not torch.allclose(via_peft, before, atol=1e-6)
    torch.testing.assert_close(direct, via_peft)


def test_a_lora_run_resumes_and_replays_to_the_same_adapter(tiny_dirs, tmp_path: Path) -> None:
    from zoplan.runtime.replay import replay_to

    model_dir = tiny_dirs["tiny-opt"]
    two = cpu_topology(tmp_path, 2)
    plan_path = planned(tmp_path, model_dir, two, "2x1", tuning=LORA, perturbation=2, data=1, upload="whole")
    whole = train(plan_path, model_dir, tmp_path / "whole", steps=5)
    # 3 steps with a snapshot after 2, then on to 5: the snapshot's adapter + one journal line
    train(plan_path, model_dir, tmp_path / "parts", steps=3, snapshot_every=2, keep_snapshots=0)
    assert (tmp_path / "parts" / "snapshots" / "step-00000002" / "adapter_model.safetensors").exists()
    run(make(model=str(model_dir), steps=5, output=tmp_path / "parts", quiet=True), resume=True)
    resumed = adapter(tmp_path / "parts")
    for n in whole:
        assert torch.equal(resumed[n], whole[n]), n
    # `zoplan replay`: the initial adapter (from the run's seed) and the journal alone
    assert replay_to(str(model_dir), tmp_path / "whole" / "journal.jsonl", tmp_path / "replayed") == 5
    replayed = load_file(str(tmp_path / "replayed" / "adapter_model.safetensors"))
    for n in whole:
        assert torch.equal(replayed[n], whole[n]), n
