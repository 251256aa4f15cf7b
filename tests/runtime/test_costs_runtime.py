"""The cost model's counts of the runtime's work (zoplan.sim.costs, zoplan.models.RUNTIME_OPS) against
what the runtime really issues: tensor ops per stage, resident tensors, the z generator's chunk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from zoplan.models import RUNTIME_OPS, load_model_shape
from zoplan.runtime.adapters import adapter_for


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


class _Stop(Exception):
    pass


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama", "tiny-qwen2"])
def test_runtime_op_counts_are_what_a_micro_batch_issues(name: str, tiny_dirs: dict[str, Path]) -> None:
    """Per micro-batch and branch: the model's forward up to its first block (as the engine runs
    it), one block, the head with the fp32 next-token loss. A transformers release that changes
    these by more than a few ops changes the CPU's predicted step: update RUNTIME_OPS."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[name], dtype=torch.float32).eval()
    adapter = adapter_for(model.config.model_type)
    blocks = adapter.blocks(model)
    box: dict = {}

    def hook(module, args, kwargs):
        box["args"], box["kwargs"] = args, dict(kwargs)
        raise _Stop

    ids = torch.randint(0, 1000, (2, 64))
    counted = {}
    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        with _Count() as c:
            try:
                model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
            except _Stop:
                pass
        counted["embed"] = c.n
        handle.remove()
        kwargs = box["kwargs"]
        hidden = box["args"][0] if box["args"] else kwargs.pop("hidden_states")
        with _Count() as c:
            out = blocks[0](hidden, **kwargs)
        counted["block"] = c.n
        hidden = out[0] if isinstance(out, tuple) else out
        with _Count() as c:
            logits = adapter.logits(model, hidden).float()
            loss = F.cross_entropy(
                logits[:, :-1, :].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            )
            float(loss)
        counted["head"] = c.n
    family = load_model_shape(tiny_dirs[name]).family
    for stage, expected in RUNTIME_OPS[family].items():
        assert abs(counted[stage] - expected) <= max(2, expected // 10), (stage, counted, RUNTIME_OPS[family])


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama", "tiny-qwen2"])
def test_resident_tensors_are_the_runtimes_resident_parameters(name: str, tiny_dirs: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[name], dtype=torch.float32)
    adapter = adapter_for(model.config.model_type)
    sizes = sorted(p.numel() for n, p in model.named_parameters() if not n.startswith(adapter.blocks_path + "."))
    assert sorted(load_model_shape(tiny_dirs[name]).resident_tensors()) == sizes


@pytest.mark.parametrize("rows", [1, 2, 4])
def test_the_loss_copies_the_shifted_logits_only_for_several_sequences(rows: int) -> None:
    """What StepCosts.loss_s leaves out, as it says: the runtime's loss_terms hands
    cross_entropy a view of the logits for one sequence and a copy (8 bytes a logit) for more."""
    from zoplan.runtime import data as zdata

    vocab, tokens = 11, 6
    logits = torch.randn(rows, tokens, vocab)
    labels = torch.randint(0, vocab, (rows, tokens))
    ones = torch.ones(rows, tokens, dtype=torch.long)
    batch = zdata.Batch(ones, ones, ones, labels, None, None, rows * (tokens - 1))
    seen: list[torch.Tensor] = []
    real = F.cross_entropy

    def spy(input: torch.Tensor, *args, **kwargs):
        seen.append(input)
        return real(input, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(F, "cross_entropy", spy)
    try:
        loss, count = zdata.loss_terms(logits, batch, zdata.Task("lm"))
    finally:
        mp.undo()
    assert count == rows * (tokens - 1)
    shares = seen[0].untyped_storage().data_ptr() == logits.untyped_storage().data_ptr()
    assert shares == (rows == 1)
    assert float(loss) == pytest.approx(
        float(real(logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), reduction="sum")), rel=1e-6
    )
