"""Interleaved rounds: every round launches every (workload, world size, implementation) once.

Within a round, ours and its competitors run back to back on the same workload and world size,
in an order rotated each round, so slow drift of the machine (thermal, neighbours, caches) hits
every side alike. A ratio is formed per round from the runs of that round only. Each launch waits
for an idle machine first and is repeated (up to ``Plan.retries`` times) when other processes
used the CPU meanwhile; one still disturbed after that is kept and counted in the report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.measure import read_steps, throughput, time_to_first_step
from bench.quiet import wait_until_quiet
from bench.runners import OURS, Implementation, RunFailed, launch
from bench.workloads import BATCH_SIZE, Workload


@dataclass(frozen=True)
class Plan:
    workloads: list[Workload]
    worlds: list[int]
    competitors: list[Implementation]  # the ones that can run here
    skipped: dict[str, str]  # competitor key → why it does not run
    rounds: int
    quick: bool
    timeout: float  # per launch, seconds
    quiet_wait: float = 120.0  # longest wait for an idle machine before each launch, seconds
    retries: int = 2  # repeats of a launch other processes disturbed
    ours_extra: tuple[str, ...] = ()  # extra key=value overrides for ours (e.g. data.loader=dataloader)

    @property
    def launches(self) -> int:
        return self.rounds * len(self.workloads) * len(self.worlds) * (1 + len(self.competitors))


@dataclass(frozen=True)
class Measurement:
    samples_per_s: float
    first_step_s: float
    attempts: int = 1  # launches it took (more than 1: earlier ones were disturbed)
    disturbed: bool = False  # other processes used the CPU even in the last attempt


Key = tuple[str, int, str]  # (workload key, world size, implementation key)


@dataclass
class Results:
    """Per key, one entry per round: a Measurement, or the failure message."""

    runs: dict[Key, list[Measurement | str]] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, key: Key, outcome: Measurement | str) -> None:
        self.runs.setdefault(key, []).append(outcome)

    def measured(self, key: Key) -> list[Measurement | None]:
        return [m if isinstance(m, Measurement) else None for m in self.runs.get(key, [])]

    def failures(self) -> list[str]:
        return [m for outcomes in self.runs.values() for m in outcomes if isinstance(m, str)]

    def measurements(self) -> list[Measurement]:
        return [m for outcomes in self.runs.values() for m in outcomes if isinstance(m, Measurement)]


def round_order(implementations: list[Implementation], round_index: int) -> list[Implementation]:
    """The launch order for one round: rotated by the round index."""
    shift = round_index % len(implementations)
    return implementations[shift:] + implementations[:shift]


def run_plan(plan: Plan, workdir: Path, progress: Callable[[str], None] = print) -> Results:
    """Launch everything in ``plan``; a failed launch is recorded and the rest still runs."""
    results = Results()
    done = 0
    for round_index in range(plan.rounds):
        for workload in plan.workloads:
            for world in plan.worlds:
                for impl in round_order([OURS, *plan.competitors], round_index):
                    run_dir = workdir / f"round{round_index + 1}" / f"{workload.key}-w{world}-{impl.key}"
                    outcome = measure(impl, workload, world, plan, run_dir)
                    results.add((workload.key, world, impl.key), outcome)
                    done += 1
                    progress(f"[{done}/{plan.launches}] round {round_index + 1} {workload.key} × {world} "
                             f"{impl.key}: {describe(outcome)}")
    return results


def measure(impl: Implementation, workload: Workload, world: int, plan: Plan, run_dir: Path) -> Measurement | str:
    """One measurement: launched on an idle machine, repeated while other processes disturb it."""
    outcome: Measurement | str = "never launched"
    for attempt in range(1, plan.retries + 2):
        wait_until_quiet(plan.quiet_wait)
        outcome = measure_once(impl, workload, world, plan, run_dir / f"attempt{attempt}", attempt)
        if isinstance(outcome, str) or not outcome.disturbed:
            return outcome
    return outcome


def measure_once(impl: Implementation, workload: Workload, world: int, plan: Plan, run_dir: Path,
                 attempt: int = 1) -> Measurement | str:
    """One launch → its Measurement, or a one-line failure message."""
    try:
        result = launch(impl, workload, world, plan.quick, run_dir, plan.timeout, plan.ours_extra)
        steps = read_steps(result.steps)
        return Measurement(throughput(steps, BATCH_SIZE * world), time_to_first_step(steps, result.launched_at),
                           attempt, result.disturbed)
    except RunFailed as err:
        return str(err)
    except (OSError, ValueError) as err:
        return f"{impl.key} on {workload.key} × {world}: {err} (run dir: {run_dir})"


def describe(outcome: Measurement | str) -> str:
    if isinstance(outcome, str):
        return f"FAILED ({outcome})"
    notes = (f", attempt {outcome.attempts}" if outcome.attempts > 1 else "") + (
        ", DISTURBED by other processes" if outcome.disturbed else "")
    return f"{outcome.samples_per_s:,.0f} samples/s, first step after {outcome.first_step_s:.2f} s{notes}"
