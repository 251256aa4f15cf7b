"""What a model directory must hold, checked before any rank starts.

``zoplan run`` would otherwise learn of a missing, truncated or mismatched checkpoint from a rank's
traceback (or not at all: Hugging Face initialises missing weights at random and ignores extra
ones, so a config with fewer layers than the weights trains a truncated model). The checks read
only the weights' headers (safetensors) or their tensors' shapes (pytorch_model.bin: its pickle,
not its data) and build the model on the meta device: seconds, whatever its size, and once per
unchanged directory (a directory that passed is remembered by its files' sizes and modification
times, under ~/.cache/zoplan/checked).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import pickle
import re
from pathlib import Path

from zoplan.errors import ZoplanError

# a block's index in a parameter name (model.layers.3.mlp..., model.decoder.layers.3..., h.3...)
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
_SHOWN = 3


def dtype_kwarg(dtype) -> dict:
    """``from_pretrained`` and ``from_config``'s dtype argument: ``dtype`` since transformers 4.56,
    ``torch_dtype`` before (where ``dtype`` went on to the model's constructor, which refused it)."""
    from importlib.metadata import version

    major, minor = (int(x) for x in version("transformers").split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files (one, or the shards its index names); [] when it has
    only torch's pickled format (``bin_files``)."""
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    found = _sharded(model_dir, "model.safetensors.index.json", ".safetensors", "model-*.safetensors")
    if found is not None:
        return found
    if any(model_dir.glob("pytorch_model*.bin")):
        return []
    raise ZoplanError(
        f"{model_dir} holds no weights (no model.safetensors, no shard index, no pytorch_model.bin)",
        fix="point --model at a checkpoint directory with its weights, or save them there (model.save_pretrained(DIR))",
    )


def bin_files(model_dir: Path) -> list[Path]:
    """The checkpoint's files in torch's pickled format (pytorch_model.bin, or the shards its
    index names), for a directory without safetensors weights; [] when it has none."""
    single = model_dir / "pytorch_model.bin"
    if single.is_file():
        return [single]
    found = _sharded(model_dir, "pytorch_model.bin.index.json", ".bin", "pytorch_model-*.bin")
    return found if found is not None else sorted(model_dir.glob("pytorch_model*.bin"))


def _sharded(model_dir: Path, index_name: str, suffix: str, pattern: str) -> list[Path] | None:
    """The shards a checkpoint's index names (None without an index); a damaged index, or a
    shard it names that is not there, is refused."""
    index = model_dir / index_name
    if index.is_file():
        try:
            weight_map = json.loads(index.read_bytes()[: 64 << 20])["weight_map"]
            names = sorted(set(weight_map.values()))
            if not all(isinstance(n, str) and "/" not in n and n.endswith(suffix) for n in names):
                raise TypeError
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise ZoplanError(
                f"{index} is damaged: it must map tensor names to shard files", fix="copy the checkpoint again"
            ) from None
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise ZoplanError(
                f"{model_dir} lacks {len(missing)} weight shard(s) its index names (first: {missing[0]})",
                fix=f"copy the whole checkpoint (every {pattern} file)",
            )
        return [model_dir / n for n in names]
    return None


def weight_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from the headers alone (a pickled ``.bin`` file: its tensors made on
    the meta device, its data not read); a truncated or damaged file is refused."""
    from safetensors import SafetensorError, safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        try:
            if path.suffix == ".bin":
                shapes.update((name, tuple(t.shape)) for name, t in _load_bin(path, "meta").items())
                continue
            with safe_open(str(path), "pt") as f:
                for name in f.keys():
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        except (SafetensorError, OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
            raise ZoplanError(
                f"{path} is truncated or damaged ({(str(exc).splitlines() or [type(exc).__name__])[0][:200]})",
                fix="copy the checkpoint again: its size must match the original",
            ) from None
    return shapes


def _load_bin(path: Path, device: str) -> dict:
    """A pickled checkpoint's tensors, as transformers loads them (weights only): on ``device``
    ("meta": shapes only), or mapped from the file where its format allows."""
    import torch

    if device == "meta":
        loaded = torch.load(str(path), map_location="meta", weights_only=True)
    else:
        try:
            loaded = torch.load(str(path), map_location=device, weights_only=True, mmap=True)
        except RuntimeError:  # a file of torch's legacy format cannot be mapped: read whole
            loaded = torch.load(str(path), map_location=device, weights_only=True)
    if not isinstance(loaded, dict) or not all(isinstance(t, torch.Tensor) for t in loaded.values()):
        raise ValueError("it holds no table of tensors")
    return loaded


CHECKED_KEPT = 256  # remembered directories (a few bytes each); the oldest are forgotten first


STAMP_SAMPLES, STAMP_READ = 256, 4096  # reads of each weight file, and their size: 1 MiB a file


def weights_stamp(model_dir: Path) -> str:
    """A fingerprint of a checkpoint's weights that a copy of them keeps and other weights do
    not: each weight file's name and size, and ``STAMP_SAMPLES`` reads spread evenly over it (the
    first holds a safetensors header: every tensor's name, dtype, shape and place). It reads 1 MiB
    of a file whatever its size, so a change to a few tensors only may escape it; a checkpoint
    replaced by another of the same shape does not."""
    files = weight_files(model_dir) or sorted(model_dir.glob("pytorch_model*.bin"))
    digest = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode("utf-8", "surrogatepass"))
        with path.open("rb") as f:
            for k in range(STAMP_SAMPLES):
                f.seek(size * k // STAMP_SAMPLES)
                digest.update(f.read(STAMP_READ))
    return digest.hexdigest()[:32]


def checked_cache_dir() -> Path:
    return Path.home() / ".cache" / "zoplan" / "checked"


# what the check looks at, by version: a directory passed by an older check is checked again
CHECKS = "4"  # 2: a config that says its weights are quantized is refused; 3: a tied head the weights untie;
# 4: pytorch_model.bin weights compared with the config too


def _stamp(model_dir: Path) -> str:
    """What the check depends on: every file of the directory (name, size, modification time to the
    nanosecond, inode) and the versions that read them. A file written, replaced, truncated, added
    or removed changes it."""
    from importlib.metadata import version

    from zoplan import __version__

    entries = []
    for path in sorted(model_dir.resolve().iterdir()):
        st = path.stat()
        entries.append(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}")
    text = "\n".join([str(model_dir.resolve()), __version__, CHECKS, version("transformers"), *entries])
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def check_model_dir(model_dir: Path) -> None:
    """Refuse, with the file and a fix, a directory whose weights are missing or damaged, disagree
    with its config.json, or that has no tokenizer. A directory that passed and has not changed
    since (``_stamp``) is not checked again: the check imports transformers' model code and builds
    the model on the meta device, seconds of every `zoplan run`'s start."""
    try:
        marker = checked_cache_dir() / _stamp(model_dir)
    except OSError:
        marker = None  # unreadable: the full check says what is wrong
    if marker is not None and marker.exists():
        return
    _check_model_dir(model_dir)
    if marker is not None:
        with contextlib.suppress(OSError):  # only a cache: a read-only home checks every time
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
            kept = sorted(marker.parent.iterdir(), key=lambda p: p.stat().st_mtime_ns)
            for old in kept[:-CHECKED_KEPT]:
                old.unlink(missing_ok=True)


def _unbuildable(model_dir: Path, exc: Exception) -> ZoplanError:
    return ZoplanError(
        f"{model_dir / 'config.json'} does not describe a model transformers can build "
        f"({str(exc).splitlines()[0][:200]})",
        fix="use the config.json saved with the weights",
    )


def _check_model_dir(model_dir: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    files = weight_files(model_dir) or bin_files(model_dir)
    shapes = weight_shapes(files)
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _unbuildable(model_dir, exc) from None
    quantized = getattr(config, "quantization_config", None)
    if quantized:
        method = (
            quantized.get("quant_method", "?")
            if isinstance(quantized, dict)
            else getattr(quantized, "quant_method", "?")
        )
        raise ZoplanError(
            f"{model_dir / 'config.json'} says its weights are quantized (quant_method {str(method)!r}): a ZO run "
            "updates and writes every weight in full precision, and transformers will not save a model so marked",
            fix="dequantize the weights first; if they already are (float32 or bf16 safetensors, as a GGUF file "
            'converted by transformers writes them), remove "quantization_config" from config.json',
        )
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _unbuildable(model_dir, exc) from None
    if files:
        _compare(model_dir, config, model, shapes)
        _check_tied_head(model_dir, config, model, files, shapes)
    fix = (
        "copy the tokenizer files (tokenizer.json, tokenizer_config.json, ...) saved with the model into the directory"
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # (ImportError: older transformers, finding no tokenizer.json, reach for a library to read other
    # files with, such as protobuf, and say it is missing)
    except (OSError, ValueError, TypeError, KeyError, ImportError) as exc:
        raise ZoplanError(
            f"{model_dir} has no tokenizer transformers can load ({str(exc).splitlines()[0][:200]})", fix=fix
        ) from None
    # without its files transformers may still build an empty tokenizer, which encodes nothing
    if len(tokenizer) == 0 or not tokenizer("It was great")["input_ids"]:
        raise ZoplanError(f"{model_dir} has no tokenizer: the one transformers builds from it is empty", fix=fix)


def _compare(model_dir: Path, config, model, shapes: dict[str, tuple[int, ...]]) -> None:
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    if not set(expected) & set(shapes):
        return  # another naming scheme (one transformers converts while loading): not judged here
    where = f"{model_dir}: the weights and config.json disagree"
    fix = "use the config.json saved with these weights"
    layers = getattr(config, "num_hidden_layers", None)
    found = {int(m.group(1)) for name in shapes for m in [_LAYER.search(name)] if m}
    if layers is not None and found and max(found) + 1 != layers:
        raise ZoplanError(f"{where}: config.json says {layers} layer(s), the weights hold {max(found) + 1}", fix=fix)
    wrong = [
        f"{n} is {list(shapes[n])} in the weights, {list(s)} by the config"
        for n, s in expected.items()
        if n in shapes and shapes[n] != s
    ]
    if wrong:
        raise ZoplanError(f"{where}: {len(wrong)} tensor shape(s) differ ({'; '.join(wrong[:_SHOWN])})", fix=fix)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = sorted(set(expected) - set(shapes) - tied)
    if missing:
        raise ZoplanError(
            f"{model_dir}: the weights lack {len(missing)} tensor(s) the model needs "
            f"(first: {', '.join(missing[:_SHOWN])}); they would start from random values",
            fix="copy the whole checkpoint, or use the config.json saved with these weights",
        )


def _check_tied_head(model_dir: Path, config, model, files: list[Path], shapes: dict[str, tuple[int, ...]]) -> None:
    """A config that ties the head to the embedding, over weights that hold a head of their own
    with other values: transformers keeps the two apart as it loads such a checkpoint (the loader
    rank), while the ranks that build the model on their own tie them: the two branches of a step
    would be two different models (the loss and every update wrong, with exit 0)."""
    import torch
    from safetensors import safe_open

    if not getattr(config, "tie_word_embeddings", False) or "lm_head.weight" not in shapes:
        return
    embedding = model.get_input_embeddings().weight
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is embedding and n != "lm_head.weight"]
    if not names or names[0] not in shapes or shapes[names[0]] != shapes["lm_head.weight"]:
        return
    values = {}
    for path in files:
        if path.suffix == ".bin":
            tensors = _load_bin(path, "cpu")
            values.update((name, tensors[name]) for name in {names[0], "lm_head.weight"} & set(tensors))
            continue
        with safe_open(str(path), "pt") as f:
            for name in {names[0], "lm_head.weight"} & set(f.keys()):
                values[name] = f.get_tensor(name)
    if torch.equal(values[names[0]], values["lm_head.weight"]):
        return  # a tied checkpoint that saved the head too: the same values
    raise ZoplanError(
        f"{model_dir}: config.json ties the head to the embedding (tie_word_embeddings: true), but the weights "
        f"hold their own lm_head.weight, with other values than {names[0]}: transformers keeps them apart as it "
        "loads them, the ranks that build the model themselves tie them, so the branches of a step would run "
        "two different models",
        fix='if the head is its own (as the weights say), set "tie_word_embeddings": false in config.json; '
        "if it is the embedding, save the checkpoint again without lm_head.weight",
    )


# what a model directory holds beside its weights, copied with trained weights: config,
# generation config, tokenizer files, the chat template
_COMPANION_SUFFIXES = (".json", ".txt", ".model", ".jinja")
_NOT_COMPANIONS = ("model.safetensors.index.json", "meta.json")


def companion_files(model_dir: Path) -> list[Path]:
    """The files a directory of trained weights takes from the base model's directory."""
    return sorted(
        f
        for f in model_dir.iterdir()
        if f.is_file() and f.suffix in _COMPANION_SUFFIXES and f.name not in _NOT_COMPANIONS
    )


def readable_as_umask(directory: Path) -> None:
    """safetensors writes its files mode 0600 whatever the umask: give the weights the mode any
    other file written here gets, so a model directory is as shareable as the user's files
    (``directory`` a file: that file)."""
    mask = os.umask(0)
    os.umask(mask)
    for f in [directory] if directory.is_file() else directory.iterdir():
        if f.is_file() and not f.is_symlink():
            os.chmod(f, 0o666 & ~mask)


# safetensors' names of the dtypes a model's weights are written in
_SAFETENSORS_DTYPES = {
    "torch.float32": "F32",
    "torch.float16": "F16",
    "torch.bfloat16": "BF16",
    "torch.float64": "F64",
    "torch.int64": "I64",
    "torch.int32": "I32",
    "torch.int16": "I16",
    "torch.int8": "I8",
    "torch.uint8": "U8",
    "torch.bool": "BOOL",
}


def write_safetensors(path: Path, tensors, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (name -> (dtype, shape, a callable making that CPU tensor)) as one
    safetensors file, each tensor made and written in turn: ``safetensors.torch.save_file`` holds
    the bytes of every tensor at once, on top of the copies given it, so writing a model's weights
    out of the host copy took twice the model's size again in host memory (a run sized to its
    machine was killed by the out-of-memory killer at its end, or at its first snapshot). Here one
    tensor is held at a time (none where a view of the host copy in its own dtype is given). The
    file is the format's: an 8-byte little-endian header length, the JSON header (padded with
    spaces to 8 bytes, as safetensors pads it), the tensors' bytes in the header's order."""
    import torch

    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, (dtype, shape, _) in tensors.items():
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[str(dtype)],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name, (dtype, shape, make) in tensors.items():
            tensor = make()
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):  # a bug in the caller
                raise RuntimeError(
                    f"{name}: made {tensor.dtype} {tuple(tensor.shape)}, announced {dtype} {tuple(shape)}"
                )
            if tensor.numel():
                f.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
            del tensor
