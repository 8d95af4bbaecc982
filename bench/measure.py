"""Timing math: step records → steady-state throughput and time to first step; ratios → summaries.

Every implementation is measured by the same rule, from the step records its rank 0 writes right
after each optimizer step (``{"kind": "step", "epoch": e, "step": k, "time": <time.time()>}``, one
per step):

* **Steady-state throughput** (samples/s): step k's duration is ``time[k] - time[k-1]``. Steps
  1..``drop`` are dropped (warm-up: allocator, DDP bucket set-up, first collectives), and so are the
  first step of every later epoch (its interval holds ours' end-of-epoch evaluation and every
  side's new DataLoader iterator) and the last step of every epoch (its batch may be partial). The
  result is ``kept steps × global batch ÷ sum of kept durations``. Inside one epoch this is exactly
  ``(step_last − step_first_kept) × global_batch ÷ (time_last − time_first_kept)``, minus the last step.
* **Time to first step** (s): ``time[1]`` minus the wall-clock time just before ``torchrun`` was
  started, so it includes the launcher, interpreter start-up, imports, rendezvous, data and model
  construction and the whole first step.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

DROP_STEPS = 3  # at least this many leading steps are never timed


@dataclass(frozen=True)
class Step:
    epoch: int
    step: int
    time: float


def read_steps(path: Path) -> list[Step]:
    """The ``kind == "step"`` records of a JSONL file, in step order."""
    steps = []
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            if record.get("kind") == "step":
                steps.append(Step(int(record["epoch"]), int(record["step"]), float(record["time"])))
    return sorted(steps, key=lambda s: s.step)


def drop_count(total_steps: int) -> int:
    """Leading steps to drop: ``DROP_STEPS``, or a tenth of the run when that is more."""
    return max(DROP_STEPS, total_steps // 10)


def kept_durations(steps: list[Step], drop: int) -> list[float]:
    """Durations of the steps the throughput rule keeps (see the module docstring)."""
    durations = []
    for index in range(1, len(steps)):
        previous, current = steps[index - 1], steps[index]
        last_of_epoch = index + 1 == len(steps) or steps[index + 1].epoch != current.epoch
        if current.step <= drop or current.step != previous.step + 1:
            continue
        if current.epoch != previous.epoch or last_of_epoch:
            continue
        durations.append(current.time - previous.time)
    return durations


def throughput(steps: list[Step], global_batch: int, drop: int | None = None) -> float:
    """Steady-state samples/s; raises ``ValueError`` when no step is left to time."""
    durations = kept_durations(steps, drop_count(len(steps)) if drop is None else drop)
    if not durations or sum(durations) <= 0:
        raise ValueError(f"no timed steps among {len(steps)} step records (need more than {DROP_STEPS + 2})")
    return len(durations) * global_batch / sum(durations)


def time_to_first_step(steps: list[Step], launched_at: float) -> float:
    """Seconds from just before the launcher started to the end of optimizer step 1."""
    first = next((s for s in steps if s.step == 1), None)
    if first is None:
        raise ValueError("no record for step 1")
    return first.time - launched_at


@dataclass(frozen=True)
class Summary:
    """Median and range of one quantity over rounds."""

    median: float
    low: float
    high: float
    count: int

    @classmethod
    def of(cls, values: list[float]) -> Summary:
        if not values:
            raise ValueError("no values to summarise")
        return cls(statistics.median(values), min(values), max(values), len(values))
