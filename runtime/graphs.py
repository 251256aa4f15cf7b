"""CUDA graphs of the blocks' forwards: ``ZOPLAN_CUDA_GRAPHS=1``, on CUDA only, experimental.

On a GPU a block's forward is a few dozen small kernels, and at the sizes one GPU streams (an
OPT-1.3B shape at 8 x 256 tokens) the host issues them more slowly than the GPU runs them: about a
millisecond per block and branch (docs/results/runtime-gpu.md). A CUDA graph issues a captured
forward in one launch. Capturing is possible because the engine forms a branch's weights in a
buffer of its own that lives as long as the engine (``Engine._branch_buffer``) and binds block i's
parameters to the same views of it every step: a forward captured once reads every later step's
weights where they are. So there is one graph per block, branch and micro-batch, replayed after
its inputs are copied into the tensors it was captured reading (none for a hidden state that is
the previous block's graph output: the graph reads it where it is). The graphs of one branch and
micro-batch write their outputs into two tensors in turn, so the graphs hold two hidden states
per branch and micro-batch beyond the eager forward's memory, and one block's workspace.

When: a run's first training step runs eagerly (its forwards also set up the libraries' lazy
state, which a capture must not see); the second captures each forward as it comes, then replays
it for that step's result; later steps replay. The graphs share one memory pool, which is safe
because every step replays them in the order they were captured; a forward first met after the
capturing step (another shape, another micro-batch count) therefore runs eagerly, as does one
whose capture fails or whose arguments are not tensors and plain values (one warning). A replay
runs the kernels captured from the forward, on the same inputs; whether the GPU's libraries pick
the same kernels under capture as eagerly, and so give the same bits, is for the GPU check to say
(it compares the losses with the eager run's).

Measured on the CPU only, with a stand-in for the capture that replays the forward on the same
static tensors (tests/runtime/test_graphs.py); the GPU check is ``bench/runtime_gpu.py
--graphs`` (bench/gpu_checks.sh speed).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree

_PLAIN = (type(None), bool, int, float, str, torch.dtype, torch.device)


def _hashable(spec: object) -> object:
    """A pytree spec as a key: itself, or its text where it cannot be hashed (torch before 2.2)."""
    try:
        hash(spec)
    except TypeError:
        return repr(spec)
    return spec


# a graph per (block, branch, micro-batch): a run with more than this many per block (many
# micro-batches) runs the rest eagerly rather than hold a graph's tensors for each
MAX_PER_BLOCK = 16


def wanted(device: torch.device) -> bool:
    """Whether this run's blocks should run as CUDA graphs (``ZOPLAN_CUDA_GRAPHS=1``, on CUDA)."""
    return device.type == "cuda" and os.environ.get("ZOPLAN_CUDA_GRAPHS", "0") == "1"


def hidden_of(out: Any) -> torch.Tensor:
    """A block's hidden state from what its forward returns (a tuple whose first item, or the tensor)."""
    return out[0] if isinstance(out, tuple) else out


# capture(block, x, kwargs, out, pool) -> a graph whose .replay() writes block(x, **kwargs)'s
# hidden state into ``out``
Capture = Callable[[Callable[..., Any], torch.Tensor, dict, torch.Tensor, Any], Any]


def cuda_capture(block: Callable[..., Any], x: torch.Tensor, kwargs: dict, out: torch.Tensor, pool: Any) -> Any:
    graph = torch.cuda.CUDAGraph()
    # thread-local: what other threads call meanwhile (NCCL's own, on several GPUs) is not the
    # capture's business
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        out.copy_(hidden_of(block(x, **kwargs)))
    return graph


class _Captured:
    __slots__ = ("graph", "x", "out")

    def __init__(self, graph: Any, x: torch.Tensor, out: torch.Tensor) -> None:
        self.graph, self.x, self.out = graph, x, out


class _Arguments:
    """The static copies of one micro-batch's block arguments that its graphs read, and the
    tensors last copied into them (a step's arguments are the same objects for every block)."""

    __slots__ = ("spec", "statics", "sources")

    def __init__(self, spec: Any, leaves: list[Any]) -> None:
        self.spec = spec
        self.statics = [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        self.sources: list[Any] = list(leaves)

    def refresh(self, leaves: list[Any]) -> None:
        for k, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor) and self.sources[k] is not leaf:
                self.statics[k].copy_(leaf)
                self.sources[k] = leaf

    def kwargs(self) -> dict:
        built: dict = pytree.tree_unflatten(self.statics, self.spec)
        return built


class BlockGraphs:
    """The engine's block forwards, as CUDA graphs where they can be (module docstring).
    ``capture``: how a forward is captured (``cuda_capture``; a test passes a stand-in)."""

    def __init__(self, capture: Capture | None = None, pool: Any = None) -> None:
        self._capture = capture or cuda_capture
        self._pool = pool if pool is not None or capture is not None else torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, _Captured | None] = {}
        self._arguments: dict[tuple, _Arguments] = {}
        # where the graphs write: per branch and micro-batch, two tensors that the blocks take in
        # turn (block i reads the one block i - 1 wrote and writes the other), not one per graph
        self._outputs: dict[tuple, torch.Tensor] = {}
        self._per_block: dict[int, int] = {}
        self.training_steps = 0  # training forwards begun: the first runs eagerly, the second captures
        self.failed: str | None = None  # the first capture's failure, if any

    def begin_training_step(self) -> None:
        self.training_steps += 1

    @property
    def capturing(self) -> bool:
        return self.training_steps == 2

    def forward(
        self, block: Callable[..., Any], i: int, sign: int, k: int, x: torch.Tensor, kwargs: dict
    ) -> torch.Tensor:
        """Block i's output for branch ``sign`` and micro-batch ``k``: ``block(x, **kwargs)``'s
        hidden state, by its graph where there is one."""
        leaves, spec = pytree.tree_flatten(kwargs)
        if not all(isinstance(leaf, (torch.Tensor, *_PLAIN)) for leaf in leaves):
            return hidden_of(block(x, **kwargs))
        shape = (
            tuple(x.shape),
            x.dtype,
            tuple(
                (tuple(leaf.shape), leaf.dtype, leaf.device) if isinstance(leaf, torch.Tensor) else leaf
                for leaf in leaves
            ),
            _hashable(spec),
        )
        key = (i, sign, k, shape)
        entry = self.graphs.get(key)
        if entry is None:
            if key in self.graphs or not self.capturing or self._per_block.get(i, 0) >= MAX_PER_BLOCK:
                return hidden_of(block(x, **kwargs))
            entry = self._new(key, block, x, leaves, spec)
            if entry is None:
                return hidden_of(block(x, **kwargs))
        args = self._arguments[(k, shape[2], shape[3])]
        args.refresh(leaves)
        if entry.x is not x:
            entry.x.copy_(x)
        entry.graph.replay()
        return entry.out

    def _new(self, key: tuple, block: Callable[..., Any], x: torch.Tensor, leaves: list, spec: Any) -> _Captured | None:
        i, sign, k, (x_shape, x_dtype, arg_shapes, spec_key) = key
        arguments = self._arguments.get((k, arg_shapes, spec_key))
        if arguments is None:
            arguments = self._arguments[(k, arg_shapes, spec_key)] = _Arguments(spec, leaves)
        arguments.refresh(leaves)
        out = self._outputs.get((sign, k, i % 2, x_shape, x_dtype))
        if out is None:  # a block's output has its input's shape
            out = self._outputs[sign, k, i % 2, x_shape, x_dtype] = torch.empty_like(x)
        # the previous block's graph output is read where it is; any other input gets a copy
        written = any(x is t for t in self._outputs.values())
        static_x = x if written and x is not out else x.clone()
        try:
            graph = self._capture(block, static_x, arguments.kwargs(), out, self._pool)
        except Exception as exc:  # an operation a graph cannot hold: this forward runs eagerly
            self.graphs[key] = None
            if self.failed is None:
                self.failed = f"{type(exc).__name__}: {exc}"
                print(f"warning: block {i} runs without a CUDA graph ({self.failed})", file=sys.stderr, flush=True)
            return None
        entry = self.graphs[key] = _Captured(graph, static_x, out)
        self._per_block[i] = self._per_block.get(i, 0) + 1
        return entry

    def count(self) -> int:
        """Graphs captured."""
        return sum(entry is not None for entry in self.graphs.values())
