"""The batch-size search as pure functions, and against a simulated device with a hard cap."""

from __future__ import annotations

import math
import random

import pytest
import torch

from bench.simulated_memory import MB, SimulatedDevice
from ddp.memory.estimate import estimate_state
from ddp.memory.policy import MAX_BISECT, MAX_VERIFY, Fit, Search, back_off, fit_affine, largest_under, safe_bound
from ddp.memory.trials import probe_model
from ddp.model.zoo import mnist_mlp


def test_fit_is_exact_through_two_points_and_least_squares_through_more():
    assert fit_affine([(1, 110.0), (11, 210.0)]) == Fit(100.0, 10.0)
    fit = fit_affine([(1, 11.0), (2, 13.0), (3, 15.0), (4, 17.0)])
    assert fit.intercept == pytest.approx(9.0) and fit.slope == pytest.approx(2.0)
    noisy = fit_affine([(1, 12.0), (2, 12.0), (3, 16.0), (4, 16.0)])
    assert noisy.slope == pytest.approx(1.6)


def test_one_point_fits_through_the_origin_which_overestimates_the_slope():
    fit = fit_affine([(4, 100.0)])
    assert fit == Fit(0.0, 25.0)
    with pytest.raises(ValueError):
        fit_affine([])


def test_largest_under_budget_and_limit():
    fit = Fit(100.0, 10.0)
    assert largest_under(fit, 1000.0, 10**6) == 90
    assert largest_under(fit, 1000.0, 50) == 50
    assert largest_under(fit, 99.0, 50) == 0
    assert largest_under(Fit(5.0, 0.0), 10.0, 64) == 64  # no measurable growth: the limit
    assert largest_under(Fit(5.0, -1.0), 1.0, 64) == 0


def test_safe_bound_never_exceeds_the_true_maximum_of_an_affine_device():
    rng = random.Random(1)
    for _ in range(2000):
        a, s = rng.uniform(0, 1e9), rng.uniform(1, 1e7)
        budget = a + s * rng.uniform(1, 1e5)
        true_max = int((budget - a) // s)
        b = rng.randint(1, max(1, true_max))
        assert safe_bound(b, a + s * b, budget) <= true_max


def test_back_off_first_a_small_step_then_bisection():
    assert back_off(1000, 0, 0) == 975  # the fit was a little off
    assert back_off(1000, 980, 0) == 980  # never below the largest batch that fitted: stop there
    assert back_off(2, 1, 0) == 1
    assert [back_off(1000, 200, k) for k in (1, 2)] == [600, 600]  # the device holds less than promised
    assert back_off(201, 200, 3) == 200


def test_repeated_out_of_memory_bisects_down_to_what_the_device_holds():
    search = Search(budget=10_000.0, limit=10**6)
    cap = 37
    while (planned := search.next()) is not None:
        batch, phase = planned
        search.record(batch, phase, None if batch > cap else 10.0 * batch)  # budget says 1,000 fit
    assert 0.9 * cap <= search.good <= cap


def test_batch_1_that_does_not_fit_ends_the_search_with_nothing():
    search = Search(budget=100.0, limit=1000)
    assert search.next() == (1, "measure")
    search.record(1, "measure", 150.0)
    assert search.next() is None and search.good == 0


def test_over_budget_reading_is_refitted_below_the_failure():
    search = Search(budget=1000.0, limit=10**6)
    search.record(1, "measure", 20.0)
    search.record(50, "measure", 500.0)
    batch, phase = search.next()
    assert phase == "verify" and batch == largest_under(fit_affine(search.points), 990.0, 10**6)
    search.record(batch, phase, 1100.0)  # the device turned out steeper than the line
    retry, _ = search.next()
    assert 50 < retry < batch
    assert largest_under(fit_affine(search.points), 990.0, batch - 1) == retry


def run_policy(device: SimulatedDevice, limit: int = 10**7) -> Search:
    search = Search(budget=device.budget(), limit=limit)
    while (planned := search.next()) is not None:
        batch, phase = planned
        search.record(batch, phase, None if batch > device.cap else float(device.peak_for(batch)))
    return search


@pytest.mark.parametrize("cap", [100, 5_000, 100_000])
@pytest.mark.parametrize("fixed_share", [0.0, 0.02, 0.1])
def test_simulated_cap_pick_is_at_least_95_percent_never_above(cap, fixed_share):
    for seed in range(40):
        device = SimulatedDevice(cap=cap, fixed_share=fixed_share, seed=seed)
        search = run_policy(device)
        assert 0.95 * cap <= search.good <= cap, (seed, [(t.batch, t.phase, t.fits) for t in search.trials])
        assert search.count("verify") <= MAX_VERIFY
        assert search.good in {t.batch for t in search.trials if t.fits}  # the pick actually ran


@pytest.mark.parametrize("cap", [100, 5_000, 100_000])
def test_probe_on_a_real_model_against_the_simulated_device(cap):
    """probe_model end to end (real steps of a small MLP, OOM raised inside the forward)."""
    device = SimulatedDevice(cap=cap, per_sample=0.25 * 2**20, seed=cap)
    model = device.attach(mnist_mlp((1, 4, 4), 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    estimate = estimate_state(model, "sgd", 0.9)
    results = probe_model(model, optimizer, (1, 4, 4), 10, device, estimate.state + device.budget(),
                          {"train": 10**7}, estimate)
    search = results["train"].search
    assert 0.95 * cap <= results["train"].pick <= cap
    measured = search.count("measure")
    assert measured <= 3 and search.count("verify") <= 3 and device.forwards == measured + search.count("verify")


class CurvedDevice:
    """A device whose memory is NOT affine in the batch: allocator blocks (readings rounded up),
    one fragmentation jump at a batch, a quadratic or power-law term, and noise. The true maximum
    is the largest batch whose exact memory is within the budget; above it the device runs out
    of memory, below it every reading is the exact memory ± noise."""

    def __init__(self, budget: float, seed: int, *, fixed: float = 0.02, block: float = 0.0, jump: float = 0.0,
                 quadratic: float = 0.0, power: float = 1.0, noise: float = 0.003) -> None:
        rng = random.Random(seed)
        self.budget, self.noise, self._rng = budget, noise, rng
        samples = budget / MB  # an affine device with 1 MB per sample would hold about this many
        self.fixed, self.block, self.jump = fixed * budget, block * budget, jump * budget
        self.jump_at = max(2, int(rng.uniform(0, 1) * samples))  # anywhere, below or above the measurements
        self.quadratic = quadratic * budget / samples**2  # its share of the budget at ``samples``
        self.per_sample = MB * samples ** (1 - power)  # b**power: the same 1 MB/sample at ``samples``
        self.power = power
        low, high = 0, 1
        while self.exact(high) <= budget:
            high *= 2
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if self.exact(middle) <= budget else (low, middle)
        self.cap = low

    def exact(self, batch: int) -> float:
        bytes_ = self.fixed + self.per_sample * batch**self.power + self.quadratic * batch**2
        bytes_ += self.jump if batch >= self.jump_at else 0.0
        return math.ceil(bytes_ / self.block) * self.block if self.block else bytes_

    def reading(self, batch: int) -> float | None:
        if batch > self.cap:
            return None  # out of memory
        return self.exact(batch) * (1 + self._rng.uniform(-self.noise, self.noise))


def _curved_picks(**shape: float) -> list[float]:
    """The pick as a share of the true maximum on 100 seeds at 3 sizes (~100, 5,000 and 100,000 samples)."""
    shares = []
    for samples in (100, 5_000, 100_000):
        for seed in range(100):
            device = CurvedDevice(samples * MB, seed * 7919 + samples, **shape)
            search = Search(budget=device.budget, limit=10**7)
            while (planned := search.next()) is not None:
                search.record(planned[0], planned[1], device.reading(planned[0]))
            assert search.good <= device.cap  # never above: the pick is a batch that ran within the budget
            assert search.good in {t.batch for t in search.trials if t.fits and t.reading <= device.budget}
            assert search.count("verify") <= MAX_VERIFY + MAX_BISECT
            shares.append(search.good / device.cap)
    return shares


# docs/memory.md "Memory that is not affine" states these bounds: keep them in step
HOLDS = {
    "noise ±2%": dict(noise=0.02),
    "allocator blocks of 2% of the budget": dict(block=0.02),
    "a fragmentation jump of 5% of the budget at any batch": dict(jump=0.05),
    "a quadratic term, 80% of the budget at the maximum": dict(quadratic=0.8),
    "memory growing as batch^1.3": dict(power=1.3),
    "blocks 1%, jump 5%, quadratic 30%, noise ±1% together": dict(block=0.01, jump=0.05, quadratic=0.3, noise=0.01),
}
BREAKS = {  # name: (shape, the floor docs/memory.md gives)
    "noise ±5%": (dict(noise=0.05), 0.9),
    "allocator blocks of 5% of the budget": (dict(block=0.05), 0.9),
    "a fragmentation jump of 20% of the budget": (dict(jump=0.2), 0.7),
    "memory growing as batch^0.8": (dict(power=0.8), 0.9),
}


@pytest.mark.parametrize("shape", list(HOLDS.values()), ids=list(HOLDS))
def test_non_affine_device_within_the_documented_bounds_picks_at_least_95_percent_never_above(shape):
    assert min(_curved_picks(**shape)) >= 0.95


@pytest.mark.parametrize("shape, floor", list(BREAKS.values()), ids=list(BREAKS))
def test_beyond_the_documented_bounds_the_pick_can_fall_below_95_percent_but_never_above(shape, floor):
    """Where docs/memory.md says the 95% promise breaks, it does, down to the floor it gives (when
    the policy gets better, move the case to HOLDS and the docs with it); never above holds everywhere."""
    shares = _curved_picks(**shape)
    assert floor <= min(shares) < 0.95
