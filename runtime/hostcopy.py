"""One host copy of the parameters per machine, shared by every local rank.

Each block's parameters are flattened into one buffer (padded to a multiple of the slice count),
so "slice k of block i" is a plain range of one tensor: a rank uploads, updates and writes back
exactly its own ranges. Buffers live in files under /dev/shm mapped by every local rank
(``torch.from_file(shared=True)``): the weights occupy host memory once however many ranks run.
The resident parts (embeddings, final norm, head) are stored there too, so ranks other than the
loader never materialise the model.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def decays(name: str, tensor: torch.Tensor) -> bool:
    """MeZO applies weight decay to weight matrices only, not to biases and norm weights."""
    return tensor.dim() > 1 and "norm" not in name


@dataclass(frozen=True)
class Slot:
    """One parameter inside a block's flat buffer."""

    name: str  # full parameter name: the perturbation's name
    local: str  # name inside the block module
    offset: int
    numel: int
    shape: tuple[int, ...]
    decay: bool


@dataclass(frozen=True)
class BlockLayout:
    index: int
    slots: tuple[Slot, ...]
    numel: int
    padded: int

    def segments(self, start: int, end: int) -> Iterator[tuple[Slot, int, int, int]]:
        """(slot, first element in the slot, count, position in the flat range) for every
        parameter overlapping the flat range [start, end)."""
        for slot in self.slots:
            lo = max(start, slot.offset)
            hi = min(end, slot.offset + slot.numel)
            if lo < hi:
                yield slot, lo - slot.offset, hi - lo, lo - start


def block_layouts(blocks: nn.ModuleList, prefix: str, slices: int) -> list[BlockLayout]:
    layouts = []
    for i, block in enumerate(blocks):
        slots, offset = [], 0
        for local, param in block.named_parameters():
            name = f"{prefix}{i}.{local}"
            slots.append(Slot(name, local, offset, param.numel(), tuple(param.shape), decays(name, param)))
            offset += param.numel()
        padded = -(-offset // slices) * slices
        layouts.append(BlockLayout(i, tuple(slots), offset, padded))
    return layouts


class HostCopy:
    """Flat block buffers and resident tensors in shared memory, opened by name."""

    def __init__(
        self, root: Path, layouts: list[BlockLayout], wire_dtype: str, resident: dict[str, tuple[tuple[int, ...], str]]
    ) -> None:
        self.root = root
        self.layouts = layouts
        self.wire = DTYPES[wire_dtype]
        self.blocks = [
            torch.from_file(str(root / f"block{l.index}.bin"), shared=True, size=l.padded, dtype=self.wire)
            for l in layouts
        ]
        self.pinned = False  # page-locked for CUDA (pin_for_cuda): once per process
        self.resident = {}
        for name, (shape, dtype) in resident.items():
            numel = 1
            for s in shape:
                numel *= s
            flat = torch.from_file(str(root / f"resident.{name}.bin"), shared=True, size=numel, dtype=DTYPES[dtype])
            self.resident[name] = flat.view(shape)

    def pin_for_cuda(self) -> bool:
        """Page-lock the block buffers (asynchronous copies at full PCIe speed); False if the
        driver refused, which leaves copies correct but slower."""
        if self.pinned:
            return True
        cudart = torch.cuda.cudart()
        for t in self.blocks:
            if int(cudart.cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)) != 0:
                return False
        self.pinned = True
        return True

    @staticmethod
    def create(
        root: Path, model: nn.Module, blocks: nn.ModuleList, prefix: str, slices: int, wire_dtype: str, param_dtype: str
    ) -> HostCopy:
        """Write a loaded model's parameters into shared memory (the loader rank of a machine).
        Each block is released (moved to meta) as soon as it is copied, so the loader holds the
        weights about once, plus one block, instead of the model and its host copy side by side."""
        root.mkdir(parents=True, exist_ok=True)
        layouts = block_layouts(blocks, prefix, slices)
        block_names = {s.name for l in layouts for s in l.slots}
        resident = {n: (tuple(p.shape), param_dtype) for n, p in model.named_parameters() if n not in block_names}
        (root / "layout.json").write_text(json.dumps({"wire": wire_dtype, "resident": resident, "slices": slices}))
        copy = HostCopy(root, layouts, wire_dtype, resident)
        for layout, flat in zip(layouts, copy.blocks):
            params = dict(blocks[layout.index].named_parameters())
            for slot in layout.slots:
                flat[slot.offset : slot.offset + slot.numel].copy_(params[slot.local].detach().reshape(-1))
            flat[layout.numel :].zero_()
            del params
            blocks[layout.index].to("meta")
        for name, param in model.named_parameters():
            if name in copy.resident:
                copy.resident[name].copy_(param.detach())
        (root / "ready").write_text("ok")
        return copy

    @staticmethod
    def open(root: Path, blocks: nn.ModuleList, prefix: str) -> HostCopy:
        meta = json.loads((root / "layout.json").read_text())
        layouts = block_layouts(blocks, prefix, meta["slices"])
        resident = {n: (tuple(shape), dtype) for n, (shape, dtype) in meta["resident"].items()}
        return HostCopy(root, layouts, meta["wire"], resident)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
