"""zoplan's words for the choices a plan makes, each spelled once.

Every value is a ``StrEnum``: a member equals, hashes and prints as its string, so plan files,
command lines and tables read plain strings ("bf16", "sliced"), and code that compares with a
string keeps working. The on-disk schemas (zoplan.fileio.Strict) store the plain value.
No imports beyond the standard library: everything may use this module.
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Mapping

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # Python 3.10: the same behaviour, as the standard library later defined it
    from enum import Enum

    class StrEnum(str, Enum):
        def __str__(self) -> str:
            return str(self.value)


class Dtype(StrEnum):
    """How parameters are stored: in the host copy, on the wire (PCIe), on the device."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


# bytes per parameter, by the dtype's plain name
DTYPE_BYTES: dict[str, int] = {Dtype.FP32.value: 4, Dtype.BF16.value: 2, Dtype.FP16.value: 2}


class Upload(StrEnum):
    """whole: each compute GPU uploads every block itself; sliced: the movers share each block."""

    WHOLE = "whole"
    SLICED = "sliced"


class Movers(StrEnum):
    """Who uploads slices: the compute GPUs only, or every GPU (the others relay)."""

    COMPUTE = "compute"
    ALL = "all"


class Schedule(StrEnum):
    """The learning rate over the run."""

    CONSTANT = "constant"
    LINEAR = "linear"
    COSINE = "cosine"


class Method(StrEnum):
    """What a run trains (zoplan.tuning): every weight, or an adapter on read-only blocks."""

    FULL = "full"
    LORA = "lora"
    PREFIX = "prefix"


class Objective(StrEnum):
    """What the search ranks plans by: step time, or dollars per million tokens."""

    TIME = "time"
    COST = "cost"


class Stream(StrEnum):
    """A device's in-order streams in the step program (zoplan.program)."""

    UPLOAD = "upload"
    EXCHANGE = "exchange"
    COMPUTE = "compute"
    OFFLOAD = "offload"


class Meetings(StrEnum):
    """How the CPU ranks of one machine meet before a whole block and sum the loss: through a page
    of shared memory (zoplan.runtime.dist.NodeMeeting), or through collective calls (gloo)."""

    SHARED_MEMORY = "shared-memory"
    COLLECTIVE = "collective"


def local_meetings() -> Meetings:
    """How this machine's CPU ranks meet: through shared memory where a plain store is seen after
    the stores before it (x86's total store order, which NodeMeeting's ordering relies on), else
    through collective calls."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return Meetings.SHARED_MEMORY if x86 else Meetings.COLLECTIVE


def run_meetings(environ: Mapping[str, str]) -> Meetings:
    """How a run's CPU ranks meet here: as this machine's CPU lets them (``local_meetings``),
    unless ``ZOPLAN_MEETINGS=gloo`` asks for collective calls."""
    return Meetings.COLLECTIVE if environ.get("ZOPLAN_MEETINGS", "") == "gloo" else local_meetings()
