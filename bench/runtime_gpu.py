"""GPU figures of the runtime (docs/results/runtime-gpu.md): one GPU, OPT-1.3B- and 2.7B-shaped
models with random weights, bf16, offloaded (every block streamed from host memory) against the
same model kept in GPU memory (plain MeZO: every block resident), with measured host-to-device
bandwidth and matmul throughput for the bounds.

With ``--zo2 PATH`` (a checkout of ZO2), ZO2's offloading schedule (``zo2`` mode: blocks in host
memory, streamed through the GPU) runs the same model, batch and hyperparameters after zoplan, for
tokens/s side by side; ZO2 needs transformers 4.51.3: ``--zo2-site`` (a folder holding it and the
versions it requires, installed from carried wheels: bench/zo2_peer.py, bench/gpu_checks.sh) or
``--zo2-python`` (a Python of its own environment).

Usage (on a GPU machine, zoplan installed with the runtime extra):
    python -m bench.runtime_gpu --out results-dir [--steps 5] [--models opt-1.3b,opt-2.7b] [--batch B --seq-len S]
        [--graphs] [--zo2 PATH (--zo2-site DIR | --zo2-python PYTHON)]
        [--graphs] [--zo2 .peers/zo2 --zo2-site /tmp/site-zo2]

``--graphs`` runs the offloaded step again with the blocks as CUDA graphs (``ZOPLAN_CUDA_GRAPHS=1``,
zoplan.runtime.graphs), after a tiny-opt run with them (a capture that fails costs seconds), and
says whether the losses are the eager run's.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from bench import zo2_peer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SHAPES = {"opt-125m": (768, 12, 3072, 12), "opt-1.3b": (2048, 24, 8192, 32), "opt-2.7b": (2560, 32, 10240, 32)}


def log(out: Path, text: str) -> None:
    print(text, flush=True)
    with (out / "gpu.txt").open("a") as f:
        f.write(text + "\n")


def copy_gbps(direction: str, nbytes: int = 2**30, reps: int = 5) -> float:
    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    src, dst = (host, dev) if direction == "h2d" else (dev, host)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        dst.copy_(src, non_blocking=True)
    end.record()
    torch.cuda.synchronize()
    return nbytes * reps / (start.elapsed_time(end) / 1e3) / 1e9


def duplex_gbps(nbytes: int = 2**30, reps: int = 5) -> tuple[float, float]:
    """H2D and D2H rates (GB/s) while both run at once, on two streams, pinned buffers: each
    direction timed by events on its own stream."""
    host_in, host_out = (torch.empty(nbytes, dtype=torch.uint8).pin_memory() for _ in range(2))
    dev_in, dev_out = (torch.empty(nbytes, dtype=torch.uint8, device="cuda") for _ in range(2))
    up, down = torch.cuda.Stream(), torch.cuda.Stream()
    dev_in.copy_(host_in, non_blocking=True)
    host_out.copy_(dev_out, non_blocking=True)
    torch.cuda.synchronize()
    events = {
        name: (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for name in ("h2d", "d2h")
    }
    for name, stream in (("h2d", up), ("d2h", down)):
        with torch.cuda.stream(stream):
            events[name][0].record()
    for _ in range(reps):  # interleaved, so both directions stay busy together
        with torch.cuda.stream(up):
            dev_in.copy_(host_in, non_blocking=True)
        with torch.cuda.stream(down):
            host_out.copy_(dev_out, non_blocking=True)
    for name, stream in (("h2d", up), ("d2h", down)):
        with torch.cuda.stream(stream):
            events[name][1].record()
    torch.cuda.synchronize()
    h2d, d2h = (nbytes * reps / (events[n][0].elapsed_time(events[n][1]) / 1e3) / 1e9 for n in ("h2d", "d2h"))
    return h2d, d2h


def matmul_tflops(n: int = 8192, reps: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def build(directory: Path, name: str, device: str = "cuda") -> tuple[Path, int, int]:
    """An OPT-shaped model with random weights (bf16) and the tiny tokenizer, saved for from_pretrained."""
    from transformers import AutoModelForCausalLM, OPTConfig

    from zoplan.runtime.tiny import build_tokenizer

    hidden, layers, ffn, heads = SHAPES[name]
    tok = build_tokenizer()
    config = OPTConfig(
        vocab_size=50272,
        hidden_size=hidden,
        num_hidden_layers=layers,
        ffn_dim=ffn,
        num_attention_heads=heads,
        max_position_embeddings=2048,
        word_embed_proj_dim=hidden,
        dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    block = sum(p.numel() for p in model.model.decoder.layers[0].parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return directory, layers, block


def long_texts(path: Path, count: int = 128) -> Path:
    from zoplan.runtime.data import load_examples

    examples, _ = load_examples("sentiment-text")
    with path.open("w") as f:
        for i in range(count):
            f.write(
                json.dumps({"text": ". ".join(examples[(i * 7 + k) % len(examples)].text for k in range(40))}) + "\n"
            )
    return path


def zoplan_run(
    model: Path, data: Path, out: Path, steps: int, resident: int, batch: int, seq: int, graphs: bool = False
) -> list[float]:
    """The step times of a 1x1 ``zoplan run`` (with ``graphs``, its blocks as CUDA graphs)."""
    cmd = [
        sys.executable,
        "-m",
        "zoplan.cli",
        "run",
        "--model",
        str(model),
        "--data",
        str(data),
        "--steps",
        str(steps),
        "-o",
        str(out),
        "--topology",
        "dgx-h100",
        "--gpus",
        "gpu0",
        "--pertp",
        "1",
        "--ddp",
        "1",
        "--upload",
        "whole",
        "--resident",
        str(resident),
        "--global-batch",
        str(batch),
        "--micro-batch",
        str(batch),
        "--seq-len",
        str(seq),
        "--lr",
        "1e-6",
    ]
    env = dict(os.environ, ZOPLAN_CUDA_GRAPHS="1" if graphs else "0")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    worker_log = (out / "worker-node0.log").read_text() if (out / "worker-node0.log").exists() else ""
    if proc.returncode != 0:
        raise RuntimeError(f"zoplan run failed ({proc.returncode}): {proc.stderr[-2000:]}\n{worker_log[-3000:]}")
    if graphs and "runs without a CUDA graph" in proc.stderr + worker_log:
        said = next(l for l in (proc.stderr + worker_log).splitlines() if "runs without a CUDA graph" in l)
        print(f"{out.name}: {said}", flush=True)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time_s"] for r in rows if "step_time_s" in r]


def _losses(run: Path) -> list[float]:
    """A run's training losses, step by step (metrics.jsonl)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r and "step_time_s" in r]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--models", default="opt-1.3b,opt-2.7b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--graphs", action="store_true", help="also run the offloaded step with CUDA graphs")
    parser.add_argument("--zo2", type=Path, help="a checkout of ZO2: its offloading schedule side by side")
    parser.add_argument("--zo2-site", type=Path, help="transformers 4.51.3 and its needs, for this Python")
    parser.add_argument("--zo2-python", help="or a Python with ZO2's torch and transformers 4.51.3")
    opts = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.runtime_gpu needs a CUDA GPU (torch sees none here)")
    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    import transformers

    log(
        out,
        f"{time.strftime('%Y-%m-%d %H:%M')} {torch.cuda.get_device_name()} torch {torch.__version__} "
        f"transformers {transformers.__version__}",
    )
    h2d, d2h, mm = copy_gbps("h2d"), copy_gbps("d2h"), matmul_tflops()
    log(out, f"pinned copy 1 GiB: H2D {h2d:.1f} GB/s, D2H {d2h:.1f} GB/s; bf16 matmul 8192^3 {mm:.0f} TFLOP/s")
    work = Path(tempfile.mkdtemp(prefix="zoplan-gpu-bench-"))
    atexit.register(shutil.rmtree, work, True)  # models and runs: nothing left behind
    data = long_texts(work / "long.jsonl")
    # a quick end-to-end run first: a broken GPU path should cost seconds, not the whole budget
    try:
        from zoplan.runtime.tiny import resolve_model

        tiny = zoplan_run(resolve_model("tiny-opt"), data, work / "tiny", 3, 0, 4, 64)
        log(out, f"tiny-opt on the GPU: ok, steps {[round(x, 4) for x in tiny]} s")
        if opts.graphs:
            tiny_g = zoplan_run(resolve_model("tiny-opt"), data, work / "tiny-graphs", 4, 0, 4, 64, graphs=True)
            same = _losses(work / "tiny-graphs")[:3] == _losses(work / "tiny")
            log(
                out,
                f"tiny-opt with CUDA graphs: steps {[round(x, 4) for x in tiny_g]} s; first 3 losses as eager: {same}",
            )
    except Exception:
        log(out, f"tiny-opt on the GPU: FAILED\n{traceback.format_exc()[-4000:]}")
        return
    tokens = opts.batch * opts.seq_len
    # per shape, what issue 23 asks for first (offloaded, with graphs, ZO2), the in-GPU step last:
    # a run cut short by its time limit keeps what it logged
    for name in opts.models.split(","):
        try:
            model, layers, block = build(work / name, name)
            off = zoplan_run(model, data, work / f"{name}-off", opts.steps, 0, opts.batch, opts.seq_len)
            off_s = statistics.median(off[2:])
            transfer_s = layers * block * 2 / (h2d * 1e9)
            log(
                out,
                f"{name}-shaped ({layers} blocks of {block / 1e6:.1f}M params, bf16), batch {opts.batch} x "
                f"{opts.seq_len}: offloaded {off_s * 1e3:.1f} ms/step, {tokens / off_s:.0f} tok/s; transfer bound "
                f"{transfer_s * 1e3:.1f} ms ({layers * block * 2 / 1e9:.2f} GB at {h2d:.1f} GB/s): "
                f"{off_s / transfer_s:.2f}x; effective H2D {layers * block * 2 / off_s / 1e9:.1f} GB/s; raw steps "
                f"{[round(x, 4) for x in off]}",
            )
        except Exception:  # keep measuring the other shape; the error is part of the record
            log(out, f"{name}: FAILED\n{traceback.format_exc()[-4000:]}")
            continue
        best_s = off_s
        if opts.graphs:
            try:
                run = work / f"{name}-off-graphs"
                graphed = zoplan_run(model, data, run, opts.steps, 0, opts.batch, opts.seq_len, graphs=True)
                graphed_s = statistics.median(graphed[2:])
                best_s = min(best_s, graphed_s)
                same = _losses(run) == _losses(work / f"{name}-off")
                log(
                    out,
                    f"{name}-shaped, offloaded with CUDA graphs (ZOPLAN_CUDA_GRAPHS=1): {graphed_s * 1e3:.1f} ms/step, "
                    f"{tokens / graphed_s:.0f} tok/s, {graphed_s / transfer_s:.2f}x the transfer bound (eager "
                    f"{off_s / transfer_s:.2f}x); losses as eager: {same}; raw steps {[round(x, 4) for x in graphed]}",
                )
            except Exception:
                log(out, f"{name}, CUDA graphs: FAILED\n{traceback.format_exc()[-4000:]}")
        if opts.zo2 is not None:
            try:
                ids = zo2_peer.token_batches(model, data, work / f"{name}-ids.json", opts.batch, opts.seq_len)
                # its offloading schedule on the GPU, in the dtype zoplan ran in
                settings = dict(
                    device="cuda", offload=True, dtype="bfloat16", python=opts.zo2_python, site=opts.zo2_site
                )
                peer = zo2_peer.step_times(opts.zo2, model, ids, steps=opts.steps, lr=1e-6, eps=1e-3, **settings)
                times = [float(t) for t in peer["times"]]  # type: ignore[attr-defined]
                zo2_s = statistics.median(times[2:])
                log(
                    out,
                    f"{name}-shaped, ZO2 offloading (zo2 mode, transformers {peer['transformers']}, lr 1e-6, eps "
                    f"1e-3, no weight decay, bf16), batch {opts.batch} x {opts.seq_len}: {zo2_s * 1e3:.1f} ms/step, "
                    f"{tokens / zo2_s:.0f} tok/s; zoplan offloaded {tokens / off_s:.0f} tok/s eager, "
                    f"{tokens / best_s:.0f} at best; zoplan / ZO2 step time {off_s / zo2_s:.2f} eager, "
                    f"{best_s / zo2_s:.2f} at best; raw ZO2 steps {[round(x, 4) for x in times]}",
                )
            except Exception:
                log(out, f"{name}, ZO2: FAILED\n{traceback.format_exc()[-4000:]}")
        try:
            mem = zoplan_run(model, data, work / f"{name}-mem", opts.steps, layers, opts.batch, opts.seq_len)
            mem_s = statistics.median(mem[2:])
            log(
                out,
                f"{name}-shaped, in GPU memory (every block resident): {mem_s * 1e3:.1f} ms/step; offloaded / "
                f"max(transfer, in-GPU) = {off_s / max(transfer_s, mem_s):.2f} eager; raw steps "
                f"{[round(x, 4) for x in mem]}",
            )
        except Exception:
            log(out, f"{name}, in GPU memory: FAILED\n{traceback.format_exc()[-4000:]}")


if __name__ == "__main__":
    main()
