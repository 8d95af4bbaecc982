"""Item 7: a rank waiting for its peers says so; ranks started with different recipes refuse.

Real ``python -m ddp.train`` processes in the seed style on loopback (no namespaces needed).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from ddp.config import load_recipe, to_yaml
from ddp.cluster.rendezvous import recipe_differences
from tests.harness import free_port, python_env

QUICK = ("train.epochs=1", "log.tensorboard=false")


def _rank(rank: int, port: int, cwd: Path, *overrides: str) -> subprocess.Popen:
    env = python_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    return subprocess.Popen([sys.executable, "-m", "ddp.train", *QUICK, *overrides], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _first_line_with(proc: subprocess.Popen, text: str, timeout: float) -> tuple[str | None, float]:
    start = time.monotonic()
    seen = []
    while time.monotonic() - start < timeout:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if text in line:
            return line, time.monotonic() - start
    return None, "".join(seen)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rank, says", [(0, "rank 0 waiting"), (1, "rank 1: reaching the rendezvous store")])
def test_a_lone_rank_logs_its_wait_within_10_s(tmp_path, rank, says):
    port = free_port()
    start = time.monotonic()
    proc = _rank(rank, port, tmp_path, "dist.timeout_s=60")
    try:
        line, _ = _first_line_with(proc, says, timeout=30)
        took = time.monotonic() - start
    finally:
        proc.kill()
        proc.wait()
    assert line is not None and took <= 10, (took, line)
    assert f"127.0.0.1:{port}" in line
    if rank == 0:
        assert "joined 0, missing 1 of 2" in line, line


@pytest.mark.timeout(60)
def test_a_rank_alone_past_the_timeout_names_the_missing_ranks(tmp_path):
    proc = _rank(0, free_port(), tmp_path, "dist.timeout_s=3")
    out, _ = proc.communicate(timeout=50)
    assert proc.returncode == 1, out
    assert "ranks 1 of 2 never joined the rendezvous at 127.0.0.1" in out and "Traceback" not in out, out


@pytest.mark.timeout(90)
def test_ranks_with_different_recipes_both_refuse_naming_the_keys(tmp_path):
    port = free_port()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    procs = [_rank(0, port, tmp_path / "a"), _rank(1, port, tmp_path / "b", "optim.lr=0.1", "train.seed=3")]
    outs = [proc.communicate(timeout=80)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [2, 2], outs
    for out in outs:
        assert "different recipe than rank 0" in out and "optim.lr=" in out and "train.seed=" in out, out
        assert "collective mismatch" not in out and "Traceback" not in out, out


def test_recipe_differences_ignore_per_machine_keys():
    ours = load_recipe(None, ["optim.lr=0.1", "data.root=/b"])
    theirs = to_yaml(load_recipe(None, ["optim.lr=0.05", "data.root=/a"]))
    assert recipe_differences(theirs, ours) == "optim.lr=0.1≠0.05"
    assert recipe_differences(to_yaml(ours), ours) == ""


@pytest.mark.timeout(120)
def test_older_launcher_variables_train_together(tmp_path):
    """RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* and no LOCAL_WORLD_SIZE: used to train alone twice."""
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = python_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                         WORLD_SIZE="2")
        procs.append(subprocess.Popen([sys.executable, "-m", "ddp.train", *QUICK], cwd=tmp_path, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [proc.communicate(timeout=100)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outs
    assert "[rank 0/2" in outs[0] and "× 2 ranks" in outs[0] and "done: test accuracy" in outs[0], outs[0]


@pytest.mark.timeout(120)
def test_a_rank_that_agrees_still_refuses_when_another_differs(tmp_path):
    port = free_port()
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="3")
    procs = []
    for rank, extra in ((0, ()), (1, ()), (2, ("optim.lr=0.2",))):
        (tmp_path / str(rank)).mkdir()
        procs.append(subprocess.Popen([sys.executable, "-m", "ddp.train", *QUICK, *extra], cwd=tmp_path / str(rank),
                                      env=python_env(**env, RANK=str(rank)), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [proc.communicate(timeout=100)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [2, 2, 2], outs
    assert "rank 2 started with a different recipe than rank 0: optim.lr=0.2≠0.05" in outs[1], outs[1]
