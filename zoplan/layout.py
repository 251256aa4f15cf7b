"""The parallel layout: a validated plain object, the one place that says which rank does what.

Words (docs/architecture.md has the glossary):
- a *perturbation pair* is two compute ranks that run the +eps and -eps branch of the same step
  on the same data (perturbation degree 2). With degree 1 one rank runs both ("dual forward").
- a *replica* is one copy of the computation on its own shard of the global batch; every replica
  uses the same seed, and only loss scalars cross between replicas.
- a *mover* pulls slices of each block from host memory over its own PCIe link; movers that do not
  compute are *relays*: they only pass slices on over NVLink.
- a *block* is one transformer layer's parameters; a *slice* is 1/slices_per_block of a block.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Any

from zoplan.errors import ZoplanError
from zoplan.vocab import DTYPE_BYTES


@dataclass(frozen=True)
class Layout:
    """One configuration of one node (every node of a multi-node machine runs the same)."""

    perturbation: int
    data: int  # replicas per node
    compute_gpus: tuple[str, ...]  # index = replica * perturbation + branch
    upload: str  # "whole": each compute GPU uploads every block itself; "sliced": movers share it
    movers: tuple[str, ...]  # GPUs that pull slices from host memory ("sliced"); compute_gpus for "whole"
    slices_per_block: int
    wire_dtype: str  # dtype of the host copy and of PCIe transfers
    param_dtype: str  # dtype blocks are computed in on the GPU
    micro_batch: int
    prefetch: int  # blocks buffered ahead of the one being computed
    resident: tuple[int, ...] = ()  # block indices that never cross PCIe
    nodes: int = 1
    placement: str = "spread"  # how compute_gpus were chosen (for display)
    # sliced uploads: each mover's share of every round, in proportion to these weights (one per
    # mover; empty: equal shares). A mover behind a slower host link carries less of each block.
    shares: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------------------------
    def validate(self) -> None:
        if self.perturbation not in (1, 2):
            raise ZoplanError(f"perturbation degree must be 1 or 2, got {self.perturbation}")
        if self.data < 1:
            raise ZoplanError(f"data-parallel degree must be at least 1, got {self.data}")
        want = self.perturbation * self.data
        if len(self.compute_gpus) != want:
            raise ZoplanError(
                f"perturbation {self.perturbation} x data {self.data} = {want} compute GPUs, "
                f"but {len(self.compute_gpus)} are given ({', '.join(self.compute_gpus)})"
            )
        if len(set(self.compute_gpus)) != len(self.compute_gpus):
            raise ZoplanError(f"a GPU appears twice among the compute GPUs: {', '.join(self.compute_gpus)}")
        if self.upload == "whole":
            if tuple(self.movers) != tuple(self.compute_gpus):
                raise ZoplanError("with whole-block uploads the movers are the compute GPUs")
            if self.slices_per_block != 1:
                raise ZoplanError("whole-block uploads use 1 slice per block")
        else:
            twice = sorted({g for g in self.movers if list(self.movers).count(g) > 1})
            if twice:
                raise ZoplanError(
                    f"a GPU appears twice among the movers: {', '.join(twice)} ({', '.join(self.movers)})",
                    fix="name each mover once",
                )
            missing = [g for g in self.compute_gpus if g not in self.movers]
            if missing:
                raise ZoplanError(
                    f"sliced uploads need every compute GPU among the movers; missing {', '.join(missing)}"
                )
            if self.slices_per_block % len(self.movers):
                raise ZoplanError(
                    f"{self.slices_per_block} slices per block do not divide among {len(self.movers)} movers",
                    fix="use a multiple of the mover count",
                )
        if self.shares:
            if self.upload != "sliced" or len(self.shares) != len(self.movers):
                raise ZoplanError(
                    f"shares {list(self.shares)} need sliced uploads and one weight per mover ({len(self.movers)})"
                )
            if any(type(w) is not int or w < 1 for w in self.shares):
                raise ZoplanError(f"shares must be positive whole numbers, got {list(self.shares)}")
        if self.micro_batch < 1 or self.prefetch < 1:
            raise ZoplanError("micro-batch and prefetch depth must be at least 1")
        if self.wire_dtype not in DTYPE_BYTES or self.param_dtype not in DTYPE_BYTES:
            raise ZoplanError(f"dtypes must be one of {', '.join(DTYPE_BYTES)}")
        if DTYPE_BYTES[self.wire_dtype] > DTYPE_BYTES[self.param_dtype]:
            raise ZoplanError(
                f"wire dtype {self.wire_dtype} is wider than the compute dtype {self.param_dtype}",
                fix="pick a wire dtype no wider than --dtype",
            )

    # ------------------------------------------------------------------------------------
    @property
    def compute_ranks_per_node(self) -> int:
        return self.perturbation * self.data

    @property
    def gpus(self) -> tuple[str, ...]:
        """Every GPU this layout uses on a node: compute GPUs first, then relays."""
        return tuple(self.compute_gpus) + tuple(g for g in self.movers if g not in self.compute_gpus)

    @property
    def relays(self) -> tuple[str, ...]:
        return tuple(g for g in self.movers if g not in self.compute_gpus)

    @property
    def rounds(self) -> int:
        """Slices each mover uploads per block; each round is all-gathered on its own."""
        return self.slices_per_block // len(self.movers) if self.upload == "sliced" else 1

    def parts(self, round_params: int) -> list[tuple[int, int]]:
        """Each mover's [lo, hi) within one round of ``round_params`` parameters, in mover order:
        equal with no shares (``round_params`` is a multiple of the mover count), else in
        proportion to the shares (boundaries rounded down)."""
        return split(round_params, self.shares or (1,) * len(self.movers))

    def part_of(self, gpu: str, round_params: int) -> int:
        """Parameters ``gpu`` uploads of each round (0 for a GPU that is not a mover)."""
        if gpu not in self.movers:
            return 0
        lo, hi = self.parts(round_params)[self.movers.index(gpu)]
        return hi - lo

    @property
    def branches_per_gpu(self) -> int:
        return 2 // self.perturbation

    def ranks(self) -> list[dict[str, Any]]:
        """Rank table: global rank, node, GPU, role and groups; one entry per process."""
        table: list[dict[str, Any]] = []
        per_node = len(self.gpus)
        for node in range(self.nodes):
            for local, gpu in enumerate(self.gpus):
                entry: dict[str, Any] = {"rank": node * per_node + local, "node": node, "local_rank": local, "gpu": gpu}
                if local < self.compute_ranks_per_node:
                    replica, branch = divmod(local, self.perturbation)
                    entry["role"] = "compute"
                    entry["replica"] = node * self.data + replica
                    entry["branch"] = "+-" if self.perturbation == 1 else "+-"[branch]
                else:
                    entry["role"] = "relay"
                table.append(entry)
        return table

    def groups(self) -> dict[str, list[list[int]]]:
        """Process groups by global rank: perturbation pairs, replicas (same branch across
        replicas), and the per-node block-exchange groups (the movers)."""
        ranks = self.ranks()
        compute = [r for r in ranks if r["role"] == "compute"]
        pairs: list[list[int]] = [[] for _ in range(self.data * self.nodes)]
        by_branch: dict[str, list[int]] = {}
        for r in compute:  # (in rank order: each group's ranks ascend)
            pairs[r["replica"]].append(r["rank"])
            by_branch.setdefault(r["branch"], []).append(r["rank"])
        across = [by_branch[b] for b in sorted(by_branch)]
        per_node = len(self.gpus)
        movers_local = [self.gpus.index(g) for g in self.movers]
        exchange = [[node * per_node + i for i in movers_local] for node in range(self.nodes)]
        return {"perturbation_pairs": pairs, "replicas_per_branch": across, "block_exchange": exchange}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("compute_gpus", "movers", "resident", "shares"):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Layout:
        d = dict(d)
        for key in ("compute_gpus", "movers", "resident", "shares"):
            d[key] = tuple(d.get(key, ()))
        return cls(**d)

    def describe(self) -> str:
        mv = f"{len(self.movers)} movers" if self.upload == "sliced" else "whole blocks"
        if self.shares:
            mv += " sharing " + ":".join(map(str, self.shares))
        return f"{self.perturbation}x{self.data}" + (f"x{self.nodes}n" if self.nodes > 1 else "") + f" {mv}"


def split(total: int, weights: tuple[int, ...]) -> list[tuple[int, int]]:
    """[lo, hi) ranges of ``total`` items in proportion to ``weights``, in order, covering it."""
    whole = sum(weights)
    bounds = [total * sum(weights[:k]) // whole for k in range(len(weights) + 1)]
    return list(zip(bounds, bounds[1:]))


def capacity_shares(gbps: list[float]) -> tuple[int, ...]:
    """Whole-number weights in proportion to each mover's host bandwidth (to a tenth of the
    slowest), reduced by their common divisor: (6.4, 25.6, 25.6) -> (1, 4, 4)."""
    slowest = min(gbps)
    weights = [max(1, round(10 * g / slowest)) for g in gbps]
    common = functools.reduce(math.gcd, weights)
    return tuple(w // common for w in weights)


def divisors(n: int) -> list[int]:
    """The divisors of ``n`` in ascending order, by trial division up to its square root."""
    small = [k for k in range(1, math.isqrt(n) + 1) if n % k == 0] if n >= 1 else []
    return small + [n // k for k in reversed(small) if k * k != n]


@dataclass(frozen=True)
class Pins:
    """Decisions the user fixed on the command line; ``None`` leaves a decision to the search."""

    perturbation: int | None = None
    data: int | None = None
    gpus: tuple[str, ...] | None = None  # the compute GPUs, in rank order
    slices: int | None = None
    wire_dtype: str | None = None
    micro_batch: int | None = None
    prefetch: int | None = None
    resident: int | None = None  # number of resident blocks
    upload: str | None = None  # "whole" or "sliced"
    movers: str | None = None  # "compute" or "all"
    nodes: int | None = None  # how many of the topology's nodes the layout runs on
