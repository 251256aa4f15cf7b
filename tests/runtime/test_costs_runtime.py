"""The cost model's counts of the runtime's work (zoplan.sim.costs, zoplan.models.RUNTIME_OPS) against
what the runtime really issues: tensor ops per stage, resident tensors, the z generator's chunk."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from zoplan.models import RUNTIME_OPS, load_model_shape
from zoplan.runtime.adapters import adapter_for
from zoplan.runtime.checkpoint import dtype_kwarg


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


class _Stop(Exception):
    pass


def _first_block_inputs(model, block, ids, mask, mode=None) -> tuple[torch.Tensor, dict]:
    """The model's forward up to ``block``, its first (under the dispatch ``mode``, if any): that
    block's hidden state and keyword arguments, as the engine computes a block's inputs."""
    box: dict = {}

    def hook(module, args, kwargs):
        box["args"], box["kwargs"] = args, dict(kwargs)
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad(), mode or contextlib.nullcontext():
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    kwargs = box["kwargs"]
    return (box["args"][0] if box["args"] else kwargs.pop("hidden_states")), kwargs


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama", "tiny-qwen2"])
def test_runtime_op_counts_are_what_a_micro_batch_issues(name: str, tiny_dirs: dict[str, Path]) -> None:
    """Per micro-batch and branch: the model's forward up to its first block (as the engine runs
    it), one block, the head with the fp32 next-token loss. A transformers release that changes
    these by more than a few ops changes the CPU's predicted step: update RUNTIME_OPS."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[name], **dtype_kwarg(torch.float32)).eval()
    adapter = adapter_for(model.config.model_type)
    blocks = adapter.blocks(model)
    ids = torch.randint(0, 1000, (2, 64))
    counted = {}
    embed = _Count()
    hidden, kwargs = _first_block_inputs(model, blocks[0], ids, torch.ones_like(ids), embed)
    counted["embed"] = embed.n
    with torch.no_grad():
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

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[name], **dtype_kwarg(torch.float32))
    adapter = adapter_for(model.config.model_type)
    sizes = sorted(p.numel() for n, p in model.named_parameters() if not n.startswith(adapter.blocks_path + "."))
    assert sorted(load_model_shape(tiny_dirs[name]).resident_tensors()) == sizes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,at_once", [(1, 1), (2, 1), (4, 1), (5, 2), (4, 4)])
def test_the_loss_takes_a_few_sequences_log_softmax_at_a_time_and_gives_cross_entropys_bits(
    rows: int, at_once: int, dtype: torch.dtype
) -> None:
    """What ModelShape.head_activation_bytes counts beside the logits: the loss's log-softmax of
    ``at_once`` whole sequences at a time (LOSS_CHUNK_ELEMENTS), over the logits in place (no
    shifted copy of a micro-batch's, which with cross_entropy's log-softmax held three times the
    logits at once, where the plan counted 1.5). The loss is cross_entropy's over the shifted
    logits, to the bit, ignored tokens too."""
    from zoplan import models
    from zoplan.runtime import data as zdata

    vocab, tokens = 1405, 9
    generator = torch.Generator().manual_seed(rows)
    logits = (torch.randn(rows, tokens, vocab, generator=generator) * 3).to(dtype)
    labels = torch.randint(0, vocab, (rows, tokens), generator=generator)
    labels[0, 2] = labels[-1, -1] = zdata.IGNORE_INDEX
    ones = torch.ones(rows, tokens, dtype=torch.long)
    batch = zdata.Batch(ones, ones, ones, labels, None, None, rows * (tokens - 1) - 2)
    seen: list[tuple[int, bool]] = []  # each log-softmax's elements, and whether it read the logits in place
    real = torch.log_softmax

    def spy(input: torch.Tensor, *args, **kwargs):
        seen.append((input.numel(), input.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr()))
        return real(input, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(torch, "log_softmax", spy)
    mp.setattr(models, "LOSS_CHUNK_ELEMENTS", at_once * tokens * vocab + tokens * vocab - 1)
    try:
        loss, count = zdata.loss_terms(logits, batch, zdata.Task("lm"))
    finally:
        mp.undo()
    assert count == rows * (tokens - 1) - 2
    sizes = [at_once] * (rows // at_once) + ([rows % at_once] if rows % at_once else [])
    assert [n for n, _ in seen] == [k * tokens * vocab for k in sizes], seen
    assert all(in_place for _, in_place in seen) == (dtype == torch.float32)  # bf16: cast a few at a time
    whole = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )
    assert torch.equal(loss, whole), (float(loss), float(whole))


class _Traffic(TorchDispatchMode):
    """Elements read and written by a forward's elementwise ops (matrix products, attention and
    views left out)."""

    SKIP = {"mm", "addmm", "bmm", "baddbmm", "view", "_unsafe_view", "t", "transpose", "permute", "expand"}
    SKIP |= {"unsqueeze", "squeeze", "slice", "select", "detach", "alias", "as_strided", "split", "unbind"}

    def __init__(self) -> None:
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_flatten

        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if name in self.SKIP or "scaled_dot_product" in name or name.startswith("split"):
            return out
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        self.elements += sum(t.numel() for t in tensors)
        return out


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama", "tiny-qwen2"])
def test_runtime_passes_are_what_a_block_reads_and_writes(name: str, tiny_dirs: dict[str, Path]) -> None:
    """RUNTIME_PASSES per family, from a block of the tiny model and of copies of it with another
    hidden and feed-forward size and another sequence length: a transformers release that changes
    them changes the CPU's predicted step (zoplan.sim.costs.cpu_block_s)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from zoplan.models import RUNTIME_PASSES

    base = AutoConfig.from_pretrained(tiny_dirs[name])
    family = load_model_shape(tiny_dirs[name]).family

    def per_token(hidden: int, ffn: int, seq: int) -> float:
        config = base.__class__.from_dict(base.to_dict())
        config.hidden_size, config.num_attention_heads = hidden, 4
        if config.model_type == "opt":
            config.word_embed_proj_dim, config.ffn_dim = hidden, ffn
        else:
            config.intermediate_size, config.num_key_value_heads, config.head_dim = ffn, 4, hidden // 4
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        blocks = adapter_for(config.model_type).blocks(model)
        ids = torch.randint(0, 1000, (2, seq))
        mask = torch.ones_like(ids)
        mask[:, :3] = 0
        hidden_states, kwargs = _first_block_inputs(model, blocks[0], ids, mask)
        with torch.no_grad():
            with _Traffic() as traffic:
                blocks[0](hidden_states, **kwargs)
        return traffic.elements / ids.numel()

    a = per_token(64, 128, 64)
    per_f = (per_token(64, 512, 64) - a) / (512 - 128)
    per_h = (per_token(128, 128, 64) - a) / 64
    per_s = (per_token(64, 128, 128) - a) / 64
    expected = RUNTIME_PASSES[family]
    for got, want in zip((per_h, per_f, per_s), expected):
        assert abs(got - want) <= max(0.5, 0.1 * want), ((per_h, per_f, per_s), expected)


def test_the_matmul_fit_recovers_peak_and_half() -> None:
    """bench.matmul_tokens.fit (what bench/cpu_figures.py writes as tflops and
    matmul_half_tokens): rates made by peak * M / (M + half) give back peak and half; rates that
    do not fall with fewer rows give half 0."""
    from bench.matmul_tokens import CPU_TOKENS, GPU_TOKENS, fit

    for tokens, peak, half in ((CPU_TOKENS, 185.0, 21.4), (GPU_TOKENS, 7.5e5, 600.0)):
        got_peak, got_half = fit({m: peak * m / (m + half) for m in tokens})
        assert got_peak == pytest.approx(peak, rel=1e-9) and got_half == pytest.approx(half, rel=1e-9)
    assert fit({m: 170.0 for m in CPU_TOKENS}) == pytest.approx((170.0, 0.0), abs=1e-9)
    assert fit({m: 170.0 + 1000 / m for m in CPU_TOKENS})[1] == 0.0  # faster over fewer rows: no half
