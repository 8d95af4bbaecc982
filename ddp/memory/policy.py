"""The batch-size search as pure functions: no device, no torch, no clock (unit-tested alone).

Memory of one training step is modelled as affine in the batch size b: ``reading(b) = a + s·b``
(bytes above what the process held before the probe, i.e. above the parameters, gradients and
optimizer state, which are allocated first). ``Search`` decides which batch to try next:

1. measure at b = 1 (2 for models with BatchNorm, which cannot train on one sample);
2. measure at the largest b that is *guaranteed* to fit if memory is affine with a ≥ 0: the line
   through the origin and the largest measured point has a slope ≥ s, so
   ``budget · b_k / reading(b_k)`` can only be too small. Repeat while the readings are too close
   together to resolve the slope (largest < ``SPREAD`` × smallest), at most ``MAX_POINTS`` points;
3. verify the predicted largest batch (aiming at ``AIM`` of the budget) by running it. A success is
   kept (and, when the refit promises ``REFINE`` more, tried once more); an over-budget reading is
   refitted (it lies close to the budget, so the new line is usually accurate there); an
   out-of-memory error backs off by ``back_off``; after that every failure, out of memory or over
   the budget, bisects (a line that missed twice is no guide: memory is not affine there, or the
   device holds less than the budget said). At most ``MAX_VERIFY`` steps follow the measurement
   points (``MAX_BISECT`` more once there were repeated failures); the pick is always a batch that
   actually ran within the budget. ``tests/test_memory_policy.py`` also runs it against devices
   that are not affine (docs/memory.md says how far the 95% goes there).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

MAX_POINTS = 8  # measurement points at most (2 when the fixed part is small; more only when it dominates)
UNRESOLVED_STEP = 4  # with the slope still unresolved after MAX_POINTS, verify at most 4 × the largest point
MAX_VERIFY = 3  # trial steps after the measurement points
SPREAD = 2.0  # the slope is trusted once the largest reading is this many times the smallest
AIM = 0.99  # verify the batch predicted at this share of the budget (noise margin)
REFINE = 1.02  # after a verified pick, try the refit's prediction when it is this much larger
BACK_OFF_STEP = 0.025  # after a first OOM: 2.5% smaller; after more, bisection (see back_off)
MAX_BISECT = 8  # extra verify steps allowed once out-of-memory errors show the budget was wrong


@dataclass(frozen=True)
class Fit:
    """``bytes(b) = intercept + slope · b``."""

    intercept: float
    slope: float

    def at(self, batch: int) -> float:
        return self.intercept + self.slope * batch


def fit_affine(points: Sequence[tuple[int, float]]) -> Fit:
    """Least-squares line through (batch, bytes) points. One point (or one distinct batch): the
    line through the origin, which for a ≥ 0 overestimates the slope (a safe, small prediction)."""
    batches = {b for b, _ in points}
    if not points:
        raise ValueError("fit_affine needs at least one point")
    if len(batches) == 1:
        batch = points[0][0]
        return Fit(0.0, max(sum(r for _, r in points) / len(points), 0.0) / batch)
    n = len(points)
    mean_b = sum(b for b, _ in points) / n
    mean_r = sum(r for _, r in points) / n
    var = sum((b - mean_b) ** 2 for b, _ in points)
    slope = sum((b - mean_b) * (r - mean_r) for b, r in points) / var
    return Fit(mean_r - slope * mean_b, slope)


def largest_under(fit: Fit, budget: float, limit: int) -> int:
    """The largest batch in [0, limit] whose predicted bytes are ≤ ``budget`` (0: not even one)."""
    if fit.slope <= 0:
        return limit if fit.intercept <= budget else 0
    room = (budget - fit.intercept) / fit.slope
    return max(0, min(limit, math.floor(room + 1e-9)))


def safe_bound(batch: int, reading: float, budget: float) -> int:
    """The largest batch certain to fit when memory is affine with a non-negative intercept: the
    line through the origin and (batch, reading) is at least as steep as the true one."""
    if reading <= 0:
        return batch
    return max(batch, math.floor(budget * batch / reading + 1e-9))


def back_off(failed: int, good: int, attempt: int) -> int:
    """The batch to try after ``failed`` ran out of memory, given ``good`` (the largest batch that
    ran under the budget, 0 if none) and the number of earlier out-of-memory errors.

    The first time, 2.5% smaller: the fit was slightly off (timm's ``decay_batch_step`` idea: a
    fixed, testable rule). After that the device evidently holds less than the budget promised
    (another process took memory), so bisect between ``good`` and ``failed``. Never ``failed`` or
    above, never below ``good``; returning ``good`` means: stop, keep it."""
    if attempt == 0:
        return max(good, min(failed - 1, math.floor(failed * (1 - BACK_OFF_STEP))))
    return good + (failed - good) // 2


@dataclass
class Trial:
    batch: int
    reading: float | None  # bytes above the baseline; None after an out-of-memory error
    phase: str  # "measure" | "verify"
    predicted: float | None  # bytes the fit predicted before running it
    fits: bool  # ran and stayed within the budget


@dataclass
class Search:
    """Which batch to run next. ``budget`` and readings are in bytes above the baseline."""

    budget: float
    limit: int  # largest useful batch (e.g. the rank's share of the dataset)
    start: int = 1  # the smallest batch the model can train on (2 with BatchNorm)
    trials: list[Trial] = field(default_factory=list)

    @property
    def good(self) -> int:
        return max((t.batch for t in self.trials if t.fits), default=0)

    @property
    def failed(self) -> int | None:
        return min((t.batch for t in self.trials if not t.fits), default=None)

    @property
    def points(self) -> list[tuple[int, float]]:
        return [(t.batch, t.reading) for t in self.trials if t.reading is not None]

    def count(self, phase: str) -> int:
        return sum(t.phase == phase for t in self.trials)

    def prediction(self, aim: float = AIM) -> int:
        """Largest batch the readings predict under ``aim`` × budget (below any failed batch)."""
        ceiling = self.limit if self.failed is None else min(self.limit, self.failed - 1)
        return largest_under(fit_affine(self.points), self.budget * aim, ceiling) if self.points else 1

    def next(self) -> tuple[int, str] | None:
        """(batch, phase) of the next trial, or None when ``good`` is the answer."""
        if not self.trials:
            return max(1, min(self.start, self.limit)), "measure"
        if self.good == 0:  # the smallest batch did not fit: nothing smaller to try
            return None
        if self.count("verify") == 0 and self.failed is None and not self._slope_resolved():
            largest, reading = max(self.points)
            safe = min(self.limit, safe_bound(largest, reading, self.budget))
            if safe > largest and self.count("measure") < MAX_POINTS:
                return safe, "measure"
        return self._verify_step()

    def _slope_resolved(self) -> bool:
        readings = [r for _, r in self.points]
        return max(readings) >= SPREAD * max(min(readings), 1.0)

    def _verify_step(self) -> tuple[int, str] | None:
        failures = sum(not t.fits for t in self.trials)  # out of memory, or over the budget
        if self.count("verify") >= MAX_VERIFY + (MAX_BISECT if failures > 1 else 0):
            return None
        last = self.trials[-1]
        if last.reading is None or (not last.fits and failures > 1):  # no reading, or the refit missed: back off
            target = back_off(last.batch, self.good, failures - 1)
        else:
            target = self.prediction()
            if not self._slope_resolved():
                target = min(target, UNRESOLVED_STEP * max(b for b, _ in self.points))
            if last.fits and last.phase == "verify" and target < last.batch * REFINE:
                return None  # verified, and the refit promises little more
        return (target, "verify") if target > self.good else None

    def record(self, batch: int, phase: str, reading: float | None) -> Trial:
        predicted = fit_affine(self.points).at(batch) if self.points else None
        trial = Trial(batch, reading, phase, predicted, reading is not None and reading <= self.budget)
        self.trials.append(trial)
        return trial


def sound_batch(fits: int, train_samples: int, world: int, accumulate: int, min_steps: int) -> int:
    """``data.batch_size=auto``: the largest per-rank batch that fits, but never so large that an
    epoch has fewer than ``min_steps`` optimizer steps. The largest batch that fits is often the
    whole shard (one step per epoch), which trains a poor model at the recipe's learning rate;
    keeping the steps per epoch near a hand-picked batch's keeps its learning rate sound."""
    cap = max(1, train_samples // (world * accumulate * max(min_steps, 1)))
    return max(1, min(fits, cap))
