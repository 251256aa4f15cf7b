"""Model shapes: the architecture numbers the cost model and the simulator need, and nothing else.

The planner never loads weights. It needs, per model, how many bytes one transformer block is
(what crosses PCIe twice per step), how many bytes stay resident on the GPU (embeddings, final
norm, LM head), how many FLOPs one block costs per token and how much activation memory running
one block in inference takes. All of that follows from a handful of numbers in a Hugging Face
``config.json``, so a shape is built either from a preset (``PRESETS``) or by reading such a file
with :mod:`json`: no torch, no transformers.

Parameter counts are exact per family (they reproduce the Hugging Face totals to the parameter),
so block sizes in bytes are exact too.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from zoplan.errors import ZoplanError, did_you_mean
from zoplan.fileio import RepeatedKey, brief, content_hash, loads_json, read_text
from zoplan.limits import MAX_LAYERS, MIN_SEQ_LEN
from zoplan.vocab import DTYPE_BYTES


FAMILIES = ("opt", "llama", "qwen2")

# config.json model_type -> family. Mistral is LLaMA-shaped (RMSNorm, SwiGLU, GQA, no biases,
# untied head); its sliding window changes the attention kernel, not the parameter count.
MODEL_TYPE_FAMILY = {"opt": "opt", "llama": "llama", "mistral": "llama", "qwen2": "qwen2"}

# OPT's learned positional embedding has two extra rows: Hugging Face offsets positions by 2.
OPT_POSITION_OFFSET = 2

# Tensor ops (aten calls) the runtime issues per micro-batch and branch, per family: the model's
# forward up to its first block ("embed"), one block's forward, and the head with the fp32
# next-token loss. Counted on the tiny models with the transformers the tests run
# (tests/runtime/test_costs_runtime.py checks them); the cost model charges a device's op_us each.
RUNTIME_OPS: dict[str, dict[str, int]] = {
    "opt": {"embed": 14, "block": 38, "head": 14},
    "llama": {"embed": 17, "block": 70, "head": 19},
    "qwen2": {"embed": 17, "block": 70, "head": 19},
}

# Elements a block's elementwise ops read and write per token, per family, as (per hidden unit,
# per feed-forward unit, per position of the sequence: the mask): norms, residual adds, the
# activation, scalings, rotary embeddings. Counted on the tiny models (and copies of them with
# other hidden and feed-forward sizes) with the transformers the tests run; attention's own
# scores and matrix products are left out (tests/runtime/test_costs_runtime.py checks them). A CPU
# rank streams them through memory one op after another (zoplan.sim.costs.cpu_block_s).
RUNTIME_PASSES: dict[str, tuple[float, float, float]] = {
    "opt": (12.0, 2.0, 2.0),
    "llama": (40.5, 5.0, 2.0),
    "qwen2": (40.5, 5.0, 2.0),
}
# A CPU's scaled-dot-product attention reads and writes each score twice (its softmax and mask)
# besides its products: 1.5-1.8 ns a score at head size 16, 3.0-3.7 ns at 64 on one thread
# (docs/results/program.md), the rest being its 4 * head size FLOPs.
SCORE_PASSES = 4

# A CPU rank's token table of at least this many elements is not perturbed whole for each
# branch's embedding: the embedding draws z for the rows it looks up (runtime/engine.py
# _embedding_rows), and only the heads perturb the output projection. A smaller table costs less
# whole than its rows' calls do (a tiny model's 90k elements: ~0.3 ms a pass against ~1 ms).
ROWS_TABLE_MIN = 1 << 20

# The fp32 loss needs the logits in fp32; the model produces them in the compute dtype first
# (a 2-byte one: both at once, for a moment). The loss then takes the log-softmax of as many whole
# sequences at a time as make at most this many logits (at least one sequence), fp32 too, beside
# them (runtime/data.py loss_terms): 64 MiB, few calls for a small vocabulary, one sequence of a
# big one.
LOGITS_LOSS_BYTES = 4
LOSS_CHUNK_ELEMENTS = 1 << 24

# The runtime's built-in tiny models (runtime/tiny.py builds them, with torch, the first time a
# command names one). The planner reads a built one's config.json like any checkpoint's.
TINY_MODELS = ("tiny-opt", "tiny-llama", "tiny-qwen2")
TINY_VERSION = 1  # bump when the tokenizer, the configs or the initialisation change
# MeZO's 1e-6 suits pretrained LLMs; a randomly initialised tiny model needs a far larger step.
TINY_LR = 1e-3


def tiny_name(model_name: str) -> str | None:
    """The built-in model a plan's model name refers to (plans name it ``<name>-v<version>``)."""
    for name in TINY_MODELS:
        if model_name == f"{name}-v{TINY_VERSION}":
            return name
    return None


def tiny_cache_dir() -> Path:
    return Path.home() / ".cache" / "zoplan" / "tiny"


def tiny_model_dir(name: str, cache_dir: Path) -> Path:
    """Where the built-in model ``name`` is built in ``cache_dir``: ``<cache_dir>/<name>-v<TINY_VERSION>``
    (the runtime's cache is per library versions: zoplan.runtime.tiny.default_cache)."""
    return Path(cache_dir) / f"{name}-v{TINY_VERSION}"


def _dtype_bytes(dtype: str) -> int:
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ZoplanError(f"unknown dtype {dtype!r}", fix=f"use one of: {', '.join(DTYPE_BYTES)}") from None


@dataclass(frozen=True)
class ModelShape:
    """The architecture of a decoder-only LLM, as far as memory, transfers and FLOPs go.

    ``embed_dim`` equals ``hidden`` except in OPT-350m, whose token embeddings (and tied head)
    are ``word_embed_proj_dim`` = 512 wide with ``project_in`` / ``project_out`` matrices to and
    from the 1024-wide blocks.
    """

    name: str
    family: str
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    max_positions: int
    tied_head: bool
    embed_dim: int

    def __post_init__(self) -> None:
        """Reject shapes no real model has, so a typo fails here and not as a wrong plan."""
        where = f"model shape {brief(self.name)}"
        if self.family not in FAMILIES:
            raise ZoplanError(f"{where}: unknown family {brief(self.family)}", fix=f"use one of: {', '.join(FAMILIES)}")
        for key in ("layers", "hidden", "ffn", "heads", "kv_heads", "vocab", "max_positions", "embed_dim"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ZoplanError(f"{where}: '{key}' must be a positive integer, got {brief(value)}")
        if self.layers > MAX_LAYERS:
            raise ZoplanError(
                f"{where}: {self.layers} layers is more than zoplan plans ({MAX_LAYERS}; the deepest models have ~130)"
            )
        if self.max_positions < MIN_SEQ_LEN:
            raise ZoplanError(
                f"{where}: max_positions {self.max_positions} (max_position_embeddings in a config.json): "
                f"a sequence needs at least {MIN_SEQ_LEN} positions"
            )
        if not isinstance(self.tied_head, bool):
            raise ZoplanError(f"{where}: 'tied_head' must be true or false, got {brief(self.tied_head)}")
        if self.hidden % self.heads:
            raise ZoplanError(f"{where}: hidden {self.hidden} is not a multiple of heads {self.heads}")
        if self.heads % self.kv_heads:
            raise ZoplanError(f"{where}: heads {self.heads} is not a multiple of kv_heads {self.kv_heads}")
        if self.family == "opt" and self.kv_heads != self.heads:
            raise ZoplanError(
                f"{where}: OPT has no grouped-query attention (kv_heads {self.kv_heads} != heads {self.heads})"
            )
        if self.family != "opt" and self.embed_dim != self.hidden:
            raise ZoplanError(f"{where}: only OPT may have embed_dim != hidden")

    # ----------------------------------------------------------------------------- structure
    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        """Width of the key (and of the value) projection: smaller than hidden with GQA."""
        return self.kv_heads * self.head_dim

    @property
    def has_projected_embeddings(self) -> bool:
        """OPT-350m style: embeddings narrower than the blocks, with project_in / project_out."""
        return self.embed_dim != self.hidden

    def _matmul_params_per_block(self) -> int:
        """Weights of the linear layers of one block: what the 2-FLOPs-per-parameter rule counts."""
        h, f = self.hidden, self.ffn
        attention = h * (h + 2 * self.kv_dim + h)  # q, k, v, o
        mlp = (2 if self.family == "opt" else 3) * h * f  # fc1/fc2, or gate/up/down (SwiGLU)
        return attention + mlp

    def block_pass_elements(self, tokens: int, seq_len: int) -> float:
        """Elements one block's elementwise ops and attention scores read and write for ``tokens``
        tokens in sequences of ``seq_len`` (RUNTIME_PASSES, SCORE_PASSES)."""
        per_h, per_f, per_s = RUNTIME_PASSES[self.family]
        per_token = per_h * self.hidden + per_f * self.ffn + per_s * seq_len + SCORE_PASSES * self.heads * seq_len
        return per_token * tokens

    def block_product_outputs(self) -> tuple[int, ...]:
        """Elements each matrix product of one block writes per token, in the order it runs them:
        q, k, v, o, then fc1 and fc2 (OPT) or gate, up and down (SwiGLU)."""
        h, f, kv = self.hidden, self.ffn, self.kv_dim
        mlp = (f, h) if self.family == "opt" else (f, f, h)
        return (h, kv, kv, h, *mlp)

    def block_decay_exempt_params(self) -> int:
        """Biases and norm weights of one block: ZO-SGD applies no weight decay to them."""
        h, f = self.hidden, self.ffn
        if self.family == "opt":
            attention_biases = 4 * h  # q, k, v, out_proj
            mlp_biases = f + h  # fc1, fc2
            layer_norms = 2 * 2 * h  # self_attn_layer_norm, final_layer_norm: weight + bias
            return attention_biases + mlp_biases + layer_norms
        rms_norms = 2 * h  # input_layernorm, post_attention_layernorm (weight only)
        if self.family == "qwen2":
            return rms_norms + h + 2 * self.kv_dim  # q, k, v biases
        return rms_norms

    def block_params(self) -> int:
        """Exact parameter count of one transformer block (all blocks of a model are equal)."""
        return self._matmul_params_per_block() + self.block_decay_exempt_params()

    def embedding_params(self) -> int:
        """Token embeddings, plus OPT's learned positions and OPT-350m's project_in/out."""
        params = self.vocab * self.embed_dim
        if self.family == "opt":
            params += (self.max_positions + OPT_POSITION_OFFSET) * self.hidden
            if self.has_projected_embeddings:
                params += 2 * self.embed_dim * self.hidden  # project_in, project_out (no bias)
        return params

    def final_norm_params(self) -> int:
        """The norm after the last block: LayerNorm (weight + bias) in OPT, RMSNorm otherwise.

        OPT-350m is post-LN (``do_layer_norm_before: false``) and has NO final LayerNorm. It is
        also the only OPT with projected embeddings, so that is how the shape recognises it
        (a hypothetical post-LN OPT without projections would be over-counted by 2·hidden).
        """
        if self.family == "opt":
            return 0 if self.has_projected_embeddings else 2 * self.hidden
        return self.hidden

    def head_params(self) -> int:
        """The LM head's own weights: 0 when it is tied to the token embeddings."""
        return 0 if self.tied_head else self.vocab * self.embed_dim

    def resident_tensors(self) -> tuple[int, ...]:
        """Sizes of the resident parameters, one per tensor (the runtime draws z per tensor)."""
        if self.family == "opt":
            sizes = [self.vocab * self.embed_dim, (self.max_positions + OPT_POSITION_OFFSET) * self.hidden]
            if self.has_projected_embeddings:
                sizes += [self.embed_dim * self.hidden] * 2
            sizes += [self.hidden] * (self.final_norm_params() // self.hidden)
        else:
            sizes = [self.vocab * self.embed_dim, self.hidden]
        if not self.tied_head:
            sizes.append(self.vocab * self.embed_dim)
        return tuple(sizes)

    def resident_params(self) -> int:
        """Everything but the blocks: it stays on the GPU for the whole run (never offloaded)."""
        return self.embedding_params() + self.final_norm_params() + self.head_params()

    def total_params(self) -> int:
        return self.layers * self.block_params() + self.resident_params()

    def block_bytes(self, dtype: str) -> int:
        """Bytes of one block in ``dtype``: the unit every upload and offload moves."""
        return self.block_params() * _dtype_bytes(dtype)

    def resident_bytes(self, dtype: str) -> int:
        return self.resident_params() * _dtype_bytes(dtype)

    # ----------------------------------------------------------------------------- compute
    def block_flops(self, tokens: int, seq_len: int) -> float:
        """Forward FLOPs of ONE block for ``tokens`` tokens in sequences of ``seq_len``.

        2 FLOPs per linear-layer weight per token, plus 4·seq_len·hidden per token for the
        attention scores and the weighted sum of values. The causal halving is NOT applied:
        a conservative figure, and what kernels that do not skip masked tiles really execute.
        Biases, norms and activations are a few FLOPs per element and are left out.
        """
        _check_positive(tokens=tokens, seq_len=seq_len)
        per_token = 2 * self._matmul_params_per_block() + 4 * seq_len * self.hidden
        return float(per_token) * tokens

    def head_flops(self, tokens: int) -> float:
        """Forward FLOPs of the LM head: 2·embed_dim·vocab per token (the final norm is noise)."""
        _check_positive(tokens=tokens)
        return 2.0 * self.embed_dim * self.vocab * tokens

    # ----------------------------------------------------------------------------- memory
    def block_activation_bytes(self, micro_batch: int, seq_len: int, dtype: str, branches: int) -> int:
        """Peak activation memory to run one block forward, inference only, per GPU.

        ZO training keeps no activations for a backward pass, so per branch (the "+" and "−"
        perturbations; 2 when one GPU runs both, 1 under perturbation parallelism) only these
        live at once, in units of b·s elements of ``dtype``:

        - the persistent hidden state entering the block: ``hidden``;
        - plus the larger of the two transient phases:
          * attention: normed input (h) + q (h) + k, v (2·kv_dim) + attention output (h)
            + o-projection output (h);
          * MLP: normed input (h) + intermediate(s) (ffn for OPT's fc1, 2·ffn for SwiGLU's
            gate and up; element-wise activations assumed in place or fused) + down/fc2
            output (h).

        ASSUMPTION: attention runs in a fused kernel (FlashAttention / PyTorch SDPA memory-
        efficient path) that never materialises the b·heads·s·s score matrix. An eager
        attention implementation needs b·heads·s² more elements per branch and can dominate
        at long sequences; the runtime must select SDPA / flash for this figure to hold.
        """
        _check_positive(micro_batch=micro_batch, seq_len=seq_len)
        if branches not in (1, 2):
            raise ZoplanError(f"branches must be 1 or 2, got {brief(branches)}")
        h = self.hidden
        attention_phase = h + h + 2 * self.kv_dim + h + h
        mlp_width = self.ffn if self.family == "opt" else 2 * self.ffn
        mlp_phase = h + mlp_width + h
        per_token_elements = h + max(attention_phase, mlp_phase)
        return branches * micro_batch * seq_len * per_token_elements * _dtype_bytes(dtype)

    def head_activation_bytes(self, micro_batch: int, seq_len: int, dtype: str) -> int:
        """Peak memory of ONE branch's logits and loss: the fp32 logits of the micro-batch, with
        the ``dtype`` ones they are cast from (a 2-byte dtype; fp32 needs no cast) or the fp32
        log-softmax of the sequences the loss takes at once (``LOSS_CHUNK_ELEMENTS``; runtime/data.py
        loss_terms), whichever is more. This is usually the largest single tensor of a ZO step
        with a big vocabulary.
        """
        _check_positive(micro_batch=micro_batch, seq_len=seq_len)
        width = _dtype_bytes(dtype)
        logits = micro_batch * seq_len * self.vocab
        cast = logits * width if width < LOGITS_LOSS_BYTES else 0
        sequence = seq_len * self.vocab
        at_once = min(micro_batch, max(1, LOSS_CHUNK_ELEMENTS // sequence)) * sequence
        return logits * LOGITS_LOSS_BYTES + max(cast, at_once * LOGITS_LOSS_BYTES)

    # ----------------------------------------------------------------------------- I/O
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of the fields (what plans embed and hash)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelShape:
        """Strict inverse of :meth:`to_dict`: unknown or missing keys are errors naming the key."""
        if not isinstance(d, dict):
            raise ZoplanError(f"model shape must be a mapping, got {type(d).__name__}")
        names = [f.name for f in fields(cls)]
        for key in d:
            if key not in names:
                raise ZoplanError(f"model shape: unknown key '{key}'", fix=f"valid keys: {', '.join(names)}")
        for key in names:
            if key not in d:
                raise ZoplanError(f"model shape: missing key '{key}'")
        for key in ("name", "family"):
            if not isinstance(d[key], str):
                raise ZoplanError(f"model shape: '{key}' must be a string, got {brief(d[key])}")
        return cls(**d)

    @property
    def hash(self) -> str:
        return content_hash(self.to_dict())

    @property
    def shape_hash(self) -> str:
        """The hash of everything but the name: what plans and profiles depend on."""
        return content_hash({k: v for k, v in self.to_dict().items() if k != "name"})

    def differences(self, other: ModelShape) -> list[str]:
        """The fields other than the name where ``other`` differs: 'layers 24 vs 32', ..."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{k} {mine[k]} vs {theirs[k]}" for k in mine if k != "name" and mine[k] != theirs[k]]


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ZoplanError(f"{key} must be a positive integer, got {brief(value)}")


# --------------------------------------------------------------------------------- presets
def _opt(name: str, layers: int, hidden: int, heads: int, embed_dim: int | None = None) -> ModelShape:
    return ModelShape(
        name=name,
        family="opt",
        layers=layers,
        hidden=hidden,
        ffn=4 * hidden,
        heads=heads,
        kv_heads=heads,
        vocab=50272,
        max_positions=2048,
        tied_head=True,
        embed_dim=embed_dim or hidden,
    )


def _llama(
    name: str, layers: int, hidden: int, ffn: int, heads: int, kv_heads: int, vocab: int, max_positions: int
) -> ModelShape:
    return ModelShape(
        name=name,
        family="llama",
        layers=layers,
        hidden=hidden,
        ffn=ffn,
        heads=heads,
        kv_heads=kv_heads,
        vocab=vocab,
        max_positions=max_positions,
        tied_head=False,
        embed_dim=hidden,
    )


def _qwen2(
    name: str, layers: int, hidden: int, ffn: int, heads: int, kv_heads: int, vocab: int, tied: bool, max_positions: int
) -> ModelShape:
    return ModelShape(
        name=name,
        family="qwen2",
        layers=layers,
        hidden=hidden,
        ffn=ffn,
        heads=heads,
        kv_heads=kv_heads,
        vocab=vocab,
        max_positions=max_positions,
        tied_head=tied,
        embed_dim=hidden,
    )


# Numbers from each model's Hugging Face config.json (docs/hardware-sources.md, "Model shapes").
# max_positions does not change any count except OPT's learned positions.
PRESETS: dict[str, ModelShape] = {
    s.name: s
    for s in (
        _opt("opt-125m", 12, 768, 12),
        _opt("opt-350m", 24, 1024, 16, embed_dim=512),
        _opt("opt-1.3b", 24, 2048, 32),
        _opt("opt-2.7b", 32, 2560, 32),
        _opt("opt-6.7b", 32, 4096, 32),
        _opt("opt-13b", 40, 5120, 40),
        _opt("opt-30b", 48, 7168, 56),
        _opt("opt-66b", 64, 9216, 72),
        _opt("opt-175b", 96, 12288, 96),
        _llama("llama-2-7b", 32, 4096, 11008, 32, 32, 32000, 4096),
        _llama("llama-2-13b", 40, 5120, 13824, 40, 40, 32000, 4096),
        _llama("llama-2-70b", 80, 8192, 28672, 64, 8, 32000, 4096),
        _llama("llama-3-8b", 32, 4096, 14336, 32, 8, 128256, 8192),
        _llama("llama-3-70b", 80, 8192, 28672, 64, 8, 128256, 8192),
        _qwen2("qwen2.5-0.5b", 24, 896, 4864, 14, 2, 151936, True, 32768),
        _qwen2("qwen2.5-1.5b", 28, 1536, 8960, 12, 2, 151936, True, 131072),
        _qwen2("qwen2.5-3b", 36, 2048, 11008, 16, 2, 151936, True, 32768),
        _qwen2("qwen2.5-7b", 28, 3584, 18944, 28, 4, 152064, False, 131072),
        _qwen2("qwen2.5-14b", 48, 5120, 13824, 40, 8, 152064, False, 131072),
        _qwen2("qwen2.5-32b", 64, 5120, 27648, 40, 8, 152064, False, 131072),
        _qwen2("qwen2.5-72b", 80, 8192, 29568, 64, 8, 152064, False, 131072),
    )
}


# The built-in tiny models' shapes, as the runtime builds them (runtime/tiny.py; named after the
# directory they are built in, as any checkpoint's shape is): the planner plans them without
# building them, and a runtime test checks that a built one reads back as exactly this shape.
# The vocabulary is the tiny tokenizer's (256 bytes, 4 special tokens, the trained words).
TINY_VOCAB = 1405
TINY_SHAPES: dict[str, ModelShape] = {
    name: ModelShape(
        name=f"{name}-v{TINY_VERSION}",
        family=family,
        layers=4,
        hidden=64,
        ffn=128,
        heads=4,
        kv_heads=kv,
        vocab=TINY_VOCAB,
        max_positions=128,
        tied_head=tied,
        embed_dim=64,
    )
    for name, family, kv, tied in (
        ("tiny-opt", "opt", 4, True),
        ("tiny-llama", "llama", 2, False),
        ("tiny-qwen2", "qwen2", 2, False),
    )
}


# --------------------------------------------------------------------------------- config.json
def load_model_shape(name_or_path: str | Path) -> ModelShape:
    """A preset by name, or the shape in a Hugging Face ``config.json`` (file or its directory).

    A user's own checkpoint only needs its config.json: weights are never opened. The shape's
    name is the preset name, or the name of the directory holding the config.
    """
    text = str(name_or_path)
    if not text.strip():  # Path("") is the current directory: not what was meant
        raise ZoplanError(
            "the model name is empty",
            fix="name a preset (zoplan models list) or give the path to a Hugging Face config.json",
        )
    if text in PRESETS:
        return PRESETS[text]
    if text in TINY_MODELS:
        return TINY_SHAPES[text]
    path = Path(text).expanduser()
    if not path.exists():
        if _looks_like_path(text):
            raise ZoplanError(
                f"model config {path} does not exist",
                fix="give a Hugging Face config.json, the directory holding one, or a preset name (zoplan models list)",
            )
        raise ZoplanError(
            f"unknown model preset {text!r}" + did_you_mean(text, [*PRESETS, *TINY_MODELS]),
            fix=f"use one of: {', '.join(PRESETS)}; or give the path to a Hugging Face config.json (or its directory)",
        )
    if path.is_dir():
        directory, config_path = path, path / "config.json"
        if not config_path.is_file():
            raise ZoplanError(
                f"model config {config_path} does not exist (directory {path} has no config.json)",
                fix="point at the model's config.json or the directory holding it",
            )
    else:
        directory, config_path = path.resolve().parent, path
    # named for its directory (a checkpoint's), or for the file when it is not a config.json (a
    # llama-2-7b.json among others was named for the folder that holds them all)
    name = directory.resolve().name if config_path.name == "config.json" else config_path.stem
    return _shape_from_config(_read_config(config_path), config_path, name)


def _looks_like_path(text: str) -> bool:
    return "/" in text or "\\" in text or text.endswith(".json") or text.startswith(".")


def _read_config(path: Path) -> dict[str, Any]:
    text = read_text(path, "model config")
    try:
        data = loads_json(text)
    except RepeatedKey as exc:
        raise ZoplanError(f"{path}: {exc}", fix="keep one of them: a config.json names each setting once") from None
    except (RecursionError, ValueError) as exc:
        if not isinstance(exc, json.JSONDecodeError):  # deep nesting, 4300+ digit numbers
            raise ZoplanError(f"{path}: invalid JSON: {type(exc).__name__}") from None
        raise ZoplanError(
            f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
            fix="a model is a preset's name (zoplan models list) or a Hugging Face config.json"
            + (" (a YAML shape is not read)" if path.suffix.lower() in (".yaml", ".yml") else ""),
        ) from None
    if not isinstance(data, dict):
        raise ZoplanError(f"{path}: expected a JSON object at the top of the model config, found {type(data).__name__}")
    return data


def _shape_from_config(config: dict[str, Any], path: Path, name: str) -> ModelShape:
    model_type = _get(config, path, "model_type", str)
    family = MODEL_TYPE_FAMILY.get(model_type)
    if family is None:
        raise ZoplanError(
            f"{path}: unsupported model_type {model_type!r}",
            fix=f"supported model types: {', '.join(MODEL_TYPE_FAMILY)}",
        )
    layers = _get(config, path, "num_hidden_layers", int)
    hidden = _get(config, path, "hidden_size", int)
    heads = _get(config, path, "num_attention_heads", int)
    vocab = _get(config, path, "vocab_size", int)
    max_positions = _get(config, path, "max_position_embeddings", int)
    if family == "opt":
        ffn = _get(config, path, "ffn_dim", int)
        kv_heads = heads
        embed_dim = _get(config, path, "word_embed_proj_dim", int, default=hidden)
        tied = _get(config, path, "tie_word_embeddings", bool, default=True)
        if _get(config, path, "enable_bias", bool, default=True) is False:
            raise ZoplanError(f"{path}: OPT without biases (enable_bias: false) is not supported")
    else:
        ffn = _get(config, path, "intermediate_size", int)
        kv_heads = _get(config, path, "num_key_value_heads", int, default=heads)
        embed_dim = hidden
        tied = _get(config, path, "tie_word_embeddings", bool, default=False)
        for key in ("attention_bias", "mlp_bias"):
            if family == "llama" and _get(config, path, key, bool, default=False):
                raise ZoplanError(
                    f"{path}: {key}: true is not supported for {model_type} "
                    f"(the LLaMA family is counted without biases)"
                )
        head_dim = config.get("head_dim")
        if head_dim is not None and heads and head_dim * heads != hidden:
            raise ZoplanError(
                f"{path}: head_dim {head_dim} × num_attention_heads {heads} != "
                f"hidden_size {hidden}: decoupled head_dim is not supported"
            )
    _check_alike_layers(config, path, model_type, layers)
    try:
        return ModelShape(
            name=name,
            family=family,
            layers=layers,
            hidden=hidden,
            ffn=ffn,
            heads=heads,
            kv_heads=kv_heads,
            vocab=vocab,
            max_positions=max_positions,
            tied_head=tied,
            embed_dim=embed_dim,
        )
    except ZoplanError as exc:
        raise ZoplanError(f"{path}: {exc.message}", fix=exc.fix) from None


def _check_alike_layers(config: dict[str, Any], path: Path, model_type: str, layers: int) -> None:
    """Refuse a config whose layers attend differently (some through a sliding window, the others
    over the whole sequence: Qwen2 with use_sliding_window and max_window_layers, or a config's
    own layer_types). The runtime runs every block with the arguments transformers gives its
    first (its attention mask among them): such a model would be trained as another, with exit 0."""
    kinds = config.get("layer_types")
    if not isinstance(kinds, list):
        window, first = config.get("sliding_window"), config.get("max_window_layers", layers)
        if model_type == "qwen2" and config.get("use_sliding_window") is True and window and isinstance(first, int):
            kinds = ["full_attention" if i < first else "sliding_attention" for i in range(layers)]
        else:
            return
    kinds = [str(k) for k in kinds]  # (whatever a hand-written list holds)
    counts = {k: kinds.count(k) for k in dict.fromkeys(kinds)}
    if len(counts) > 1:
        said = ", ".join(f"{n} {kind}" for kind, n in counts.items())
        raise ZoplanError(
            f"{path}: its layers attend differently ({said}): zoplan runs every block with the attention of "
            "the first, so it would train another model than this config describes",
            fix='use a config whose layers all attend alike (Qwen2: "use_sliding_window": false, as its '
            "checkpoints ship)",
        )


_MISSING = object()


def _get(config: dict[str, Any], path: Path, key: str, kind: type, default: Any = _MISSING) -> Any:
    """One config value, type-checked; a missing required key names the file and the key."""
    if key not in config or config[key] is None:
        if default is _MISSING:
            raise ZoplanError(
                f"{path}: missing key '{key}'", fix="use the model's original config.json from Hugging Face"
            )
        return default
    value = config[key]
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise ZoplanError(
            f"{path}: '{key}' must be {'an integer' if kind is int else kind.__name__}, got {brief(value)}"
        )
    return value


# --------------------------------------------------------------------------------- display
def format_params(count: int) -> str:
    """125239296 -> '125.2M', 174.6e9 -> '174.6B'."""
    if count >= 1_000_000_000:
        return f"{count / 1e9:.1f}B"
    return f"{count / 1e6:.1f}M"


def format_bytes(count: int) -> str:
    """Decimal units (1 GB = 1e9 bytes), the same units as the topology's GB/s."""
    if count >= 1_000_000_000:
        return f"{count / 1e9:.1f} GB"
    return f"{count / 1e6:.1f} MB"


def preset_table_rows() -> list[tuple[str, ...]]:
    """Rows for ``zoplan models list``: name, family, layers, hidden, params, fp16 block size."""
    return [
        (
            s.name,
            s.family,
            str(s.layers),
            str(s.hidden),
            format_params(s.total_params()),
            format_bytes(s.block_bytes("fp16")),
        )
        for s in PRESETS.values()
    ]
