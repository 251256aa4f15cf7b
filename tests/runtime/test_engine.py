"""The block-streamed executor in one process: it computes the model's own losses at theta +- eps z."""

from __future__ import annotations

import dataclasses

import uuid
from pathlib import Path

import pytest
import torch

from zoplan.planner import plan
from zoplan.program import build
from zoplan.runtime import data as zdata
from zoplan.runtime import dist as zdist
from zoplan.runtime.engine import Engine
from zoplan.runtime.perturb import normal
from zoplan.runtime.worker import load_model
from zoplan.search import Pins
from zoplan.runtime.checkpoint import dtype_kwarg

EPS = 1e-3


def _single_rank(model_dir: Path, tmp_path: Path, resident: int = 0, **engine_kwargs):
    report = plan(
        str(model_dir / "config.json"),
        "cpu-local",
        global_batch=4,
        seq_len=32,
        dtype="fp32",
        pins=Pins(perturbation=1, data=1, upload="whole", resident=resident, wire_dtype="fp32"),
    )
    ctx = zdist.RankContext(
        rank=0,
        world=1,
        node=0,
        local_rank=0,
        device=torch.device("cpu"),
        role="compute",
        signs=(1, -1),
        replica=0,
        replicas=1,
        mover_index=None,
        movers=1,
        compute_index=0,
        computes=1,
    )
    model, adapter, host = load_model(model_dir, report.plan, ctx, tmp_path / f"host-{uuid.uuid4().hex[:8]}")
    layout = report.plan.to_layout()
    if "prefetch" in engine_kwargs:
        layout = dataclasses.replace(layout, prefetch=engine_kwargs.pop("prefetch"))
    program = build(layout, layers=len(host.layouts), block_params=host.layouts[0].numel)
    engine = Engine(model, adapter, host, ctx, program=program, rank=layout.gpus[0], eps=EPS, **engine_kwargs)
    return engine, host


def _batch(model_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    examples, kind = zdata.load_examples("sentiment")
    task = zdata.Task(kind)
    batch = zdata.encode(examples[:4], tok, task, 32)
    return batch, task


def _reference_loss(model_dir: Path, batch, task, seed: int, sign: int) -> float:
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_dir, **dtype_kwarg(torch.float32)).eval()
    with torch.no_grad():
        for name, param in ref.named_parameters():
            param.add_(normal(seed, name, 0, param.numel()).view(param.shape), alpha=sign * EPS)
        total, count = zdata.loss_terms(ref(**batch.model_inputs()).logits.float(), batch, task)
    return float(total) / count


@pytest.mark.parametrize("family", ["tiny-opt", "tiny-llama", "tiny-qwen2"])
def test_streamed_dual_forward_equals_the_models_own_loss(family: str, tiny_dirs, tmp_path: Path) -> None:
    model_dir = tiny_dirs[family]
    batch, task = _batch(model_dir)
    engine, host = _single_rank(model_dir, tmp_path)
    try:
        seed = 4321
        losses = engine.forward_losses(
            [{"inputs": batch.model_inputs(), "batch": batch}],
            seed,
            [lambda lg, mb: zdata.loss_terms(lg, mb["batch"], task)],
        )
        for sign in (1, -1):
            total, count = losses[sign][0]
            # same modules, same weights: equal up to float summation order (here: exactly)
            assert total / count == pytest.approx(_reference_loss(model_dir, batch, task, seed, sign), rel=1e-6)
        assert losses[1][0][0] != losses[-1][0][0]
    finally:
        host.remove()


def test_host_copy_is_not_perturbed_and_resident_blocks_give_the_same_losses(tiny_dirs, tmp_path: Path) -> None:
    model_dir = tiny_dirs["tiny-llama"]
    batch, task = _batch(model_dir)
    fn = [lambda lg, mb: zdata.loss_terms(lg, mb["batch"], task)]
    mbs = [{"inputs": batch.model_inputs(), "batch": batch}]
    streamed, host_a = _single_rank(model_dir, tmp_path)
    kept, host_b = _single_rank(model_dir, tmp_path, resident=4)
    try:
        before = [b.clone() for b in host_a.blocks]
        a = streamed.forward_losses(mbs, 99, fn)
        b = kept.forward_losses(mbs, 99, fn)
        assert a == b
        assert all(torch.equal(x, y) for x, y in zip(before, host_a.blocks))  # no pending update yet
        assert len(kept.kept) == 4
        # between uses, a streamed block holds its own empty parameters again, not a device buffer
        for engine in (streamed, kept):
            for block in engine.blocks:
                params = list(block.parameters())
                assert params and all(isinstance(p, torch.nn.Parameter) and p.is_meta for p in params)
    finally:
        host_a.remove()
        host_b.remove()


def test_a_step_then_flush_moves_the_weights_along_minus_g_z(tiny_dirs, tmp_path: Path) -> None:
    model_dir = tiny_dirs["tiny-opt"]
    batch, task = _batch(model_dir)
    engine, host = _single_rank(model_dir, tmp_path)
    try:
        before = host.blocks[0].clone()
        result = engine.step(
            [{"inputs": batch.model_inputs(), "batch": batch}],
            7,
            1e-2,
            0.0,
            lambda lg, mb: zdata.loss_terms(lg, mb["batch"], task),
        )
        assert result.finite and result.projected_grad != 0
        engine.flush()
        slot = host.layouts[0].slots[0]
        z = normal(7, slot.name, 0, slot.numel)
        moved = host.blocks[0][: slot.numel] - before[: slot.numel]
        expected = -1e-2 * result.projected_grad * z
        assert expected.abs().max() > 1e-4  # a step large enough for the comparison to mean something
        torch.testing.assert_close(moved, expected, rtol=1e-3, atol=1e-6)
    finally:
        host.remove()


@pytest.mark.parametrize("prefetch", [2, 4])  # 4: the whole model ahead, each block carried after its own write-back
def test_the_next_steps_first_uploads_start_before_the_head_and_carry_every_update(
    prefetch: int, tiny_dirs, tmp_path: Path
) -> None:
    """A training step uploads the next step's first `prefetch` blocks as its last blocks compute
    (the simulator's steps do the same); those uploads must hold the update this step wrote back."""
    import json

    from zoplan.runtime.spans import Spans

    model_dir = tiny_dirs["tiny-opt"]
    batch, task = _batch(model_dir)
    spans = Spans(torch.device("cpu"), tmp_path / "spans.jsonl")
    engine, host = _single_rank(model_dir, tmp_path, prefetch=prefetch, spans=spans)
    fn = lambda lg, mb: zdata.loss_terms(lg, mb["batch"], task)  # noqa: E731
    mbs = [{"inputs": batch.model_inputs(), "batch": batch}]
    try:
        n = len(host.blocks)
        assert n == 4
        before = [b.clone() for b in host.blocks]
        results = [engine.step(mbs, seed, 1e-2, 0.0, fn, step=k) for k, seed in enumerate((7, 8, 9))]
        assert sorted(engine.carried) == list(range(prefetch))
        rows = [json.loads(line) for line in (tmp_path / "spans.jsonl").read_text().splitlines()]
        labels = [[s[2] for s in row["spans"]] for row in rows]
        if prefetch == 2:
            # step 0 uploads blocks 0-3, then the next step's 0 and 1 before its head; the later
            # steps start with those and upload only blocks 2 and 3 themselves
            assert [x for x in labels[0] if x.startswith("h2d")] == [
                "h2d b0",
                "h2d b1",
                "h2d b2",
                "h2d b3",
                "h2d b0",
                "h2d b1",
            ]
            assert [x for x in labels[1] if x.startswith("h2d")] == ["h2d b2", "h2d b3", "h2d b0", "h2d b1"]
        assert labels[1].index("h2d b1") < labels[1].index("head")
        engine.flush()
        assert engine.carried == {}
        # every block moved by the three updates: a carried upload that missed the write-back of
        # the step before would lose one of them on blocks 0 and 1
        for i in (0, 1, 3):
            slot = host.layouts[i].slots[0]
            expected = sum(
                -1e-2 * r.projected_grad * normal(seed, slot.name, 0, slot.numel) for r, seed in zip(results, (7, 8, 9))
            )
            moved = host.blocks[i][: slot.numel] - before[i][: slot.numel]
            assert expected.abs().max() > 1e-4
            torch.testing.assert_close(moved, expected, rtol=1e-3, atol=1e-6)
    finally:
        spans.close()
        host.remove()


def test_the_host_copy_holds_the_weights_and_the_loader_releases_each_block(
    tiny_dirs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM

    from zoplan.runtime.adapters import adapter_for
    from zoplan.runtime.hostcopy import HostCopy

    model_dir = tiny_dirs["tiny-qwen2"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, **dtype_kwarg(torch.float32))
    adapter = adapter_for(model.config.model_type)
    blocks = list(adapter.blocks(model))
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    released = []  # (block index, which blocks' parameters were already meta at that moment)
    original_to = torch.nn.Module.to

    def spy(module, *args, **kwargs):
        if any(module is b for b in blocks):
            index = next(i for i, b in enumerate(blocks) if b is module)
            released.append((index, [all(p.is_meta for p in b.parameters()) for b in blocks]))
        return original_to(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", spy)
    host = HostCopy.create(
        tmp_path / "host", model, adapter.blocks(model), adapter.blocks_path + ".", 2, "fp32", "fp32"
    )
    monkeypatch.undo()
    try:
        # block i is released right after its copy: the blocks before it are gone, the later ones loaded
        assert [i for i, _ in released] == list(range(len(blocks)))
        for i, gone in released:
            assert gone == [k < i for k in range(len(blocks))], i
        assert all(p.is_meta for b in blocks for p in b.parameters())
        for layout, flat in zip(host.layouts, host.blocks):
            for slot in layout.slots:
                assert torch.equal(flat[slot.offset : slot.offset + slot.numel].view(slot.shape), expected[slot.name])
            assert not flat[layout.numel :].any()
        for name, value in host.resident.items():
            assert torch.equal(value, expected[name])
    finally:
        host.remove()


@pytest.mark.parametrize("family", ["tiny-opt", "tiny-llama", "tiny-qwen2"])
def test_the_embedding_reads_its_rows_perturbed_and_the_table_is_perturbed_once_per_branch(
    family: str, tiny_dirs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each branch's embedding perturbs only the rows it looks up; the output projection is
    perturbed by the heads, once per branch, and an untied token table never whole. Steps give
    the same losses and weights, bit for bit, as perturbing every resident part for each
    embedding."""
    import zoplan.runtime.engine as engine_module

    model_dir = tiny_dirs[family]
    batch, task = _batch(model_dir)
    fn = lambda lg, mb: zdata.loss_terms(lg, mb["batch"], task)  # noqa: E731
    mbs = [{"inputs": batch.model_inputs(), "batch": batch}] * 2
    small, host_c = _single_rank(model_dir, tmp_path)
    host_c.remove()
    assert small._table is None  # a tiny model's table is perturbed whole (ROWS_TABLE_MIN)
    monkeypatch.setattr(engine_module, "ROWS_TABLE_MIN", 0)
    rows, host_a = _single_rank(model_dir, tmp_path)
    whole, host_b = _single_rank(model_dir, tmp_path)
    assert rows._table is not None
    whole._table = None  # every embedding perturbs every resident part
    whole._embed_skips = whole._head_skips = frozenset()
    table, head = rows._table, next(iter(rows._embed_skips - {rows._table}), rows._table)
    writes: list[str] = []
    real = engine_module.fused_kernels

    def counted(master: torch.Tensor):
        fused = real(master)
        if fused is None:
            return None

        class Counting:
            def __getattr__(self, attr: str):
                return getattr(fused, attr)

            def perturbed_into(self, param, master, seed, name, start, scale):
                writes.append(name)
                return fused.perturbed_into(param, master, seed, name, start, scale)

        return Counting()

    try:
        for step, seed in enumerate((11, 12, 13)):
            monkeypatch.setattr(engine_module, "fused_kernels", counted)
            writes.clear()
            a = rows.step(mbs, seed, 1e-2, 0.0, fn)
            # the output projection once per branch; an untied table never whole
            assert writes.count(head) == 2 and writes.count(table) == (2 if head == table else 0), writes
            monkeypatch.setattr(engine_module, "fused_kernels", real)
            b = whole.step(mbs, seed, 1e-2, 0.0, fn)
            assert (a.loss_plus, a.loss_minus, a.projected_grad) == (b.loss_plus, b.loss_minus, b.projected_grad)
        rows.flush()
        whole.flush()
        for name, master in rows.resident_master.items():
            assert torch.equal(master, whole.resident_master[name]), name
        assert all(torch.equal(x, y) for x, y in zip(host_a.blocks, host_b.blocks))
    finally:
        host_a.remove()
        host_b.remove()


def test_a_cpu_rank_keeps_none_of_the_checkpoint_mapped_after_loading(tiny_dirs, tmp_path: Path) -> None:
    """safetensors maps the checkpoint: on a CPU rank the embeddings, norms and head stayed the
    file's pages for the whole run, so a checkpoint replaced in place mid-run changed the weights
    (exit 0) or ended the rank with SIGBUS. After loading, no page of the file is mapped."""
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_dirs["tiny-opt"], model_dir)
    engine, host = _single_rank(model_dir, tmp_path)
    weights = str((model_dir / "model.safetensors").resolve())
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("no /proc/self/maps on this platform")
    assert weights not in maps.read_text(), "the checkpoint is still mapped"
    del engine, host
