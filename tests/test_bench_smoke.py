"""The benchmark suite runs end to end and reports what it promises. Speed is never asserted here:
no timing figure or ratio threshold, only that the numbers exist and the rows are the right ones."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest
import torch

from tests.harness import REPO, python_env

RATIO = re.compile(r"^\d+\.\d\d \[\d+\.\d\d–\d+\.\d\d\]$")
NUMBER = re.compile(r"^[\d,]+(\.\d+)?$")
SECTIONS = ("Loop throughput", "Time to first optimizer step")


def table_rows(report: str, section: str) -> dict[tuple[str, str, str], list[str]]:
    """(workload title, ranks, competitor) → the remaining cells, for one section of the report."""
    body = report.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in body.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[1].isdigit():
            rows[(cells[0], cells[1], cells[2])] = cells[3:]
    return rows


@pytest.mark.timeout(330)
def test_quick_run_writes_a_report_with_numeric_ratios(tmp_path):
    from bench.runners import COMPETITORS, INSTALL_HINT
    from bench.workloads import QUICK_WORKLOADS, WORKLOADS

    proc = subprocess.run(
        [sys.executable, "-m", "bench", "all", "--quick", "--out", str(tmp_path), "--quiet-wait", "0",
         "--timeout", "120"],
        cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = list(tmp_path.glob("*.md"))
    assert len(reports) == 1, reports
    report = reports[0].read_text()
    assert "| workload |" in proc.stdout
    assert f"torch {torch.__version__.split('+')[0]}" in report and "CPU:" in report and "Python" in report
    for section in SECTIONS:
        rows = table_rows(report, section)
        for key in QUICK_WORKLOADS:
            for competitor in COMPETITORS.values():
                cells = rows[(WORKLOADS[key].title, "2", competitor.label)]
                if competitor.requires and importlib.util.find_spec(competitor.requires) is None:
                    assert cells[0] == INSTALL_HINT
                    continue
                ratio, ours, theirs, rounds = cells
                assert RATIO.match(ratio), cells
                assert NUMBER.match(ours) and NUMBER.match(theirs), cells
                assert rounds == "1/1"
        assert len(rows) == len(QUICK_WORKLOADS) * len(COMPETITORS)


@pytest.mark.parametrize("key", ["mlp", "digits", "resnet18"])
def test_competitors_train_on_exactly_our_data(key):
    from bench.workloads import WORKLOADS
    from ddp.config import load_recipe
    from ddp.data.datasets import build_datasets

    workload = WORKLOADS[key]
    ours = build_datasets(load_recipe(None, workload.ours_overrides(quick=True)).data).train
    theirs = workload.train_set()
    assert len(ours) == len(theirs)
    for index in (0, len(ours) // 2, len(ours) - 1):
        assert torch.equal(ours[index][0], theirs[index][0]) and int(ours[index][1]) == int(theirs[index][1])


def test_missing_competitors_are_reported_not_run():
    from bench.report import FIRST_STEP, THROUGHPUT, render
    from bench.runners import INSTALL_HINT
    from bench.suite import Measurement, Plan, Results
    from bench.workloads import WORKLOADS

    plan = Plan(workloads=[WORKLOADS["mlp"]], worlds=[2], competitors=[], rounds=1, quick=True, timeout=1,
                skipped={"lightning": INSTALL_HINT, "accelerate": INSTALL_HINT})
    results = Results()
    results.add(("mlp", 2, "ours"), Measurement(100.0, 2.0))
    report = render(plan, results, [THROUGHPUT, FIRST_STEP], "python -m bench all", "2026-01-01")
    rows = table_rows(report, "Loop throughput")
    assert rows[(WORKLOADS["mlp"].title, "2", "Lightning Trainer")][0] == INSTALL_HINT
    assert rows[(WORKLOADS["mlp"].title, "2", "Accelerate")][0] == INSTALL_HINT


def test_throughput_rule_drops_warmup_and_epoch_edges():
    from bench.measure import Step, throughput, time_to_first_step

    # epoch 1: steps 1-6, 1 s apart except slow warm-up; epoch 2: steps 7-10 after a 50 s evaluation gap
    times = [10.0, 20.0, 30.0, 31.0, 32.0, 33.0, 83.0, 84.0, 85.0, 86.0]
    epochs = [1] * 6 + [2] * 4
    steps = [Step(e, k, t) for k, (e, t) in enumerate(zip(epochs, times), 1)]
    # kept: steps 4, 5 (epoch 1; 6 is its last step) and 8, 9 (epoch 2; 7 crosses the gap, 10 is last)
    assert throughput(steps, global_batch=64, drop=3) == pytest.approx(4 * 64 / 4.0)
    assert time_to_first_step(steps, launched_at=4.0) == pytest.approx(6.0)
