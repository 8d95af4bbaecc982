"""The batch-probe benchmark's own side runs and reports (Lightning/Accelerate need the bench extras)."""

from bench.batch_probe import Outcome, ours, render


def test_our_side_of_the_batch_probe_bench():
    outcome = ours(100, seed=0)
    assert 95 <= outcome.found <= 100 and outcome.steps <= 4 and outcome.verdict == "ok"
    report = render([[outcome], [Outcome("other", 100, 128, 7, 0.5)]], seeds=1)
    assert "| 100 | ours (ddp.memory) |" in report and "ABOVE the cap" in report
