"""Layout independence, replay and two machines: real `zoplan run`s under torchrun with gloo.

Every layout trains the same model on the same global batches with the same seeds, so the weights
after a few steps must agree. They agree up to float summation order only: replicas add their
loss sums in a different order than one process does, and examples padded in shards of
different lengths go through matrix products of different shapes. Hence rtol 1e-5, atol 1e-6 on
weights of order 0.02-1 (a real layout bug moves them by far more: an update is ~lr*g ~ 1e-4).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from zoplan.planfile import load_plan, write_plan
from zoplan.planner import plan
from zoplan.program import Stream, build
from zoplan import runconfig
from zoplan.runconfig import make
from zoplan.runtime.launch import run
from zoplan.search import Pins
from zoplan.topology import resolve_topology_path
from zoplan.tuning import FULL, Tuning
from zoplan.runtime.checkpoint import dtype_kwarg

STEPS = 3
LR = 1e-3
BATCH = 8


def cpu_topology(tmp: Path, ranks: int, nodes: int = 1) -> Path:
    """cpu-local with ``ranks`` CPU ranks per node (ranks may outnumber cores in tests)."""
    spec = yaml.safe_load(resolve_topology_path("cpu-local").read_text())
    spec["name"] = f"cpu-{ranks}x{nodes}"
    spec["gpus"] = [{"id": f"rank{i}", "model": "cpu-rank"} for i in range(ranks)]
    spec["links"] = [
        {"a": "cpu0", "b": f"rank{i}", "kind": "memory", "gbps": 8.3, "latency_us": 5} for i in range(ranks)
    ]
    if nodes > 1:
        spec.update(nodes=nodes, network={"gbps": 1, "latency_us": 50})
    path = tmp / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def planned(tmp: Path, model_dir: Path, topology: Path, name: str, tuning: Tuning = FULL, **pins) -> Path:
    report = plan(
        str(model_dir / "config.json"),
        str(topology),
        global_batch=BATCH,
        seq_len=32,
        dtype="fp32",
        # exact master weights in every layout; the same micro-batches (the sums of the
        # losses in the same order, so the same projected gradient to the bit)
        pins=Pins(**{"wire_dtype": "fp32", "micro_batch": 2, **pins}),
        tuning=tuning,
    )
    path = tmp / f"{name}.yaml"
    write_plan(report.plan.model_copy(update={"zo": report.plan.zo.model_copy(update={"lr": LR, "seed": 3})}), path)
    return path


def train(plan_path: Path, model_dir: Path, out: Path, steps: int = STEPS, **extra) -> dict[str, torch.Tensor]:
    run(make(plan=plan_path, model=str(model_dir), steps=steps, output=out, quiet=True, **extra))
    return load_file(str(out / "model" / "model.safetensors"))


def assert_ran_its_program(plan_path: Path, out: Path) -> None:
    """Every rank ran, on each stream, the ops of its step program in the program's order: the
    measured spans of every step after the first (which has no update to apply yet) carry the same
    op ids, in the same order, as ``zoplan.program`` lists them. The host work (the next batch at
    the start of a step, the journal line at its end) is the program's one host op."""
    the_plan = load_plan(plan_path)
    layout = the_plan.to_layout()
    program = build(
        layout, layers=the_plan.model_shape().layers, block_params=1, frozen=the_plan.tuning.to_tuning().frozen_base
    )
    files = sorted(out.glob("spans-rank*.jsonl"))
    assert len(files) == len(layout.gpus) * layout.nodes
    for f in files:
        gpu = layout.gpus[int(f.stem.removeprefix("spans-rank")) % len(layout.gpus)]
        rows = [json.loads(line) for line in f.read_text().splitlines()]
        steady = [r for r in rows if r["step"] >= 1 and "spans" in r]
        assert len(steady) == STEPS - 1, f.name
        for row in steady:
            for stream in Stream:
                measured = [label for s, _cat, label, *_ in row["spans"] if s == stream.value and label != "host"]
                want = [i for i in program.stream_ids(gpu, stream) if i != "host"]
                assert measured == want, (f.name, row["step"], stream.value)
            host = [label for s, _cat, label, *_ in row["spans"] if label == "host"]
            assert bool(host) == (gpu in layout.compute_gpus), (f.name, host)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", ["tiny-opt", "tiny-llama"])
def test_every_layout_trains_the_same_weights(family: str, tiny_dirs, tmp_path: Path) -> None:
    model_dir = tiny_dirs[family]
    four = cpu_topology(tmp_path, 4)
    base_plan = planned(
        tmp_path, model_dir, four, "1x1", perturbation=1, data=1, gpus=("rank0",), upload="whole", resident=0
    )
    base = train(base_plan, model_dir, tmp_path / "1x1")
    assert_ran_its_program(base_plan, tmp_path / "1x1")
    # a rank alone on the machine computes on every core it may use; 4 ranks on it share them
    cores = len(os.sched_getaffinity(0))
    assert f"on cpu ({cores} threads)" in (tmp_path / "1x1" / "worker-node0.log").read_text()
    initial = load_file(str(model_dir / "model.safetensors"))
    moved = [n for n in base if n in initial and not torch.equal(base[n], initial[n])]
    assert moved, "training changed no weight"
    layouts = {
        "2x1-sliced4-prefetch2": dict(
            perturbation=2, data=1, upload="sliced", movers="compute", slices=4, resident=0, prefetch=2
        ),
        "1x2-whole-resident": dict(perturbation=1, data=2, upload="whole", resident=2, prefetch=2),
        "2x2-sliced4-resident": dict(
            perturbation=2, data=2, upload="sliced", movers="compute", slices=4, resident=2, prefetch=1
        ),
        # the relay keeps a shard of the resident block too, and all-gathers it with the compute rank
        "1x1-relay": dict(perturbation=1, data=1, gpus=("rank0",), upload="sliced", movers="all", slices=4, resident=1),
    }
    for name, pins in layouts.items():
        topo = cpu_topology(tmp_path, 2) if name == "1x1-relay" else four
        plan_path = planned(tmp_path, model_dir, topo, name, **pins)
        assert_same_weights(base, train(plan_path, model_dir, tmp_path / name))
        # the runtime ran the step program the simulator times, op by op
        assert_ran_its_program(plan_path, tmp_path / name)
    # what each rank keeps on its device: with sliced uploads a shard (1/4 of each resident block
    # among 4 movers), with whole-block uploads whole blocks; and the plan's prefetch depth
    block = sum(t.numel() for n, t in initial.items() if ".layers.0." in n)
    kept = {
        name: [
            int(x)
            for x in re.findall(
                r"resident blocks \[[\d, ]*\] holding (\d+) elements",
                (tmp_path / name / "worker-node0.log").read_text(),
            )
        ]
        for name in ("1x2-whole-resident", "2x2-sliced4-resident", "1x1-relay")
    }
    assert kept["1x2-whole-resident"] == [2 * block] * 2
    assert kept["2x2-sliced4-resident"] == [2 * -(-block // 4)] * 4
    assert kept["1x1-relay"] == [2 * -(-block // 4)] * 2  # 4 slices, 2 each
    log = (tmp_path / "2x1-sliced4-prefetch2" / "worker-node0.log").read_text()
    assert log.count("prefetch 2,") == 2


def test_replaying_the_journal_gives_the_trained_weights(tiny_dirs, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from zoplan.runtime.journal import read_journal
    from zoplan.runtime.replay import replay

    model_dir = tiny_dirs["tiny-opt"]
    two = cpu_topology(tmp_path, 2)
    plan_path = planned(
        tmp_path,
        model_dir,
        two,
        "2x1",
        perturbation=2,
        data=1,
        upload="sliced",
        movers="compute",
        slices=2,
        micro_batch=8,
    )  # one micro-batch per rank
    trained = train(plan_path, model_dir, tmp_path / "run")
    assert_ran_its_program(plan_path, tmp_path / "run")
    model = AutoModelForCausalLM.from_pretrained(model_dir, **dtype_kwarg(torch.float32))
    replay(model, read_journal(tmp_path / "run" / "journal.jsonl"))
    replayed = {n: p.detach() for n, p in model.named_parameters()}
    for name, value in trained.items():
        assert torch.equal(replayed[name], value), name  # bit-identical on the device that trained

    # the command: base weights + journal -> a from_pretrained directory, dtype from plan.yaml
    from zoplan.runtime.replay import replay_to

    assert replay_to(str(model_dir), tmp_path / "run" / "journal.jsonl", tmp_path / "replayed") == STEPS
    rebuilt = load_file(str(tmp_path / "replayed" / "model.safetensors"))
    for name, value in trained.items():
        assert torch.equal(rebuilt[name], value), name

    # a torn last line (power loss mid-write) is dropped; the steps before it still replay
    torn = tmp_path / "torn.jsonl"
    lines = (tmp_path / "run" / "journal.jsonl").read_text().splitlines()
    torn.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    assert [r["step"] for r in read_journal(torn)] == list(range(STEPS - 1))


def test_replay_applies_a_zero_gradient_steps_weight_decay_but_not_a_skipped_step() -> None:
    """The engine applies a finite step whose projected gradient is exactly 0 (its weight decay
    still moves the weight matrices); a skipped step (non-finite losses) changes nothing."""
    from zoplan.runtime.journal import journal_row
    from zoplan.runtime.replay import replay

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    row = {"step": 0, "seed": 5, "projected_grad": 0.0, "lr": 0.1, "weight_decay": 0.5}
    replay(model, [journal_row({**row, "skipped": True})])
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())
    replay(model, [journal_row({**row, "skipped": False})])
    # with g = 0 the update is w - lr * (0 * z + wd * w), in float32: only the weight matrix decays;
    # the bias and the LayerNorm's weight and bias stay as they were
    after = {n: p.detach() for n, p in model.named_parameters()}
    assert torch.equal(after["0.weight"], base["0.weight"] - (base["0.weight"] * 0.5) * 0.1)
    assert not torch.equal(after["0.weight"], base["0.weight"])
    for name in ("0.bias", "1.weight", "1.bias"):
        assert torch.equal(after[name], base[name]), name
    # a journal without the field (older runs): a zero gradient counts as skipped
    assert journal_row(row)["skipped"] is True and journal_row({**row, "projected_grad": 1.0})["skipped"] is False


def start_two_nodes(
    tmp_path: Path,
    model_dir: Path,
    outs: list[Path],
    port: int,
    steps: tuple[int, int],
    *extra: str,
    nodes: tuple[int, ...] = (0, 1),
    env: dict[str, str] | None = None,
    cwds: list[Path] | None = None,
    node1_extra: tuple[str, ...] = (),
) -> list[subprocess.Popen]:
    """`zoplan run` of a one-rank-per-node plan as two 'machines' on 127.0.0.1, node k with steps[k]
    (``nodes``: the ones started)."""
    two_nodes = planned(
        tmp_path, model_dir, cpu_topology(tmp_path, 1, nodes=2), "1x1x2", perturbation=1, data=1, upload="whole"
    )
    return [
        subprocess.Popen(
            [sys.executable, "-m", "zoplan.cli", "run", str(two_nodes), "--model", str(model_dir)]
            + ["--steps", str(steps[k]), "--output", str(outs[k]), "--nnodes", "2", "--node-rank", str(k)]
            + ["--master-port", str(port), *extra, *(node1_extra if k == 1 else ())],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=None if env is None else {**os.environ, **env},
            cwd=None if cwds is None else cwds[k],
        )
        for k in nodes
    ]


def test_a_node_alone_says_it_waits_and_stopped_before_the_nodes_meet_keeps_nothing(tiny_dirs, tmp_path: Path) -> None:
    """A node whose peers never came waited in silence, and once stopped left a directory the same
    command then refused ("not empty") with a fix that resumed a run of no step."""
    outs = [tmp_path / "node0", tmp_path / "node1"]
    (proc,) = start_two_nodes(
        tmp_path, tiny_dirs["tiny-opt"], outs, 29741, (2, 2), nodes=(0,), env={"ZOPLAN_NODES_NOTE_AFTER_S": "1"}
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while not any("waiting for the other node" in line for line in lines) and time.monotonic() < deadline:
        assert proc.poll() is None, lines
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    reader.join(timeout=10)
    text = "".join(lines)
    assert "node 0 of 2: waiting for the other node(s)" in text and "--node-rank 1" in text, text
    assert proc.returncode == 128 + signal.SIGTERM, text
    assert "stopped by SIGTERM while waiting for the other node(s)" in text and "run the same command again" in text
    assert not outs[0].exists()  # the same command starts it again


def test_two_machines_match_one(tiny_dirs, tmp_path: Path) -> None:
    """Two torchrun 'machines' on 127.0.0.1, each with its own host copy, one replica each; stopped
    after a snapshot and resumed, as machines that share no disk: each node works in its own
    folder (``-o out`` relative to it), and a resumed node read the snapshot path node 0 had sent,
    which on another machine is not there."""
    model_dir = tiny_dirs["tiny-opt"]
    one = train(
        planned(tmp_path, model_dir, cpu_topology(tmp_path, 2), "1x2", perturbation=1, data=2, upload="whole"),
        model_dir,
        tmp_path / "one",
    )
    machines = [tmp_path / "machine0", tmp_path / "machine1"]
    for m in machines:
        m.mkdir()
    outs = [Path("out"), Path("out")]
    procs = start_two_nodes(
        tmp_path, model_dir, outs, 29731, (STEPS - 1, STEPS - 1), "--snapshot-every", "1", cwds=machines
    )
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    # every node keeps its own snapshots
    assert all((m / "out" / "snapshots" / f"step-{STEPS - 2:08d}").is_dir() for m in machines), logs
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "zoplan.cli", "run", "--resume", "out", "--steps", str(STEPS)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=m,
        )
        for m in machines
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert f"snapshot step-{STEPS - 2:08d} + 1 journal step(s) replayed" in logs[0], logs[0]
    assert_same_weights(one, load_file(str(machines[0] / "out" / "model" / "model.safetensors")))
    # node 1 has no journal or model of its own: it says it is done and where they are
    assert f"node 1 of 2: done ({STEPS} steps)" in logs[1] and "node 0's output directory" in logs[1], logs[1]


def test_a_node_whose_peer_went_away_says_so(tiny_dirs, tmp_path: Path) -> None:
    """Node 1 killed mid-run: node 0 said "a rank exited without a message" and offered
    --max-restarts (which covers one machine); it now says it lost another node, and that every
    node resumes."""
    outs = [tmp_path / "node0", tmp_path / "node1"]
    procs = start_two_nodes(tmp_path, tiny_dirs["tiny-opt"], outs, 29751, (400, 400))
    journal = outs[0] / "journal.jsonl"
    deadline = time.monotonic() + 180
    while not (journal.exists() and journal.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        assert procs[0].poll() is None, procs[0].communicate()[0]
        time.sleep(0.2)
    procs[1].kill()  # the machine went away: its torchrun and ranks stop with its launcher
    said = procs[0].communicate(timeout=180)[0]
    procs[1].communicate(timeout=60)
    # the killed launcher's host copy and temporary folder, which the next launch would sweep:
    # the tests leave none
    import tempfile

    from zoplan.runtime.scratch import abandoned, shared_memory

    deadline = time.monotonic() + 30
    for left in [
        p for base in (shared_memory(), Path(tempfile.gettempdir())) for p in base.glob("zoplan-*29751-*-node1")
    ]:
        while not abandoned(left) and time.monotonic() < deadline:  # (its ranks still stopping)
            time.sleep(0.2)
        shutil.rmtree(left, ignore_errors=True)
    assert procs[0].returncode == 2, said
    assert "this node lost its connection to another node of the run" in said, said
    assert "the same on every other node with its own directory" in said and "--max-restarts" not in said, said


def test_nodes_started_otherwise_refuse_together_before_a_step(tiny_dirs, tmp_path: Path) -> None:
    """Nodes given another --steps waited at a collective the other never reached (10 minutes),
    and nodes given another seed, data or model trained on, exit 0: every node now says which
    setting differs, none takes a step, and each removes what it wrote (the corrected commands were
    refused: "output directory ... is not empty")."""
    model_dir = tiny_dirs["tiny-opt"]
    outs = [tmp_path / "node0", tmp_path / "node1"]
    # (node 1 also evaluates every step: a node that evaluates or snapshots at other steps waited
    # at a collective too)
    procs = start_two_nodes(
        tmp_path,
        model_dir,
        outs,
        29733,
        (STEPS, STEPS + 2),
        "--max-restarts",
        "0",
        node1_extra=("--eval-every", "1"),
    )
    try:
        logs = [p.communicate(timeout=180)[0] for p in procs]
    finally:  # (they waited at a collective for 10 minutes: nothing is left waiting after the test)
        for p in procs:
            if p.poll() is None:
                p.kill()  # its ranks die with it (test_resume.py)
    assert [p.returncode for p in procs] == [2, 2], logs
    said = f"node 1 was started otherwise than node 0: --steps {STEPS + 2} (node 0: {STEPS}), --eval-every 1 (node 0: "
    assert all(said in log for log in logs), logs
    assert not any((out / "journal.jsonl").exists() and (out / "journal.jsonl").read_text() for out in outs)
    # refused before the nodes met: what each wrote is removed, so the same commands, corrected, run
    # again (they were refused as "not empty")
    assert not any((out / "run.json").exists() or (out / "plan.yaml").exists() for out in outs), [
        sorted(p.name for p in out.iterdir()) for out in outs if out.exists()
    ]


def test_replay_is_bit_identical_when_the_host_copy_is_narrower_than_the_compute_dtype(
    tiny_dirs, tmp_path: Path
) -> None:
    """bf16 blocks in the host copy, fp32 compute: the blocks' updates are rounded to bf16 when they
    are written back, the embeddings and final norm stay fp32 on the devices, and the model is
    written in fp32. `zoplan replay` keeps each where the run kept it and gives the same bits."""
    from zoplan.runtime.replay import replay_to

    model_dir = tiny_dirs["tiny-llama"]
    two = cpu_topology(tmp_path, 2)
    for resident in (0, 2):  # streamed blocks (rounded every step), and two kept on the devices (at the end)
        name = f"bf16-wire-resident{resident}"
        plan_path = planned(
            tmp_path,
            model_dir,
            two,
            name,
            perturbation=2,
            data=1,
            upload="sliced",
            movers="compute",
            slices=2,
            wire_dtype="bf16",
            resident=resident,
        )
        assert len(load_plan(plan_path).resident_blocks) == resident
        trained = train(plan_path, model_dir, tmp_path / name)
        assert replay_to(str(model_dir), tmp_path / name / "journal.jsonl", tmp_path / f"{name}-replayed") == STEPS
        rebuilt = load_file(str(tmp_path / f"{name}-replayed" / "model.safetensors"))
        assert {v.dtype for v in trained.values()} == {torch.float32}
        for key, value in trained.items():
            assert rebuilt[key].dtype == torch.float32, key
            assert torch.equal(rebuilt[key], value), (resident, key)
        assert any("layers" not in key for key in trained)  # the parameters outside the blocks too


def test_the_final_evaluation_is_of_the_weights_written_when_resident_blocks_are_rounded(
    tiny_dirs, tmp_path: Path
) -> None:
    """A bf16 host copy and resident blocks kept in fp32: the final evaluation ran on the fp32
    blocks, then they were rounded into the host copy and written: the closing "held-out" figures
    (exit 0) were not those of the saved model. A run started from the saved model evaluates, before
    its first step, exactly what the first run said last."""
    model_dir = tiny_dirs["tiny-llama"]
    two = cpu_topology(tmp_path, 2)
    pins = dict(perturbation=2, data=1, upload="whole", wire_dtype="bf16", resident=2)
    plan_path = planned(tmp_path, model_dir, two, "rounded", **pins)
    assert len(load_plan(plan_path).resident_blocks) == 2
    train(plan_path, model_dir, tmp_path / "first")

    def evaluations(out: Path) -> list[tuple[int, float, float]]:
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["eval_loss"], r["eval_accuracy"]) for r in rows if "eval_loss" in r]

    first = evaluations(tmp_path / "first")
    assert first[0][0] == -1 and first[-1][0] == STEPS - 1
    train(plan_path, tmp_path / "first" / "model", tmp_path / "again", steps=1)
    again = evaluations(tmp_path / "again")
    assert again[0][0] == -1 and again[0][1:] == first[-1][1:], (first, again)


def test_uneven_shares_move_each_movers_part_and_train_the_same_weights(tiny_dirs, tmp_path: Path) -> None:
    """Each mover uploads (and keeps of a resident block) its share of every round; the block it
    assembles, hence the weights, are bit for bit those of the even split."""
    model_dir = tiny_dirs["tiny-opt"]
    two = cpu_topology(tmp_path, 2)
    pins = dict(perturbation=1, data=1, gpus=("rank0",), upload="sliced", movers="all", slices=4, resident=1)
    even = planned(tmp_path, model_dir, two, "even", **pins)
    base = train(even, model_dir, tmp_path / "even")
    the_plan = load_plan(even)
    uneven = tmp_path / "uneven.yaml"
    write_plan(
        the_plan.model_copy(update={"transfer": the_plan.transfer.model_copy(update={"shares": [3, 1]})}), uneven
    )
    assert load_plan(uneven).to_layout().shares == (3, 1)
    trained = train(uneven, model_dir, tmp_path / "uneven")
    assert trained.keys() == base.keys() and all(torch.equal(trained[n], base[n]) for n in base)
    assert_ran_its_program(uneven, tmp_path / "uneven")
    # the resident block's shard on each rank: 3/4 and 1/4 of each of its 2 rounds
    initial = load_file(str(model_dir / "model.safetensors"))
    block = sum(t.numel() for n, t in initial.items() if ".layers.0." in n)
    rounds, size = 2, -(-block // 4) * 2  # padded to 4 slices, 2 rounds of 2 slices
    held = [
        int(x)
        for x in re.findall(
            r"resident blocks \[[\d, ]*\] holding (\d+) elements",
            (tmp_path / "uneven" / "worker-node0.log").read_text(),
        )
    ]
    assert sorted(held) == sorted([rounds * (size * 3 // 4), rounds * (size - size * 3 // 4)])


def test_a_nodes_directory_resumed_as_another_node_is_refused(tiny_dirs, tmp_path: Path) -> None:
    """Node 1's directory resumed with --node-rank 0 trained every step again from the base weights
    (its directory holds no journal), warning that its snapshots were removed; node 0's resumed as
    node 1 left its journal unread."""
    model_dir = tiny_dirs["tiny-opt"]
    two_nodes = planned(
        tmp_path, model_dir, cpu_topology(tmp_path, 1, nodes=2), "1x1x2", perturbation=1, data=1, upload="whole"
    )
    node1 = tmp_path / "node1"
    node1.mkdir()
    (node1 / "plan.yaml").write_text(two_nodes.read_text())
    cfg = make(plan=two_nodes, model=str(model_dir), steps=4, output=node1, nnodes=2, node_rank=1, master_port=29761)
    runconfig.write(cfg, node1)
    # with a snapshot and no journal (node 0 keeps it): it said node 1's journal was gone, and
    # offered to make an empty one, before it named the swap
    (node1 / "snapshots" / "step-2").mkdir(parents=True)
    before = (node1 / runconfig.CONFIG_FILE).read_bytes()
    said = subprocess.run(
        [sys.executable, "-m", "zoplan.cli", "run", "--resume", str(node1), "--node-rank", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert said.returncode == 2, said.stdout + said.stderr
    assert f"{node1} is node 1's output directory of its run" in said.stderr and "--node-rank 1" in said.stderr
    assert (node1 / runconfig.CONFIG_FILE).read_bytes() == before  # its record as it was


def test_a_resume_its_ranks_refuse_leaves_the_runs_record_as_it_was(tmp_path: Path, monkeypatch) -> None:
    """The options a resume is given are written into run.json for its ranks to read; ranks that
    refused them (another node's --steps) left them there, and the next resume without them was
    refused for values the user had not typed that time."""
    from zoplan.errors import Refused
    from zoplan.runtime import launch

    out = tmp_path / "run"
    out.mkdir()
    cfg = make(model="tiny-opt", steps=4, output=out)
    runconfig.write(cfg, out)
    before = (out / runconfig.CONFIG_FILE).read_bytes()

    def refused(cfg, resume):
        runconfig.write(cfg.given(steps=9), out)  # what a resume writes before its ranks start
        raise Refused("node 1 was started otherwise than node 0: --steps 9 (node 0: 4)")

    monkeypatch.setattr(launch, "_run", refused)
    with pytest.raises(Refused):
        launch.run(cfg, resume=True)
    assert (out / runconfig.CONFIG_FILE).read_bytes() == before


def test_a_new_run_refused_for_its_scratch_folder_keeps_nothing(tmp_path: Path, monkeypatch) -> None:
    """A second launch of a node on a port in use was refused ("... exists: another zoplan launch
    is using it") after writing plan.yaml and run.json: the same command, once the port was free,
    was refused again ("not empty")."""
    from zoplan.errors import Refused, ZoplanError
    from zoplan.runtime import launch

    def busy(base, name):
        raise ZoplanError(f"{base / name} exists: another zoplan launch is using it")

    monkeypatch.setattr(launch, "owned", busy)
    out = tmp_path / "run"
    with pytest.raises(Refused, match="another zoplan launch is using it"):
        launch.run(make(model="tiny-opt", steps=2, output=out))
    assert not out.exists()


def test_nodes_planned_with_another_seed_or_lr_are_named_by_it(tiny_dirs, tmp_path: Path, monkeypatch) -> None:
    """Without a plan file each node plans from its options: a node given --seed 2 (node 0: 1) was
    said to differ in "the plan", the setting unnamed."""
    from zoplan.errors import ZoplanError
    from zoplan.runtime import worker

    plan_path = planned(tmp_path, tiny_dirs["tiny-opt"], cpu_topology(tmp_path, 2), "p")
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(plan_path, out / "plan.yaml")
    cfg = make(plan=plan_path, model=str(tiny_dirs["tiny-opt"]), output=out)

    def gather(mine):  # node 1 planned with another seed and lr
        node, (agreed, sections) = mine
        other = {k: dict(v) if isinstance(v, dict) else v for k, v in sections.items()}
        other["zo"].update(seed=2, lr=0.5)
        return [mine, (1, ({**agreed, "plan": "another"}, other))]

    monkeypatch.setattr(worker.zdist, "gather_objects", gather)
    with pytest.raises(ZoplanError) as said:
        worker.check_nodes_agree(cfg, out)
    seed = worker.load_plan(out / "plan.yaml").zo.seed
    assert "the plan's zo.lr 0.5 (node 0: " in said.value.message, said.value.message
    assert f"the plan's zo.seed 2 (node 0: {seed})" in said.value.message, said.value.message
