"""Calibration and validation on the CPU: `zoplan calibrate` measures the 2 gloo ranks,
`zoplan plan --profile` plans with the figures, `zoplan validate` runs the plan and compares.

One calibration and one validation run are shared by the checks (each launch costs seconds).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .test_scratch import another_launch

from zoplan.models import load_model_shape
from zoplan.planfile import load_plan
from zoplan.planner import timeline
from zoplan.profile import load_profile


def zoplan(*args: str, code: int = 0, tmp: Path | None = None) -> subprocess.CompletedProcess:
    """The CLI; with ``tmp``, that is its temporary directory (torchrun's and the ranks' too)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", **({"TMPDIR": str(tmp)} if tmp else {}))
    proc = subprocess.run(
        [sys.executable, "-m", "zoplan.cli", *args], capture_output=True, text=True, timeout=600, env=env
    )
    assert proc.returncode == code, proc.stdout + proc.stderr
    if code == 2:
        assert "Traceback" not in proc.stderr
    return proc


@pytest.fixture(scope="module")
def calibrated(tiny_dirs, tmp_path_factory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("calibrate")
    profile = work / "profile.yaml"
    tmp = work / "tmp"
    tmp.mkdir()
    shm = shared_memory_folders()
    # another launch is running meanwhile (as far as its folders tell: it holds one, and sleeps)
    with another_launch(tmp, "tmp-beside-node0") as other:
        proc = zoplan(
            "calibrate",
            "--model",
            str(tiny_dirs["tiny-opt"]),
            "--micro-batch",
            "2",
            "--seq-len",
            "32",
            "-o",
            str(profile),
            "--steps",
            "8",
            "--spans",
            str(work / "spans"),
            tmp=tmp,
        )
    # the figures are a shared machine's: said when it starts, and again when it ends
    said_beside(proc.stderr, f"zoplan run (pid {other})", "calibrate")
    # calibrate leaves nothing behind: no temporary folder (its own, torchrun's), no host copy
    assert list(tmp.iterdir()) == [] and shared_memory_folders() <= shm
    return profile, tiny_dirs["tiny-opt"]


def said_beside(stderr: str, other: str, verb: str) -> None:
    """``stderr`` warns before and after a measurement that ``other`` ran beside it (other
    launches of this machine may be named too)."""
    before = [l for l in stderr.splitlines() if l.startswith("warning: another zoplan launch is running")]
    after = [l for l in stderr.splitlines() if l.startswith("warning: this was measured while")]
    assert len(before) == 1 and other in before[0] and f"{verb} when it has ended" in before[0], stderr
    assert len(after) == 1 and other in after[0] and f"{verb} again when nothing else runs" in after[0], stderr


def shared_memory_folders() -> set[Path]:
    from zoplan.runtime.scratch import shared_memory

    return set(shared_memory().glob("zoplan-*"))


@pytest.fixture(scope="module")
def planned(calibrated, tmp_path_factory) -> Path:
    profile, model = calibrated
    plan = tmp_path_factory.mktemp("plan") / "plan.yaml"
    zoplan(
        "plan",
        "--model",
        str(model / "config.json"),
        "--topology",
        "cpu-local",
        "--global-batch",
        "8",
        "--seq-len",
        "32",
        "--dtype",
        "fp32",
        "--pertp",
        "2",
        "--ddp",
        "1",
        "--upload",
        "sliced",
        "--micro-batch",
        "2",
        "--wire-dtype",
        "fp32",
        "--profile",
        str(profile),
        "-o",
        str(plan),
    )
    return plan


def test_calibration_measures_every_rank_and_the_model_shape(calibrated) -> None:
    profile = load_profile(calibrated[0])
    assert sorted(profile.devices) == ["rank0", "rank1"]
    for d in profile.devices.values():
        assert d.h2d_gbps > 0.1 and d.d2h_gbps > 0.1 and d.h2d_gbps_together > 0.1
    assert profile.allgather is not None and profile.allgather.ranks == 2 and profile.allgather.gbps > 0
    assert profile.model.hash == load_model_shape(str(calibrated[1] / "config.json")).hash
    assert profile.model.micro_batch == 2 and profile.model.seq_len == 32
    import torch

    # what the figures depend on besides the machine: the torch build and the perturbation kernels
    from zoplan.runtime.perturb import kernels_label

    assert profile.measured_on["torch"] == torch.__version__ and profile.measured_on["kernels"] == kernels_label("cpu")
    times = profile.compute
    assert sorted(times.block_s) == ["1x1", "1x2", "2x1", "2x2"]
    assert all(math.isfinite(t) and t > 0 for t in times.block_s.values())
    assert times.update_s_per_param > 0
    # the training loop between steps (batch, journal line) was timed in every setting
    assert sorted(times.loop_s) == ["1x1", "1x2", "2x1", "2x2"] and all(t > 0 for t in times.loop_s.values())


def test_calibration_keeps_the_steps_it_timed_and_the_profile_follows_from_them(calibrated) -> None:
    import statistics

    profile = load_profile(calibrated[0])
    kept = calibrated[0].parent / "spans"
    assert sorted(p.name for p in kept.iterdir()) == ["1x1", "1x2", "2x1", "2x2", "exchange", "meeting"]
    # each setting's entry follows from that setting's steps (not from another's: the settings'
    # timings differ), so a mislabelled setting fails here; which one is slower is for benchmarks
    for setting in ("1x1", "1x2", "2x1", "2x2"):
        per_rank = []
        for rank in (0, 1):
            rows = [json.loads(line) for line in (kept / setting / f"spans-rank{rank}.jsonl").read_text().splitlines()]
            # --steps 8 timed, in rounds of fresh engines; only the first engine's warm-up is kept
            assert [r["step"] for r in rows] == list(range(9))
            blocks = {s[3] for s in rows[0]["spans"] if s[1] == "compute"}
            assert blocks == set(range(len(blocks))) and len(blocks) >= 2
            # every timed step keeps its spans, and they add up to the step's totals
            for r in rows:
                assert math.isclose(
                    sum(s[5] - s[4] for s in r["spans"] if s[1] == "compute"), r["totals"]["compute"], rel_tol=1e-6
                )
            per_rank.append(statistics.median(r["totals"]["compute"] for r in rows[1:]) / len(blocks))
        # the profile's block time is the ranks' mean of the median step after the warm-up, per block
        assert math.isclose(profile.compute.block_s[setting], sum(per_rank) / 2, rel_tol=1e-6), setting
    exchange = [json.loads(line) for line in (kept / "exchange" / "spans-rank0.jsonl").read_text().splitlines()]
    assert len(exchange) == 17 and any(s[1] == "exchange" for s in exchange[3]["spans"])  # twice the steps
    # the lockstep compute: the exchange steps' block compute, as the independent settings take theirs
    locked = []
    for rank in (0, 1):
        rows = [json.loads(line) for line in (kept / "exchange" / f"spans-rank{rank}.jsonl").read_text().splitlines()]
        blocks = len({s[3] for s in rows[0]["spans"] if s[1] == "compute"})
        locked.append(statistics.median(r["totals"]["compute"] for r in rows[1:]) / blocks)
    assert math.isclose(profile.compute.lockstep_s["block"], sum(locked) / 2, rel_tol=1e-6)
    # the whole-block setting (CPU ranks): the ranks met before every block, and the profile's
    # meeting figures are the ranks' mean of the mean wait per block and loss sum after the warm-up
    waits, sums = [], []
    for rank in (0, 1):
        rows = [json.loads(line) for line in (kept / "meeting" / f"spans-rank{rank}.jsonl").read_text().splitlines()]
        blocks = len({s[3] for s in rows[0]["spans"] if s[1] == "compute"})
        assert all(sum(s[2].startswith("barrier") for s in r["spans"]) == blocks for r in rows[1:])
        waits.append(statistics.mean(r["totals"].get("exchange", 0.0) for r in rows[1:]) / blocks)
        sums.append(statistics.mean(r["totals"]["scalar"] for r in rows[1:]))
    assert profile.meeting is not None
    assert math.isclose(profile.meeting.wait_us, sum(waits) / 2 * 1e6, rel_tol=1e-6)
    assert math.isclose(profile.meeting.scalar_us, sum(sums) / 2 * 1e6, rel_tol=1e-6)


def test_a_plan_made_with_a_profile_records_it_and_timeline_reproduces_it(calibrated, planned, tmp_path) -> None:
    plan = load_plan(planned)
    assert plan.profile is not None and plan.profile.hash == load_profile(calibrated[0]).hash
    assert timeline(planned).candidate.step_time_s == pytest.approx(plan.prediction.step_time_s, rel=1e-9)
    nominal = tmp_path / "nominal.yaml"
    zoplan(
        "plan",
        "--model",
        str(calibrated[1] / "config.json"),
        "--topology",
        "cpu-local",
        "--global-batch",
        "8",
        "--seq-len",
        "32",
        "--dtype",
        "fp32",
        "--pertp",
        "2",
        "--ddp",
        "1",
        "--upload",
        "sliced",
        "--micro-batch",
        "2",
        "--wire-dtype",
        "fp32",
        "-o",
        str(nominal),
    )
    assert load_plan(nominal).profile is None
    assert load_plan(nominal).prediction.step_time_s != plan.prediction.step_time_s


def test_a_profile_for_another_machine_or_model_is_refused(calibrated, tmp_path) -> None:
    profile, model = calibrated
    other = tmp_path / "other-machine.yaml"
    data = yaml.safe_load(profile.read_text())
    data["machine"]["hash"] = "sha256:0000000000000000"
    assert data["machine"]["node_hash"]  # (calibrate records its node's: another machine's is another node's too)
    data["machine"]["node_hash"] = "sha256:0000000000000000"
    other.write_text(yaml.safe_dump(data))
    err = zoplan(
        "plan",
        "--model",
        str(model / "config.json"),
        "--topology",
        "cpu-local",
        "--dtype",
        "fp32",
        "--profile",
        str(other),
        code=2,
    ).stderr
    assert "was measured on 'cpu-local'" in err and "zoplan calibrate" in err
    err = zoplan("plan", "--model", "opt-125m", "--topology", "cpu-local", "--profile", str(profile), code=2).stderr
    assert "holds compute times for model 'tiny-opt'" in err and "not for 'opt-125m'" in err


def test_four_ranks_measure_every_group_size_and_a_rank_dying_at_exit_spoils_nothing(tiny_dirs, tmp_path: Path) -> None:
    """One launch, three checks. 4 CPU ranks: the all-gather is measured among all 4 and among the
    first 2 and 3 (the groups a plan's movers can form). Every micro-batch count asked for is
    timed. And a rank that aborts while shutting
    down, once every rank has measured (a rare gloo teardown abort seen in CI), spoils nothing:
    the figures file is complete by then."""
    machine = yaml.safe_load((Path(__file__).parents[2] / "topologies" / "cpu-local.yaml").read_text())
    machine["name"] = "cpu-four"
    machine["gpus"] = [{"id": f"rank{i}", "model": "cpu-rank"} for i in range(4)]
    machine["links"] = [
        {"a": "cpu0", "b": f"rank{i}", "kind": "memory", "gbps": 8.3, "latency_us": 5} for i in range(4)
    ]
    topology = tmp_path / "four.yaml"
    topology.write_text(yaml.safe_dump(machine))
    profile = tmp_path / "profile.yaml"
    env = dict(os.environ, HF_HUB_OFFLINE="1", ZOPLAN_FAULTS="abort-at-exit:1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "zoplan.cli",
            "calibrate",
            "--model",
            str(tiny_dirs["tiny-opt"]),
            "-t",
            str(topology),
            "--micro-batch",
            "1",
            "--seq-len",
            "16",
            "--steps",
            "3",
            "--micro-batches",
            "1,2,3",
            "-o",
            str(profile),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "after every rank had finished measuring" in proc.stderr
    from zoplan.runtime.perturb import kernels_label

    assert f"perturbation kernels: {kernels_label('cpu')}" in proc.stdout  # the table's "measured with" row
    measured = load_profile(profile)
    assert sorted(measured.devices) == [f"rank{i}" for i in range(4)]
    assert measured.allgather is not None and measured.allgather.ranks == 4
    assert [g.ranks for g in measured.allgather_groups] == [2, 3]
    for k in (2, 3, 4):
        c = measured.collective(k)
        assert c is not None and c.latency_us > 0 and c.gbps > 0 and c.wait_us == measured.allgather.wait_us
    assert "all-gather among 3" in proc.stdout
    # --micro-batches: every count timed for both branch counts
    assert sorted(measured.compute.block_s) == ["1x1", "1x2", "1x3", "2x1", "2x2", "2x3"]
    assert sorted(measured.compute.loop_s) == sorted(measured.compute.block_s)


def test_calibrating_a_gpu_topology_without_a_gpu_says_so() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    err = zoplan("calibrate", "--topology", "h100-pcie-1x", "-o", "/nonexistent/p.yaml", code=2).stderr
    assert "calibration cannot reach a GPU" in err


def test_validate_runs_the_plan_and_compares_every_stage(calibrated, planned, tmp_path) -> None:
    trace = tmp_path / "trace.json"
    proc = zoplan(
        "validate",
        str(planned),
        "--model",
        str(calibrated[1]),
        "--steps",
        "4",
        "--json",
        "--trace",
        str(trace),
        "-o",
        str(tmp_path / "run"),
    )
    report = json.loads(proc.stdout)
    rows = {r["stage"]: r for r in report["rows"]}
    assert report["measured_steps"] == [1, 2, 3]
    assert rows["step"]["predicted_s"] == pytest.approx(load_plan(planned).prediction.step_time_s)
    for stage in ("step", "compute", "embed", "head", "update", "exchange", "scalar", "loop"):
        assert rows[stage]["measured_s"] > 0 and rows[stage]["predicted_s"] > 0, stage
        assert rows[stage]["error"] == pytest.approx(
            (rows[stage]["predicted_s"] - rows[stage]["measured_s"]) / rows[stage]["measured_s"]
        )
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e["args"]["name"] for e in events if e.get("name") == "process_name"}
    assert {"rank0 (simulated)", "rank1 (simulated)", "rank0 (measured)", "rank1 (measured)"} <= names
    measured_pids = {e["pid"] for e in events if e.get("name") == "process_name" and "measured" in e["args"]["name"]}
    assert any(e.get("ph") == "X" and e["pid"] in measured_pids and e["cat"] == "compute" for e in events)
    # both timelines label each span with its op in the step program, the rank and the stream
    spans = [e for e in events if e.get("ph") == "X" and e["cat"] != "step"]
    assert all({"op", "rank", "stream"} <= set(e["args"]) for e in spans)
    measured_ops = {
        (e["args"]["rank"], e["args"]["stream"], e["args"]["op"]) for e in spans if e["pid"] in measured_pids
    }
    simulated_ops = {
        (e["args"]["rank"], e["args"]["stream"], e["args"]["op"]) for e in spans if e["pid"] not in measured_pids
    }
    assert ("rank0", "compute", "block 0") in measured_ops and measured_ops <= simulated_ops | {
        (r, "compute", "host") for r in ("rank0", "rank1")
    }  # host work: a profile's, simulated here too
    # the measured step is the run's trace_step, said by every measured span and its step's name
    # (each said "step 1", the simulator's index of the reported step)
    measured_x = [e for e in events if e.get("ph") == "X" and e["pid"] in measured_pids]
    assert {e["args"]["run_step"] for e in measured_x} == {report["trace_step"]}
    assert f"step {report['trace_step']} of the run (measured)" in {e["name"] for e in events if e.get("cat") == "step"}
    assert json.loads(trace.read_text())["otherData"]["measured.run_step"] == report["trace_step"]
    # the default data: long texts written for the plan's sequence length, kept with the run
    assert json.loads((tmp_path / "run" / "run.json").read_text())["data"] == str(tmp_path / "run" / "long-text.jsonl")
    assert report["padding_fraction"] == 0.0  # they fill every sequence
    # the training loop's host work is inside every step: the batch on each rank, the journal
    # line on rank 0 (the writer) only
    for rank in (0, 1):
        lines = [json.loads(line) for line in (tmp_path / "run" / f"spans-rank{rank}.jsonl").read_text().splitlines()]
        assert all(line["totals"]["loop"] > 0 for line in lines)
        # (both are the step program's host op)
        labels = [s[2] for s in lines[0]["spans"] if s[1] == "loop"]
        assert labels == (["host", "host"] if rank == 0 else ["host"]), (rank, labels)
        # one thread on the CPU: the spans, loop included, follow one another within the step
        assert all(sum(line["totals"].values()) <= line["wall_s"] + 1e-6 for line in lines)


def test_a_validation_without_an_output_leaves_nothing_behind(calibrated, planned, tmp_path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    shm = shared_memory_folders()
    with another_launch(tmp, "calibrate-tmp-beside") as other:  # (its folder goes when it ends)
        proc = zoplan("validate", str(planned), "--model", str(calibrated[1]), "--steps", "2", tmp=tmp)
    assert "step" in proc.stdout and "run output" not in proc.stdout  # nothing kept to point at
    # the step was measured beside another launch: said before and after
    said_beside(proc.stderr, f"zoplan calibrate (pid {other})", "validate")
    assert list(tmp.iterdir()) == [] and shared_memory_folders() <= shm


def test_a_warning_during_validation_goes_to_stderr_so_the_json_report_stays_parseable(calibrated, planned) -> None:
    # 21 steps at the plan's learning rate (1e-6) move the tiny model's loss by nothing: the run
    # warns after 20 steps, and the warning must not land in the report on stdout
    proc = zoplan("validate", str(planned), "--model", str(calibrated[1]), "--steps", "21", "--json")
    report = json.loads(proc.stdout)
    assert report["measured_steps"] == list(range(1, 21))
    assert report["output"] is None  # without --output the run's directory is gone: not named
    assert "likely too small" in proc.stderr and "likely too small" not in proc.stdout


def test_a_validation_refused_before_it_starts_leaves_no_run_directory(calibrated, planned, tmp_path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "zoplan.cli",
            "validate",
            str(planned),
            "--model",
            str(calibrated[1]),
            "--data",
            str(tmp_path / "missing.jsonl"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, HF_HUB_OFFLINE="1", TMPDIR=str(tmp)),
    )
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp.iterdir()) == []  # no empty zoplan-validate-* directory
    # a kept run directory that is not empty: refused with validate's own fix (it has no --resume)
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    proc = zoplan("validate", str(planned), "--model", str(calibrated[1]), "-o", str(tmp_path / "kept"), code=2)
    assert "is not empty" in proc.stderr and "--resume" not in proc.stderr, proc.stderr
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["notes.txt"]


def test_validate_pads_batches_to_the_planned_sequence_length(tiny_dirs) -> None:
    from transformers import AutoTokenizer

    from zoplan.runtime import data as zdata
    from zoplan.runtime import worker

    tok = AutoTokenizer.from_pretrained(tiny_dirs["tiny-opt"])
    examples, kind = zdata.load_examples("sentiment-text")
    task = zdata.Task(kind)
    short = worker.Batcher(tok, task, 64, 2)(examples[:4])[0]["inputs"]["input_ids"]
    padded = worker.Batcher(tok, task, 64, 2, pad=True)(examples[:4])[0]["inputs"]["input_ids"]  # validate --pad
    assert short.shape[1] < 64 and tuple(padded.shape) == (2, 64)


def test_long_text_fills_every_sequence_so_no_batch_is_padded(tiny_dirs, tmp_path) -> None:
    """`zoplan validate`'s default data: as the calibration's batches, no padding (whose per
    micro-batch attention mask the calibration does not time), for any sequence length."""
    import torch
    from transformers import AutoTokenizer

    from zoplan.runtime import data as zdata
    from zoplan.runtime import worker

    tok = AutoTokenizer.from_pretrained(tiny_dirs["tiny-opt"])
    for seq_len in (16, 64, 700):
        path = zdata.write_long_text(tmp_path / f"long-{seq_len}.jsonl", seq_len, records=20)
        examples, kind = zdata.load_examples(str(path))
        assert kind == "lm" and len(examples) == 20 and len({e.text for e in examples}) == 20
        assert all(len(tok(e.text)["input_ids"]) >= seq_len for e in examples)
        batch = worker.Batcher(tok, zdata.Task(kind), seq_len, 2)(examples[:4])[0]["inputs"]
        assert tuple(batch["input_ids"].shape) == (2, seq_len) and bool(batch["attention_mask"].all())
        assert worker.padding_share(worker.Batcher(tok, zdata.Task(kind), seq_len, 2)(examples[:4])) == 0.0
    # the bundled short texts are padded; the share is the mask's zeros over all positions
    short = worker.Batcher(tok, zdata.Task("lm"), 64, 2)(zdata.load_examples("sentiment-text")[0][:6])
    masks = torch.cat([mb["inputs"]["attention_mask"].flatten() for mb in short])
    assert 0.0 < worker.padding_share(short) == pytest.approx(float((masks == 0).sum()) / masks.numel())


def test_the_duplex_copy_measurement_runs_its_stream_logic_and_leaves_the_host_copy_intact(monkeypatch) -> None:
    # its CUDA calls replaced by no-ops, so the loop, the byte count and the write-back source run
    # on the CPU; on a real CPU rank it measures nothing (a rank's copies run one after the other)
    import contextlib

    import torch

    from zoplan.runtime.calibrate import _duplex_gbps

    src = torch.arange(1 << 16, dtype=torch.float32)
    dst = src.clone()  # as the one-way measurements leave it: the host copy's values
    assert _duplex_gbps(dst, src, torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: object())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    rate = _duplex_gbps(dst, src, torch.device("cuda"))
    assert rate is not None and rate > 0
    assert torch.equal(src, torch.arange(1 << 16, dtype=torch.float32)) and torch.equal(dst, src)


def test_duplex_samples_refresh_the_device_copy_and_report_their_median(monkeypatch) -> None:
    # between samples the engine's updates rewrite the host copy: a sample must not write the
    # older device copy back over it; the figure is the median of the samples
    import contextlib

    import torch

    from zoplan.runtime import calibrate

    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: object())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(calibrate.zdist, "barrier", lambda: None)
    src = torch.arange(1 << 12, dtype=torch.float32)
    dst = src.clone()
    samples = calibrate._DuplexSamples(dst, src, torch.device("cuda"))
    assert samples.gbps is None
    samples.sample()
    src.add_(1.0)  # an update written back to the host copy
    samples.sample()
    assert torch.equal(src, torch.arange(1 << 12, dtype=torch.float32) + 1.0)
    assert len(samples.rates) == 2 and all(r > 0 for r in samples.rates)
    samples.rates[:] = [97.8, 87.2, 96.5, 97.1, 98.0]
    assert samples.gbps == 97.1


def test_a_profile_path_that_cannot_be_written_is_refused_before_anything_is_measured(tmp_path: Path) -> None:
    """Calibrating takes minutes on a real model: the profile's path is checked first, not after."""
    (tmp_path / "a-folder").mkdir()
    proc = zoplan("calibrate", "-o", str(tmp_path / "a-folder"), code=2)
    assert "is a directory" in proc.stderr and "calibrating" not in proc.stdout + proc.stderr, proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["a-folder"]  # no log, no scratch
    # a file of the user's own under the name (a mistyped -o): not replaced by a profile
    (tmp_path / "notes.txt").write_text("precious")
    proc = zoplan("calibrate", "-o", str(tmp_path / "notes.txt"), code=2)
    assert "exists and is not a profile zoplan wrote: it is not overwritten" in proc.stderr, proc.stderr
    assert (tmp_path / "notes.txt").read_text() == "precious"


def test_a_calibration_stopped_by_sigterm_says_so_with_its_status_and_writes_nothing(tiny_dirs, tmp_path) -> None:
    """SIGTERM (or SIGHUP) stopped calibrate's ranks but it said "interrupted" with exit status
    130, as for Ctrl-C; zoplan run and validate exit 143 (129)."""
    import signal
    import tempfile
    import time

    profile = tmp_path / "profile.yaml"
    cmd = [sys.executable, "-m", "zoplan.cli", "calibrate", "--model", str(tiny_dirs["tiny-opt"]), "-o", str(profile)]
    before = set(Path(tempfile.gettempdir()).glob("zoplan-calibrate-tmp-*"))
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1")
    )
    deadline = time.monotonic() + 120
    while not set(Path(tempfile.gettempdir()).glob("zoplan-calibrate-tmp-*")) - before:  # its ranks are starting
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "calibration stopped by SIGTERM: the ranks have stopped, and no profile was written" in err, err
    assert "interrupted" not in err and not profile.exists()
    assert set(Path(tempfile.gettempdir()).glob("zoplan-calibrate-tmp-*")) <= before


def test_calibrate_refuses_options_its_ranks_would_fail_on_and_names_a_killed_rank(tiny_dirs, tmp_path) -> None:
    """--spans naming a file or a folder that cannot be made, and a --seq-len past an OPT's
    positions, started the ranks, which failed with a FileNotFoundError, a NotADirectoryError or
    an IndexError; a rank killed by the out-of-memory killer (a micro-batch too large) was
    "calibration failed (exit status 1)"."""
    import signal

    def calibrate(*args: str, **env: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "zoplan.cli", "calibrate", "--model", str(tiny_dirs["tiny-opt"]), *args]
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1", **env)
        )

    (tmp_path / "notes.txt").write_text("mine")
    profile = str(tmp_path / "profile.yaml")
    for args, said in (
        (("--spans", str(tmp_path / "notes.txt")), "is a file, not a folder"),
        (("--spans", "/proc/no-such/spans"), "cannot make the --spans folder /proc/no-such/spans"),
        (("--seq-len", "100000"), "--seq-len 100000 is longer than the 128 positions"),
    ):
        done = calibrate(*args, "-o", profile)
        assert done.returncode == 2 and said in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert calibrate("--seq-len", "1", "-o", profile).returncode == 2
    killed = calibrate("-o", profile, ZOPLAN_FAULTS="kill:1:0")
    assert killed.returncode == 2 and not Path(profile).exists()
    assert (
        f"a rank was killed by {signal.SIGKILL.name}, most often by the kernel's out-of-memory killer" in killed.stderr
    )
    assert "--micro-batch" in killed.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"
