"""Your own training loop on ``ddp.setup``: the examples run on real Gloo ranks, stop together on a
signal, resume to the weights of a run that never stopped, and evaluate exactly; the trainer takes
a custom metric function and ranks a regression run's checkpoints by its loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.harness import REPO, run_cli, run_torchrun, spawn_ranks

MULTINODE = str(REPO / "examples" / "multinode.py")
MNIST = str(REPO / "examples" / "mnist_loop.py")
STOPPER = str(REPO / "tests" / "workers" / "stop_at_step.py")


def _final_weights(version: Path) -> dict[str, torch.Tensor]:
    checkpoints = version / "checkpoints"
    name = (checkpoints / "latest").read_text().strip()
    return torch.load(checkpoints / name, weights_only=True)["model"]


def _epochs(version: Path) -> list[dict]:
    records = [json.loads(line) for line in (version / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "epoch"]


def test_the_tutorial_loop_stopped_by_a_signal_on_one_rank_resumes_to_the_uninterrupted_weights(tmp_path):
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    whole.mkdir(), stopped.mkdir()
    done = run_torchrun(2, [MULTINODE, "2", "1"], whole)
    assert done.returncode == 0, done.stderr[-3000:]

    # 32 steps per epoch: rank 1 gets SIGTERM at step 40, mid-epoch 2
    cut = run_torchrun(2, [STOPPER, MULTINODE, "2", "1"], stopped, STOP_AT_STEP="40", STOP_RANK="1")
    assert cut.returncode != 0, "a preempted run must not report success"
    assert "stopped by" in cut.stderr and "run the same command to resume" in cut.stderr, cut.stderr[-3000:]
    version = stopped / "runs" / "multinode" / "version_0"
    history = [json.loads(line) for line in (version / "history.jsonl").read_text().splitlines()]
    assert [h["event"] for h in history] == ["start", "stop"]  # rank 0 records it, told by rank 1:
    assert (history[1]["signal"], history[1]["exit_code"]) == ("a signal on another rank", 75)
    stop_step = torch.load(version / "checkpoints" / (version / "checkpoints" / "latest").read_text().strip(),
                           weights_only=True)["state"]
    assert 40 <= stop_step["global_step"] < 64 and stop_step["epoch"] == 1 and stop_step["sample_index"] > 0

    again = run_torchrun(2, [MULTINODE, "2", "1"], stopped)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(p.name for p in (stopped / "runs" / "multinode").iterdir()) == ["version_0"]
    history = [json.loads(line) for line in (version / "history.jsonl").read_text().splitlines()]
    assert [h["event"] for h in history] == ["start", "stop", "resume"]
    assert history[1]["step"] == history[2]["step"] == stop_step["global_step"]
    assert [e["epoch"] for e in _epochs(version)] == [1, 2]  # the epoch cut short is recorded once, when done
    expected, got = _final_weights(whole / "runs" / "multinode" / "version_0"), _final_weights(version)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_the_mnist_loop_runs_under_plain_python_and_keeps_its_best_checkpoint(tmp_path):
    done = run_cli([MNIST, "--epochs", "3"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    version = tmp_path / "runs" / "mnist_loop" / "version_0"
    epochs = _epochs(version)
    assert [e["epoch"] for e in epochs] == [1, 2, 3] and all(e["test_count"] == 360 for e in epochs)
    assert epochs[-1]["test_acc"] > 0.8  # chance is 0.1
    best = max(epochs, key=lambda e: e["test_acc"])
    best_file = (version / "checkpoints" / "best").read_text().strip()
    assert best_file == f"step-{best['step']:08d}.pt"

    rerun = run_cli([MNIST, "--epochs", "3"], tmp_path)  # finished: a new version, the old one untouched
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "finished at epoch 3" in rerun.stderr
    assert (tmp_path / "runs" / "mnist_loop" / "version_1").is_dir()


def _evaluate_on_ranks(env, n):
    from torch.utils.data import TensorDataset

    from ddp.cluster.devices import Devices, Placement
    from ddp.config import load_recipe
    from ddp.run import Run

    generator = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(n, 3, generator=generator), torch.randn(n, 1, generator=generator))
    model = torch.nn.Linear(3, 1)
    torch.manual_seed(0)
    model.reset_parameters()
    run = Run(load_recipe(None, []), env, Placement("gloo", torch.device("cpu"), "test"),
              Devices(False, 0, (), None), 1)  # not opened: evaluate needs only the group
    per_sample = run.evaluate(model, data, lambda out, y: {"mae": (out - y).abs().mean(1), "mean_err": (out - y).mean()},
                              batch_size=4)
    return {k: float(v) for k, v in per_sample.items()}


@pytest.mark.parametrize("world", [1, 3])
def test_evaluate_with_a_metric_function_counts_every_sample_once(world):
    n = 23  # not divisible by 3, nor by the batch size: shards and last batches differ in length
    got = spawn_ranks(_evaluate_on_ranks, world, n)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 3, generator=generator), torch.randn(n, 1, generator=generator)
    model = torch.nn.Linear(3, 1)
    torch.manual_seed(0)
    model.reset_parameters()
    with torch.no_grad():
        err = model(x) - y
    for result in got:
        assert result["count"] == n
        assert result["mae"] == pytest.approx(err.abs().mean().item(), rel=1e-6)
        assert result["mean_err"] == pytest.approx(err.mean().item(), rel=1e-5, abs=1e-7)


def test_the_trainer_reports_a_custom_metric_and_a_regression_run_keeps_a_best_by_loss(tmp_path):
    done = run_cli(["-m", "ddp.train", "model.name=tests.workers.regression_metrics:model",
                    "data.name=tests.workers.regression_metrics:data", "train.loss=mse",
                    "train.metrics=tests.workers.regression_metrics:metrics", "train.epochs=3", "optim.lr=0.05",
                    "data.batch_size=16", "log.progress=false", "log.tensorboard=false"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    version = tmp_path / "runs" / "digits" / "version_0"
    epochs = _epochs(version)
    assert all(e["test_mae"] > 0 and "test_bias" in e and e["test_acc"] is None for e in epochs)
    best = min(epochs, key=lambda e: e["test_loss"])
    assert (version / "checkpoints" / "best").read_text().strip() == f"step-{best['step']:08d}.pt"


def test_a_metric_function_named_wrong_is_refused_before_the_run(tmp_path):
    done = run_cli(["-m", "ddp.train", "train.metrics=tests.workers.regression_metrics:nope"], tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "train.metrics" in done.stderr, done.stderr
    assert not (tmp_path / "runs").exists()
