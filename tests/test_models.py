"""Model shapes: exact parameter counts against Hugging Face totals, cost scaling, config loading."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from zoplan.errors import ZoplanError
from zoplan.limits import MAX_LAYERS
from zoplan.planner import plan
from zoplan.models import (
    DTYPE_BYTES,
    PRESETS,
    ModelShape,
    load_model_shape,
    preset_table_rows,
)

FIXTURES = Path(__file__).parent / "fixtures" / "configs"

# Totals as Hugging Face reports them (sum of p.numel() over unique parameters).
EXACT_TOTAL_PARAMS = {
    "opt-125m": 125_239_296,
    "opt-350m": 331_196_416,
    "opt-1.3b": 1_315_758_080,
    "llama-2-7b": 6_738_415_616,
    "llama-3-8b": 8_030_261_248,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-7b": 7_615_616_512,
}

# Published sizes (in the names); rounding of the marketing figure allows a few percent.
APPROX_TOTAL_PARAMS = {
    "opt-2.7b": 2.7e9,
    "opt-6.7b": 6.7e9,
    "opt-13b": 13e9,
    "opt-30b": 30e9,
    "opt-66b": 66e9,
    "opt-175b": 175e9,
    "llama-2-13b": 13e9,
    "llama-2-70b": 69e9,
    "llama-3-70b": 70.6e9,
    "qwen2.5-1.5b": 1.54e9,
    "qwen2.5-3b": 3.09e9,
    "qwen2.5-14b": 14.7e9,
    "qwen2.5-32b": 32.5e9,
    "qwen2.5-72b": 72.7e9,
}

PRESET_NAMES_IN_REFERENCE = [
    "opt-125m",
    "opt-350m",
    "opt-1.3b",
    "opt-2.7b",
    "opt-6.7b",
    "opt-13b",
    "opt-30b",
    "opt-66b",
    "opt-175b",
    "llama-2-7b",
    "llama-2-13b",
    "llama-2-70b",
    "llama-3-8b",
    "llama-3-70b",
    "qwen2.5-0.5b",
    "qwen2.5-1.5b",
    "qwen2.5-3b",
    "qwen2.5-7b",
    "qwen2.5-14b",
    "qwen2.5-32b",
    "qwen2.5-72b",
]


def test_presets_are_exactly_the_reference_list() -> None:
    assert list(PRESETS) == PRESET_NAMES_IN_REFERENCE
    for name, shape in PRESETS.items():
        assert shape.name == name


@pytest.mark.parametrize("name,total", sorted(EXACT_TOTAL_PARAMS.items()))
def test_exact_total_params(name: str, total: int) -> None:
    assert PRESETS[name].total_params() == total


@pytest.mark.parametrize("name,total", sorted(APPROX_TOTAL_PARAMS.items()))
def test_approximate_total_params(name: str, total: float) -> None:
    assert PRESETS[name].total_params() == pytest.approx(total, rel=0.03)


def test_opt_125m_breakdown() -> None:
    """The pieces, not only the sum: 2050 position rows, tied head, LayerNorm with bias."""
    s = PRESETS["opt-125m"]
    h, f = 768, 3072
    assert s.block_params() == 4 * h * h + 4 * h + 2 * h * f + h + f + 4 * h
    assert s.embedding_params() == 50272 * h + 2050 * h
    assert s.final_norm_params() == 2 * h
    assert s.head_params() == 0
    assert s.resident_params() == s.embedding_params() + s.final_norm_params()
    assert s.block_decay_exempt_params() == 4 * h + (f + h) + 4 * h


def test_opt_350m_projected_embeddings_and_no_final_norm() -> None:
    s = PRESETS["opt-350m"]
    assert s.embed_dim == 512 and s.hidden == 1024
    assert s.embedding_params() == 50272 * 512 + 2050 * 1024 + 2 * 512 * 1024
    assert s.final_norm_params() == 0
    assert s.head_flops(1) == 2 * 512 * 50272


def test_llama_2_7b_breakdown() -> None:
    s = PRESETS["llama-2-7b"]
    # attention q, k, v, o (4 x 4096^2), MLP gate, up, down (3 x 4096 x 11008), two RMSNorm weights
    assert s.block_params() == 4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096 == 202_383_360
    assert s.block_decay_exempt_params() == 2 * 4096
    assert s.head_params() == 32000 * 4096
    assert s.final_norm_params() == 4096
    assert s.head_dim == 128


def test_qwen2_biases_are_counted_and_exempt() -> None:
    s = PRESETS["qwen2.5-7b"]
    kv_dim = 4 * 128
    assert s.head_dim == 128
    assert s.block_decay_exempt_params() == 2 * 3584 + 3584 + 2 * kv_dim
    no_bias = dataclasses.replace(s, family="llama")
    assert s.block_params() - no_bias.block_params() == 3584 + 2 * kv_dim


def test_tied_head_has_no_params() -> None:
    s = PRESETS["qwen2.5-0.5b"]
    assert s.tied_head
    assert s.head_params() == 0
    untied = dataclasses.replace(s, tied_head=False)
    assert untied.total_params() - s.total_params() == 151936 * 896


def test_bytes_follow_dtype() -> None:
    s = PRESETS["opt-1.3b"]
    for dtype, size in DTYPE_BYTES.items():
        assert s.block_bytes(dtype) == s.block_params() * size
        assert s.resident_bytes(dtype) == s.resident_params() * size
    with pytest.raises(ZoplanError, match="dtype"):
        s.block_bytes("int3")


def test_block_flops_linear_in_tokens_and_formula() -> None:
    s = PRESETS["llama-2-7b"]
    one = s.block_flops(tokens=512, seq_len=512)
    assert s.block_flops(tokens=1024, seq_len=512) == pytest.approx(2 * one)
    assert s.block_flops(tokens=4096, seq_len=512) == pytest.approx(8 * one)
    matmul_params = s.block_params() - s.block_decay_exempt_params()
    assert one == pytest.approx(2 * matmul_params * 512 + 4 * 512 * 4096 * 512)
    # Longer sequences cost more per token (attention), never less.
    assert s.block_flops(tokens=512, seq_len=2048) > one


def test_head_flops_linear_in_tokens() -> None:
    s = PRESETS["llama-3-8b"]
    assert s.head_flops(1) == 2 * 4096 * 128256
    assert s.head_flops(300) == pytest.approx(300 * s.head_flops(1))


def test_flops_reject_non_positive_tokens() -> None:
    with pytest.raises(ZoplanError, match="tokens"):
        PRESETS["opt-125m"].block_flops(tokens=0, seq_len=128)


def test_block_activation_grows_with_micro_batch_branches_and_seq() -> None:
    s = PRESETS["opt-6.7b"]
    base = s.block_activation_bytes(1, 512, "fp16", 1)
    assert base > 0
    assert s.block_activation_bytes(4, 512, "fp16", 1) == 4 * base
    assert s.block_activation_bytes(1, 512, "fp16", 2) == 2 * base
    assert s.block_activation_bytes(1, 1024, "fp16", 1) == 2 * base  # linear: no s*s scores
    assert s.block_activation_bytes(1, 512, "fp32", 1) == 2 * base
    # At least the hidden state plus one MLP intermediate, per token.
    assert base >= 512 * (s.hidden + s.ffn) * 2


def test_block_activation_swiglu_keeps_two_intermediates() -> None:
    s = PRESETS["llama-2-7b"]
    b, seq = 2, 256
    mlp_peak_elements = s.hidden + (s.hidden + 2 * s.ffn + s.hidden)
    assert s.block_activation_bytes(b, seq, "bf16", 1) == b * seq * mlp_peak_elements * 2


def test_block_activation_rejects_bad_branches() -> None:
    with pytest.raises(ZoplanError, match="branches"):
        PRESETS["opt-125m"].block_activation_bytes(1, 128, "fp16", 3)


def test_head_activation_is_fp32_logits_plus_their_cast_or_one_sequences_log_softmax() -> None:
    """What the runtime holds at once for one branch's loss (runtime/data.py loss_terms): the
    micro-batch's fp32 logits, with the 2-byte ones they were cast from, or the fp32 log-softmax
    of the sequences taken at once (LOSS_CHUNK_ELEMENTS logits, at least one sequence), whichever
    is more (one sequence of fp32 logits took 6 bytes a logit, not 8)."""
    from zoplan.models import LOSS_CHUNK_ELEMENTS

    s = PRESETS["qwen2.5-0.5b"]
    logits = 128 * 151936  # one sequence's: more than LOSS_CHUNK_ELEMENTS, so taken alone
    assert logits > LOSS_CHUNK_ELEMENTS
    assert s.head_activation_bytes(2, 128, "bf16") == 2 * logits * (4 + 2)
    assert s.head_activation_bytes(4, 128, "bf16") == 2 * s.head_activation_bytes(2, 128, "bf16")
    assert s.head_activation_bytes(1, 128, "bf16") == logits * (4 + 4)  # a sequence's log-softmax > its cast
    assert s.head_activation_bytes(1, 128, "fp32") == logits * (4 + 4)
    assert s.head_activation_bytes(8, 128, "fp32") == 8 * logits * 4 + logits * 4
    small = PRESETS["opt-125m"]  # 16 tokens of 50272: 20 sequences at once
    sequence = 16 * small.vocab
    assert LOSS_CHUNK_ELEMENTS // sequence == 20
    assert small.head_activation_bytes(8, 16, "fp32") == 8 * sequence * (4 + 4)
    assert small.head_activation_bytes(64, 16, "fp32") == 64 * sequence * 4 + 20 * sequence * 4
    with pytest.raises(ZoplanError, match="unknown dtype"):
        s.head_activation_bytes(1, 128, "fp8")


def test_preset_table_rows() -> None:
    rows = preset_table_rows()
    assert len(rows) == len(PRESETS)
    by_name = {row[0]: row for row in rows}
    opt = PRESETS["opt-175b"]
    # the table prints the preset's own figures: 96 layers of hidden 12288, all parameters in
    # billions, one block in bf16 in GB (12 h^2 matrix weights + 13 h biases and norms per block)
    assert opt.block_params() == 12 * 12288**2 + 13 * 12288
    assert by_name["opt-175b"] == (
        "opt-175b",
        "opt",
        "96",
        "12288",
        f"{opt.total_params() / 1e9:.1f}B",
        f"{opt.block_params() * 2 / 1e9:.1f} GB",
    )
    assert by_name["opt-175b"][4] == "174.6B" and by_name["opt-175b"][5] == "3.6 GB"  # the OPT paper's "175B"
    assert by_name["opt-125m"][4] == "125.2M"
    assert all(len(row) == 6 and all(isinstance(c, str) for c in row) for row in rows)


# ---------------------------------------------------------------------------- dict round trip
@pytest.mark.parametrize("name", ["opt-350m", "llama-3-70b", "qwen2.5-0.5b"])
def test_to_dict_from_dict_round_trip(name: str) -> None:
    s = PRESETS[name]
    d = s.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert ModelShape.from_dict(d) == s
    assert ModelShape.from_dict(d).hash == s.hash
    assert s.hash.startswith("sha256:")


def test_hash_changes_with_shape() -> None:
    s = PRESETS["opt-125m"]
    assert dataclasses.replace(s, layers=13).hash != s.hash


def test_from_dict_rejects_unknown_key() -> None:
    d = PRESETS["opt-125m"].to_dict() | {"n_experts": 8}
    with pytest.raises(ZoplanError, match="n_experts"):
        ModelShape.from_dict(d)


def test_from_dict_rejects_missing_key() -> None:
    d = PRESETS["opt-125m"].to_dict()
    del d["vocab"]
    with pytest.raises(ZoplanError, match="vocab"):
        ModelShape.from_dict(d)


def test_invalid_shape_is_rejected() -> None:
    with pytest.raises(ZoplanError, match="heads"):
        dataclasses.replace(PRESETS["llama-2-7b"], heads=31)
    with pytest.raises(ZoplanError, match="family"):
        dataclasses.replace(PRESETS["llama-2-7b"], family="gpt2")


# ---------------------------------------------------------------------------- config.json
def hf_config(shape: ModelShape) -> dict[str, Any]:
    """A minimal Hugging Face config.json for a shape, as its family writes it."""
    common = {
        "num_hidden_layers": shape.layers,
        "hidden_size": shape.hidden,
        "num_attention_heads": shape.heads,
        "vocab_size": shape.vocab,
        "max_position_embeddings": shape.max_positions,
        "torch_dtype": "float16",
    }
    if shape.family == "opt":
        # OPT configs rely on the tie default (True) and usually state word_embed_proj_dim.
        return common | {"model_type": "opt", "ffn_dim": shape.ffn, "word_embed_proj_dim": shape.embed_dim}
    config = common | {
        "model_type": shape.family,
        "intermediate_size": shape.ffn,
        "num_key_value_heads": shape.kv_heads,
    }
    if shape.family == "qwen2":
        config["tie_word_embeddings"] = shape.tied_head
    return config


def write_config(directory: Path, config: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


@pytest.mark.parametrize("name", ["opt-125m", "opt-350m", "llama-2-7b", "llama-3-8b", "qwen2.5-0.5b", "qwen2.5-7b"])
def test_config_json_matches_preset(tmp_path: Path, name: str) -> None:
    preset = PRESETS[name]
    path = write_config(tmp_path / name, hf_config(preset))
    from_file = load_model_shape(str(path))
    from_dir = load_model_shape(str(path.parent))
    assert from_file == preset
    assert from_dir == preset
    assert from_file.total_params() == preset.total_params()


def test_path_object_accepted(tmp_path: Path) -> None:
    path = write_config(tmp_path / "opt-125m", hf_config(PRESETS["opt-125m"]))
    assert load_model_shape(path) == PRESETS["opt-125m"]


@pytest.mark.parametrize("name", ["opt-125m", "opt-350m", "llama-2-7b", "qwen2.5-7b"])
def test_real_hugging_face_configs(name: str) -> None:
    """Full config.json files as published, extra keys and all."""
    assert load_model_shape(str(FIXTURES / name)) == PRESETS[name]
    assert load_model_shape(str(FIXTURES / name / "config.json")) == PRESETS[name]


def test_config_name_is_directory_name(tmp_path: Path) -> None:
    path = write_config(tmp_path / "my-finetune", hf_config(PRESETS["llama-2-7b"]))
    assert load_model_shape(str(path)).name == "my-finetune"
    assert load_model_shape(str(path.parent)).name == "my-finetune"


def test_a_config_file_of_its_own_name_is_named_for_it(tmp_path: Path) -> None:
    """configs/llama-2-7b.json was named 'configs', the folder of every config, in the table and the plan."""
    path = tmp_path / "configs" / "llama-2-7b.json"
    path.parent.mkdir()
    path.write_text(json.dumps(hf_config(PRESETS["llama-2-7b"])))
    assert load_model_shape(str(path)).name == "llama-2-7b"


QWEN2_7B = {
    "model_type": "qwen2",
    "num_hidden_layers": 28,
    "hidden_size": 3584,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "intermediate_size": 18944,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
}


@pytest.mark.parametrize(
    "extra, refused",
    [
        ({"use_sliding_window": True, "sliding_window": 4096, "max_window_layers": 14}, True),
        ({"layer_types": ["full_attention"] * 27 + ["sliding_attention"]}, True),
        ({"layer_types": [[1]] + ["full_attention"] * 27}, True),  # (unhashable entries: a TypeError before)
        ({"use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28}, False),  # as shipped
        ({"use_sliding_window": True, "sliding_window": 4096, "max_window_layers": 0}, False),  # every layer alike
        ({"layer_types": ["full_attention"] * 28}, False),
    ],
)
def test_a_config_whose_layers_attend_differently_is_refused(tmp_path: Path, extra: dict, refused: bool) -> None:
    """The runtime runs every block with its first block's attention mask: a Qwen2 config with
    sliding-window layers after full ones trained with full attention throughout, with exit 0."""
    path = write_config(tmp_path / "qwen2-swa", {**QWEN2_7B, **extra})
    if not refused:
        assert load_model_shape(str(path)).layers == 28
        return
    with pytest.raises(ZoplanError, match="its layers attend differently") as said:
        load_model_shape(str(path))
    assert "attention" in said.value.message and said.value.fix


def test_mistral_is_llama_shaped(tmp_path: Path) -> None:
    config = {
        "model_type": "mistral",
        "num_hidden_layers": 32,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
        "max_position_embeddings": 32768,
        "sliding_window": 4096,
        "tie_word_embeddings": False,
    }
    shape = load_model_shape(str(write_config(tmp_path / "mistral-7b", config)))
    assert shape.family == "llama"
    assert shape.total_params() == 7_241_732_096  # Mistral-7B-v0.1 as Hugging Face counts it


def test_defaults_kv_heads_and_tie(tmp_path: Path) -> None:
    config = hf_config(PRESETS["llama-2-7b"])
    del config["num_key_value_heads"]
    shape = load_model_shape(str(write_config(tmp_path / "m", config)))
    assert shape.kv_heads == shape.heads
    assert shape.tied_head is False
    opt = load_model_shape(str(write_config(tmp_path / "o", hf_config(PRESETS["opt-125m"]))))
    assert opt.tied_head is True


# ---------------------------------------------------------------------------- errors
def test_unknown_preset_lists_presets() -> None:
    with pytest.raises(ZoplanError) as info:
        load_model_shape("opt-7b")
    text = str(info.value)
    assert "opt-7b" in text
    assert "opt-125m" in text and "qwen2.5-72b" in text
    assert "config.json" in text


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "config.json"
    with pytest.raises(ZoplanError, match="does not exist") as info:
        load_model_shape(str(path))
    assert "config.json" in str(info.value) and "nowhere" in str(info.value)


def test_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "empty-model").mkdir()
    with pytest.raises(ZoplanError) as info:
        load_model_shape(str(tmp_path / "empty-model"))
    assert "empty-model" in str(info.value) and "config.json" in str(info.value)


def test_invalid_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken" / "config.json"
    path.parent.mkdir()
    path.write_text('{\n  "model_type": "opt",\n  "hidden_size": 768,,\n}\n', encoding="utf-8")
    with pytest.raises(ZoplanError, match="invalid JSON") as info:
        load_model_shape(str(path))
    assert "config.json" in str(info.value) and "broken" in str(info.value)
    assert "line 3" in str(info.value)


def test_a_yaml_file_given_as_the_model_is_told_what_a_model_is(tmp_path: Path) -> None:
    path = tmp_path / "shape.yaml"
    path.write_text("layers: 2\nhidden: 64\n", encoding="utf-8")
    with pytest.raises(ZoplanError, match="invalid JSON") as info:
        load_model_shape(str(path))
    assert info.value.fix is not None
    assert (
        "a preset's name (zoplan models list) or a Hugging Face config.json (a YAML shape is not read)"
        in info.value.fix
    )


def test_top_level_not_object(tmp_path: Path) -> None:
    path = write_config(tmp_path / "list", {})
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ZoplanError, match="JSON object") as info:
        load_model_shape(str(path))
    assert "config.json" in str(info.value)


@pytest.mark.parametrize("key", ["num_hidden_layers", "hidden_size", "ffn_dim", "vocab_size", "model_type"])
def test_missing_key_names_file_and_key(tmp_path: Path, key: str) -> None:
    config = hf_config(PRESETS["opt-125m"])
    del config[key]
    path = write_config(tmp_path / "opt", config)
    with pytest.raises(ZoplanError, match=f"missing key '{key}'") as info:
        load_model_shape(str(path))
    assert "config.json" in str(info.value)


@pytest.mark.parametrize(
    "change,says",
    [
        # a step program of 100000 blocks: minutes and gigabytes before any answer
        ({"num_hidden_layers": MAX_LAYERS + 1}, f"{MAX_LAYERS + 1} layers is more than zoplan plans ({MAX_LAYERS}"),
        # it read "--seq-len 1 is not a whole number of tokens from 2 to 1048576", an option never given
        (
            {"max_position_embeddings": 1},
            "max_positions 1 (max_position_embeddings in a config.json): a sequence needs",
        ),
    ],
)
def test_a_config_no_model_could_have_is_refused_at_once(tmp_path: Path, change: dict, says: str) -> None:
    config = (
        hf_config(PRESETS["llama-2-7b"])
        | {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4}
        | change
    )
    path = write_config(tmp_path / "odd", config)
    with pytest.raises(ZoplanError) as info:
        plan(str(path), "dgx-a100")
    assert says in str(info.value) and "config.json" in str(info.value)


def test_the_deepest_model_allowed_is_planned(tmp_path: Path) -> None:
    config = hf_config(PRESETS["llama-2-7b"]) | {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "num_hidden_layers": MAX_LAYERS,
    }
    assert load_model_shape(str(write_config(tmp_path / "deep", config))).layers == MAX_LAYERS


def test_missing_intermediate_size_for_llama(tmp_path: Path) -> None:
    config = hf_config(PRESETS["llama-2-7b"])
    del config["intermediate_size"]
    with pytest.raises(ZoplanError, match="intermediate_size") as info:
        load_model_shape(str(write_config(tmp_path / "l", config)))
    assert "config.json" in str(info.value)


def test_wrong_type_names_key(tmp_path: Path) -> None:
    config = hf_config(PRESETS["opt-125m"]) | {"hidden_size": "768"}
    with pytest.raises(ZoplanError, match="hidden_size") as info:
        load_model_shape(str(write_config(tmp_path / "t", config)))
    assert "config.json" in str(info.value)


def test_unsupported_model_type(tmp_path: Path) -> None:
    config = hf_config(PRESETS["llama-2-7b"]) | {"model_type": "gpt_neox"}
    with pytest.raises(ZoplanError) as info:
        load_model_shape(str(write_config(tmp_path / "neox", config)))
    text = str(info.value)
    assert "config.json" in text and "gpt_neox" in text
    for supported in ("opt", "llama", "qwen2", "mistral"):
        assert supported in text


def test_inconsistent_heads_names_file(tmp_path: Path) -> None:
    config = hf_config(PRESETS["llama-3-8b"]) | {"num_key_value_heads": 7}
    with pytest.raises(ZoplanError, match="kv_heads") as info:
        load_model_shape(str(write_config(tmp_path / "gqa", config)))
    assert "config.json" in str(info.value)


def test_error_carries_fix_hint() -> None:
    with pytest.raises(ZoplanError) as info:
        load_model_shape("gpt-5")
    assert info.value.fix is not None and "opt-125m" in info.value.fix


def test_no_torch_or_transformers_imported() -> None:
    code = (
        "import sys, zoplan.models; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_tiny_model_is_planned_without_the_runtime_and_without_building_it(tmp_path: Path) -> None:
    # a fresh HOME (nothing built) and a torch that cannot be imported: the planner alone
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from zoplan.cli import main\n"
        "sys.argv = ['zoplan', 'plan', '--model', 'tiny-llama', '--topology', 'cpu-local']; main()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "tiny-llama-v1" in proc.stdout and "Traceback" not in proc.stderr
    assert not (tmp_path / ".cache" / "zoplan" / "tiny").exists()


def test_a_key_given_twice_in_a_json_file_is_refused(tmp_path: Path) -> None:
    """json keeps the later of two values without a word: a config.json's tie_word_embeddings
    given twice planned the later one; a run.json's "steps": 4, "steps": 2 resumed as if --steps 2
    had been given. Every YAML file zoplan reads refuses a repeated key already."""
    from zoplan import runconfig
    from zoplan.errors import ZoplanError

    config = (Path(__file__).parent / "fixtures" / "configs" / "opt-125m" / "config.json").read_text().rstrip()
    assert config.endswith("}")
    (tmp_path / "config.json").write_text(config[:-1] + ', "tie_word_embeddings": false, "tie_word_embeddings": true}')
    with pytest.raises(ZoplanError, match="the key 'tie_word_embeddings' is given twice"):
        load_model_shape(str(tmp_path / "config.json"))
    (tmp_path / "run.json").write_text(
        '{"version": 1, "model": "tiny-opt", "data": "sentiment", "steps": 4, "steps": 2}'
    )
    with pytest.raises(ZoplanError, match="the key 'steps' is given twice"):
        runconfig.read(tmp_path / "run.json")
