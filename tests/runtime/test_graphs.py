"""The blocks' forwards as CUDA graphs (zoplan.runtime.graphs), checked on the CPU with a stand-in
for the capture: it keeps the tensors a graph would read and write, and its replay runs the
forward again on them. What the engine computes must not change, step after step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from zoplan.runtime import data as zdata
from zoplan.runtime.graphs import BlockGraphs, hidden_of, wanted

from .test_engine import _single_rank


class _Replay:
    """A stand-in graph: replaying runs the captured call on the tensors captured, in place."""

    def __init__(self, block, x, kwargs, out) -> None:
        self.block, self.x, self.kwargs, self.out = block, x, kwargs, out
        self.replays = 0

    def replay(self) -> None:
        self.out.copy_(hidden_of(self.block(self.x, **self.kwargs)))
        self.replays += 1


def _stand_in(block, x, kwargs, out, pool):
    return _Replay(block, x, kwargs, out)


def _micro_batches(model_dir: Path, count: int, steps: int):
    """Each step's ``count`` micro-batches of 2 sequences, padded to one length (the shapes a graph
    needs), each step's of other sequences (other masks and positions); and the loss."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    examples, kind = zdata.load_examples("sentiment")
    task = zdata.Task(kind)
    per_step = []
    for step in range(steps):
        mbs = []
        for m in range(count):
            first = 2 * (step * count + m)
            batch = zdata.encode(examples[first : first + 2], tok, task, 32, pad_to_max_len=True)
            mbs.append({"inputs": batch.model_inputs(), "batch": batch})
        per_step.append(mbs)
    masks = [mbs[0]["inputs"]["attention_mask"] for mbs in per_step]
    assert any(not torch.equal(masks[0], m) for m in masks[1:])  # the padding moves from step to step
    return per_step, (lambda lg, mb: zdata.loss_terms(lg, mb["batch"], task))


def _pair(model_dir: Path, tmp_path: Path, graphs: BlockGraphs):
    eager, host_a = _single_rank(model_dir, tmp_path)
    graphed, host_b = _single_rank(model_dir, tmp_path, block_graphs=graphs)
    return eager, host_a, graphed, host_b


@pytest.mark.parametrize("family", ["tiny-opt", "tiny-llama", "tiny-qwen2"])
def test_replayed_forwards_train_the_same_bits_as_eager_ones(family: str, tiny_dirs, tmp_path: Path) -> None:
    """Step 1 runs eagerly, step 2 captures a graph per block, branch and micro-batch and replays
    it, later steps replay: every step's losses and the weights written back are those of the
    engine without graphs, bit for bit. A block's input is the previous block's graph output,
    read where it is."""
    model_dir = tiny_dirs[family]
    per_step, fn = _micro_batches(model_dir, 2, 4)
    graphs = BlockGraphs(capture=_stand_in)
    eager, host_a, graphed, host_b = _pair(model_dir, tmp_path, graphs)
    try:
        blocks = len(host_a.blocks)
        for k, (seed, mbs) in enumerate(zip((11, 12, 13, 14), per_step)):
            a = eager.step(mbs, seed, 1e-2, 0.0, fn)
            b = graphed.step(mbs, seed, 1e-2, 0.0, fn)
            assert a == b and a.finite
            assert graphs.count() == (0 if k == 0 else blocks * 2 * len(mbs))
        entries = {key[:3]: entry for key, entry in graphs.graphs.items()}
        assert all(isinstance(e.graph, _Replay) and e.graph.replays == 3 for e in entries.values())
        for (i, sign, m), entry in entries.items():
            if i > 0:
                assert entry.x is entries[i - 1, sign, m].out  # chained: no copy between blocks
            # two output tensors per branch and micro-batch, taken in turn
            assert entry.out is entries[i % 2, sign, m].out and entry.out is not entries[1 - i % 2, sign, m].out
        assert len({id(e.out) for e in entries.values()}) == 2 * 2 * len(per_step[0])
        eager.flush()
        graphed.flush()
        assert all(torch.equal(x, y) for x, y in zip(host_a.blocks, host_b.blocks))
        # evaluation runs the unperturbed blocks eagerly, with the same result
        assert eager.evaluate(per_step[0], fn, fn) == graphed.evaluate(per_step[0], fn, fn)
    finally:
        host_a.remove()
        host_b.remove()


def test_a_forward_that_cannot_be_captured_or_is_met_late_runs_eagerly(tiny_dirs, tmp_path: Path, capsys) -> None:
    """A capture that fails leaves its forward eager with one warning; a forward first met after
    the capturing step (here a third micro-batch) runs eagerly too, since the graphs share memory
    that only their capture order keeps apart."""
    model_dir = tiny_dirs["tiny-llama"]
    per_step, fn = _micro_batches(model_dir, 3, 3)
    tries: list[int] = []

    def fails_on_block_1(block, x, kwargs, out, pool):
        tries.append(1)
        if len(tries) in (3, 4):  # block 1's two branches (micro-batch 0 only)
            raise RuntimeError("operation not permitted when stream is capturing")
        return _stand_in(block, x, kwargs, out, pool)

    graphs = BlockGraphs(capture=fails_on_block_1)
    eager, host_a, graphed, host_b = _pair(model_dir, tmp_path, graphs)
    try:
        blocks = len(host_a.blocks)
        for k, (seed, mbs) in enumerate(zip((21, 22, 23), per_step)):
            batch = mbs[:2] if k < 2 else mbs
            assert eager.step(batch, seed, 1e-2, 0.0, fn) == graphed.step(batch, seed, 1e-2, 0.0, fn)
        assert graphs.count() == blocks * 2 * 2 - 2 and graphs.failed is not None
        assert sum(v is None for v in graphs.graphs.values()) == 2
        assert all(key[2] < 2 for key in graphs.graphs)  # nothing captured for the late micro-batch
        assert capsys.readouterr().err.count("runs without a CUDA graph") == 1
        eager.flush()
        graphed.flush()
        assert all(torch.equal(x, y) for x, y in zip(host_a.blocks, host_b.blocks))
    finally:
        host_a.remove()
        host_b.remove()


def test_graphs_are_asked_for_on_cuda_only(monkeypatch) -> None:
    monkeypatch.delenv("ZOPLAN_CUDA_GRAPHS", raising=False)
    assert not wanted(torch.device("cuda"))
    monkeypatch.setenv("ZOPLAN_CUDA_GRAPHS", "1")
    assert wanted(torch.device("cuda")) and not wanted(torch.device("cpu"))


def test_asking_for_graphs_on_cpu_ranks_says_it_does_nothing(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = dict(os.environ, ZOPLAN_CUDA_GRAPHS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "zoplan.cli", "run", "--steps", "1", "--eval-every", "0", "-o", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = proc.stdout + proc.stderr
    assert said.count("ZOPLAN_CUDA_GRAPHS=1 has no effect on CPU ranks") == 1, said[-2000:]
    # a switch read while the run runs: the session's rank server serves the run (test_rankserver.py)
    assert "starting the ranks without it" not in said, said[-2000:]
