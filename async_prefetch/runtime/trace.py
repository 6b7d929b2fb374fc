"""Optional record of what a prefetch run did: which steps ran, when, and how many rows.

``with tracing() as trace: await aprefetch(...)`` fills ``trace.steps``; the demo
prints it to show which lookups ran together. Without ``tracing()`` the engine pays
one ``None`` check per step.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

ROOT_KEY = "(queryset)"
"""The key of a run's root query (the queryset's own rows)."""


@dataclass
class StepTrace:
    """One step of a run: ``kind`` is ``query``, ``django`` (delegated) or ``walk``."""

    key: str
    kind: str
    started: float
    finished: float = 0.0
    objects: int = 0
    sql: str | None = None
    params: Any = None


@dataclass
class RunTrace:
    """Steps of every run started inside one ``tracing()`` block, times from its start."""

    origin: float = field(default_factory=time.perf_counter)
    steps: list[StepTrace] = field(default_factory=list)
    #: Lookups learned plans added to calls in the block (``learn=True``), in order.
    learned: list[str] = field(default_factory=list)

    def start(self, key: str, kind: str, sql: str | None = None, params: Any = None) -> StepTrace:
        step = StepTrace(key, kind, time.perf_counter() - self.origin, sql=sql, params=params)
        self.steps.append(step)
        return step

    def finish(self, step: StepTrace, objects: int) -> None:
        step.finished = time.perf_counter() - self.origin
        step.objects = objects

    @property
    def queries(self) -> int:
        """Steps that sent a query of the engine's own."""
        return sum(step.kind == "query" for step in self.steps)

    def render(self, width: int = 40) -> str:
        """A text timeline: one line per step, a bar from its start to its end."""
        if not self.steps:
            return "(no steps)"
        end = max(step.finished for step in self.steps) or 1e-9
        key_width = max(len(step.key) for step in self.steps)
        lines = []
        for step in sorted(self.steps, key=lambda s: (s.started, s.key)):
            left = min(width - 1, round(step.started / end * width))
            right = min(width, max(left + 1, round(step.finished / end * width)))
            bar = " " * left + "#" * (right - left) + " " * (width - right)
            lines.append(
                f"{step.key:<{key_width}} |{bar}| {step.started * 1000:7.2f} -> "
                f"{step.finished * 1000:7.2f} ms  {step.kind:<6} {step.objects} objects"
            )
        return "\n".join(lines)


_current: ContextVar[RunTrace | None] = ContextVar("async_prefetch_trace", default=None)


@contextmanager
def tracing() -> Iterator[RunTrace]:
    """Record the steps of every engine run started in this block (sync or async)."""
    trace = RunTrace()
    token = _current.set(trace)
    try:
        yield trace
    finally:
        _current.reset(token)


def current_trace() -> RunTrace | None:
    """The trace of the enclosing ``tracing()`` block, captured by the API on the caller's side."""
    return _current.get()
