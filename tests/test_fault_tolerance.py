"""Killed ranks under torchrun restarts, and dead peers without restarts."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from ddp.checkpoint import files
from ddp.lifecycle.history import read_history
from tests.harness import python_env

RECIPE = ("train.epochs=3", "checkpoint.every_steps=5", "log.every_steps=1", "log.tensorboard=false")


def _torchrun(cwd: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *extra,
           "-m", "ddp.train", *RECIPE]
    return subprocess.Popen(cmd, cwd=cwd, env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _steps_logged(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in lines if line.endswith("}")]
    return max(steps, default=0)


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while _steps_logged(run_dir) < step:
        assert proc.poll() is None, "the job ended before the step was reached"
        assert time.monotonic() < deadline, f"step {step} not reached in {timeout} s"
        time.sleep(0.02)


def _worker(launcher_pid: int, rank: int) -> psutil.Process:
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "ddp.train" in " ".join(child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no worker with RANK={rank}")


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = files.read_pointer(run_dir / "checkpoints", "latest")
    return files.load(run_dir / "checkpoints" / latest)["model"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("straight")
    proc = _torchrun(cwd)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-3000:]
    return _final_weights(cwd / "runs" / "digits" / "version_0")


def _step_records(run_dir: Path) -> dict[int, str]:
    """metrics.jsonl's per-step records as written (each carries the time it was written), by step."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return {}
    records = [(json.loads(line), line) for line in lines if line.endswith("}")]
    return {record["step"]: line for record, line in records if record["kind"] == "step"}


@pytest.mark.parametrize("attempt", range(2))  # rank 0, then rank 1; tests/chaos.py kills at random
def test_sigkill_of_a_rank_under_max_restarts_resumes_to_identical_weights(tmp_path, uninterrupted, attempt):
    run_dir = tmp_path / "runs" / "digits" / "version_0"  # checkpoints every 5 steps: restarts resume it
    proc = _torchrun(tmp_path, "--max-restarts=3")
    try:
        _wait_for_step(proc, run_dir, 12 + 7 * attempt)  # mid-epoch, at a different step each time
        worker = _worker(proc.pid, rank=attempt % 2)
        before = _step_records(run_dir)  # what the first attempt had logged when the rank died
        killed_at = time.time()
        worker.kill()
        out, _ = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-4000:]
    assert "connectFullMesh" not in out
    assert "restart 1" in (run_dir / "logs" / "rank0.log").read_text()  # the group really was restarted
    weights = _final_weights(run_dir)
    assert weights.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert torch.equal(weights[name], tensor), name
    # the restarted group resumed from the last checkpoint before the kill, not from step 0
    seen = max(before)
    history = read_history(run_dir / "history.jsonl")
    assert [(h["event"], h["world_size"]) for h in history] == [("start", 2), ("resume", 2)], history
    resumed = history[1]["step"]
    assert 5 * ((seen - 1) // 5) <= resumed, (seen, history)  # saves ≤ that step were durable before it was logged
    assert Path(history[1]["checkpoint"]).name == files.checkpoint_name(resumed)
    # ... and ran each later step once: the steps up to the checkpoint are the first attempt's own
    # records (the very lines it wrote), every later one was written after the kill
    after = _step_records(run_dir)
    assert sorted(after) == list(range(1, max(after) + 1))
    for step in range(1, min(resumed, seen) + 1):
        assert after[step] == before[step], step
    assert all(json.loads(after[step])["time"] > killed_at for step in after if step > resumed)


def _manual_rank(rank: int, port: int, cwd: Path, *overrides: str) -> subprocess.Popen:
    env = python_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    return subprocess.Popen([sys.executable, "-m", "ddp.train", "train.epochs=200", "log.every_steps=1",
                             "log.tensorboard=false", "checkpoint.every_epochs=0", *overrides],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_survivor_of_a_dead_peer_exits_naming_the_rank(tmp_path, how):
    """No restarts: rank 1 dies (or hangs) mid-epoch; rank 0 must not hang and must name rank 1."""
    from tests.harness import free_port

    timeout_s = 5
    port = free_port()
    procs = [_manual_rank(rank, port, tmp_path, f"dist.timeout_s={timeout_s}") for rank in (0, 1)]
    try:
        _wait_for_step(procs[0], tmp_path / "runs" / "digits" / "version_0", 5)
        procs[1].send_signal(getattr(signal, how))
        started = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        elapsed = time.monotonic() - started
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)
    assert procs[0].returncode == 1, err[-3000:]
    assert elapsed < timeout_s + 15
    assert "lost rank 1 of 2: no answer within 3 s" in err, err[-3000:]
    assert "HINT: check logs/rank1.log" in err
