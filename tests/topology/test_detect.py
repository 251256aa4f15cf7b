"""``zoplan topo detect``: a topology file for the local machine.

The CPU path runs on this machine for real (/proc/meminfo, /sys, the process's CPU affinity). The
GPU path is fed the ``nvidia-smi topo -m`` fixtures of tests/fixtures/nvidia-smi/ (described in
test_topo_import.py) with a fake nvidia-smi: a function in-process, an executable script on PATH
for the command line. h200-1x.txt is the real `nvidia-smi topo -m` of a one-GPU H200 cloud machine
(its header underlined with ANSI escapes, as the driver prints it); `nvidia-smi --query-gpu=name,
memory.total --format=csv,noheader` there printed "NVIDIA H200, 143771 MiB".
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import pytest
from rich.console import Console
from typer.testing import CliRunner

from zoplan import cli
from zoplan.topology import detect as topo_detect
from zoplan.errors import ZoplanError
from zoplan.topology.presets import preset_names
from zoplan.planner import plan
from zoplan.topology.detect import (
    cpu_topology,
    detect,
    gpu_preset_for,
    mem_total_kib,
    parse_cpulist,
    read_l2_kib,
    read_numa_nodes,
    run_nvidia_smi,
)
from zoplan.topology.container import Limits, oom_kills, read_limits
from zoplan.topology.importer import import_nvidia_smi
from zoplan.topology import Machine, load_topology

FIXTURES = Path(__file__).parents[1] / "fixtures" / "nvidia-smi"
DGX = FIXTURES / "dgx-a100-like.txt"
L40S = FIXTURES / "l40s-8x-like.txt"
H200 = FIXTURES / "h200-1x.txt"
A100_QUERY = "NVIDIA A100-SXM4-80GB, 81920 MiB\n" * 8
MEMINFO = "MemTotal:       2113929216 kB\nMemFree:        2000000000 kB\n"  # 2016 GiB
MEMINFO_GIB = 2113929216 / 2**20
TINY = dict(global_batch=4, seq_len=128)
runner = CliRunner()


@pytest.fixture(autouse=True)
def no_container(monkeypatch: pytest.MonkeyPatch) -> None:
    """detect() reads this process's container limits: none here, wherever the tests run (a CI
    container's own would change every figure); test_detect_reads_this_process_s_limits sets some."""
    monkeypatch.setattr(topo_detect, "read_limits", Limits)


def local_mem_gib() -> float:
    return mem_total_kib(Path("/proc/meminfo").read_text()) / 2**20


def fake_smi(topo: Path | str, query: str, calls: list[list[str]] | None = None):
    """A stand-in for run_nvidia_smi answering the two queries detect makes."""

    def run(args: Sequence[str]) -> str:
        if calls is not None:
            calls.append(list(args))
        if list(args) == ["topo", "-m"]:
            return Path(topo).read_text(encoding="utf-8")
        assert args[0].startswith("--query-gpu=name,memory.total"), args
        return query

    return run


def detect_gpu(tmp_path: Path, topo: Path, query: str, **kw) -> topo_detect.DetectedTopology:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(MEMINFO)
    return detect(run=fake_smi(topo, query), which=lambda _: "/usr/bin/nvidia-smi", meminfo_path=meminfo, **kw)


def comments(text: str) -> str:
    """The file's comments as one line (they are wrapped at 100 columns)."""
    return " ".join(line.strip().lstrip("#").strip() for line in text.splitlines() if line.strip().startswith("#"))


def written(tmp_path: Path, result: topo_detect.DetectedTopology, name: str = "machine") -> Machine:
    path = tmp_path / f"{name}.yaml"
    result.write(path)
    return load_topology(path)


# ----- the CPU path, on this machine --------------------------------------------------------------
def test_cpu_path_on_this_machine_loads_and_plans(tmp_path: Path) -> None:
    machine = written(tmp_path, detect(which=lambda _: None, name="here"))
    cores = len(os.sched_getaffinity(0))
    assert machine.name == "here"
    assert machine.gpus == [f"rank{r}" for r in range(cores)]
    assert all(machine.gpu_model(g).kind == "cpu" for g in machine.gpus)
    nodes = max(1, len(list(Path("/sys/devices/system/node").glob("node[0-9]*"))))
    assert len(machine.spec.sockets) == nodes
    assert sum(s.memory_gib for s in machine.spec.sockets) == pytest.approx(local_mem_gib(), abs=0.01 * nodes)
    best = plan("opt-125m", machine.source, **TINY).search.best
    assert best.step_time_s > 0 and set(best.layout.gpus) <= set(machine.gpus)


def test_cpu_ranks_option_and_assumed_figures(tmp_path: Path) -> None:
    result = detect(which=lambda _: None, ranks=1, host_gbps=12.5)
    machine = written(tmp_path, result)
    assert machine.gpus == ["rank0"]
    assert machine.gpu_model("rank0").memory_gib == pytest.approx(local_mem_gib(), abs=0.01)
    assert {s.memory_gbps for s in machine.spec.sockets} == {12.5}
    assert "ASSUMED" in result.text and "zoplan calibrate" in comments(result.text)
    assert "zoplan calibrate" in result.summary


@pytest.mark.parametrize("ranks", [0, len(os.sched_getaffinity(0)) + 1])
def test_cpu_ranks_out_of_range(ranks: int) -> None:
    with pytest.raises(ZoplanError, match="--ranks must be between 1 and"):
        detect(which=lambda _: None, ranks=ranks)


def test_cpu_two_numa_nodes_from_sys(tmp_path: Path) -> None:
    for node, cpus in (("node0", "0-3"), ("node1", "4-7"), ("node2", "")):
        (tmp_path / node).mkdir()
        (tmp_path / node / "cpulist").write_text(cpus + "\n")
    (tmp_path / "possible").write_text("0-2\n")  # not a node directory
    nodes = read_numa_nodes(tmp_path)
    assert nodes == {0: frozenset(range(4)), 1: frozenset(range(4, 8)), 2: frozenset()}
    result = cpu_topology(MEMINFO, nodes, set(range(8)), ranks=4)
    machine = Machine(result.spec, "test")
    assert [s.id for s in result.spec.sockets] == ["cpu0", "cpu1", "cpu2"]
    assert [s.memory_gib for s in result.spec.sockets] == [672, 672, 672]
    assert [machine.host_socket(f"rank{r}") for r in range(4)] == ["cpu0", "cpu0", "cpu1", "cpu1"]
    # ASSUMED bus: 4 GB/s per rank on the node; a node without ranks still gets a positive figure
    assert [s.memory_gbps for s in result.spec.sockets] == [8, 8, 4]
    assert {(l.a, l.b) for l in result.spec.links if l.kind == "socket"} == {
        ("cpu0", "cpu1"),
        ("cpu0", "cpu2"),
        ("cpu1", "cpu2"),
    }


def test_cpu_ranks_meet_as_this_machines_cpu_lets_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """x86 ranks meet through shared memory, others through gloo's collective calls: the file says
    which (``meetings``), so the cost model charges the calls where the runtime makes them."""
    nodes = {0: frozenset(range(2))}
    for arch, meetings in (("x86_64", "shared-memory"), ("aarch64", "collective")):
        monkeypatch.setattr("platform.machine", lambda: arch)
        result = cpu_topology(MEMINFO, nodes, {0, 1}, ranks=2)
        assert f"meetings: {meetings}" in result.text and f"this machine: {arch}" in result.text
        assert Machine(result.spec, "test").gpu_model("rank0").meetings == meetings


def test_a_cores_l2_cache_becomes_the_ranks_cache_mib(tmp_path: Path) -> None:
    """/sys/devices/system/cpu/cpuN/cache/index*: the level-2 cache (Unified or Data) of the first
    core the process may run on is written as the ranks' cache_mib; without it the key is left out
    (0: every head pays for its logits, the conservative side)."""
    cache = tmp_path / "cpu3" / "cache"
    for index, (level, kind, size) in enumerate(
        (("1", "Data", "48K"), ("1", "Instruction", "32K"), ("2", "Unified", "1280K"), ("3", "Unified", "105M"))
    ):
        d = cache / f"index{index}"
        d.mkdir(parents=True)
        for name, value in (("level", level), ("type", kind), ("size", size)):
            (d / name).write_text(value + "\n")
    assert read_l2_kib(3, tmp_path) == 1280
    assert read_l2_kib(0, tmp_path) is None  # no such core listed
    (cache / "index2" / "size").write_text("2M\n")
    assert read_l2_kib(3, tmp_path) == 2048
    nodes = {0: frozenset(range(2))}
    with_cache = cpu_topology(MEMINFO, nodes, {0, 1}, ranks=2, l2_kib=1280)
    assert Machine(with_cache.spec, "test").gpu_model("rank0").cache_mib == 1.25
    assert "cache_mib" not in cpu_topology(MEMINFO, nodes, {0, 1}, ranks=2).text


def test_readers() -> None:
    assert parse_cpulist("0-2,8,10-11\n") == {0, 1, 2, 8, 10, 11}
    assert parse_cpulist("\n") == frozenset()
    assert mem_total_kib(MEMINFO) == 2113929216
    with pytest.raises(ZoplanError, match="MemTotal"):
        mem_total_kib("MemFree: 12 kB\n")


# ----- the GPU path, with a fake nvidia-smi -------------------------------------------------------
def test_gpu_path_is_the_import_with_memory_from_meminfo(tmp_path: Path) -> None:
    calls: list[list[str]] = []
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(MEMINFO)
    result = detect(
        run=fake_smi(DGX, A100_QUERY, calls),
        which=lambda _: "/usr/bin/nvidia-smi",
        meminfo_path=meminfo,
        host_gbps=204.8,
        name="dgx",
    )
    assert sorted(calls) == [["--query-gpu=name,memory.total", "--format=csv,noheader"], ["topo", "-m"]]
    machine = written(tmp_path, result, "dgx")
    # two NUMA nodes in the matrix: MemTotal divided between them, the total kept
    assert [s.memory_gib for s in machine.spec.sockets] == [1008, 1008]
    assert sum(s.memory_gib for s in machine.spec.sockets) == pytest.approx(MEMINFO_GIB, abs=0.02)
    same = import_nvidia_smi(DGX.read_text(), gpu="a100-sxm4-80gb", host_memory_gib=1008, host_gbps=204.8)
    assert machine.spec.links == same.spec.links
    assert machine.spec.gpu_models == same.spec.gpu_models
    assert machine.spec.sockets == same.spec.sockets
    said = comments(result.text)
    assert "MemTotal 2113929216 kB in /proc/meminfo" in said and "8x 'NVIDIA A100-SXM4-80GB'" in said
    assert result.summary.startswith("8x a100-sxm4-80gb, NVSwitch")
    assert result.warnings == []


def _cgroup_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_a_container_s_limits_are_read_from_its_cgroups_v1_and_v2(tmp_path: Path) -> None:
    """Docker, Kubernetes and Slurm set a memory limit and a CPU quota below what /proc/meminfo
    and the affinity say: the lowest limit on the process's cgroup or any above it holds; a path
    the mount does not show (a container's namespace) reads the mount's root."""
    v1 = _cgroup_tree(
        tmp_path / "v1",
        {
            "proc": "4:memory:/pod/abc\n3:cpu,cpuacct:/pod/abc\n0::/\n",
            "sys/memory/memory.limit_in_bytes": "9223372036854771712\n",  # the root: none
            "sys/memory/pod/memory.limit_in_bytes": "3221225472\n",  # the pod's, below its container's
            "sys/memory/pod/abc/memory.limit_in_bytes": "8589934592\n",
            "sys/memory/pod/memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
            "sys/cpu,cpuacct/pod/abc/cpu.cfs_quota_us": "150000\n",
            "sys/cpu,cpuacct/pod/abc/cpu.cfs_period_us": "100000\n",
            "sys/cpu,cpuacct/pod/cpu.cfs_quota_us": "-1\n",
            "sys/cpu,cpuacct/pod/cpu.cfs_period_us": "100000\n",
        },
    )
    limits = read_limits(v1 / "proc", v1 / "sys")
    assert (limits.memory_bytes, limits.cpus) == (3 << 30, 1.5)
    assert limits.memory_file == v1 / "sys/memory/pod/memory.limit_in_bytes" and oom_kills(limits) == 2
    assert (limits.cores(8), limits.cores(1), Limits(cpus=0.5).cores(8), Limits().cores(8)) == (1, 1, 1, 8)
    v2 = _cgroup_tree(
        tmp_path / "v2",
        {
            "proc": "0::/system.slice/docker-1.scope\n",  # not in the mount (a namespace): its root read
            "sys/memory.max": "2147483648\n",
            "sys/cpu.max": "200000 100000\n",
            "sys/memory.events": "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n",
        },
    )
    limits = read_limits(v2 / "proc", v2 / "sys")
    assert (limits.memory_bytes, limits.cpus, oom_kills(limits)) == (2 << 30, 2.0, 1)
    unlimited = _cgroup_tree(
        tmp_path / "none", {"proc": "0::/\n", "sys/memory.max": "max\n", "sys/cpu.max": "max 100000\n"}
    )
    assert read_limits(unlimited / "proc", unlimited / "sys") == Limits()
    assert read_limits(tmp_path / "no-such-file", tmp_path) == Limits()  # (no /proc: nothing known)


def test_detect_plans_within_the_container_s_limits(tmp_path: Path) -> None:
    """A container's memory limit and CPU quota, not MemTotal and the affinity, are what a run
    may use: the detected topology planned 16 GiB inside a 3 GiB container, and a rank per core
    the quota could not keep busy."""
    limits = Limits(
        memory_bytes=3 << 30, memory_file=Path("/sys/fs/cgroup/memory.max"), cpus=1.0, cpu_file=Path("cpu.max")
    )
    result = cpu_topology(MEMINFO, {}, {0, 1, 2, 3}, limits=limits)
    machine = Machine(result.spec, "test")
    assert machine.gpus == ["rank0"] and [s.memory_gib for s in machine.spec.sockets] == [3]
    assert [s.cores for s in machine.spec.sockets] == [1]
    said = comments(result.text)
    assert "the memory limit of this process's container" in said and "/sys/fs/cgroup/memory.max" in said
    assert "a CPU quota of 1 core (cpu.max) keeps 1 busy" in said
    assert "this container allows 3 GiB of memory and 1 busy core" in result.summary
    with pytest.raises(ZoplanError, match="between 1 and the 1 cores this process may use \\(a CPU quota of 1 core"):
        cpu_topology(MEMINFO, {}, {0, 1, 2, 3}, ranks=2, limits=limits)
    assert Machine(cpu_topology(MEMINFO, {}, {0, 1, 2, 3}).spec, "t").gpus == [f"rank{r}" for r in range(4)]
    # two NUMA nodes of 8 cores under a 3-core quota: the sockets' cores add up to the 3 ranks (2 + 1,
    # as the ranks are placed; rounded down per node they gave 1 + 1)
    two = cpu_topology(
        MEMINFO, {0: frozenset(range(8)), 1: frozenset(range(8, 16))}, set(range(16)), limits=Limits(cpus=3.0)
    )
    assert [s.cores for s in two.spec.sockets] == [2, 1] and len(two.spec.gpus) == 3
    # a GPU machine's host memory too (the host copy of the weights lives in it)
    gpus = detect(
        run=fake_smi(DGX, A100_QUERY),
        which=lambda _: "/usr/bin/nvidia-smi",
        meminfo_path=_cgroup_tree(tmp_path, {"meminfo": MEMINFO}) / "meminfo",
        limits=Limits(memory_bytes=512 << 30, memory_file=Path("memory.max")),
    )
    assert [s.memory_gib for s in gpus.spec.sockets] == [256, 256]


def test_detect_reads_this_process_s_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(topo_detect, "read_limits", lambda: Limits(memory_bytes=1 << 30, cpus=1.0))
    result = detect(which=lambda _: None)
    assert [s.memory_gib for s in result.spec.sockets] == [1] and len(result.spec.gpus) == 1


def test_gpu_path_l40s_plans(tmp_path: Path) -> None:
    result = detect_gpu(tmp_path, L40S, "NVIDIA L40S, 46068 MiB\n" * 8)
    machine = written(tmp_path, result, "l40s")
    assert len(machine.gpus) == 8 and machine.gpu_model_name("gpu0") == "l40s-48gb"
    assert any("--host-gbps not given" in w for w in result.warnings)  # the import's warning, kept
    best = plan("opt-125m", machine.source, **TINY).search.best
    assert best.step_time_s > 0


def test_gpu_path_real_h200_output(tmp_path: Path) -> None:
    result = detect_gpu(tmp_path, H200, "NVIDIA H200, 143771 MiB\n", host_gbps=100)
    machine = written(tmp_path, result, "h200")
    assert machine.gpus == ["gpu0"] and machine.gpu_model_name("gpu0") == "h200-sxm-141gb"
    assert [(s.id, s.memory_gib, s.memory_gbps) for s in machine.spec.sockets] == [("cpu0", 2016, 100)]
    assert machine.host_path("gpu0") == ["cpu0->gpu0"] and result.warnings == []
    assert "all on the one socket below" in comments(result.text)


@pytest.mark.parametrize(
    "name, preset",
    [
        ("NVIDIA A100-SXM4-80GB", "a100-sxm4-80gb"),
        ("NVIDIA A100-SXM4-40GB", "a100-sxm4-40gb"),
        ("A100-SXM4-40GB", "a100-sxm4-40gb"),
        ("NVIDIA H100 80GB HBM3", "h100-sxm5-80gb"),
        ("NVIDIA H100 PCIe", "h100-pcie-80gb"),
        ("NVIDIA H200", "h200-sxm-141gb"),
        ("NVIDIA L40S", "l40s-48gb"),
        ("NVIDIA GeForce RTX 4090", "rtx4090-24gb"),
    ],
)
def test_product_names_map_to_presets(name: str, preset: str) -> None:
    assert gpu_preset_for(name).name == preset


@pytest.mark.parametrize(
    "name", ["NVIDIA H100 NVL", "NVIDIA A100 80GB PCIe", "Tesla V100-SXM2-32GB", "NVIDIA H200 NVL"]
)
def test_unknown_gpu_names_the_gpu_and_lists_the_presets(tmp_path: Path, name: str) -> None:
    with pytest.raises(ZoplanError) as exc:
        detect_gpu(tmp_path, DGX, f"{name}, 95830 MiB\n" * 8)
    assert f"'{name}', 95830 MiB" in exc.value.message
    assert all(p in exc.value.message for p in preset_names())
    assert "zoplan topo import" in exc.value.fix and "--gpu" in exc.value.fix


def test_mixed_models_and_count_mismatch_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ZoplanError, match="different GPU models"):
        detect_gpu(tmp_path, DGX, A100_QUERY + "NVIDIA L40S, 46068 MiB\n")
    with pytest.raises(ZoplanError, match="shows 8 GPUs but .* lists 4"):
        detect_gpu(tmp_path, DGX, "NVIDIA A100-SXM4-80GB, 81920 MiB\n" * 4)
    with pytest.raises(ZoplanError, match="lists no GPUs"):
        detect_gpu(tmp_path, DGX, "\n")


def test_less_memory_than_the_preset_is_what_the_file_plans_with(tmp_path: Path) -> None:
    """A plan made for the preset's 80 GiB would not fit GPUs that have 40: the file says 40."""
    result = detect_gpu(tmp_path, DGX, "NVIDIA A100-SXM4-80GB, 40960 MiB\n" * 8, host_gbps=100)
    assert result.warnings == [
        "nvidia-smi reports 40960 MiB per GPU but preset a100-sxm4-80gb has 80 GiB: the file gives the GPUs "
        "the 40 GiB reported, and the preset's compute and copy figures; check the GPU model (MIG or a variant?)"
    ]
    assert result.spec.gpu_models["a100-sxm4-80gb"].memory_gib == 40
    assert "nvidia-smi reports 40960 MiB per GPU, less than the 80 GiB of preset a100-sxm4-80gb" in comments(
        result.text
    )
    written = tmp_path / "m.yaml"
    written.write_text(result.text)
    assert load_topology(written).gpu_model("gpu0").memory_gib == 40
    # within the tolerance (ECC, the driver's reserve), the preset's figure stays
    close = detect_gpu(tmp_path, DGX, "NVIDIA A100-SXM4-80GB, 79000 MiB\n" * 8, host_gbps=100)
    assert close.warnings == [] and close.spec.gpu_models["a100-sxm4-80gb"].memory_gib == 80


def test_more_memory_than_the_preset_keeps_the_preset_and_warns(tmp_path: Path) -> None:
    result = detect_gpu(tmp_path, DGX, "NVIDIA A100-SXM4-40GB, 81920 MiB\n" * 8, host_gbps=100)
    assert result.warnings == [
        "nvidia-smi reports 81920 MiB per GPU but preset a100-sxm4-40gb has 40 GiB: planned with the "
        "preset's; check the GPU model (a variant?)"
    ]
    assert result.spec.gpu_models["a100-sxm4-40gb"].memory_gib == 40


def test_ranks_with_gpus_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ZoplanError, match="--ranks is for CPU-only machines"):
        detect_gpu(tmp_path, DGX, A100_QUERY, ranks=2)


def test_cpu_flag_ignores_nvidia_smi(tmp_path: Path) -> None:
    def boom(args: Sequence[str]) -> str:
        raise AssertionError("nvidia-smi must not run")

    result = detect(run=boom, which=lambda _: "/usr/bin/nvidia-smi", cpu_only=True)
    assert all(g.model == "cpu-rank" for g in result.spec.gpus)
    assert result.summary.startswith("--cpu given:")


def test_failing_nvidia_smi_reports_its_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    said = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."

    def failed(command, **kw):
        assert kw["timeout"] == topo_detect.NVIDIA_SMI_TIMEOUT_S
        return subprocess.CompletedProcess(command, 9, stdout="", stderr=said + "\n")

    monkeypatch.setattr(topo_detect.subprocess, "run", failed)
    with pytest.raises(ZoplanError) as exc:
        run_nvidia_smi(["topo", "-m"])
    assert exc.value.message == f"`nvidia-smi topo -m` failed with exit status 9: {said}"
    assert "--cpu" in exc.value.fix


def test_hanging_nvidia_smi_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    def hangs(command, **kw):
        raise subprocess.TimeoutExpired(command, kw["timeout"])

    monkeypatch.setattr(topo_detect.subprocess, "run", hangs)
    with pytest.raises(ZoplanError, match=r"did not answer within \d+ s"):
        run_nvidia_smi(["topo", "-m"])


# ----- the command line ---------------------------------------------------------------------------
@pytest.fixture
def plain_consoles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "out", Console(width=200, color_system=None, force_terminal=False))
    monkeypatch.setattr(cli, "err", Console(stderr=True, width=200, color_system=None, force_terminal=False))


def test_cli_cpu_in_process(tmp_path: Path, plain_consoles) -> None:
    out = tmp_path / "box.yaml"
    result = runner.invoke(cli.app, ["topo", "detect", "--cpu", "--ranks", "1", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: --cpu given: 1 CPU rank" in result.stdout
    assert "zoplan calibrate" in result.stdout
    assert load_topology(out).name == "box"
    plan_run = runner.invoke(cli.app, ["plan", "-t", str(out), "-m", "opt-125m", "-b", "4", "-s", "128"])
    assert plan_run.exit_code == 0 and "best: 1×1 on rank0" in plan_run.stdout, plan_run.output


def fake_bin(tmp_path: Path, script: str) -> dict[str, str]:
    """An environment whose PATH starts with a directory holding ``script`` as nvidia-smi."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\n" + script)
    smi.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}


def detect_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "zoplan.cli", "topo", "detect", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_gpu_with_a_fake_nvidia_smi(tmp_path: Path) -> None:
    query = tmp_path / "query.txt"
    query.write_text(A100_QUERY)
    env = fake_bin(tmp_path, f'if [ "$1" = topo ]; then cat "{DGX}"; else cat "{query}"; fi\n')
    out = tmp_path / "dgx.yaml"
    proc = detect_cli(env, "-o", str(out), "--host-gbps", "204.8")
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}: 8x a100-sxm4-80gb" in proc.stdout and proc.stderr == ""
    machine = load_topology(out)
    assert machine.name == "dgx" and len(machine.gpus) == 8
    assert sum(s.memory_gib for s in machine.spec.sockets) == pytest.approx(local_mem_gib(), abs=0.02)


def test_cli_unknown_gpu_exits_2(tmp_path: Path) -> None:
    env = fake_bin(tmp_path, f'if [ "$1" = topo ]; then cat "{DGX}"; else echo "NVIDIA H100 NVL, 95830 MiB"; fi\n')
    proc = detect_cli(env, "-o", str(tmp_path / "x.yaml"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: no GPU preset matches 'NVIDIA H100 NVL'")
    assert "fix: pick the closest preset yourself" in proc.stderr
    assert not (tmp_path / "x.yaml").exists()


def test_cli_failing_nvidia_smi_exits_2_with_its_stderr(tmp_path: Path) -> None:
    env = fake_bin(tmp_path, 'echo "No devices were found" >&2; exit 6\n')
    proc = detect_cli(env, "-o", str(tmp_path / "x.yaml"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "failed with exit status 6: No devices were found" in proc.stderr


@pytest.mark.parametrize("gbps", [0, -1.0, float("inf"), float("nan")])
@pytest.mark.parametrize("cpu_only", [True, False])
def test_a_host_gbps_that_is_not_a_positive_number_is_an_error(tmp_path: Path, cpu_only: bool, gbps: float) -> None:
    with pytest.raises(ZoplanError) as exc:
        detect_gpu(tmp_path, DGX, A100_QUERY, host_gbps=gbps, cpu_only=cpu_only)
    assert exc.value.message == f"--host-gbps must be a positive number, got {gbps}"
