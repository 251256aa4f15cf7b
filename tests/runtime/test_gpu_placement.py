"""Ranks run on the GPUs the plan placed them on (runtime/launch.py cuda_env), checked without a GPU:
the environment torchrun's ranks get, for plans of the bundled multi-GPU machines."""

from __future__ import annotations

from pathlib import Path

import pytest

from zoplan.errors import ZoplanError
from zoplan.planner import plan
from zoplan.runtime.launch import cuda_env, plan_gpus
from zoplan.search import Pins
from zoplan.topology import load_topology


def test_a_spread_plan_runs_on_the_gpus_it_names() -> None:
    machine = load_topology("dgx-a100")
    report = plan(
        "opt-13b",
        "dgx-a100",
        global_batch=8,
        seq_len=256,
        pins=Pins(perturbation=2, data=2, gpus=("gpu0", "gpu2", "gpu4", "gpu6")),
    )
    gpus = plan_gpus(report.plan)
    assert gpus[:4] == ["gpu0", "gpu2", "gpu4", "gpu6"]  # local ranks 0-3 compute, relays after
    env = cuda_env(machine.gpus, gpus, {})
    # the topology's i-th GPU is CUDA device i in nvidia-smi's (PCI bus) order
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert env["CUDA_VISIBLE_DEVICES"].split(",") == [str(machine.gpus.index(g)) for g in gpus]
    assert env["CUDA_VISIBLE_DEVICES"].startswith("0,2,4,6")


def test_the_users_visible_devices_are_the_machine() -> None:
    machine_gpus = ["gpu0", "gpu1", "gpu2", "gpu3"]
    env = cuda_env(
        machine_gpus, ["gpu3", "gpu1"], {"CUDA_VISIBLE_DEVICES": "4,5,6,7", "CUDA_DEVICE_ORDER": "FASTEST_FIRST"}
    )
    assert env == {"CUDA_VISIBLE_DEVICES": "7,5", "CUDA_DEVICE_ORDER": "FASTEST_FIRST"}
    with pytest.raises(ZoplanError, match="GPU number 3.*lists 2 device"):
        cuda_env(machine_gpus, ["gpu3"], {"CUDA_VISIBLE_DEVICES": "0,1"})


def test_every_local_rank_gets_a_distinct_gpu_on_every_bundled_gpu_machine() -> None:
    for name, model in (("dgx-h100", "opt-13b"), ("l40s-8x", "opt-6.7b"), ("rtx4090-4x", "opt-1.3b")):
        machine = load_topology(name)
        p = plan(model, name, global_batch=8, seq_len=256, top=1).plan
        gpus = plan_gpus(p)
        assert len(gpus) == p.layout.world_size // p.layout.nodes == len(set(gpus)), name
        devices = cuda_env(machine.gpus, gpus, {})["CUDA_VISIBLE_DEVICES"].split(",")
        assert sorted(int(d) for d in devices) == sorted(machine.gpus.index(g) for g in gpus), name


def test_a_plan_for_more_gpus_is_refused_and_other_models_are_named() -> None:
    from zoplan.runtime.launch import check_gpus_here

    machine = load_topology("dgx-a100")
    # this machine: the 8 A100s the topology describes (torch's names for them)
    eight = ["NVIDIA A100-SXM4-80GB"] * 8
    assert check_gpus_here(machine, ["gpu0", "gpu2", "gpu4", "gpu6"], eight) == []
    with pytest.raises(ZoplanError, match="needs 7 CUDA device.*sees 4"):
        check_gpus_here(machine, ["gpu0", "gpu6"], eight[:4])
    other = check_gpus_here(machine, ["gpu0", "gpu2"], ["NVIDIA A100-SXM4-80GB", "x", "NVIDIA H200"] + eight[3:])
    assert len(other) == 1 and "gpu2 (a100-sxm4-80gb in 'dgx-a100')" in other[0] and "NVIDIA H200" in other[0]
    variant = check_gpus_here(machine, ["gpu0"], ["NVIDIA H100 NVL"] + eight[1:])  # a variant no preset names
    assert len(variant) == 1 and "NVIDIA H100 NVL" in variant[0]


def test_a_gpu_model_the_topology_defines_itself_is_not_compared(tmp_path) -> None:
    import yaml

    from zoplan.runtime.launch import check_gpus_here
    from zoplan.topology import resolve_topology_path

    spec = yaml.safe_load(resolve_topology_path("h100-pcie-1x").read_text())
    spec["gpu_models"] = {"my-card": spec["gpu_models"]["h100-pcie-80gb"]}
    spec["gpus"] = [{**g, "model": "my-card"} for g in spec["gpus"]]
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(spec))
    machine = load_topology(str(path))
    assert check_gpus_here(machine, machine.gpus, ["Some Future GPU"] * len(machine.gpus)) == []


def test_ranks_get_one_thread_and_the_allocator_settings_unless_the_user_set_them() -> None:
    from zoplan.runtime.launch import MALLOC_ENV, SHARE_THREADS_ENV, rank_env

    env = rank_env({"PATH": "/bin"})
    assert env["OMP_NUM_THREADS"] == "1" and env["PYTHONUNBUFFERED"] == "1" and env["PATH"] == "/bin"
    assert env[SHARE_THREADS_ENV] == "1"  # one thread to start with, then a share of the cores
    assert rank_env(env) == env  # the rank server re-executes itself in it and compares
    # a user's own thread count is the ranks' (threads_per_rank)
    env = rank_env({"PATH": "/bin", "OMP_NUM_THREADS": "8"})
    assert env["OMP_NUM_THREADS"] == "8" and SHARE_THREADS_ENV not in env and rank_env(env) == env
    assert {k: env[k] for k in MALLOC_ENV} == MALLOC_ENV and int(MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"]) > 2**17
    mine = rank_env({"MALLOC_MMAP_THRESHOLD_": "65536"})
    assert mine["MALLOC_MMAP_THRESHOLD_"] == "65536"  # a user's own tuning wins


def test_a_cpu_rank_takes_the_users_own_thread_count_else_its_share_of_the_cores(monkeypatch) -> None:
    import os

    from zoplan.runtime.launch import SHARE_THREADS_ENV, rank_env
    from zoplan.runtime.worker import threads_per_rank

    from zoplan.runtime import worker
    from zoplan.topology.container import Limits

    monkeypatch.setattr(worker, "read_limits", Limits)  # (no container's quota: the test's own)
    cores = len(os.sched_getaffinity(0))
    for name in ("OMP_NUM_THREADS", SHARE_THREADS_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in rank_env({}).items():  # what the launcher gives a rank where the user set none
        monkeypatch.setenv(name, value)
    assert threads_per_rank(1) == cores and threads_per_rank(2 * cores) == 1
    monkeypatch.delenv(SHARE_THREADS_ENV)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's
    assert threads_per_rank(1) == 3 and threads_per_rank(2 * cores) == 3
    for odd in ("0", "abc", ""):  # not a thread count: the share of the cores, as without one
        monkeypatch.setenv("OMP_NUM_THREADS", odd)
        assert threads_per_rank(1) == cores
    # a container's CPU quota of one core: one thread (two waited their turn: 40% slower steps)
    monkeypatch.setattr(worker, "read_limits", lambda: Limits(cpus=1.0))
    assert threads_per_rank(1) == 1 and threads_per_rank(2) == 1
    monkeypatch.setattr(worker, "read_limits", lambda: Limits(cpus=2.5))
    assert threads_per_rank(1) == min(cores, 2)


def test_cpu_ranks_that_meet_otherwise_than_the_topology_says_are_named(tmp_path, monkeypatch) -> None:
    """The topology's ``meetings`` is what the prediction charged; the launcher warns where this
    run's CPU ranks will meet otherwise (ZOPLAN_MEETINGS=gloo, or another CPU), and not for one
    rank, which meets nobody."""
    from zoplan.runtime.launch import check_meetings_here
    from zoplan.vocab import Meetings, local_meetings, run_meetings

    assert run_meetings({"ZOPLAN_MEETINGS": "gloo"}) is Meetings.COLLECTIVE
    assert run_meetings({}) is local_meetings()
    cpu = load_topology("cpu-local")
    ranks = ["rank0", "rank1"]
    assert check_meetings_here(cpu, ranks, Meetings.SHARED_MEMORY) == []
    assert check_meetings_here(cpu, ranks[:1], Meetings.COLLECTIVE) == []
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    [gloo] = check_meetings_here(cpu, ranks, Meetings.COLLECTIVE)
    assert "through shared memory, but here (ZOPLAN_MEETINGS=gloo) they meet through collective calls" in gloo
    assert "meetings: collective" in gloo
    path = tmp_path / "arm.yaml"
    text = (Path(__file__).resolve().parents[2] / "topologies" / "cpu-local.yaml").read_text()
    path.write_text(text.replace("    kind: cpu\n", "    kind: cpu\n    meetings: collective\n", 1))
    arm = load_topology(path)
    assert check_meetings_here(arm, ranks, Meetings.COLLECTIVE) == []
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    [other] = check_meetings_here(cpu, ranks, Meetings.COLLECTIVE)
    assert "this CPU (aarch64)" in other
