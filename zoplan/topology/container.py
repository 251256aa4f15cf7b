"""The limits a container (Docker, Kubernetes, Slurm: a Linux cgroup) sets this process, below
what the machine has: /proc/meminfo's MemTotal and the cores of the CPU affinity say the machine's.

- memory: cgroup v2 ``memory.max``, v1 ``memory.limit_in_bytes``;
- CPU: v2 ``cpu.max`` (quota and period), v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, in cores;
- out-of-memory kills so far: v2 ``memory.events`` ``oom_kill``, v1 ``memory.oom_control`` ``oom_kill``.

Each is read on this process's cgroup (``/proc/self/cgroup``) and every cgroup above it, up to the
root of the mount, and the lowest limit holds (a limit may sit on a parent: a Kubernetes pod's
around its container's). Inside a container the mount's root is often the container's own cgroup
while /proc/self/cgroup names it from the host's root: the folders that do not exist are skipped,
and the root's files are read. Torch-free, like the rest of the planner; ``zoplan topo detect``
and the runtime (its threads, the launcher's memory check and out-of-memory message) read it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

PROC_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")
# v1 writes "no limit" as the largest page-aligned int64 (9223372036854771712): anything this
# large is none
_UNLIMITED = 1 << 60


@dataclass(frozen=True)
class Limits:
    """What the cgroups above this process allow (None: no limit), each with the file that says it."""

    memory_bytes: int | None = None
    memory_file: Path | None = None
    cpus: float | None = None  # cores' worth of CPU time (a quota of 150000 per 100000 us: 1.5)
    cpu_file: Path | None = None
    oom_file: Path | None = None  # where the out-of-memory kills of the memory limit's cgroup are counted

    def cores(self, available: int) -> int:
        """Whole cores a process may keep busy: ``available`` (its affinity), fewer under a quota
        (at least one)."""
        if self.cpus is None:
            return available
        return max(1, min(available, math.floor(self.cpus + 1e-9)))


def _cgroups(proc_cgroup: Path) -> dict[str, str]:
    """Each controller's cgroup path ("" for cgroup v2's unified one), from /proc/self/cgroup."""
    paths: dict[str, str] = {}
    try:
        text = proc_cgroup.read_text()
    except OSError:
        return paths
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    return paths


def _folders(mount: Path, path: str) -> list[Path]:
    """``mount``/``path`` and every folder above it up to ``mount``, the deepest first, those that exist."""
    parts = [p for p in path.split("/") if p and p not in (".", "..")]
    chain = [mount.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]
    return [folder for folder in chain if folder.is_dir()]


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _number(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def read_limits(proc_cgroup: Path = PROC_CGROUP, root: Path = CGROUP_ROOT) -> Limits:
    """This process's container limits (``Limits()`` where none is set or none can be read)."""
    paths = _cgroups(proc_cgroup)
    memory: tuple[int, Path] | None = None
    cpus: tuple[float, Path] | None = None
    oom: Path | None = None

    def lower_memory(value: int | None, file: Path, events: Path) -> None:
        nonlocal memory, oom
        if value is not None and 0 < value < _UNLIMITED and (memory is None or value < memory[0]):
            memory, oom = (value, file), events

    def lower_cpus(value: float, file: Path) -> None:
        nonlocal cpus
        if value > 0 and (cpus is None or value < cpus[0]):
            cpus = (value, file)

    if "" in paths:  # cgroup v2 (or the unified hierarchy beside v1 controllers)
        for folder in _folders(root, paths[""]):
            text = _read(folder / "memory.max")
            if text is not None and text != "max":
                lower_memory(_number(text), folder / "memory.max", folder / "memory.events")
            quota = (_read(folder / "cpu.max") or "").split()
            if len(quota) == 2 and quota[0] != "max":
                q, period = _number(quota[0]), _number(quota[1])
                if q is not None and period:
                    lower_cpus(q / period, folder / "cpu.max")
    if "memory" in paths:  # v1
        for folder in _folders(root / "memory", paths["memory"]):
            file = folder / "memory.limit_in_bytes"
            lower_memory(_number(_read(file)), file, folder / "memory.oom_control")
    for name in ("cpu", "cpu,cpuacct"):  # v1: the cpu controller's mount (cpu,cpuacct on most systems)
        if "cpu" in paths and (root / name).is_dir():
            for folder in _folders(root / name, paths["cpu"]):
                q, period = _number(_read(folder / "cpu.cfs_quota_us")), _number(_read(folder / "cpu.cfs_period_us"))
                if q is not None and q > 0 and period:
                    lower_cpus(q / period, folder / "cpu.cfs_quota_us")
            break
    return Limits(
        memory_bytes=memory[0] if memory else None,
        memory_file=memory[1] if memory else None,
        cpus=cpus[0] if cpus else None,
        cpu_file=cpus[1] if cpus else None,
        oom_file=oom,
    )


def oom_kills(limits: Limits) -> int | None:
    """How many processes the out-of-memory killer of the memory limit's cgroup has killed so far
    (None: no limit, or the kernel does not count them)."""
    if limits.oom_file is None:
        return None
    for line in (_read(limits.oom_file) or "").splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return _number(value.strip())
    return None
