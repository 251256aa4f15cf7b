"""Read-only blocks mapped from the checkpoint (zoplan.runtime.hostcopy.mappable / HostCopy.map):
the views hold the checkpoint's values, and every layout the mapping cannot serve says why."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from zoplan.runtime.adapters import adapter_for
from zoplan.runtime.hostcopy import HostCopy, Mapping, mappable
from zoplan.runtime.checkpoint import dtype_kwarg


def meta_model(model_dir: Path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, **dtype_kwarg(torch.float32))
    adapter = adapter_for(config.model_type)
    return adapter.blocks(model), adapter.blocks_path + "."


def copy_dir(src: Path, dst: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    shutil.copytree(src, dst)
    if state is not None:
        (dst / "model.safetensors").unlink()
        save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("family", ["tiny-opt", "tiny-llama"])
def test_mapped_blocks_hold_the_checkpoints_values(family: str, tiny_dirs) -> None:
    model_dir = tiny_dirs[family]
    blocks, prefix = meta_model(model_dir)
    mapping = mappable(model_dir, blocks, prefix, 4, "fp32")
    assert isinstance(mapping, Mapping), mapping
    host = HostCopy.map(mapping, blocks, prefix, 4, "fp32")
    saved = load_file(str(model_dir / "model.safetensors"))
    assert host.read_only and len(host.blocks) == len(blocks)
    for layout, flat in zip(host.layouts, host.blocks):
        assert flat.numel() == layout.padded
        assert [s.name for s in layout.slots] == sorted(s.name for s in layout.slots)  # the file's order
        for slot in layout.slots:
            assert torch.equal(flat[slot.offset : slot.offset + slot.numel].view(slot.shape), saved[slot.name])
    host.remove()  # nothing to remove: the checkpoint stays
    assert (model_dir / "model.safetensors").exists()


def test_a_checkpoint_written_while_mapped_stops_the_run_from_saving(tiny_dirs, tmp_path: Path) -> None:
    from zoplan.errors import ZoplanError

    model_dir = copy_dir(tiny_dirs["tiny-llama"], tmp_path / "model")
    blocks, prefix = meta_model(model_dir)
    mapping = mappable(model_dir, blocks, prefix, 1, "fp32")
    assert isinstance(mapping, Mapping)
    host = HostCopy.map(mapping, blocks, prefix, 1, "fp32")
    host.check_unchanged()  # as mapped
    saved = load_file(str(model_dir / "model.safetensors"))
    save_file({n: t * 2 for n, t in saved.items()}, str(model_dir / "model.safetensors"))  # rewritten in place
    with pytest.raises(ZoplanError, match="changed while this run read its blocks from it"):
        host.check_unchanged()


def test_a_checkpoint_the_mapping_cannot_serve_says_why(tiny_dirs, tmp_path: Path) -> None:
    source = tiny_dirs["tiny-llama"]
    blocks, prefix = meta_model(source)
    state = load_file(str(source / "model.safetensors"))

    def why(directory: Path, slices: int = 1, wire: str = "fp32") -> str:
        got = mappable(directory, blocks, prefix, slices, wire)
        assert isinstance(got, str)
        return got

    assert "stored as F32, the host copy is bf16" in why(source, wire="bf16")
    half = {n: t.to(torch.bfloat16) if n == "model.layers.1.mlp.up_proj.weight" else t for n, t in state.items()}
    assert "block 1 is stored as BF16/F32" in why(copy_dir(source, tmp_path / "mixed", half))
    # a tensor that is no parameter between a block's own: not one range
    extra = {**state, "model.layers.0.self_attn.extra": torch.zeros(3)}
    assert "block 0's tensors are not one range" in why(copy_dir(source, tmp_path / "extra", extra))
    gone = {n: t for n, t in state.items() if n != "model.layers.2.input_layernorm.weight"}
    assert "no tensor model.layers.2.input_layernorm.weight" in why(copy_dir(source, tmp_path / "gone", gone))
    # the last block ends its file (no final norm after it): padded to 7 slices it would run past
    # the end; 1 slice needs no padding
    numel = sum(p.numel() for p in blocks[-1].parameters())
    assert numel % 7
    ends = copy_dir(source, tmp_path / "ends", {n: t for n, t in state.items() if n != "model.norm.weight"})
    assert f"block {len(blocks) - 1} cannot be mapped as 7 slices" in why(ends, slices=7)
    assert isinstance(mappable(ends, blocks, prefix, 1, "fp32"), Mapping)
    # sharded, block 0 split over two files
    shards = copy_dir(source, tmp_path / "sharded")
    (shards / "model.safetensors").unlink()
    names = sorted(state)
    first = {n for n in names if n.startswith(f"{prefix}0.")}
    one = {n: state[n] for n in names if n in first and "mlp" in n}
    two = {n: state[n] for n in names if n not in one}
    save_file(one, str(shards / "a.safetensors"))
    save_file(two, str(shards / "b.safetensors"))
    weight_map = {n: "a.safetensors" for n in one} | {n: "b.safetensors" for n in two}
    (shards / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert "block 0 is split over 2 files" in why(shards)
    # not safetensors at all
    legacy = copy_dir(source, tmp_path / "legacy")
    (legacy / "model.safetensors").unlink()
    assert "not in safetensors" in why(legacy)
