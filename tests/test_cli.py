"""The command line end to end: torchrun and plain python, real processes, the default recipe."""

from __future__ import annotations

import json
import re
import time

import pytest

from ddp.config import load_recipe
from tests.harness import REPO, run_cli, run_torchrun


def _epochs(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "epoch"]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """``torchrun --nproc_per_node=4 -m ddp.train`` on the default recipe, once for the module."""
    cwd = tmp_path_factory.mktemp("default")
    started = time.monotonic()
    done = run_torchrun(4, ["-m", "ddp.train"], cwd=cwd, timeout=240)
    return done, cwd / "runs" / "digits" / "version_0", time.monotonic() - started


def test_default_recipe_on_4_ranks_reaches_97_percent(default_run):
    done, run_dir, seconds = default_run
    assert done.returncode == 0, done.stderr[-3000:]
    epochs = _epochs(run_dir)
    assert len(epochs) == 10
    assert epochs[-1]["test_acc"] >= 0.97
    assert epochs[-1]["test_count"] == 359
    print(f"default run: test accuracy {epochs[-1]['test_acc']:.4f}, {seconds:.1f} s wall")


def test_default_run_saves_resolved_recipe_and_tensorboard(default_run):
    _, run_dir, _ = default_run
    assert load_recipe(run_dir / "recipe.yaml") == load_recipe(REPO / "recipes" / "digits.yaml")
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_only_rank_0_writes_the_console_and_every_rank_its_file(default_run):
    done, run_dir, _ = default_run
    assert re.search(r"INFO \[rank 0/4 \S+\] epoch 10/10", done.stderr)
    for rank in (1, 2, 3):
        assert f"[rank {rank}/4" not in done.stderr
    for rank in range(4):
        text = (run_dir / "logs" / f"rank{rank}.log").read_text()
        assert f"[rank {rank}/4" in text and "epoch 10/10" in text
        assert not re.search(rf"\[rank (?!{rank}/)", text)  # only its own records


def test_plain_python_runs_the_same_recipe(tmp_path):
    done = run_cli(["-m", "ddp.train", "train.epochs=2", "log.tensorboard=false"], cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "single process" in done.stderr
    epochs = _epochs(tmp_path / "runs" / "digits" / "version_0")
    assert [e["epoch"] for e in epochs] == [1, 2] and epochs[-1]["test_acc"] > 0.8
    assert (tmp_path / "runs" / "digits" / "version_0" / "logs" / "rank0.log").exists()


def test_a_warning_and_an_error_on_rank_1_reach_the_console(tmp_path):
    """Rank 1 fails at step 3; the job ends then, not when rank 0's collective would time out: with
    dist.timeout_s=900 a rank 0 left waiting would outlast the 240 s this run gets (TimeoutExpired)."""
    done = run_torchrun(2, [str(REPO / "tests" / "workers" / "fail_on_rank.py"), "1", "train.epochs=1",
                            "dist.timeout_s=900"], cwd=tmp_path, timeout=240)
    assert done.returncode != 0
    rank0 = (tmp_path / "runs" / "digits" / "version_0" / "logs" / "rank0.log").read_text()
    assert "epoch 1/1" not in rank0 and "done: test accuracy" not in rank0, rank0  # rank 0 stopped with it
    assert re.search(r"WARNING \[rank 1/2 \S+\] .*injected warning on rank 1", done.stderr)
    assert re.search(r"ERROR \[rank 1/2 \S+\] training failed: RuntimeError: boom on rank 1", done.stderr)
    log = (tmp_path / "runs" / "digits" / "version_0" / "logs" / "rank1.log").read_text()
    assert "Traceback" in log and "boom on rank 1" in log  # the full traceback lives in the file
