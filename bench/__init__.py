"""zoplan's benchmarks: measurements only, each run from the repository root as
`python -m bench.NAME` (its usage in the module's docstring); results in docs/results/.
"""

from __future__ import annotations

import os
import platform
import time
import timeit


def cpu_name() -> str:
    """The processor's model name as the kernel reports it (``AMD EPYC``, ``Intel(R) Xeon(R) ...``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def python_speed_ms() -> float:
    """Milliseconds this machine's Python takes for ``sum(range(10**6))`` (best of 5): the
    planner's figures are single-threaded Python, and they scale with this between machines."""
    return min(timeit.repeat("sum(range(10**6))", number=1, repeat=5)) * 1e3


def machine() -> dict[str, object]:
    """What a benchmark's result file says about the machine it ran on."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "cpu": cpu_name(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "python_sum_1e6_ms": round(python_speed_ms(), 2),
    }


def describe(info: dict[str, object]) -> str:
    """One line for a benchmark's output: the machine and when."""
    return (
        f"{info['date']}, {info['cpu']}, {info['cpus']} CPUs, Python {info['python']} "
        f"(sum(range(10**6)): {info['python_sum_1e6_ms']} ms)"
    )
