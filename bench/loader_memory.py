"""Peak host memory of the loader rank (docs/results/runtime-cpu.md, "Loading").

The loader rank of each machine reads the checkpoint with ``from_pretrained`` and writes it into
the shared host copy. This measures its peak resident set (VmHWM: private memory plus the shared
host copy's pages it wrote) against the size of the weights, for an OPT-shaped model with random
weights saved in bf16 (``--saved fp32``: in the compute dtype) and trained in fp32.

Usage: python -m bench.loader_memory [--hidden 1024 --layers 24] [--saved bf16|fp32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CHILD = r"""
import json, sys, uuid
from pathlib import Path
import torch
from zoplan.planner import plan
from zoplan.runtime import dist as zdist
from zoplan.runtime.worker import load_model
from zoplan.runtime.scratch import shared_memory
from zoplan.search import Pins

import threading, time

def kib(*fields):
    got = {}
    for line in open("/proc/self/status"):
        name = line.split(":")[0]
        if name in fields:
            got[name] = int(line.split()[1])
    return sum(got.values())

peaks = {"pinned": 0, "file": 0}  # anonymous + shared memory (not evictable); file-backed pages
stop = threading.Event()

def sample():
    while not stop.is_set():
        peaks["pinned"] = max(peaks["pinned"], kib("RssAnon", "RssShmem"))
        peaks["file"] = max(peaks["file"], kib("RssFile"))
        time.sleep(0.002)

model_dir = Path(sys.argv[1])
report = plan(str(model_dir / "config.json"), "cpu-local", global_batch=4, seq_len=32, dtype="fp32",
              pins=Pins(perturbation=1, data=1, upload="whole", resident=0, wire_dtype="fp32"))
ctx = zdist.RankContext(rank=0, world=1, node=0, local_rank=0, device=torch.device("cpu"), role="compute",
                        signs=(1, -1), replica=0, replicas=1, mover_index=None, movers=1,
                        compute_index=0, computes=1)
before = kib("RssAnon", "RssShmem")
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
# the host copy in shared memory, as a run's loader writes it (host.remove() takes it away)
root = shared_memory() / f"zoplan-bench-{uuid.uuid4().hex[:8]}"
model, adapter, host = load_model(model_dir, report.plan, ctx, root)
stop.set()
sampler.join()
try:
    print(json.dumps({"before_kib": before, "peak_kib": peaks["pinned"], "peak_file_kib": peaks["file"],
                      "vm_hwm_kib": kib("VmHWM"), "after_kib": kib("RssAnon", "RssShmem")}))
finally:
    host.remove()
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument(
        "--saved",
        choices=["fp32", "bf16"],
        default="bf16",
        help="checkpoint dtype (loaded as fp32: bf16 makes from_pretrained convert every tensor)",
    )
    opts = parser.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, OPTConfig

    from zoplan.runtime.tiny import build_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "model"
        tok = build_tokenizer()
        config = OPTConfig(
            vocab_size=len(tok),
            hidden_size=opts.hidden,
            num_hidden_layers=opts.layers,
            ffn_dim=4 * opts.hidden,
            num_attention_heads=opts.hidden // 64,
            max_position_embeddings=512,
            word_embed_proj_dim=opts.hidden,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        block = sum(p.numel() * p.element_size() for p in model.model.decoder.layers[0].parameters())
        model.to(torch.bfloat16 if opts.saved == "bf16" else torch.float32).save_pretrained(directory)
        tok.save_pretrained(directory)
        del model
        proc = subprocess.run([sys.executable, "-c", CHILD, str(directory)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        got = json.loads(proc.stdout.strip().splitlines()[-1])
    mib = 2**20
    base, peak = got["before_kib"] * 1024, got["peak_kib"] * 1024
    print(
        f"weights {weights / mib:.0f} MiB (fp32, {opts.layers} blocks of {block / mib:.1f} MiB), checkpoint "
        f"{opts.saved}; loader anonymous + shared memory: {base / mib:.0f} MiB before loading, peak "
        f"{peak / mib:.0f} MiB, after {got['after_kib'] * 1024 / mib:.0f} MiB; file-backed peak "
        f"{got['peak_file_kib'] * 1024 / mib:.0f} MiB (checkpoint pages, evictable); VmHWM "
        f"{got['vm_hwm_kib'] * 1024 / mib:.0f} MiB"
    )
    print(f"peak above the start: {(peak - base) / mib:.0f} MiB = {(peak - base) / weights:.2f} x the weights")


if __name__ == "__main__":
    main()
