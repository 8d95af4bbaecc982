"""The benchmark suite runs end to end and reports what it promises. Speed is never asserted here:
no timing figure or ratio threshold, only that the numbers exist and the rows are the right ones.

Lightning's and Accelerate's loops run only where the bench extras are installed
(``pip install -e '.[bench]'``, or ``make bench``). Neither CI nor ``make test`` installs them (about 4 of
CI's 45 minutes), so there their tests are skipped with that reason. Ours and the minimal DDP loop always run.
"""

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
PEERS = ("lightning", "accelerate")  # competitors that need the bench extras
# Guards against a hang only: one quick run with every peer takes 2-4 min on 2 loaded cores.
RUN_TIMEOUT_S = 540


def table_rows(report: str, section: str) -> dict[tuple[str, str, str], list[str]]:
    """(workload title, ranks, competitor) → the remaining cells, for one section of the report."""
    body = report.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in body.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[1].isdigit():
            rows[(cells[0], cells[1], cells[2])] = cells[3:]
    return rows


def installed(key: str) -> bool:
    from bench.runners import COMPETITORS

    requires = COMPETITORS[key].requires
    return requires is None or importlib.util.find_spec(requires) is not None


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, str]:
    """One ``python -m bench all --quick`` for the module: (the process, the report's text)."""
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "all", "--quick", "--out", str(out), "--quiet-wait", "0", "--timeout", "120"],
        cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = list(out.glob("*.md"))
    assert len(reports) == 1, reports
    return proc, reports[0].read_text()


def _check_rows(report: str, competitor_key: str) -> None:
    """Every quick workload at 2 ranks has numeric cells for this competitor, in both sections."""
    from bench.runners import COMPETITORS
    from bench.workloads import QUICK_WORKLOADS, WORKLOADS

    for section in SECTIONS:
        rows = table_rows(report, section)
        for key in QUICK_WORKLOADS:
            cells = rows[(WORKLOADS[key].title, "2", COMPETITORS[competitor_key].label)]
            ratio, ours, theirs, rounds = cells
            assert RATIO.match(ratio), cells
            assert NUMBER.match(ours) and NUMBER.match(theirs), cells
            assert rounds == "1/1"


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_quick_run_writes_a_report_with_numeric_ratios(quick_run):
    from bench.runners import COMPETITORS, INSTALL_HINT
    from bench.workloads import QUICK_WORKLOADS, WORKLOADS

    proc, report = quick_run
    assert "| workload |" in proc.stdout
    assert f"torch {torch.__version__.split('+')[0]}" in report and "CPU:" in report and "Python" in report
    _check_rows(report, "minimal")
    for section in SECTIONS:
        rows = table_rows(report, section)
        assert len(rows) == len(QUICK_WORKLOADS) * len(COMPETITORS)
        for key in QUICK_WORKLOADS:
            for peer in PEERS:
                if not installed(peer):  # said in the report, not run
                    assert rows[(WORKLOADS[key].title, "2", COMPETITORS[peer].label)][0] == INSTALL_HINT


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
@pytest.mark.parametrize("peer", PEERS)
def test_the_peers_loops_run_and_report_numbers(request, peer):
    if not installed(peer):
        pytest.skip(f"{peer} is not installed, so its benchmark loop did not run; to run it: "
                    f".venv/bin/pip install -e '.[bench]' && .venv/bin/python -m pytest tests/test_bench_smoke.py "
                    "(neither CI nor make test installs the bench extras)")
    _check_rows(request.getfixturevalue("quick_run")[1], peer)  # the run only starts once the peer is there


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
