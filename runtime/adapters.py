"""Where a model family keeps its parts. The only model-specific code in the runtime.

The executor streams decoder blocks itself and needs to know, per family: the list of blocks,
the modules that stay resident (embeddings, final norm, head) and how hidden states become
logits. Everything else (attention masks, position ids, rotary embeddings) comes from the
model's own forward: the executor runs it up to the first block and captures the arguments the
model passes to its blocks, so the schedule works across transformers versions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from zoplan.errors import ZoplanError


@dataclass(frozen=True)
class Adapter:
    family: str
    blocks_path: str  # attribute path of the nn.ModuleList of decoder blocks
    final_paths: tuple[str, ...]  # modules applied to the last hidden state, in order, before the head
    buffers_rebuild: Callable[[nn.Module, torch.device], None] | None = None

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks_path)

    def logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        for path in self.final_paths:
            module = _optional(model, path)
            if module is not None:
                hidden = module(hidden)
        return model.get_submodule("lm_head")(hidden)


def _optional(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _rebuild_rotary(model: nn.Module, device: torch.device) -> None:
    """Rotary embeddings hold a computed, non-persistent buffer (inv_freq) that a model built on
    the meta device lacks: build the module again on the real device."""
    rotary = model.get_submodule("model.rotary_emb")
    with torch.device(device):  # the constructor's own device argument differs across versions
        model.get_submodule("model").rotary_emb = type(rotary)(config=model.config)


ADAPTERS = {
    # OPT: final LayerNorm (absent in OPT-350m) and project_out (OPT-350m only) before the head
    "opt": Adapter("opt", "model.decoder.layers", ("model.decoder.final_layer_norm", "model.decoder.project_out")),
    "llama": Adapter("llama", "model.layers", ("model.norm",), _rebuild_rotary),
    "mistral": Adapter("mistral", "model.layers", ("model.norm",), _rebuild_rotary),
    "qwen2": Adapter("qwen2", "model.layers", ("model.norm",), _rebuild_rotary),
}


def adapter_for(model_type: str) -> Adapter:
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise ZoplanError(
            f"model type '{model_type}' is not supported by the runtime",
            fix=f"use one of {', '.join(sorted(ADAPTERS))}",
        ) from None
