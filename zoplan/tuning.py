"""What a run trains: every weight (full-parameter MeZO), or a small adapter on a frozen base.

- ``full``: every parameter is perturbed and updated (MeZO). Blocks stream in, are updated and
  written back each step.
- ``lora``: LoRA on the attention's query and value projections of every block (MeZO's and PEFT's
  choice: ``W x + (alpha / rank) * B A x``, A of ``rank x in``, B of ``out x rank``, B zero at
  the start). Only A and B are perturbed and updated.
- ``prefix``: ``tokens`` trained key and value vectors per block, read by every position's
  attention before the sequence's own (MeZO's prefix tuning without reparameterisation).

With an adapter the base weights are read-only: no block is updated or written back, both
branches of a step read the same uploaded block, the resident parts (embeddings, head) are not
perturbed, and each rank keeps the whole adapter (a few hundred thousand to a few million
parameters) resident, perturbing and updating it itself. The step program then has no update,
barrier or write-back ops (zoplan.program), and the simulator times what is left.

Torch-free: the planner counts; zoplan.runtime.tuning trains.
"""

from __future__ import annotations

from dataclasses import dataclass

from zoplan.errors import ZoplanError
from zoplan.limits import MAX_LORA_RANK, MAX_PREFIX_TOKENS
from zoplan.models import ModelShape
from zoplan.vocab import Method

LORA_TARGETS = ("q_proj", "v_proj")  # in every block's attention, for every supported family
PREFIX_BLOCK_OPS = {"opt": 15, "llama": 23, "qwen2": 23}  # Tuning.block_ops

# MeZO's hyper-parameters for the adapters (its README, OPT-13B): the defaults where not given.
# Full-parameter: the plan's own (zoplan.planfile.ZoSettings).
ADAPTER_LR: dict[str, float] = {Method.LORA: 5e-5, Method.PREFIX: 1e-3}
ADAPTER_EPS: dict[str, float] = {Method.LORA: 1e-2, Method.PREFIX: 1e-1}


@dataclass(frozen=True)
class Tuning:
    method: Method = Method.FULL
    lora_rank: int = 8
    lora_alpha: float = 16.0
    prefix_tokens: int = 5

    def __post_init__(self) -> None:
        if self.method not in tuple(Method):
            raise ZoplanError(
                f"unknown tuning method {self.method!r}", fix=f"use one of: {', '.join(m.value for m in Method)}"
            )
        object.__setattr__(self, "method", Method(self.method))
        if self.lora_rank < 1 or self.prefix_tokens < 1 or not self.lora_alpha > 0:
            raise ZoplanError("LoRA rank, LoRA alpha and prefix tokens must be positive")
        for flag, value, most in (
            ("--lora-rank", self.lora_rank, MAX_LORA_RANK),
            ("--prefix-tokens", self.prefix_tokens, MAX_PREFIX_TOKENS),
        ):
            if value > most:  # (as zoplan run checks it: a plan made past it would be refused there)
                raise ZoplanError(f"{flag} {value} is more than {most}", fix=f"use {flag} {most} or less")

    @property
    def frozen_base(self) -> bool:
        """The base weights are only read: no update, no write-back."""
        return self.method != "full"

    @property
    def positions(self) -> int:
        """Positions taken before every sequence's own (a prefix's tokens)."""
        return self.prefix_tokens if self.method == "prefix" else 0

    def block_params(self, shape: ModelShape) -> int:
        """Trained parameters per block (0 for full-parameter: the block itself is trained)."""
        if self.method == "lora":  # q: hidden -> hidden, v: hidden -> kv_dim
            return self.lora_rank * (2 * shape.hidden) + self.lora_rank * (shape.hidden + shape.kv_dim)
        if self.method == "prefix":  # a key and a value per prefix token, per key-value head
            return 2 * self.prefix_tokens * shape.kv_dim
        return 0

    def params(self, shape: ModelShape) -> int:
        """The adapter's parameters, all blocks together."""
        return self.block_params(shape) * shape.layers

    def block_flops(self, shape: ModelShape, tokens: int) -> float:
        """Extra forward FLOPs of one block for ``tokens`` tokens: LoRA's two small matrix
        products per target; a prefix's extra keys in every position's attention."""
        if self.method == "lora":
            return 2.0 * tokens * self.block_params(shape)
        if self.method == "prefix":
            return 2.0 * 2 * tokens * self.prefix_tokens * shape.hidden
        return 0.0

    def block_ops(self, family: str) -> int:
        """Tensor ops the adapter adds to a block's forward per micro-batch (a CPU rank pays each):
        LoRA's two products, its scale and the add on each of its two projections; a prefix's key
        and value views and concatenations and the attention's masked path (counted with
        transformers 5: 15 on an OPT block, 23 on a LLaMA or Qwen2 one)."""
        if self.method == Method.PREFIX:
            return PREFIX_BLOCK_OPS.get(family, max(PREFIX_BLOCK_OPS.values()))
        return {Method.LORA: 4 * len(LORA_TARGETS)}.get(self.method, 0)

    def embed_ops(self) -> int:
        """Tensor ops the adapter adds to the model's forward up to the first block per micro-batch:
        a prefix's mask and position columns, its cache of zeros and the masks made with it (30,
        counted with transformers 5 on OPT, LLaMA and Qwen2)."""
        return 30 if self.method == Method.PREFIX else 0

    def describe(self) -> str:
        if self.method == "lora":
            return f"LoRA (rank {self.lora_rank}, alpha {self.lora_alpha:g}, on {' and '.join(LORA_TARGETS)})"
        if self.method == "prefix":
            return f"prefix ({self.prefix_tokens} tokens)"
        return "full-parameter"


FULL = Tuning()


def default_lr(tuning: Tuning) -> float:
    from zoplan.planfile import ZoSettings

    return float(ADAPTER_LR.get(tuning.method, ZoSettings.model_fields["lr"].default))


def default_eps(tuning: Tuning) -> float:
    from zoplan.planfile import ZoSettings

    return float(ADAPTER_EPS.get(tuning.method, ZoSettings.model_fields["eps"].default))
