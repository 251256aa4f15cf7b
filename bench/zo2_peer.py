"""ZO2 (github.com/liangyuwang/zo2) as a peer to measure against, run in a process of its own.

ZO2 is never a dependency of zoplan and never imported by it: a benchmark passes the path of a
ZO2 checkout, and ZO2 runs with the transformers it was written for (4.51.3; it patches that era's
internals), in either of two ways:
- ``python``: a Python of its own environment (``pip install torch transformers==4.51.3``);
- ``site``: a folder that holds transformers 4.51.3 and the versions it requires, put before this
  Python's own packages. A machine that reaches no package registry (a lent GPU machine) gets it
  so: carry the wheels (``python -m bench.zo2_peer --wheels .whl/zo2`` downloads them here), then
  ``pip install --no-index --no-deps --target SITE .whl/zo2/*.whl`` there (bench/gpu_checks.sh).

A step is one ``model(input_ids=..., labels=...)`` call after ``zo_train()``: ZO2's whole MeZO-SGD
step (two perturbed forwards and the update). ``offload``: its ZO2 schedule (blocks kept in host
memory and streamed through the GPU on CUDA streams; needs CUDA), else its ``zo`` mode (the model
on ``device``, plain MeZO-SGD).

    python -m bench.zo2_peer --wheels DIR      # transformers 4.51.3 and what it requires, as wheels
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# what transformers 4.51.3 requires in versions a newer environment may not have: pure-Python or
# abi3 wheels, so one download serves any CPython 3.9+ on x86-64 Linux
WHEELS = ("transformers==4.51.3", "tokenizers>=0.21,<0.22", "huggingface-hub>=0.30,<1.0")

# runs in ZO2's environment (no zoplan there); argv[1]: the settings, as JSON
STEP = r"""
import json, sys, time
cfg = json.loads(sys.argv[1])
sys.path.insert(0, cfg["zo2"])
import torch, transformers
from zo2 import ZOConfig
from zo2.model.huggingface.opt.mezo_sgd import zo, zo2
torch.set_num_threads(cfg["threads"])
impl = zo2 if cfg["offload"] else zo
model = impl.OPTForCausalLM.from_pretrained(cfg["model"], torch_dtype=getattr(torch, cfg["dtype"]))
if not cfg["offload"]:
    model = model.to(cfg["device"])
model.zo_init(ZOConfig(method="mezo-sgd", zo2=cfg["offload"], working_device=cfg["device"],
                       offloading_device="cpu", lr=cfg["lr"], eps=cfg["eps"], weight_decay=0.0))
model.zo_train()
batches = json.load(open(cfg["batches"]))
cuda = cfg["device"].startswith("cuda")
times = []
for step in range(cfg["steps"]):
    ids = torch.tensor(batches[step % len(batches)], device=cfg["device"])
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    model(input_ids=ids, labels=ids)
    if cuda:
        torch.cuda.synchronize()
    times.append(time.perf_counter() - t)
print(json.dumps({"times": times, "torch": torch.__version__, "transformers": transformers.__version__}))
"""


def step_times(
    zo2: Path,
    model_dir: Path,
    batches: Path,
    *,
    steps: int,
    lr: float,
    eps: float,
    threads: int = 1,
    device: str = "cpu",
    offload: bool = False,
    dtype: str = "float32",
    python: str | None = None,
    site: Path | None = None,
) -> dict[str, object]:
    """ZO2's step times (s) over ``steps`` steps of the token-id batches in ``batches`` (a JSON list
    of batches, each a list of rows), with the torch and transformers versions it ran with."""
    cfg = dict(
        zo2=str(Path(zo2).resolve()),
        model=str(model_dir),
        batches=str(batches),
        steps=steps,
        lr=lr,
        eps=eps,
        threads=threads,
        device=device,
        offload=offload,
        dtype=dtype,
    )
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if site is not None:  # before this Python's own packages, ahead of anything else on the path
        env["PYTHONPATH"] = os.pathsep.join([str(Path(site).resolve()), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run(
        [python or sys.executable, "-c", STEP, json.dumps(cfg)], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(f"ZO2 failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def token_batches(model: Path, data: Path, path: Path, batch: int, seq: int, count: int = 8) -> Path:
    """The token ids of the first ``count`` batches zoplan reads from ``data`` (a JSON list of
    batches), for a peer that takes ids: the same tokens, so the same work."""
    from transformers import AutoTokenizer

    from zoplan.runtime import data as zdata

    tok = AutoTokenizer.from_pretrained(model)
    examples, kind = zdata.load_examples(str(data))
    task = zdata.task_of(kind, "{text}", ("a", "b"))
    ids = [
        zdata.encode(zdata.batches(examples, batch, 0, step, 0, 1), tok, task, seq).input_ids.tolist()
        for step in range(count)
    ]
    path.write_text(json.dumps(ids))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", type=Path, required=True, help="download ZO2's transformers and its needs here")
    opts = parser.parse_args()
    opts.wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(opts.wheels)]
    cmd += ["--platform", "manylinux2014_x86_64", "--python-version", "3.11", *WHEELS]
    subprocess.run(cmd, check=True)
    print(f"wheels in {opts.wheels}: {', '.join(sorted(p.name for p in opts.wheels.glob('*.whl')))}")


if __name__ == "__main__":
    main()
