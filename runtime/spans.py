"""Measured per-stage spans of a rank's steps, in the simulator's span schema.

The engine wraps every stage of a step (upload, deferred update, all-gather, embed, block
compute, head, scalar exchange, write-back) in :meth:`Spans.span`; a span is
``(stream, category, label, block, start_s, end_s)`` with times from the start of the step, the
fields of zoplan.sim's spans, so the planner's trace code draws measured steps as it draws
simulated ones (``zoplan validate``).

Cost: on the CPU two ``perf_counter`` calls per span. On CUDA a span records two events on the
stream that does the work (no synchronisation); they are read at the end of the step, after the
loss all-reduce has synchronised anyway. On CUDA the host time of each span is kept too (per
category, ``host_totals``): when the host issues kernels slower than the GPU runs them, a stage
lasts as long as its issuing, and the GPU time alone would understate it. Cheap enough to stay on: per step, one line of
per-category totals is written, and the full list of spans for the first ``keep_steps`` steps.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from pathlib import Path

import torch

from zoplan.records import SpanLine


class Spans:
    def __init__(self, device: torch.device, path: Path | None, keep_steps: int = 8) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.file = open(path, "a", buffering=1) if path is not None else None
        self.keep_steps = keep_steps
        self.step: int | None = None
        self._open: list[tuple[str, str, str, int, object, object]] = []
        self._t0: object = None
        self._host: dict[str, float] = defaultdict(float)
        self.host_totals: dict[str, float] = {}  # the last step's host seconds per category (CUDA)
        self._wall0 = 0.0

    @property
    def active(self) -> bool:
        return self.step is not None

    def begin(self, step: int) -> None:
        self.step = step
        self._open = []
        self._host: dict[str, float] = defaultdict(float)
        self._wall0 = time.perf_counter()
        self._t0 = self._stamp(None)

    def _stamp(self, stream):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream or torch.cuda.current_stream(self.device))
        return event

    @contextlib.contextmanager
    def span(self, stream: str, category: str, label: str, block: int, cuda_stream=None):
        """Time the body; ``cuda_stream`` is the stream the body's work is queued on."""
        if self.step is None:
            yield
            return
        start = self._stamp(cuda_stream)
        host0 = time.perf_counter() if self.cuda else 0.0
        try:
            yield
        finally:
            if self.cuda:
                self._host[category] += time.perf_counter() - host0
            self._open.append((stream, category, label, block, start, self._stamp(cuda_stream)))

    def _seconds(self, stamp) -> float:
        if not self.cuda:
            return stamp - self._t0
        return self._t0.elapsed_time(stamp) / 1e3

    def end(self) -> dict[str, float]:
        """Close the step: write its line and return the busy seconds per category."""
        if self.step is None:
            return {}
        if self.cuda:
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - self._wall0
        spans = [(s, c, label, b, self._seconds(t0), self._seconds(t1)) for s, c, label, b, t0, t1 in self._open]
        totals: dict[str, float] = defaultdict(float)
        for _, category, _, _, t0, t1 in spans:
            totals[category] += t1 - t0
        if self.file is not None:  # a line of zoplan.records.SpanLine (built unchecked: a step's own figures)
            self.file.write(
                SpanLine.model_construct(
                    step=self.step,
                    wall_s=wall,
                    totals=dict(totals),
                    host_totals=dict(self._host) if self.cuda else None,
                    peak_bytes=torch.cuda.max_memory_allocated(self.device)
                    if self.cuda
                    else None,  # since the run began
                    spans=[(s, c, label, b, round(t0, 9), round(t1, 9)) for s, c, label, b, t0, t1 in spans]
                    if self.step < self.keep_steps
                    else None,
                ).line()
            )
        self.host_totals = dict(self._host)
        self.step = None
        self._open = []
        return dict(totals)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
