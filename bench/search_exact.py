"""The pruned search against the exhaustive one, on random small cases (docs/results/planner.md).

The search prunes by a bound that must never be above a candidate's simulated step; where it is,
a better layout can be dropped without a word. Each case draws a small model (OPT, LLaMA or Qwen2
shape), a batch, a tuning (full, LoRA, prefix), an objective, a dtype, some pins and a machine
(a bundled topology, a test fixture, a made-up GPU machine: uneven links, mixed GPU models, NVLink
or not, several nodes; or a machine of CPU ranks), then searches it twice, pruned and exhaustive,
in this process. A case is bad when the best objectives differ, a family shown is not that
family's best, the families shown differ (but for exact ties), or any candidate's bound is above
its step (to 1e-9). Each case is given ``--limit`` seconds (a big exhaustive search is skipped).

    python -m bench.search_exact [--first 0] [--cases 200] [--tuning any|full|adapter] [--budget 600]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import time
from pathlib import Path

os.environ.setdefault("ZOPLAN_PLAN_WORKERS", "1")  # both searches in this process

import yaml

from zoplan.errors import ZoplanError
from zoplan.layout import Pins
from zoplan.models import ModelShape
from zoplan.search import _objective, family, search, top_families
from zoplan.sim.costs import Workload
from zoplan.topology import Machine, TopologySpec, load_topology, resolve_topology_path
from zoplan.tuning import Tuning

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = sorted(p.stem for p in (ROOT / "topologies").glob("*.yaml"))
FIXTURES = sorted((ROOT / "tests" / "fixtures" / "topologies").glob("*.yaml"))
GPU_MODELS = {
    "a100": {"memory_gib": 80, "tflops": {"fp32": 19.5, "bf16": 312, "fp16": 312}, "hbm_gbps": 2039},
    "l40s": {"memory_gib": 48, "tflops": {"fp32": 91.6, "bf16": 362.05}, "hbm_gbps": 864},
    "h100": {"memory_gib": 80, "tflops": {"fp32": 67, "bf16": 989, "fp16": 989}, "hbm_gbps": 3350},
    "small": {"memory_gib": 1, "tflops": {"fp32": 10, "bf16": 40}, "hbm_gbps": 500, "matmul_efficiency": 0.7},
    "tiny": {"memory_gib": 0.25, "tflops": {"bf16": 20}, "hbm_gbps": 300},
}


class _Late(Exception):
    pass


def _late(signum: int, frame: object) -> None:
    raise _Late()


def model(rng: random.Random) -> ModelShape:
    fam = rng.choice(["opt", "llama", "qwen2"])
    heads = rng.choice([1, 2, 4, 8, 16])
    hidden = heads * rng.choice([16, 32, 64, 128])
    while hidden > 2048:
        heads //= 2
        hidden //= 2
    kv = heads if fam == "opt" else rng.choice([d for d in range(1, heads + 1) if heads % d == 0])
    return ModelShape(
        name="random",
        family=fam,
        layers=rng.randint(2, 24),
        hidden=hidden,
        ffn=rng.choice([hidden, 2 * hidden, 4 * hidden, rng.randint(16, 8192)]),
        heads=heads,
        kv_heads=kv,
        vocab=rng.choice([rng.randint(10, 1000), rng.randint(1000, 50000), 50272, 32000]),
        max_positions=rng.choice([512, 2048, 4096]),
        tied_head=rng.random() < 0.5,
        embed_dim=hidden,
    )


def gpu_machine(rng: random.Random) -> dict:
    """A made-up machine of 1 to 6 GPUs: uneven host links, maybe mixed models, NVLink or not."""
    n, sockets, switches = rng.randint(1, 6), rng.choice([1, 2]), rng.randint(0, 3)
    spec: dict = {"version": 1, "name": "random", "gpu_models": {}, "switches": [], "gpus": []}
    if rng.random() < 0.4:
        spec["price_per_hour_usd"] = rng.choice([1.0, 3.7, 27.4])
    spec["sockets"] = [
        {"id": f"cpu{s}", "memory_gib": rng.choice([16, 64, 512]), "memory_gbps": rng.choice([20, 100, 200])}
        for s in range(sockets)
    ]
    links = []
    for w in range(switches):
        spec["switches"].append({"id": f"sw{w}", "kind": "pcie"})
        up = rng.choice([4, 12.5, 25, 50])
        links.append({"a": f"cpu{rng.randrange(sockets)}", "b": f"sw{w}", "kind": "pcie", "gbps": up})
    mixed, base = rng.random() < 0.5, rng.choice(sorted(GPU_MODELS))
    for g in range(n):
        kind = rng.choice(sorted(GPU_MODELS)) if mixed else base
        spec["gpu_models"][kind] = GPU_MODELS[kind]
        spec["gpus"].append({"id": f"g{g}", "model": kind})
        above = rng.choice([f"cpu{rng.randrange(sockets)}"] + [f"sw{w}" for w in range(switches)])
        gbps = rng.choice([2, 8, 12.5, 25, 55])
        back = rng.choice([gbps, gbps * 0.8, gbps * 1.2])
        links.append({"a": above, "b": f"g{g}", "kind": "pcie", "gbps": gbps, "gbps_back": back, "latency_us": 1})
    if n >= 2 and rng.random() < 0.5:
        spec["switches"].append({"id": "nvs", "kind": "nvswitch"})
        for g in rng.sample(range(n), rng.randint(2, n)):
            links.append({"a": f"g{g}", "b": "nvs", "kind": "nvlink", "gbps": rng.choice([100, 200, 370])})
    if sockets == 2:
        links.append({"a": "cpu0", "b": "cpu1", "kind": "socket", "gbps": 64, "latency_us": 0.05})
    spec["links"] = links
    if rng.random() < 0.35:
        spec["nodes"] = rng.randint(2, 4)
        spec["network"] = {"gbps": 25, "latency_us": 5, "step_cv": rng.choice([0, 0.02, 0.1])}
    return spec


def cpu_machine(rng: random.Random) -> dict:
    """cpu-local with 1 to 4 CPU ranks behind uneven links, maybe several nodes or little memory."""
    spec = yaml.safe_load(resolve_topology_path("cpu-local").read_text())
    n = rng.randint(1, 4)
    spec["name"] = "random-cpu"
    spec["gpus"] = [{"id": f"rank{i}", "model": "cpu-rank"} for i in range(n)]
    spec["links"] = [
        {"a": "cpu0", "b": f"rank{i}", "kind": "memory", "gbps": rng.choice([4, 8.32, 4.16 + i]), "latency_us": 5}
        for i in range(n)
    ]
    if rng.random() < 0.3:
        spec["nodes"] = rng.randint(2, 3)
        spec["network"] = {"gbps": 10, "latency_us": 50, "step_cv": rng.choice([0, 0.05])}
    if rng.random() < 0.3:
        spec["gpu_models"]["cpu-rank"]["memory_gib"] = rng.choice([0.5, 2])
    return spec


def pins(rng: random.Random, machine: Machine, batch: int, layers: int) -> Pins:
    if rng.random() < 0.5:
        return Pins()
    picks = {
        "perturbation": lambda: rng.choice([1, 2]),
        "data": lambda: rng.randint(1, len(machine.gpus)),
        "slices": lambda: rng.choice([1, 2, 4, 6, 8]),
        "micro_batch": lambda: rng.choice([d for d in range(1, batch + 1) if batch % d == 0]),
        "prefetch": lambda: rng.randint(1, min(3, layers)),
        "resident": lambda: rng.randint(0, layers),
        "upload": lambda: rng.choice(["whole", "sliced"]),
        "movers": lambda: rng.choice(["compute", "all"]),
        "wire_dtype": lambda: rng.choice(["fp32", "bf16", "fp16"]),
    }
    return Pins(**{name: pick() for name, pick in picks.items() if rng.random() < 0.25})


def one(seed: int, tuning_kind: str, limit_s: int) -> tuple[str, list]:
    rng = random.Random(seed)
    where = rng.random()
    if where < 0.3:
        machine = load_topology(rng.choice(BUNDLED))
    elif where < 0.38 and FIXTURES:
        machine = load_topology(str(rng.choice(FIXTURES)))
    elif where < 0.5:
        machine = Machine(TopologySpec.model_validate(cpu_machine(rng)), "random-cpu")
    else:
        machine = Machine(TopologySpec.model_validate(gpu_machine(rng)), "random")
    shape, batch = model(rng), rng.choice([1, 2, 3, 4, 6, 8, 12, 16])
    draw = {"full": 0.0, "adapter": 0.7 + 0.3 * rng.random()}.get(tuning_kind, rng.random())
    if draw < 0.7:
        tuning = Tuning()
    elif draw < 0.85:
        tuning = Tuning(method="lora", lora_rank=rng.choice([1, 8, 64]))
    else:
        tuning = Tuning(method="prefix", prefix_tokens=rng.choice([1, 5, 20]))
    work = Workload(shape, batch, rng.choice([16, 32, 64, 128, 256, 512]), tuning)
    objective, dtype = rng.choice(["time", "cost"]), rng.choice(["bf16", "fp16", "fp32"])
    pinned, top = pins(rng, machine, batch, shape.layers), rng.choice([1, 2, 3, 5])
    before = signal.signal(signal.SIGALRM, _late)
    signal.alarm(limit_s)
    try:
        fast = search(machine, work, pins=pinned, objective=objective, param_dtype=dtype, top=top)
        full = search(machine, work, pins=pinned, objective=objective, param_dtype=dtype, top=top, exhaustive=True)
    except ZoplanError:
        return "refused", []
    except _Late:
        return "over the limit", []
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)

    def value(cand) -> float:  # type: ignore[no-untyped-def]
        return _objective(machine, work, cand.layout, cand.step_time_s, objective)

    def apart(a: float, b: float) -> bool:
        return abs(a - b) > 1e-9 * max(abs(a), abs(b), 1e-300)

    wrong = []
    if apart(value(fast.best), value(full.best)):
        wrong.append(["best", value(fast.best), value(full.best)])
    shown, exact = top_families(fast.ranked, top), top_families(full.ranked, top)
    for cand in shown:
        best_of_family = min(value(c) for c in full.ranked if family(c.layout) == family(cand.layout))
        if apart(value(cand), best_of_family):
            wrong.append(["family row", list(family(cand.layout)), value(cand), best_of_family])
    if [value(c) for c in shown] != [value(c) for c in exact] and any(
        apart(value(a), value(b)) for a, b in zip(shown, exact)
    ):
        wrong.append(["rows", [value(c) for c in shown], [value(c) for c in exact]])
    above = [c for c in full.ranked if c.bound.prune_bound_s > c.step_time_s * (1 + 1e-9)]
    if above:
        wrong.append(
            ["bound above its step", above[0].bound.prune_bound_s, above[0].step_time_s, repr(above[0].layout)]
        )
    return ("bad" if wrong else "same"), wrong


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first", type=int, default=0, help="the first case's seed")
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--tuning", choices=["any", "full", "adapter"], default="any")
    parser.add_argument("--limit", type=int, default=20, help="seconds a case may take")
    parser.add_argument("--budget", type=float, default=600, help="seconds for all the cases")
    opts = parser.parse_args()
    counts: dict[str, int] = {}
    started = time.perf_counter()
    print(f"{time.strftime('%Y-%m-%d %H:%M')} seeds {opts.first}.., tuning {opts.tuning}", flush=True)
    for seed in range(opts.first, opts.first + opts.cases):
        if time.perf_counter() - started > opts.budget:
            print(f"budget spent after seed {seed - 1}", flush=True)
            break
        status, wrong = one(seed, opts.tuning, opts.limit)
        counts[status] = counts.get(status, 0) + 1
        if wrong:
            print(f"seed {seed}: {json.dumps(wrong, default=str)[:600]}", flush=True)
    print(f"{sum(counts.values())} cases in {time.perf_counter() - started:.0f} s: {counts}", flush=True)
    raise SystemExit(1 if counts.get("bad") else 0)


if __name__ == "__main__":
    main()
