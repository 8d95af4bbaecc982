"""Where this rank is: its phase (loading data, computing, evaluating, saving) and step.

The training loop and evaluation mark their phase here with plain attribute writes (no I/O, no
lock: the hot path pays a few nanoseconds). The heartbeat thread (``ddp.cluster.heartbeat``)
publishes ``snapshot()`` with every beat, so the watchdog of every rank can tell when no rank has
made progress and which rank is behind (``ddp.cluster.watchdog``). One position per process.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

STARTING, DATA, COMPUTE, EVALUATING, SAVING, DONE = "starting", "data", "compute", "eval", "save", "done"
PHASE_ORDER = {STARTING: 0, DATA: 1, COMPUTE: 2, EVALUATING: 3, SAVING: 4, DONE: 5}  # within one step
DESCRIBE = {STARTING: "starting up", DATA: "loading data for step {next}", COMPUTE: "computing step {next}",
            EVALUATING: "evaluating after step {step}", SAVING: "saving the checkpoint of step {step}",
            DONE: "finished"}


@dataclass
class Position:
    """A rank's position as published: ``count`` grows with every step and evaluation batch."""

    phase: str = STARTING
    step: int = 0  # optimizer steps completed
    count: int = 0  # steps + evaluation batches completed: progress, whatever the phase
    median_step_s: float = 0.0  # over this rank's recent steps; 0 before the second step

    def encode(self) -> str:
        return f"{self.phase} {self.step} {self.count} {self.median_step_s:.6f}"

    @classmethod
    def decode(cls, text: str) -> Position:
        phase, step, count, median = text.split()
        return cls(phase, int(step), int(count), float(median))

    def order(self) -> tuple[int, int]:
        return self.step, PHASE_ORDER.get(self.phase, 0)

    def describe(self) -> str:
        return DESCRIBE.get(self.phase, self.phase).format(step=self.step, next=self.step + 1)


class _Tracker:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.phase, self.step, self.count = STARTING, 0, 0
        self._last_step_at = 0.0
        self._durations: deque[float] = deque(maxlen=101)

    def snapshot(self) -> Position:
        median = statistics.median(self._durations) if self._durations else 0.0
        return Position(self.phase, self.step, self.count, median)


_tracker = _Tracker()


def mark(phase: str) -> None:
    _tracker.phase = phase


def step_done(step: int) -> None:
    """An optimizer step finished (``step`` steps so far)."""
    now = time.monotonic()
    if _tracker._last_step_at and step == _tracker.step + 1:
        _tracker._durations.append(now - _tracker._last_step_at)
    _tracker._last_step_at = now
    _tracker.step = step
    _tracker.count += 1


def tick() -> None:
    """Progress that is not a step (an evaluation batch)."""
    _tracker.count += 1


def track(batches: Iterable[T], phase: str = DATA, after: str = COMPUTE) -> Iterator[T]:
    """Yield from ``batches``, marking ``phase`` while the next one is fetched and ``after`` once it came."""
    iterator = iter(batches)
    while True:
        _tracker.phase = phase
        try:
            batch = next(iterator)
        except StopIteration:
            return
        _tracker.phase = after
        yield batch


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Mark ``name`` for the body, then go back to the phase before it."""
    before = _tracker.phase
    _tracker.phase = name
    try:
        yield
    finally:
        _tracker.phase = before


def snapshot() -> Position:
    return _tracker.snapshot()


def reset() -> None:
    """A new run in this process (tests, ``ddp.fit`` called twice) starts from nothing."""
    _tracker.reset()
