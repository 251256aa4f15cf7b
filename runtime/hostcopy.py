"""One host copy of the parameters per machine, shared by every local rank.

Each block's parameters are flattened into one buffer (padded to a multiple of the slice count),
so "slice k of block i" is a plain range of one tensor: a rank uploads, updates and writes back
exactly its own ranges. Buffers live in files under /dev/shm mapped by every local rank
(``torch.from_file(shared=True)``): the weights occupy host memory once however many ranks run.
The resident parts (embeddings, final norm, head) are stored there too, so ranks other than the
loader never materialise the model.

Read-only blocks (an adapter run: zoplan.runtime.tuning) need no copy at all where the checkpoint
already holds each block as one range of one safetensors file in the host copy's dtype (what
``save_pretrained`` and ``save_file`` write: a block's tensors sort together): every rank maps the
file read-only (``HostCopy.map``) and the operating system's page cache holds the weights once.
The block's flat order is then the file's, and its padding the bytes that follow it (never read
as a weight). ``mappable`` says why not where it cannot.
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import shutil
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from zoplan.errors import ZoplanError
from zoplan.runtime.scratch import SHARED_MEMORY_ROOM, short_of_shared_memory

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SAFETENSORS_DTYPES = {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}


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


def block_layouts(
    blocks: nn.ModuleList, prefix: str, slices: int, order: dict[int, list[str]] | None = None
) -> list[BlockLayout]:
    """Each block's flat layout: its parameters in module order, or in ``order`` (per block, the
    parameters' local names: a mapped checkpoint's order). z is drawn per parameter name and
    element, so the order never changes a value."""
    layouts = []
    for i, block in enumerate(blocks):
        slots, offset = [], 0
        params = dict(block.named_parameters())
        for local in order[i] if order is not None else list(params):
            param = params[local]
            name = f"{prefix}{i}.{local}"
            slots.append(Slot(name, local, offset, param.numel(), tuple(param.shape), decays(name, param)))
            offset += param.numel()
        padded = -(-offset // slices) * slices
        layouts.append(BlockLayout(i, tuple(slots), offset, padded))
    return layouts


@dataclass(frozen=True)
class Mapping:
    """Where each block lies in a checkpoint: its file, first byte, and parameters in file order."""

    files: dict[int, Path]
    starts: dict[int, int]
    order: dict[int, list[str]]
    held: dict[str, Path]  # every tensor of the checkpoint: its file


def _header(path: Path) -> tuple[dict, int, int]:
    """A safetensors file's header, where its data starts, and its size in bytes."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        size = f.seek(0, 2)
    header.pop("__metadata__", None)
    return header, 8 + length, size


def mappable(model_dir: Path, blocks: nn.ModuleList, prefix: str, slices: int, wire_dtype: str) -> Mapping | str:
    """Where each block lies in ``model_dir``'s safetensors, or why the host copy must copy it."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError):
            return f"{index.name} has no weight_map"
        names = sorted(set(weight_map.values()))
    elif (model_dir / "model.safetensors").exists():
        names = ["model.safetensors"]
    else:
        return "the checkpoint is not in safetensors"
    where: dict[str, tuple[Path, dict, int]] = {}  # tensor name -> (file, its entry, data start)
    sizes: dict[Path, int] = {}
    for name in names:
        path = model_dir / name
        try:
            header, data, sizes[path] = _header(path)
        except (OSError, ValueError, struct.error) as exc:
            return f"{path.name} cannot be read as safetensors ({exc})"
        for tensor, entry in header.items():
            where[tensor] = (path, entry, data)
    element = torch.empty((), dtype=DTYPES[wire_dtype]).element_size()
    files, starts, order = {}, {}, {}
    for i, block in enumerate(blocks):
        params = dict(block.named_parameters())
        found = [(f"{prefix}{i}.{local}", local) for local in params]
        missing = [n for n, _ in found if n not in where]
        if missing:
            return f"the checkpoint has no tensor {missing[0]}"
        entries = sorted((where[n][1]["data_offsets"], where[n], n, local) for n, local in found)
        paths = {e[1][0] for e in entries}
        if len(paths) > 1:
            return f"block {i} is split over {len(paths)} files"
        dtypes = {e[1][1]["dtype"] for e in entries}
        if dtypes != {SAFETENSORS_DTYPES[wire_dtype]}:
            return f"block {i} is stored as {'/'.join(sorted(dtypes))}, the host copy is {wire_dtype}"
        for (prev, *_), (cur, *_) in zip(entries, entries[1:]):
            if prev[1] != cur[0]:
                return f"block {i}'s tensors are not one range of {paths.pop().name}"
        path, _, data = entries[0][1]
        start = data + entries[0][0][0]
        numel = sum(p.numel() for p in params.values())
        if entries[-1][0][1] - entries[0][0][0] != numel * element:
            return f"block {i}'s tensors in {path.name} are not its parameters' sizes"
        padded = -(-numel // slices) * slices
        if start % element or start + padded * element > sizes[path]:
            return f"block {i} cannot be mapped as {slices} slices (it ends its file, or is not aligned)"
        files[i], starts[i], order[i] = path, start, [local for *_, local in entries]
    return Mapping(files, starts, order, {tensor: entry[0] for tensor, entry in where.items()})


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    """What tells a file apart from a rewritten or replaced one."""
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def reserve(root: Path, files: list[tuple[str, int]], copies: int = 1) -> None:
    """Create the host copy's files in ``root`` with their bytes claimed (``posix_fallocate``)
    before any is written. In shared memory (a tmpfs) a file's pages are taken only as they are
    written, and a write that finds the tmpfs full kills the writer with SIGBUS: without the
    claim, a /dev/shm smaller than the model (a container's is 64 MiB unless started with more)
    killed the loading rank without a word. ``copies``: how many ranks each make such a copy at
    once (calibration), for the message; room is kept for the launch's small files too."""
    need = sum(size for _, size in files)
    if need + SHARED_MEMORY_ROOM > shutil.disk_usage(root).free:
        raise short_of_shared_memory(root, need, copies)
    for name, size in files:
        fd = os.open(root / name, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            if size:
                os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            for other, _ in files:  # nothing half-claimed is left for the others to wait on
                (root / other).unlink(missing_ok=True)
            raise short_of_shared_memory(root, need, copies) from None
        finally:
            os.close(fd)


class HostCopy:
    """Flat block buffers and resident tensors in shared memory, opened by name; or the blocks
    mapped read-only from the checkpoint itself (``map``)."""

    def __init__(
        self,
        root: Path,
        layouts: list[BlockLayout],
        wire_dtype: str,
        resident: dict[str, tuple[tuple[int, ...], str]],
        blocks: list[torch.Tensor] | None = None,
    ) -> None:
        self.root = root
        self.layouts = layouts
        self.wire = DTYPES[wire_dtype]
        self.read_only = blocks is not None  # mapped from the checkpoint: never written
        self.blocks = (
            blocks
            if blocks is not None
            else [
                torch.from_file(str(root / f"block{l.index}.bin"), shared=True, size=l.padded, dtype=self.wire)
                for l in layouts
            ]
        )
        self.pinned = False  # page-locked for CUDA (pin_for_cuda): once per process
        # some block value changed as the host copy's dtype stored it (a copy narrower than the
        # loaded model's values: an fp32 checkpoint in bf16); never for a mapped checkpoint
        self.rounded = False
        self._maps: list[mmap.mmap] = []  # a mapped checkpoint's files
        self._stats: dict[Path, tuple[int, int, int]] = {}  # and what they were when mapped
        self.resident = {}
        for name, (shape, dtype) in resident.items():
            numel = 1
            for s in shape:
                numel *= s
            flat = torch.from_file(str(root / f"resident.{name}.bin"), shared=True, size=numel, dtype=DTYPES[dtype])
            self.resident[name] = flat.view(shape)

    @staticmethod
    def map(mapping: Mapping, blocks: nn.ModuleList, prefix: str, slices: int, wire_dtype: str) -> HostCopy:
        """The blocks as views of the checkpoint's files mapped read-only (``mappable``); no
        resident tensors (each rank reads its own from the checkpoint)."""
        layouts = block_layouts(blocks, prefix, slices, mapping.order)
        maps, stats = {}, {}
        for path in set(mapping.files.values()):
            with open(path, "rb") as f:
                maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                stats[path] = _identity(os.fstat(f.fileno()))
        dtype = DTYPES[wire_dtype]
        views = []
        with warnings.catch_warnings():  # read-only memory: nothing writes to a mapped block
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            for layout in layouts:
                buf = maps[mapping.files[layout.index]]
                views.append(
                    torch.frombuffer(buf, dtype=dtype, count=layout.padded, offset=mapping.starts[layout.index])
                )
        copy = HostCopy(Path(), layouts, wire_dtype, {}, blocks=views)
        copy._maps = list(maps.values())  # the mappings live as long as the views
        copy._stats = stats
        return copy

    def check_unchanged(self) -> None:
        """Refuse to go on (save an adapter, a snapshot) once a mapped checkpoint file was written
        or replaced: the run read its blocks from a file that is no longer what the adapter names
        as its base (rewritten in place, it may even have read a mix)."""
        for path, then in self._stats.items():
            try:
                now = _identity(os.stat(path))
            except OSError:
                now = None
            if now != then:
                raise ZoplanError(
                    f"{path} changed while this run read its blocks from it (mapped read-only, not copied): "
                    "the adapter would name a base it was not trained on",
                    fix="keep a checkpoint unchanged while a run uses it and run again (ZOPLAN_HOST_COPY=copy "
                    "copies the blocks at the start instead)",
                )

    def pin_for_cuda(self) -> bool:
        """Page-lock the block buffers (asynchronous copies at full PCIe speed); False if the
        driver refused, which leaves copies correct but slower."""
        if self.pinned:
            return True
        cudart = torch.cuda.cudart()
        flags = 8 if self.read_only else 0  # cudaHostRegisterReadOnly: a read-only mapping
        for t in self.blocks:
            if int(cudart.cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), flags)) != 0:
                return False
        self.pinned = True
        return True

    @staticmethod
    def create(
        root: Path,
        model: nn.Module,
        blocks: nn.ModuleList,
        prefix: str,
        slices: int,
        wire_dtype: str,
        param_dtype: str,
        copies: int = 1,
    ) -> HostCopy:
        """Write a loaded model's parameters into shared memory (the loader rank of a machine;
        ``copies``: how many ranks make one at once). Each block is released (moved to meta) as soon
        as it is copied, so the loader holds the weights about once, plus one block, instead of the
        model and its host copy side by side."""
        root.mkdir(parents=True, exist_ok=True)
        layouts = block_layouts(blocks, prefix, slices)
        block_names = {s.name for l in layouts for s in l.slots}
        resident = {n: (tuple(p.shape), param_dtype) for n, p in model.named_parameters() if n not in block_names}
        wire = DTYPES[wire_dtype].itemsize
        reserve(
            root,
            [(f"block{l.index}.bin", l.padded * wire) for l in layouts]
            + [
                (f"resident.{n}.bin", math.prod(shape) * DTYPES[dtype].itemsize)
                for n, (shape, dtype) in resident.items()
            ],
            copies,
        )
        copy = HostCopy(root, layouts, wire_dtype, resident)
        for layout, flat in zip(layouts, copy.blocks):
            params = dict(blocks[layout.index].named_parameters())
            for slot in layout.slots:
                value = params[slot.local].detach().reshape(-1)
                stored = flat[slot.offset : slot.offset + slot.numel]
                stored.copy_(value)
                if not copy.rounded and stored.dtype != value.dtype:
                    copy.rounded = not torch.equal(stored.to(value.dtype), value)
            flat[layout.numel :].zero_()
            del params
            blocks[layout.index].to("meta")
        for name, param in model.named_parameters():
            if name in copy.resident:
                copy.resident[name].copy_(param.detach())
        # what the ranks that open the copy read, written once it is whole (they wait for "ready")
        meta = {"wire": wire_dtype, "resident": resident, "slices": slices, "rounded": copy.rounded}
        (root / "layout.json").write_text(json.dumps(meta))
        (root / "ready").write_text("ok")
        return copy

    @staticmethod
    def open(root: Path, blocks: nn.ModuleList, prefix: str) -> HostCopy:
        meta = json.loads((root / "layout.json").read_text())
        layouts = block_layouts(blocks, prefix, meta["slices"])
        resident = {n: (tuple(shape), dtype) for n, (shape, dtype) in meta["resident"].items()}
        copy = HostCopy(root, layouts, meta["wire"], resident)
        copy.rounded = bool(meta.get("rounded", False))
        return copy

    def remove(self) -> None:
        if not self.read_only:
            shutil.rmtree(self.root, ignore_errors=True)
