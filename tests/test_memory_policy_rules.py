"""The batch-size search step by step, as docs/memory.md describes it ("The probe"), on scripted
devices: which batch each trial runs, in which phase, and when the search stops.

``test_memory_policy.py`` checks the pick against simulated devices; a search that skips a
documented step still lands within its bounds there. Mutation testing found the second
measurement, the 2% refinement, the 3 + 8 step cap, the clamp for an unresolved slope, the
bisection after a second failure and the "predicted" column removable without a test failing;
each test here pins one of them.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from ddp.memory.policy import Fit, Search, back_off, fit_affine, largest_under, safe_bound

Device = Callable[[int], "float | None"]  # batch → bytes above the baseline, None: out of memory


def _search(device: Device, budget: float, limit: int = 10**7, start: int = 1) -> Search:
    search = Search(budget=budget, limit=limit, start=start)
    while (planned := search.next()) is not None:
        batch, phase = planned
        search.record(batch, phase, device(batch))
    return search


def _steps(search: Search) -> list[tuple[int, str, str]]:
    return [(t.batch, t.phase, "oom" if t.reading is None else "fits" if t.fits else "over") for t in search.trials]


def test_a_small_fixed_part_takes_two_measurements_and_one_verified_step():
    """1. batch 1; 2. the largest batch certain to fit (the line through the origin); 3. the batch
    the fit predicts at 99% of the budget; it fits and the refit promises nothing more: the pick."""
    search = _search(lambda b: 10.0 + b, budget=1000.0)
    assert _steps(search) == [(1, "measure", "fits"), (90, "measure", "fits"), (980, "verify", "fits")]
    assert search.good == 980
    # what the probe table shows as "predicted": the fit before each trial (none before the first)
    assert [t.predicted for t in search.trials] == [None, 990.0, 990.0]


def test_a_verified_pick_is_tried_once_more_only_when_the_refit_promises_2_percent_more():
    little_more = _search(lambda b: 10.0 + b if b < 500 else 5.0 + b, budget=1000.0)  # 980 reads 985
    assert _steps(little_more)[2:] == [(980, "verify", "fits")] and little_more.good == 980
    more = _search(lambda b: 10.0 + b if b < 500 else 0.9 * b, budget=1000.0)  # 980 reads 882: room left
    assert _steps(more)[2:] == [(980, "verify", "fits"), (1101, "verify", "fits")] and more.good == 1101


def test_the_first_out_of_memory_backs_off_2_5_percent_then_it_bisects():
    search = _search(lambda b: None if b > 700 else 10.0 + b, budget=1000.0)  # the device holds less
    assert _steps(search)[:5] == [(1, "measure", "fits"), (90, "measure", "fits"), (980, "verify", "oom"),
                                  (955, "verify", "oom"),  # 980 − 2.5%
                                  (522, "verify", "fits")]  # halfway between 90 (fitted) and 955 (failed)
    assert search.count("verify") <= 3 + 8 and 0.95 * 700 <= search.good <= 700
    for i, trial in enumerate(search.trials):  # never again at or above a batch that failed
        assert all(trial.batch < t.batch for t in search.trials[:i] if not t.fits)


def test_an_over_budget_reading_is_refitted_once_and_a_second_failure_bisects():
    """A fragmentation jump at batch 500: the first over-budget reading is refitted (the new line is
    usually accurate near the budget); when the refit misses too, the line is no guide: bisect."""
    search = _search(lambda b: 10.0 + b if b < 500 else 210.0 + b, budget=1000.0)
    assert _steps(search)[:5] == [(1, "measure", "fits"), (90, "measure", "fits"), (980, "verify", "over"),
                                  (815, "verify", "over"),  # the refit through 980's reading
                                  (452, "verify", "fits")]  # halfway between 90 and 815
    assert search.good == 789  # 790 is the most that fits: within the 3 + 8 steps


def test_after_repeated_out_of_memory_the_search_ends_after_3_plus_8_steps_with_a_batch_that_ran():
    search = _search(lambda b: None if b > 10 else 10.0 + b, budget=1e6)
    assert _steps(search)[:4] == [(1, "measure", "fits"), (90909, "measure", "oom"), (88636, "verify", "oom"),
                                  (44318, "verify", "oom")]
    assert search.count("verify") == 3 + 8 and search.good == 1


def test_one_out_of_memory_does_not_extend_the_3_steps():
    """Two verified steps, each refit promising more, then one out-of-memory error: the search stops
    with the second (8 more steps are allowed only after *repeated* errors)."""
    search = _search(lambda b: 10.0 + b if b < 500 else {980: 784.0, 1242: 900.0}.get(b), budget=1000.0)
    assert _steps(search)[2:] == [(980, "verify", "fits"), (1242, "verify", "fits"), (1319, "verify", "oom")]
    assert search.good == 1242


def test_a_second_failure_before_the_third_step_allows_the_bisection_to_go_on():
    search = _search(lambda b: None if b > 700 else 10.0 + b, budget=1000.0)
    assert search.count("verify") > 3  # 980 and 955 failed, 522 fitted: bisection continues past step 3


def test_measurements_stop_at_the_rank_share_and_nothing_is_tried_twice():
    search = _search(lambda b: 1000.0 + b, budget=1500.0, limit=150, start=100)
    assert _steps(search) == [(100, "measure", "fits"), (136, "measure", "fits"), (150, "measure", "fits")]
    assert search.good == 150


def test_an_unresolved_slope_measures_8_points_then_verifies_at_most_4_times_the_largest():
    """A fixed part that dominates: readings stay within 2× of each other, so the slope is never
    trusted; after 8 measurements each verify step goes at most 4× beyond the largest batch run."""
    search = _search(lambda b: 1000.0 + 0.01 * b, budget=1100.0, start=100)
    steps = _steps(search)
    assert [b for b, phase, _ in steps if phase == "measure"] == [100, 109, 119, 130, 142, 155, 170, 186]
    assert steps[8:] == [(744, "verify", "fits"), (2976, "verify", "fits"), (8900, "verify", "fits")]
    assert search.good == 8900


def test_readings_exactly_twice_apart_resolve_the_slope():
    search = Search(budget=1000.0, limit=10**6)
    search.record(1, "measure", 100.0)
    search.record(2, "measure", 200.0)
    assert search.next() == (9, "verify")  # resolved: the fit's 99% prediction, no third measurement


def test_measuring_never_follows_a_verify_step_even_on_noisy_readings():
    readings = {2: 1000.0, 3: 1200.0, 4: 1050.0}  # 4 reads below 3: noise
    search = _search(lambda b: readings.get(b, 1000.0 + 10 * b), budget=1500.0, start=2)
    phases = [t.phase for t in search.trials]
    assert phases == ["measure", "measure", "verify", "verify", "verify"]


@pytest.mark.parametrize("seed", range(200))
def test_on_noisy_and_non_affine_devices_the_documented_bounds_hold(seed):
    rng = random.Random(seed)
    fixed, slope, power = rng.uniform(0, 1e4), rng.uniform(1, 1e3), rng.uniform(0.85, 1.15)
    budget = fixed + slope * rng.uniform(10, 1e4)
    holds = rng.choice([None, rng.randint(1, 20_000)])  # the device may hold less than the budget says
    noise = rng.choice([0.0, 0.02, 0.1])
    limit, start = rng.choice([10**7, rng.randint(1, 5000)]), rng.choice([1, 2])

    def device(batch: int) -> float | None:
        if holds is not None and batch > holds:
            return None
        return (fixed + slope * batch**power) * (1 + noise * rng.uniform(-1, 1))

    search = _search(device, budget, limit, start)
    phases = [t.phase for t in search.trials]
    assert phases[0] == "measure" and search.trials[0].batch == min(start, limit)
    assert phases == sorted(phases)  # every measurement comes before every verify step
    assert phases.count("measure") <= 8
    failures = sum(not t.fits for t in search.trials)
    assert search.count("verify") <= 3 + (8 if failures > 1 else 0)
    for i, trial in enumerate(search.trials):
        assert trial.batch <= limit
        assert all(trial.batch < t.batch for t in search.trials[:i] if not t.fits)
    assert search.good == 0 or search.good in {t.batch for t in search.trials if t.fits}


# --- the pure functions at their edges --------------------------------------------------------

def test_several_readings_at_one_batch_are_averaged_and_a_reading_below_the_baseline_is_no_growth():
    assert fit_affine([(4, 100.0), (4, 120.0)]) == Fit(0.0, 27.5)
    assert fit_affine([(2, -5.0)]) == Fit(0.0, 0.0)
    assert Fit(100.0, 10.0).at(5) == 150.0


def test_largest_under_a_shallow_slope_and_exactly_at_the_budget():
    assert largest_under(Fit(0.0, 0.5), 10.0, 64) == 20
    assert largest_under(Fit(10.0, 0.0), 10.0, 64) == 64  # no growth and exactly at the budget: fits
    assert largest_under(Fit(10.0, 1.0), 20.0, 64) == 10  # exactly at the budget


def test_safe_bound_on_a_zero_reading_and_on_an_exact_quotient():
    assert safe_bound(4, 0.0, 100.0) == 4  # nothing measurable: no growth claimed, no division by zero
    assert safe_bound(2, 1.0, 100.0) == 200  # 200 samples need exactly the budget
    assert safe_bound(3, 0.5, 10.0) == 60


def test_the_first_back_off_of_a_small_batch_is_one_sample():
    assert back_off(10, 0, 0) == 9 and back_off(40, 0, 0) == 39 and back_off(80, 0, 0) == 78


def test_a_prediction_stays_below_a_batch_that_failed():
    search = Search(budget=1e6, limit=10**6)
    search.record(1, "measure", 10.0)
    search.record(100, "verify", None)
    assert search.prediction() == 99


def test_a_reading_exactly_at_the_budget_fits():
    search = Search(budget=1000.0, limit=10**6)
    assert search.record(5, "measure", 1000.0).fits and not search.record(6, "measure", 1000.5).fits
