"""Does it learn? SmolLM2-135M-Instruct on a sentiment task, zoplan against a plain MeZO loop.

The task (written here): short reviews labelled positive or negative, read with MeZO's SST-2
prompt ("{text} It was" + " terrible" / " great"). Training and evaluation sentences come from
disjoint templates and disjoint adjectives, so held-out accuracy measures the sentiment the model
learned to read, not the sentences it saw.

Each configuration is trained twice with the same data order, batch, lr and eps:
- by ``zoplan run`` (through ``fine_tune``: 2 CPU ranks, the default plan for this machine);
- by a plain MeZO loop of the kind MeZO's paper describes, in memory, in this process: for each
  step, z drawn per parameter with ``torch.randn`` from the step's seed, θ+εz, loss, θ−2εz, loss,
  θ+εz, then θ ← θ − lr·g·z. The same batches (zoplan's data order and encoding), the same loss.
Full-parameter, LoRA (rank 8, alpha 16 on q and v) and prefix (5 tokens); the reference trains
PEFT's LoRA and prefix models, the prefix starting from zoplan's initial values (the activations
of 5 random tokens: OUT/zoplan-prefix/prefix-init.safetensors, so run zoplan-prefix first).
Held-out loss and accuracy at step 0 (zero-shot) and every ``--eval-every`` steps.

    python -m bench.learning --out OUT [--full-steps 300] [--lora-steps 1000] [--prefix-steps 1000]
        [--eval-every 100] [--only zoplan-prefix,mezo-prefix]

Writes OUT/learning.json (every evaluation), OUT/learning.png (accuracy and loss curves) and
prints a Markdown table (docs/results/learning.md).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TRAIN_TEMPLATES = (
    "the {noun} was {adj}.",
    "{a} {adj} and {adj2} {noun}.",
    "what {a} {adj} {noun}.",
    "i found the {noun} {adj} and {adj2}.",
    "the {noun} is {adj} from start to finish.",
)
EVAL_TEMPLATES = (
    "honestly, this {noun} felt {adj}.",
    "we left thinking the {noun} had been {adj}.",
    "in short: {adj}, {adj2}, and that is the {noun}.",
    "critics called the {noun} {adj}.",
)
NOUNS = ("movie", "film", "story", "show", "plot", "ending", "cast", "script", "soundtrack", "sequel")
POSITIVE = ("great", "wonderful", "brilliant", "delightful", "superb", "moving", "charming", "excellent")
NEGATIVE = ("dull", "boring", "awful", "tedious", "clumsy", "bland", "dreadful", "lifeless")
LR = {"full": 1e-5, "lora": 1e-4, "prefix": 1e-3}  # per method; eps: MeZO's for each
EPS = {"full": 1e-3, "lora": 1e-2, "prefix": 1e-1}
PREFIX_TOKENS = 5
BATCH, SEQ, SEED = 16, 32, 7


def reviews(templates, words_pos, words_neg, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = i % 2
        adj, adj2 = rng.sample(words_pos if label else words_neg, 2)
        noun = rng.choice(NOUNS)
        text = rng.choice(templates).format(a="an" if adj[0] in "aeiou" else "a", adj=adj, adj2=adj2, noun=noun)
        out.append({"text": text, "label": label})
    rng.shuffle(out)
    return out


def write_sets(out: Path) -> tuple[Path, Path]:
    """Training on 5 templates and 5 adjectives per class; evaluation on 4 other templates and
    the 3 other adjectives per class."""
    train = reviews(TRAIN_TEMPLATES, POSITIVE[:5], NEGATIVE[:5], 320, 1)
    held = reviews(EVAL_TEMPLATES, POSITIVE[5:], NEGATIVE[5:], 160, 2)
    paths = out / "train.jsonl", out / "eval.jsonl"
    for path, rows in zip(paths, (train, held)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def zoplan_run(model: Path, train: Path, held: Path, method: str, steps: int, every: int, out: Path) -> dict:
    from zoplan.runtime import fine_tune

    t0 = time.perf_counter()
    fine_tune(
        model=str(model),
        data=str(train),
        eval_data=str(held),
        tuning=method,
        prefix_tokens=PREFIX_TOKENS if method == "prefix" else None,  # (refused for another method)
        steps=steps,
        eval_every=every,
        lr=LR[method],
        eps=EPS[method],
        seed=SEED,
        global_batch=BATCH,
        seq_len=SEQ,
        output=str(out),
        quiet=True,
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"] + 1, r["eval_loss"], r["eval_accuracy"]) for r in rows if "eval_loss" in r]
    times = [r["step_time_s"] for r in rows if "step_time_s" in r]
    return {"evals": evals, "seconds": time.perf_counter() - t0, "step_s": sorted(times)[len(times) // 2]}


def mezo_reference(
    model_dir: Path, train: Path, held: Path, method: str, steps: int, every: int, prefix_init: Path
) -> dict:
    """The plain in-memory MeZO loop (module docstring), 2 threads (the cores zoplan's 2 ranks use)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.speed_cpu import mezo_step
    from zoplan.runtime import data as zdata

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
        model.eval()
    if method == "prefix":  # PEFT's prefix tuning, from zoplan's initial values (its layout is PEFT's)
        from peft import PrefixTuningConfig, get_peft_model
        from safetensors.torch import load_file

        model = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=PREFIX_TOKENS))
        model.eval()
        with torch.no_grad():
            model.prompt_encoder["default"].embedding.weight.copy_(load_file(str(prefix_init))["prompt_embeddings"])
    params = [p for p in model.parameters() if p.requires_grad]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples, kind = zdata.load_examples(str(train))
    held_out = zdata.load_examples(str(held))[0]
    task = zdata.task_of(kind, "{text} It was", ("terrible", "great"))
    cache: dict = {}

    def loss_of(rows) -> tuple[float, float, int]:
        total, right, count = 0.0, 0.0, 0
        for k in range(0, len(rows), BATCH):
            batch = zdata.encode(rows[k : k + BATCH], tokenizer, task, SEQ, cache=cache)
            logits = model(**batch.model_inputs()).logits
            loss, n = zdata.loss_terms(logits, batch, task)
            correct, _ = zdata.accuracy(logits, batch, task)
            total, right, count = total + float(loss), right + correct, count + n
        return total / count, right / count, count

    evals, times = [], []
    t0 = time.perf_counter()
    with torch.no_grad():
        evals.append((0, *loss_of(held_out)[:2]))
        for step in range(steps):
            t = time.perf_counter()
            rows = zdata.batches(examples, BATCH, SEED, step, 0, 1)
            mezo_step(params, SEED * 100_003 + step, EPS[method], LR[method], lambda: loss_of(rows)[0])
            times.append(time.perf_counter() - t)
            if (step + 1) % every == 0 or step + 1 == steps:
                evals.append((step + 1, *loss_of(held_out)[:2]))
    return {"evals": evals, "seconds": time.perf_counter() - t0, "step_s": sorted(times)[len(times) // 2]}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, loss) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        steps = [e[0] for e in r["evals"]]
        style = "-" if name.startswith("zoplan") else "--"
        acc.plot(steps, [e[2] for e in r["evals"]], style, marker="o", label=name)
        loss.plot(steps, [e[1] for e in r["evals"]], style, marker="o", label=name)
    acc.set(xlabel="step", ylabel="held-out accuracy", title="SmolLM2-135M, sentiment (disjoint templates)")
    loss.set(xlabel="step", ylabel="held-out label loss")
    acc.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--full-steps", type=int, default=300)
    parser.add_argument("--lora-steps", type=int, default=1000)
    parser.add_argument("--prefix-steps", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--only", default="zoplan-full,mezo-full,zoplan-lora,mezo-lora,zoplan-prefix,mezo-prefix")
    opts = parser.parse_args()
    from zoplan.runtime.pretrained import smollm2

    opts.out.mkdir(parents=True, exist_ok=True)
    model = smollm2(say=print)
    train, held = write_sets(opts.out)
    saved = opts.out / "learning.json"
    results = json.loads(saved.read_text()) if saved.exists() else {}
    for name in opts.only.split(","):
        who, method = name.split("-")
        steps = {"full": opts.full_steps, "lora": opts.lora_steps, "prefix": opts.prefix_steps}[method]
        print(f"{time.strftime('%H:%M:%S')} {name}: {steps} steps", flush=True)
        if who == "zoplan":
            r = zoplan_run(model, train, held, method, steps, opts.eval_every, opts.out / name)
        else:
            init = opts.out / "zoplan-prefix" / "prefix-init.safetensors"
            r = mezo_reference(model, train, held, method, steps, opts.eval_every, init)
        results[name] = {"method": method, "lr": LR[method], "eps": EPS[method], **r}
        saved.write_text(json.dumps(results, indent=1))
        print(f"  {r['evals']}  median step {r['step_s']:.2f} s, {r['seconds']:.0f} s in all", flush=True)
    plot(results, opts.out / "learning.png")
    longest = max(results.values(), key=lambda r: len(r["evals"]))["evals"]
    print("| run | lr, eps | median step | " + " | ".join(f"step {e[0]}" for e in longest) + " |")
    for name, r in results.items():
        cells = " | ".join(f"{e[2]:.3f} / {e[1]:.3f}" for e in r["evals"])
        print(f"| {name} | {r['lr']:g}, {r['eps']:g} | {r['step_s']:.2f} s | {cells} |")


if __name__ == "__main__":
    main()
