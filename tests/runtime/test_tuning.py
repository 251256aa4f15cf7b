"""Adapters on read-only blocks (zoplan.runtime.tuning): LoRA and prefix compute what PEFT's
compute, a prefix starts as the tokens it was taken from, each trains the same adapter in every
layout, runs its read-only step program op by op, resumes and replays bit for bit, and is saved in
PEFT's layout."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zoplan.runtime.launch import run
from zoplan.runconfig import make
from zoplan.tuning import Tuning

from tests.runtime.test_layouts import assert_ran_its_program, cpu_topology, planned
from zoplan.runtime.checkpoint import dtype_kwarg

STEPS = 3
LORA = Tuning("lora", lora_rank=4, lora_alpha=8.0)
PREFIX = Tuning("prefix", prefix_tokens=3)
TUNINGS = {"lora": LORA, "prefix": PREFIX}


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
    ours = AutoModelForCausalLM.from_pretrained(model_dir, **dtype_kwarg(torch.float32)).eval()
    lora = LoRA(ours, adapter_for(ours.config.model_type), LORA, seed=5, device=torch.device("cpu"), signs=(1, -1))
    with torch.no_grad():  # B is zero at the start: give it values, so that LoRA changes the output
        lora.master.add_(torch.randn(lora.numel, generator=torch.Generator().manual_seed(0)) * 0.05)
    theirs = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir, **dtype_kwarg(torch.float32)),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    ).eval()
    # our names are PEFT's saved ones: its own loader takes the tensors as they are
    result = set_peft_model_state_dict(theirs, {n: t.clone() for n, t in lora.tensors().items()})
    assert not result.unexpected_keys
    ids = torch.randint(4, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = (
            AutoModelForCausalLM.from_pretrained(model_dir, **dtype_kwarg(torch.float32)).eval()(input_ids=ids).logits
        )
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


@pytest.mark.parametrize("family", ["tiny-opt", "tiny-llama", "tiny-qwen2"])
def test_a_prefix_computes_what_peft_computes_and_starts_as_its_tokens(family: str, tiny_dirs) -> None:
    from peft import PrefixTuningConfig, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from zoplan.runtime.adapters import adapter_for
    from zoplan.runtime.tuning import PROMPT, Prefix

    model_dir = tiny_dirs[family]

    def load():
        return AutoModelForCausalLM.from_pretrained(model_dir, **dtype_kwarg(torch.float32)).eval()

    ours = load()
    prefix = Prefix(
        ours, adapter_for(ours.config.model_type), PREFIX, seed=5, device=torch.device("cpu"), signs=(1, -1)
    )
    ids = torch.randint(4, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # MeZO's initialisation: the keys and values of random tokens run through the base model
        with prefix.capturing() as kvs:
            ours(**prefix.capture_inputs(), use_cache=False)
        prefix.set_from(kvs)
        assert prefix.master.abs().max() > 0
        prefix.select(None)
        mine = ours(**prefix.model_inputs({"input_ids": ids}), use_cache=False).logits
        # so at the start the model reads those tokens before every input
        tokens = prefix.init_tokens()
        assert tokens.shape == (1, 3)
        read_first = load()(input_ids=torch.cat([tokens.expand(2, -1), ids], 1)).logits[:, 3:]
        torch.testing.assert_close(mine, read_first, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(mine, load()(input_ids=ids).logits, atol=1e-3)
        # PEFT's prefix tuning reads our prompt_embeddings as they are, with the same result
        theirs = get_peft_model(load(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).eval()
        set_peft_model_state_dict(theirs, {PROMPT: prefix.view(prefix.master, PROMPT).clone()})
        assert torch.equal(theirs.prompt_encoder["default"].embedding.weight, prefix.view(prefix.master, PROMPT))
        torch.testing.assert_close(mine, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        # each branch reads its own copy
        prefix.perturb(seed=7, eps=1e-1)
        prefix.select(1)
        plus = ours(**prefix.model_inputs({"input_ids": ids}), use_cache=False).logits
        assert not torch.allclose(plus, mine, atol=1e-4)


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_an_adapter_trains_the_same_in_every_layout_on_read_only_blocks(
    method: str, tiny_dirs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
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
    if method == "prefix":  # (the layouts' own code paths are LoRA's: a prefix adds its own inputs)
        del layouts["1x1-relay"]
    trained = {}
    for name, pins in layouts.items():
        topo = cpu_topology(tmp_path, 2) if name == "1x1-relay" else four
        plan_path = planned(tmp_path, model_dir, topo, name, tuning=TUNINGS[method], **pins)
        trained[name] = train(plan_path, model_dir, tmp_path / name)
        # the blocks are only read: the program has no update, barrier or write-back, and the
        # runtime ran exactly that program
        assert_ran_its_program(plan_path, tmp_path / name)
        spans = (tmp_path / name / "spans-rank0.jsonl").read_text()
        assert '"d2h"' not in spans and '"update ' not in spans, name
        assert not (tmp_path / name / "model" / "model.safetensors").exists()  # the adapter alone
    # the read-only blocks were mapped from the checkpoint, not copied; copying gives the same bits
    log = (tmp_path / "1x1-whole" / "worker-node0.log").read_text()
    assert f"blocks mapped read-only from {model_dir}" in log
    monkeypatch.setenv("ZOPLAN_HOST_COPY", "copy")
    copied = train(tmp_path / "1x1-whole.yaml", model_dir, tmp_path / "copied")
    assert "mapped" not in (tmp_path / "copied" / "worker-node0.log").read_text()
    assert copied.keys() == trained["1x1-whole"].keys()
    assert all(torch.equal(copied[n], trained["1x1-whole"][n]) for n in copied)
    first = trained["1x1-whole"]
    if method == "lora":  # it trained (B starts at zero)
        assert any(n.endswith("lora_B.weight") and t.abs().max() > 0 for n, t in first.items())
    else:  # it trained (from the values of its tokens, kept in the run's directory)
        start = load_file(str(tmp_path / "1x1-whole" / "prefix-init.safetensors"))
        assert first.keys() == start.keys() == {"prompt_embeddings"}
        mask = os.umask(0)
        os.umask(mask)  # (safetensors writes 0600: the file takes the umask, as the run's others)
        assert (tmp_path / "1x1-whole" / "prefix-init.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
        assert not torch.equal(first["prompt_embeddings"], start["prompt_embeddings"])
    for name, weights in trained.items():
        assert weights.keys() == first.keys()
        for n in first:
            torch.testing.assert_close(weights[n], first[n], rtol=1e-5, atol=1e-7, msg=f"{name}: {n}")

    # PEFT loads it onto the base model, and (LoRA) transformers alone does too (peft installed)
    out = tmp_path / "1x1-whole" / "model"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(model_dir)
    if method == "lora":
        assert config["peft_type"] == "LORA" and config["r"] == 4
    else:
        assert config["peft_type"] == "PREFIX_TUNING" and config["num_virtual_tokens"] == 3
    ids = torch.randint(4, 200, (1, 10), generator=torch.Generator().manual_seed(2))
    base = AutoModelForCausalLM.from_pretrained(model_dir, **dtype_kwarg(torch.float32)).eval()
    with torch.no_grad():
        before = base(input_ids=ids).logits
        via_peft = PeftModel.from_pretrained(base, out).eval()(input_ids=ids).logits
        if method == "lora":
            direct = (
                AutoModelForCausalLM.from_pretrained(out, **dtype_kwarg(torch.float32)).eval()(input_ids=ids).logits
            )
            torch.testing.assert_close(direct, via_peft)
    assert not torch.allclose(via_peft, before, atol=1e-6)


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_an_adapter_run_resumes_and_replays_to_the_same_adapter(method: str, tiny_dirs, tmp_path: Path) -> None:
    from zoplan.runtime.replay import replay_to

    model_dir = tiny_dirs["tiny-opt"]
    two = cpu_topology(tmp_path, 2)
    plan_path = planned(tmp_path, model_dir, two, "2x1", tuning=TUNINGS[method], perturbation=2, data=1, upload="whole")
    whole = train(plan_path, model_dir, tmp_path / "whole", steps=5)
    # 3 steps with a snapshot after 2, then on to 5: the snapshot's adapter + one journal line
    train(plan_path, model_dir, tmp_path / "parts", steps=3, snapshot_every=2, keep_snapshots=0)
    assert (tmp_path / "parts" / "snapshots" / "step-00000002" / "adapter_model.safetensors").exists()
    init = tmp_path / "parts" / "prefix-init.safetensors"
    if method == "prefix":  # gone before the resume (the snapshot holds the adapter): made again, the same
        kept = init.read_bytes()
        init.unlink()
    run(make(model=str(model_dir), steps=5, output=tmp_path / "parts", quiet=True), resume=True)
    resumed = adapter(tmp_path / "parts")
    for n in whole:
        assert torch.equal(resumed[n], whole[n]), n
    if method == "prefix":  # and the resumed run's journal replays (it said it could not read them)
        assert init.read_bytes() == kept
        assert replay_to(str(model_dir), tmp_path / "parts" / "journal.jsonl", tmp_path / "parts-replayed") == 5
        replayed = load_file(str(tmp_path / "parts-replayed" / "adapter_model.safetensors"))
        assert all(torch.equal(replayed[n], whole[n]) for n in whole)
    # `zoplan replay`: the initial adapter (LoRA: from the run's seed; a prefix: saved in the run's
    # directory) and the journal alone
    assert replay_to(str(model_dir), tmp_path / "whole" / "journal.jsonl", tmp_path / "replayed") == 5
    replayed = load_file(str(tmp_path / "replayed" / "adapter_model.safetensors"))
    for n in whole:
        assert torch.equal(replayed[n], whole[n]), n
    # the journal alone does not say that the run trained an adapter: without the run's plan.yaml
    # beside it, it is refused (it was replayed onto every weight of the model, exit 0)
    from zoplan.errors import ZoplanError

    (tmp_path / "lone").mkdir()
    (tmp_path / "lone" / "journal.jsonl").write_bytes((tmp_path / "whole" / "journal.jsonl").read_bytes())
    with pytest.raises(ZoplanError, match="has no plan.yaml beside it"):
        replay_to(str(model_dir), tmp_path / "lone" / "journal.jsonl", tmp_path / "as-full")
    assert not (tmp_path / "as-full").exists()
    # an adapter is replayed as it trained (fp32): --dtype, a full run's, is refused, not ignored
    with pytest.raises(ZoplanError, match=f"--dtype bf16 sets the dtype .* of a {method} run"):
        replay_to(str(model_dir), tmp_path / "whole" / "journal.jsonl", tmp_path / "bf16", dtype="bf16")
    assert not (tmp_path / "bf16").exists()
    # the command line says how the adapter loads (it said from_pretrained)
    from fuzzkit import console

    code, said = console(["replay", str(tmp_path / "whole"), "-o", str(tmp_path / "cli")], limit=120)
    assert code == 0 and "(PeftModel.from_pretrained: an adapter)" in said, said


@pytest.mark.parametrize("family", ["tiny-opt", "tiny-llama"])
def test_the_planner_counts_the_ops_a_prefix_adds(family: str, tiny_dirs) -> None:
    """zoplan.tuning's op counts for a prefix (a CPU rank pays each) are what the runtime issues,
    within a factor of 1.5 (counted aten ops change a little with transformers' versions)."""
    from transformers import AutoModelForCausalLM

    from zoplan.runtime.adapters import adapter_for
    from zoplan.runtime.tuning import Prefix

    class Count(torch.utils._python_dispatch.TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    class Stop(Exception):
        pass

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[family], **dtype_kwarg(torch.float32)).eval()
    family_of = adapter_for(model.config.model_type)
    blocks = family_of.blocks(model)
    box: dict = {}

    def first_block(module, args, kwargs):
        box["hidden"], box["kwargs"] = args[0], dict(kwargs)
        raise Stop

    def up_to_first_block(inputs: dict) -> int:
        handle = blocks[0].register_forward_pre_hook(first_block, with_kwargs=True)
        count = Count()
        try:
            with count:
                try:
                    model(**inputs, use_cache=False)
                except Stop:
                    pass
        finally:
            handle.remove()
        return count.n

    def one_block() -> int:
        count = Count()
        with count:
            blocks[1](box["hidden"], **box["kwargs"])
        return count.n

    ids = torch.randint(4, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": torch.arange(16).expand(2, -1)}
    with torch.no_grad():
        plain_embed = up_to_first_block(inputs)
        plain_block = one_block()
        prefix = Prefix(model, family_of, PREFIX, seed=1, device=torch.device("cpu"), signs=(1,))
        prefix.select(None)
        made = Count()
        with made:
            prefixed = prefix.model_inputs(inputs)
        embed_added = made.n + up_to_first_block(prefixed) - plain_embed
        block_added = one_block() - plain_block
    shape_family = model.config.model_type
    assert PREFIX.embed_ops() / 1.5 <= embed_added <= PREFIX.embed_ops() * 1.5, embed_added
    assert PREFIX.block_ops(shape_family) / 1.5 <= block_added <= PREFIX.block_ops(shape_family) * 1.5, block_added


def test_a_prefix_starts_the_same_whatever_the_threads_and_takes_rank_0s_values(tiny_dirs, tmp_path: Path) -> None:
    """Nodes of one run (or layouts with other ranks per machine) made the prefix's starting
    values with other thread counts, which sum the pass otherwise: the runs then trained other
    prefixes. The pass runs on one thread, and every rank takes rank 0's values."""
    from transformers import AutoModelForCausalLM

    from zoplan.runtime.adapters import adapter_for
    from zoplan.runtime.tuning import PREFIX_INIT, PROMPT, Prefix

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["tiny-llama"], **dtype_kwarg(torch.float32)).eval()

    def started(threads: int, agree=None) -> torch.Tensor:
        prefix = Prefix(
            model, adapter_for(model.config.model_type), PREFIX, seed=5, device=torch.device("cpu"), signs=(1, -1)
        )
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.no_grad():
                prefix.initialise(tmp_path, lambda inputs: model(**inputs, use_cache=False), True, False, agree=agree)
        finally:
            torch.set_num_threads(before)
        assert torch.get_num_threads() == before or threads == before  # (the pass gives the threads back)
        return prefix.view(prefix.master, PROMPT).clone()

    one = started(1)
    assert torch.equal(started(2), one)
    assert (tmp_path / PREFIX_INIT).exists()
    assert torch.equal(started(2, agree=lambda values: torch.ones_like(values)), torch.ones_like(one))


def test_an_adapter_trained_on_a_narrower_host_copy_says_its_base_was_rounded_only_where_it_was(
    tiny_dirs, tmp_path: Path, monkeypatch
) -> None:
    """--tuning lora --wire-dtype bf16 on an fp32 checkpoint: the adapter learnt, and its held-out
    figures were measured, on the base rounded to bf16, but nothing said so and the adapter's
    config names the fp32 checkpoint (loaded there, it gives other figures). The note read the
    plan: on a checkpoint stored in bf16 (most published ones) nothing is rounded, yet it said so."""
    import shutil

    from safetensors.torch import save_file

    from zoplan.records import METRICS_FILE, NoteRow, read_metrics

    fp32 = tiny_dirs["tiny-opt"]
    bf16 = tmp_path / "tiny-opt-bf16"
    shutil.copytree(fp32, bf16)
    weights = load_file(str(fp32 / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in weights.items()}, str(bf16 / "model.safetensors"), {"format": "pt"})
    monkeypatch.setenv("ZOPLAN_HOST_COPY", "copy")  # the bf16 checkpoint copied, not mapped
    two = cpu_topology(tmp_path, 2)
    for name, model_dir, wire, said in (
        ("fp32-bf16", fp32, "bf16", True),
        ("fp32-fp32", fp32, "fp32", False),
        ("bf16-bf16", bf16, "bf16", False),
    ):
        plan_path = planned(tmp_path, model_dir, two, name, tuning=LORA, perturbation=2, data=1, wire_dtype=wire)
        run(make(plan=plan_path, model=str(model_dir), steps=1, output=tmp_path / name, quiet=True))
        rows, _ = read_metrics(tmp_path / name / METRICS_FILE)
        notes = [row.note for row in rows if isinstance(row, NoteRow)]
        assert any("blocks rounded to bf16" in note for note in notes) == said, (name, notes)
