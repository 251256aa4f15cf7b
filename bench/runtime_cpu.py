"""CPU figures of the runtime (docs/results/runtime-cpu.md).

1. Offloaded 1x1 step (zoplan run: blocks streamed from the shared host copy) against a plain
   in-memory MeZO step (perturb in place, two forwards, restore, update) on the same model and
   batches, one thread each.
2. Perturbation parallelism: 2x1 (two ranks, one branch each, one thread per rank) against 1x1
   on a compute-bound configuration (long sequences, small blocks).
3. Host memory with 4 local ranks: proportional set size of the shared host copy across ranks.

Usage: python -m bench.runtime_cpu [--steps 8] [--only offload,pertp,memory]
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
import threading
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_model(
    directory: Path, hidden: int, layers: int, ffn: int, heads: int, vocab: int | None = None, positions: int = 512
) -> Path:
    """An OPT-shaped model with random weights (seed 0) and the tiny models' tokenizer; ``vocab``
    defaults to the tokenizer's size (a larger one gives a real model's embedding size)."""
    from transformers import AutoModelForCausalLM, OPTConfig

    from zoplan.runtime.tiny import build_tokenizer

    tok = build_tokenizer()
    config = OPTConfig(
        vocab_size=vocab or len(tok),
        hidden_size=hidden,
        num_hidden_layers=layers,
        ffn_dim=ffn,
        num_attention_heads=heads,
        max_position_embeddings=positions,
        word_embed_proj_dim=hidden,
        dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def long_texts(path: Path, sentences_per_text: int = 30, count: int = 256) -> Path:
    """Language-modelling texts of ~`sentences_per_text` bundled sentences each."""
    from zoplan.runtime.data import load_examples

    examples, _ = load_examples("sentiment-text")
    with path.open("w") as f:
        for i in range(count):
            chunk = [examples[(i * 7 + k) % len(examples)].text for k in range(sentences_per_text)]
            f.write(json.dumps({"text": ". ".join(chunk)}) + "\n")
    return path


def zoplan_run(
    model_dir: Path, data: Path, out: Path, steps: int, topology: str, seq_len: int, batch: int, **pins
) -> subprocess.Popen:
    args = [
        sys.executable,
        "-m",
        "zoplan.cli",
        "run",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--steps",
        str(steps),
        "-o",
        str(out),
        "--topology",
        topology,
        "--seq-len",
        str(seq_len),
        "--global-batch",
        str(batch),
        "--lr",
        "1e-4",
    ]
    for flag, value in pins.items():
        args += [f"--{flag}", str(value)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def step_times(out: Path, skip: int = 2) -> list[float]:
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time_s"] for r in rows if "step_time_s" in r][skip:]


def finish(proc: subprocess.Popen) -> None:
    text, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"zoplan run failed:\n{text}")


def mezo_in_memory(model_dir: Path, data: Path, steps: int, seq_len: int, batch: int) -> list[float]:
    """A plain MeZO step on the whole model in memory (the reference the offloaded step is
    compared with): the same batches, eps, lr, perturbation function, one thread."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zoplan.runtime import data as zdata
    from zoplan.runtime.perturb import perturb_, step_seed

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(model_dir)
    examples, kind = zdata.load_examples(str(data))
    task = zdata.Task(kind)
    train, _ = zdata.split(examples, 0.1, 0)
    params = list(model.named_parameters())
    eps, lr, times = 1e-3, 1e-4, []
    for step in range(steps):
        b = zdata.encode(zdata.batches(train, batch, 0, step, 0, 1), tok, task, seq_len)
        seed = step_seed(0, step)
        t0 = time.perf_counter()
        with torch.no_grad():
            losses = []
            for scale in (eps, -2 * eps):
                for name, p in params:
                    perturb_(p, seed, name, scale)
                total, count = zdata.loss_terms(model(**b.model_inputs()).logits.float(), b, task)
                losses.append(float(total) / count)
            for name, p in params:
                perturb_(p, seed, name, eps)
            g = (losses[0] - losses[1]) / (2 * eps)
            for name, p in params:
                perturb_(p, seed, name, -lr * g)
        times.append(time.perf_counter() - t0)
    return times[2:]


def pss_of_ranks(parent_pid: int) -> dict[int, dict[str, int]]:
    """smaps_rollup of every worker process below ``parent_pid`` (kB)."""
    out: dict[int, dict[str, int]] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if not Path(f"/proc/{pid}/comm").read_text().startswith("zoplan-rank"):
                continue  # ranks only (named zoplan-rank<N>), not the process that started them
            fields = {}
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
                key, value = line.split(":", 1)
                fields[key] = int(value.split()[0])
            out[int(pid)] = fields
        except (OSError, ValueError):
            continue
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--only", default="offload,pertp,memory")
    opts = parser.parse_args()
    which = set(opts.only.split(","))
    work = Path(tempfile.mkdtemp(prefix="zoplan-bench-"))
    atexit.register(shutil.rmtree, work, True)  # the models and the runs (hundreds of MB): nothing left behind
    data = long_texts(work / "long.jsonl")
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}")

    if "offload" in which:
        model = build_model(work / "opt-mid", hidden=512, layers=8, ffn=2048, heads=8)
        proc = zoplan_run(
            model,
            data,
            work / "off",
            opts.steps,
            "cpu-local",
            256,
            8,
            pertp=1,
            ddp=1,
            upload="whole",
            gpus="rank0",
            resident=0,
        )
        finish(proc)
        off = statistics.median(step_times(work / "off"))
        mem = statistics.median(mezo_in_memory(model, data, opts.steps, 256, 8))
        print(
            f"[offload] OPT-shaped 8x512 (ffn 2048), batch 8 x 256 tokens, fp32, 1 thread: "
            f"offloaded 1x1 {off:.3f} s/step, in-memory MeZO {mem:.3f} s/step, ratio {off / mem:.2f}"
        )

    if "pertp" in which:
        model = build_model(work / "opt-small", hidden=256, layers=4, ffn=1024, heads=4)
        runs = {}
        for name, pins in {
            "1x1": dict(pertp=1, ddp=1, upload="whole", gpus="rank0", resident=0),
            "2x1": dict(pertp=2, ddp=1, upload="sliced", slices=2, resident=0),
        }.items():
            finish(zoplan_run(model, data, work / name, opts.steps, "cpu-local", 256, 32, **pins))
            runs[name] = statistics.median(step_times(work / name))
        print(
            f"[pertp] OPT-shaped 4x256 (ffn 1024), batch 32 x 256 tokens, fp32, 1 thread per rank: "
            f"1x1 {runs['1x1']:.3f} s/step, 2x1 {runs['2x1']:.3f} s/step, ratio {runs['2x1'] / runs['1x1']:.2f}"
        )

    if "memory" in which:
        model = build_model(work / "opt-mem", hidden=768, layers=12, ffn=3072, heads=12)
        param_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        topo = work / "cpu4.yaml"
        import yaml

        from zoplan.topology import resolve_topology_path

        spec = yaml.safe_load(resolve_topology_path("cpu-local").read_text())
        spec.update(
            name="cpu-4",
            gpus=[{"id": f"rank{i}", "model": "cpu-rank"} for i in range(4)],
            links=[{"a": "cpu0", "b": f"rank{i}", "kind": "memory", "gbps": 8.3} for i in range(4)],
        )
        topo.write_text(yaml.safe_dump(spec))
        proc = zoplan_run(model, data, work / "mem", 6, str(topo), 64, 8, pertp=1, ddp=4, upload="whole", resident=0)
        samples: list[dict[int, dict[str, int]]] = []

        def watch() -> None:
            while proc.poll() is None:
                ranks = pss_of_ranks(proc.pid)
                if len(ranks) >= 4 and (work / "mem" / "metrics.jsonl").exists():
                    samples.append(ranks)
                time.sleep(0.5)

        t = threading.Thread(target=watch)
        t.start()
        finish(proc)
        t.join()
        if not samples:
            raise SystemExit("no sample of the 4 ranks was taken")
        last = samples[len(samples) // 2]
        rss = sum(r["Rss"] for r in last.values()) * 1024
        pss = sum(r["Pss"] for r in last.values()) * 1024
        pss_shmem = sum(r.get("Pss_Shmem", 0) for r in last.values()) * 1024
        per_rank = [r.get("Pss_Shmem", 0) * 1024 for r in last.values()]
        print(
            f"[memory] OPT-125m-shaped (12x768), checkpoint {param_bytes / 1e6:.0f} MB (fp32), {len(last)} ranks "
            f"(1x4): shared memory per rank (Pss_Shmem) {', '.join(f'{x / 1e6:.0f}' for x in per_rank)} MB, "
            f"together {pss_shmem / 1e6:.0f} MB = {pss_shmem / param_bytes:.2f} x the checkpoint; all memory of "
            f"the ranks: PSS {pss / 1e6:.0f} MB, RSS {rss / 1e6:.0f} MB ({len(samples)} samples, the middle one)"
        )


if __name__ == "__main__":
    main()
