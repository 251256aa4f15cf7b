"""Built-in tiny random models, so the runtime can be run and tested offline.

``tiny-opt``, ``tiny-llama`` and ``tiny-qwen2`` are randomly initialised, a few hundred thousand
parameters each (a forward pass of 4 x 32 tokens takes milliseconds on a CPU), one per model
family the runtime supports. They are written to disk with ``save_pretrained`` (safetensors) next
to a tokenizer, and loaded back with ``from_pretrained``: the same path a real checkpoint takes,
so nothing in the runtime special-cases them.

The tokenizer is a byte-level BPE trained in code on a fixed word list (the bundled sentiment
data's words, the MeZO prompt and label words, and common English words), so those words are
single tokens while any other text still encodes losslessly through the 256 byte tokens.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from zoplan.errors import ZoplanError
from zoplan.models import TINY_MODELS, tiny_cache_dir, tiny_model_dir
from zoplan.runtime.data import vocabulary_words

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerFast

# transformers is imported where a model or tokenizer is built, not here: `zoplan run` checks its
# arguments and resolves an already-built model in the launching process, which then starts in
# about half the time (transformers' own import takes ~2 s of CPU)

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)

# Plain English, enough for readable test sentences and small LM examples.
COMMON_WORDS = """
the be to of and a in that have i it for not on with he as you do at this but his by from they
we say her she or an will my one all would there their what so up out if about who get which go
me when make can like time no just him know take people into year your good some could them see
other than then now look only come its over think also back after use two how our work first
well way even new want because any these give day most us is are was were been has had did said
made went got very more many much long little old big small high great good bad best better
worse worst right left same different last next early late young own few each every both such
why where here there thing things man woman child world life hand part place case week company
system program question government number night point home water room mother area money story
fact month lot study book eye job word business issue side kind head house service friend father
power hour game line end member law car city community name president team minute idea kid body
information back parent face others level office door health person art war history party result
change morning reason research girl guy moment air teacher force education food film movie music
love feel felt seem seemed keep kept let begin began help talk turn start show hear play run move
live believe hold bring happen write provide sit stand lose pay meet include continue set learn
lead understand watch follow stop create speak read allow add spend grow open walk win offer
remember consider appear buy wait serve die send expect build stay fall cut reach kill remain
yes nice happy sad fun funny boring beautiful terrible wonderful awful fine true real sure
It The This That A I He She We They You There What When Where Why How
""".split()


def tokenizer_words() -> list[str]:
    """The words the tiny tokenizers keep whole (sorted: the trained merges depend on order)."""
    return sorted(set(COMMON_WORDS) | set(vocabulary_words()))


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """Train the byte-level BPE once per process; callers get fresh copies from its JSON."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    # No prefix space, as GPT-2, OPT and Qwen2 tokenize: " word" and a text-initial "word" are
    # different tokens, so both forms are trained.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    words = tokenizer_words()
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,  # more than the words need: training stops when every word is one token
        min_frequency=0,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(words + [" " + word for word in words], trainer=trainer)
    # A BOS in front of every sequence, as LLaMA and OPT checkpoints do.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)]
    )
    for index, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == index, "special tokens must take ids 0-3"
    return tokenizer.to_str()


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny tokenizer, wrapped for transformers (deterministic: same vocabulary every time)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=128,
    )


def _vocab_size() -> int:
    return Tokenizer.from_str(_tokenizer_json()).get_vocab_size(with_added_tokens=True)


def _config(name: str) -> PretrainedConfig:
    """Tiny but structurally faithful: 4 blocks (enough to stream, slice and keep some resident),
    LLaMA and Qwen2 with grouped-query attention (2 kv heads for 4 query heads) as the real ones.
    OPT's dropout is off so that a forward pass is deterministic even in train() mode. A fresh
    config each call."""
    from transformers import LlamaConfig, OPTConfig, Qwen2Config

    ids = {"pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}
    vocab = _vocab_size()
    if name == "tiny-opt":
        return OPTConfig(
            vocab_size=vocab,
            hidden_size=64,
            num_hidden_layers=4,
            ffn_dim=128,
            num_attention_heads=4,
            max_position_embeddings=128,
            word_embed_proj_dim=64,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            **ids,
        )
    family = {"tiny-llama": LlamaConfig, "tiny-qwen2": Qwen2Config}[name]
    return family(
        vocab_size=vocab,
        hidden_size=64,
        num_hidden_layers=4,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        **ids,
    )


class _TinyConfigs(Mapping):
    """The built-in models' configs by name (zoplan.models.TINY_MODELS), each built when first
    asked for, so that naming or testing for a built-in needs no transformers."""

    def __getitem__(self, name: str) -> PretrainedConfig:
        if name not in TINY_MODELS:
            raise KeyError(name)
        return _config(name)

    def __iter__(self) -> Iterator[str]:
        return iter(TINY_MODELS)

    def __len__(self) -> int:
        return len(TINY_MODELS)

    def __contains__(self, name: object) -> bool:
        return name in TINY_MODELS


TINY: Mapping[str, PretrainedConfig] = _TinyConfigs()

_BUILTIN_FIX = "pass a local directory with config.json and *.safetensors, or a built-in: " + ", ".join(TINY)


def _model_dir_fix(local: Path) -> str:
    """What to give instead of a directory without config.json: a zoplan run's own weights, the
    base model of an adapter, or a model directory."""
    if (local / "model" / "config.json").is_file() and (local / "run.json").is_file():
        return f"{local} is a zoplan run's directory: its trained weights are {local / 'model'}"
    if (local / "adapter_config.json").is_file():
        return (
            f"{local} holds an adapter (PEFT), not a model: give the base model it was trained on "
            "(its adapter_config.json names it), and the adapter to PEFT"
        )
    return _BUILTIN_FIX


def build_tiny(name: str, directory: Path, seed: int = 0) -> Path:
    """Write tiny model ``name`` (random weights from ``seed``) and its tokenizer to ``directory``.

    The global torch RNG is left as it was: the seed only decides the initial weights.
    """
    if name not in TINY:
        raise ZoplanError(f"'{name}' is not a built-in tiny model", fix=_BUILTIN_FIX)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    import torch
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(TINY[name])
    model.save_pretrained(directory, safe_serialization=True)
    build_tokenizer().save_pretrained(directory)
    return directory


def libraries() -> str:
    """The versions of the libraries that wrote a model's files: ``transformers-4.40.0-tokenizers-0.19.1``.
    Files one version saves need not load in another (a tokenizer.json of tokenizers 0.22 fails in
    0.19's reader, a tokenizer_config.json of transformers 5 names a class 4.x lacks), and one home
    folder may serve several environments."""
    from importlib.metadata import version

    return f"transformers-{version('transformers')}-tokenizers-{version('tokenizers')}"


def default_cache() -> Path:
    """Where the built-in models are built: ``~/.cache/zoplan/tiny/<libraries()>``."""
    return tiny_cache_dir() / libraries()


STALE_BUILD_S = 600.0  # a build takes seconds: a temporary this old was left by a build killed midway


def _sweep_stale_builds(root: Path, name: str) -> None:
    """Remove the temporaries of builds of ``name`` that were killed midway (older than
    ``STALE_BUILD_S``): one that is younger may be another rank's build under way."""
    import time

    for left in root.glob(f".{name}-*"):
        try:
            if left.is_dir() and time.time() - left.stat().st_mtime > STALE_BUILD_S:
                shutil.rmtree(left, ignore_errors=True)
        except OSError:  # gone meanwhile (another rank swept it)
            pass


def resolve_model(name_or_path: str, cache_dir: Path | None = None) -> Path:
    """A directory that ``from_pretrained`` can load for ``name_or_path``.

    - a built-in name: built once under ``cache_dir`` (default: ``default_cache()``, by the
      versions of transformers and tokenizers) as
      ``<name>-v<TINY_VERSION>`` and reused; the build goes to a temporary directory renamed
      into place, so a crashed or concurrent build (several ranks) never leaves a half model;
    - an existing local directory: returned as is (it must hold a config.json);
    - anything else: a Hugging Face hub id, fetched with ``snapshot_download`` (config, tokenizer
      and safetensors files only).
    """
    if not str(name_or_path).strip():  # Path("") is the current directory: not what was meant
        raise ZoplanError(
            "the model name is empty",
            fix=f"pass a local directory with config.json and *.safetensors, or a built-in: {', '.join(TINY)}",
        )
    if name_or_path in TINY:
        final = tiny_model_dir(name_or_path, cache_dir if cache_dir is not None else default_cache())
        root = final.parent
        if final.is_dir():
            return final
        try:
            root.mkdir(parents=True, exist_ok=True)
            _sweep_stale_builds(root, name_or_path)
            temporary = Path(tempfile.mkdtemp(prefix=f".{name_or_path}-", dir=root))
        except OSError as exc:
            raise ZoplanError(
                f"cannot build the built-in model {name_or_path} under {root}: {exc.strerror or exc}",
                fix="make that folder writable, or set HOME to a writable folder (the model is built once, "
                "under HOME/.cache/zoplan/tiny)",
            ) from None
        try:
            build_tiny(name_or_path, temporary)
            try:
                os.rename(temporary, final)
            except OSError:
                if not final.is_dir():  # not a lost race with another builder: a real failure
                    raise
        finally:
            if temporary.exists():
                shutil.rmtree(temporary, ignore_errors=True)
        return final

    local = Path(name_or_path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ZoplanError(f"model directory {local} has no config.json", fix=_model_dir_fix(local))
        return local

    try:
        from huggingface_hub import snapshot_download

        snapshot = Path(
            snapshot_download(
                repo_id=name_or_path,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"],
            )
        )
    except Exception:  # offline, unknown id, invalid id, gated, ...: the same advice for all
        raise ZoplanError(f"model '{name_or_path}' cannot be found offline or on the hub", fix=_BUILTIN_FIX) from None
    if not (snapshot / "config.json").is_file() or not any(snapshot.glob("*.safetensors")):
        raise ZoplanError(
            f"model '{name_or_path}' on the hub has no config.json or no *.safetensors weights",
            fix=_BUILTIN_FIX,
        )
    return snapshot
