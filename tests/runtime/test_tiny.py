"""The built-in tiny models: they load back like real checkpoints, and resolve_model finds models."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from zoplan.errors import ZoplanError
from zoplan.models import TINY_VERSION, tiny_name
from zoplan.runtime import tiny
from zoplan.runtime.data import make_sentiment
from zoplan.runtime.tiny import TINY, build_tiny, resolve_model

NAMES = sorted(TINY)


def test_builtins_cover_three_families_and_are_small() -> None:
    assert {config.model_type for config in TINY.values()} == {"opt", "llama", "qwen2"}
    vocab = len(tiny.build_tokenizer())
    for config in TINY.values():
        assert config.vocab_size == vocab
        assert 2 <= config.num_hidden_layers <= 4
        assert config.hidden_size == 64 and config.num_attention_heads == 4
        assert config.max_position_embeddings == 128


@pytest.mark.parametrize("name", NAMES)
def test_tiny_loads_back_and_runs_a_forward(name: str, tiny_dirs: dict[str, Path]) -> None:
    directory = tiny_dirs[name]
    assert list(directory.glob("*.safetensors")), "weights must be saved as safetensors"
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    assert model.config.model_type == TINY[name].model_type
    assert model.config.vocab_size == len(tokenizer) == TINY[name].vocab_size
    assert tokenizer.pad_token_id is not None

    input_ids = torch.randint(4, len(tokenizer), (4, 32))
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    assert logits.shape == (4, 32, len(tokenizer))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", NAMES)
def test_loaded_tokenizer_keeps_data_words_whole(name: str, tiny_dirs: dict[str, Path]) -> None:
    """Through AutoTokenizer (which picks Qwen2Tokenizer for qwen2) every word of the bundled
    data is one token and no text is lost."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs[name])
    for record in make_sentiment(40, seed=3):
        text = record["text"]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        words = text.rstrip(".").split()
        assert len(ids) == len(words) + 1, tokenizer.convert_ids_to_tokens(ids)  # + the "."
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text
    other = "Zoë paid 42€ — fine?"
    assert tokenizer.decode(tokenizer(other, add_special_tokens=False)["input_ids"]) == other


def test_build_is_deterministic_per_seed(tmp_path: Path) -> None:
    state = torch.get_rng_state()
    first = load_file(build_tiny("tiny-llama", tmp_path / "a", seed=1) / "model.safetensors")
    again = load_file(build_tiny("tiny-llama", tmp_path / "b", seed=1) / "model.safetensors")
    other = load_file(build_tiny("tiny-llama", tmp_path / "c", seed=2) / "model.safetensors")
    assert torch.equal(torch.get_rng_state(), state), "building must not disturb the global RNG"
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)


def test_build_unknown_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ZoplanError, match="not a built-in"):
        build_tiny("tiny-gpt5", tmp_path)


def test_resolve_builtin_builds_once_then_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = resolve_model("tiny-opt", cache_dir=tmp_path)
    assert path == tmp_path / f"tiny-opt-v{TINY_VERSION}"
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
    assert [entry.name for entry in tmp_path.iterdir()] == [path.name], "no temporary left behind"

    def fail(*args: object, **kwargs: object) -> Path:
        raise AssertionError("a cached tiny model must not be rebuilt")

    monkeypatch.setattr(tiny, "build_tiny", fail)
    assert resolve_model("tiny-opt", cache_dir=tmp_path) == path


def test_the_built_ins_are_cached_apart_for_each_pair_of_library_versions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One folder served every environment of a home: a tokenizer transformers 5 wrote failed every
    run of a transformers 4.x environment beside it ("Tokenizer class TokenizersBackend does not
    exist")."""
    from importlib.metadata import version

    from zoplan.models import tiny_cache_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    path = resolve_model("tiny-opt")
    assert (
        path.parent == tiny_cache_dir() / f"transformers-{version('transformers')}-tokenizers-{version('tokenizers')}"
    )
    assert path.parent.parent == tmp_path / ".cache" / "zoplan" / "tiny" and (path / "tokenizer.json").is_file()
    monkeypatch.setattr(tiny, "libraries", lambda: "transformers-4.49.0-tokenizers-0.21.4")
    assert resolve_model("tiny-opt").parent.name == "transformers-4.49.0-tokenizers-0.21.4"  # built apart


def test_a_build_killed_midway_is_swept_by_the_next_and_an_unwritable_cache_is_said(tmp_path: Path) -> None:
    """A build killed midway (SIGKILL) left .tiny-opt-XXXX in the cache for good; a younger one
    may be another rank's build under way and stays. A cache that cannot be written was a
    traceback."""
    import os
    import time

    old, young = tmp_path / ".tiny-opt-killed", tmp_path / ".tiny-opt-building"
    for left in (old, young):
        left.mkdir()
        (left / "config.json").write_text("{")
    stale = time.time() - tiny.STALE_BUILD_S - 60
    os.utime(old, (stale, stale))
    path = resolve_model("tiny-opt", cache_dir=tmp_path)
    assert not old.exists() and young.exists() and path.is_dir()
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(ZoplanError, match=r"cannot build the built-in model tiny-opt under .*file") as said:
        resolve_model("tiny-opt", cache_dir=blocked / "cache")
    assert "HOME" in said.value.fix


@pytest.mark.parametrize("name", ["", "  "])
def test_an_empty_model_name_says_so(name: str) -> None:
    """Not "model directory . has no config.json": Path("") is the current directory."""
    with pytest.raises(ZoplanError, match="the model name is empty"):
        resolve_model(name)


def test_a_run_directory_or_an_adapter_given_as_the_model_is_told_apart(tmp_path: Path) -> None:
    """Both read "has no config.json" with the fix of the built-in tiny models."""
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text("{}")
    (run / "run.json").write_text("{}")
    with pytest.raises(ZoplanError, match="has no config.json") as said:
        resolve_model(str(run))
    assert said.value.fix == f"{run} is a zoplan run's directory: its trained weights are {run / 'model'}"
    adapter = tmp_path / "lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ZoplanError, match="has no config.json") as said:
        resolve_model(str(adapter))
    assert said.value.fix is not None and "holds an adapter (PEFT), not a model" in said.value.fix


def test_resolve_local_directory_as_is(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    directory = tiny_dirs["tiny-qwen2"]
    assert resolve_model(str(directory)) == directory
    with pytest.raises(ZoplanError, match="no config.json"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize("name", ["nobody-here/no-such-model-zoplan", "not a valid id!"])
def test_resolve_unknown_hub_id_fails_without_the_network(name: str, monkeypatch) -> None:
    import socket

    dialled = []

    def no_network(self, address, *args, **kwargs):
        dialled.append(address)
        raise OSError("the network is not for this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    with pytest.raises(ZoplanError) as caught:
        resolve_model(name)
    assert dialled == []  # offline mode refuses without even trying (HF_HUB_OFFLINE, conftest.py)
    assert f"model '{name}' cannot be found offline or on the hub" in caught.value.message
    assert caught.value.fix == (
        "pass a local directory with config.json and *.safetensors, or a built-in: tiny-opt, tiny-llama, tiny-qwen2"
    )


def test_the_planner_knows_the_builtins_and_plans_them_by_name(tmp_path: Path, tiny_dirs: dict[str, Path]) -> None:
    """`zoplan plan --model tiny-opt` plans the shape the runtime builds, without building it."""
    import os
    import subprocess
    import sys

    from zoplan.models import TINY_MODELS, load_model_shape
    from zoplan.planfile import load_plan

    assert sorted(TINY_MODELS) == NAMES
    for name in NAMES:  # the planner's shape of each is exactly the one a built model reads back as
        built = load_model_shape(tiny_dirs[name])
        assert load_model_shape(name) == dataclasses.replace(built, name=f"{name}-v{TINY_VERSION}")
        model = AutoModelForCausalLM.from_pretrained(tiny_dirs[name])
        assert load_model_shape(name).total_params() == sum(p.numel() for p in model.parameters())
    home = tmp_path / "home"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "zoplan.cli",
            "plan",
            "--model",
            "tiny-opt",
            "--topology",
            "cpu-local",
            "--global-batch",
            "4",
            "--seq-len",
            "32",
            "-o",
            str(tmp_path / "plan.yaml"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HOME": str(home)},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert not (home / ".cache" / "zoplan" / "tiny").exists()  # planning built nothing
    shape = load_model_shape("tiny-opt")
    written = load_plan(tmp_path / "plan.yaml")
    assert written.model.name == f"tiny-opt-v{TINY_VERSION}"
    # the defaults of `zoplan run` for a tiny model on CPU ranks: a step a random model learns
    # from, and fp32 compute
    assert written.zo.lr == 1e-3 and written.transfer.param_dtype == "fp32"
    # validate and run find the model from the plan's model name
    assert tiny_name(shape.name) == "tiny-opt"
