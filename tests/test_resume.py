"""Resume on real ranks: bit-exact after a mid-epoch stop, across world sizes, after SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from ddp.cluster import comm
from ddp.config import load_recipe
from ddp.data.datasets import Splits
from ddp.cluster.environment import SingleProcessEnv
from ddp.engine.stop import EXIT_PREEMPTED
from ddp.engine.trainer import Trainer
from tests.harness import free_port, python_env, spawn_ranks

TIMING = {"time", "samples_per_s", "epoch_time_s"}


def _recipe(run_dir, *extra: str):
    # mnist_cnn has dropout: resume is bit-exact only if every RNG state comes back.
    # signal_poll_s=0: the ranks agree on signals after every step, so the stop step is predictable.
    return load_recipe(None, ["model.name=mnist_cnn", "data.name=synthetic", "data.synthetic_shape=[1,12,12]",
                              "data.synthetic_train=200", "data.synthetic_test=50", "data.batch_size=8",
                              "train.epochs=3", f"run.dir={run_dir}", "log.tensorboard=false",
                              "log.progress=false", "log.every_steps=5", "checkpoint.signal_poll_s=0", *extra])


@contextmanager
def _signal_before_step(step: int, on_rank: int, signum: int = signal.SIGTERM):
    """Send ``signum`` to this process just before optimizer step ``step`` on rank ``on_rank``."""
    original = Trainer._run_batch

    def run_batch(self, inputs, targets, sums):
        if comm.rank() == on_rank and self.state.global_step + 1 == step:
            os.kill(os.getpid(), signum)
        return original(self, inputs, targets, sums)

    Trainer._run_batch = run_batch
    try:
        yield
    finally:
        Trainer._run_batch = original


def _metrics(run_dir) -> list[dict]:
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def _straight_and_resumed(env, tmp: str, stop_before: int, signal_rank: int, ports=(None, None, None)):
    from ddp.runner import execute

    def at(port):
        return env if port is None else replace(env, master_port=port)

    straight = execute(_recipe(f"{tmp}/straight"), at(ports[0]))
    with _signal_before_step(stop_before, signal_rank):
        stopped = execute(_recipe(f"{tmp}/resumed"), at(ports[1]))
    resumed = execute(_recipe(f"{tmp}/resumed"), at(ports[2]))
    as_numpy = {k: v.numpy() for k, v in straight.state_dict.items()}, {k: v.numpy() for k, v in
                                                                        resumed.state_dict.items()}
    assert resumed.run_dir == stopped.run_dir  # the resume continued the stopped run, in its directory
    return as_numpy, stopped.stopped_by, _metrics(straight.run_dir), _metrics(resumed.run_dir)


def _assert_bit_exact(result, expected_stop: str):
    (straight, resumed), stopped_by, straight_metrics, resumed_metrics = result
    assert stopped_by == expected_stop
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert np.array_equal(straight[name], resumed[name]), name
    assert resumed_metrics == straight_metrics
    assert [r["epoch"] for r in straight_metrics if r["kind"] == "epoch"] == [1, 2, 3]


def test_single_process_resume_mid_epoch_is_bit_exact(tmp_path):
    # 200 samples / batch 8 = 25 steps per epoch: the stop lands inside epoch 2
    result = _straight_and_resumed(SingleProcessEnv(), str(tmp_path), stop_before=31, signal_rank=0)
    _assert_bit_exact(result, "SIGTERM")


def test_two_rank_resume_mid_epoch_is_bit_exact(tmp_path):
    # 13 steps per epoch on 2 ranks; the signal reaches rank 1 only, both ranks stop together
    ports = (None, free_port(), free_port())
    results = spawn_ranks(_straight_and_resumed, 2, str(tmp_path), 17, 1, ports, init_group=False)
    for rank, result in enumerate(results):
        _assert_bit_exact(result, "a signal on another rank" if rank == 0 else "SIGTERM")


def _indexed_data(cfg):
    """Synthetic images whose first pixel is the sample's index, so batches tell what was seen."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(200, 1, 12, 12, generator=generator)
    images[:, 0, 0, 0] = torch.arange(200, dtype=torch.float32)
    labels = torch.randint(0, 10, (200,), generator=generator)
    return Splits(TensorDataset(images, labels), TensorDataset(images[:50], labels[:50]), (1, 12, 12), 10, True)


def _samples_of_first_epoch(env, run_dir: str, stop_before: int | None):
    from ddp import runner

    seen: list[int] = []
    original = Trainer._run_batch

    def recording(self, inputs, targets, sums):
        if self.state.epoch == 0:
            seen.extend(int(v) for v in inputs[:, 0, 0, 0].tolist())
        return original(self, inputs, targets, sums)

    runner.build_datasets = _indexed_data
    Trainer._run_batch = recording
    try:
        if stop_before is None:
            result = runner.execute(_recipe(run_dir), env)
        else:
            with _signal_before_step(stop_before, 0):
                result = runner.execute(_recipe(run_dir), env)
    finally:
        Trainer._run_batch = original
    return seen, result.stopped_by


def test_resume_4_ranks_on_2_continues_at_the_same_sample(tmp_path):
    run_dir = str(tmp_path / "run")
    # 4 ranks × batch 8 = 32 samples a step. A signal during step 3 is agreed on after step 4
    # (the poll overlaps one step), which leaves 72 of the epoch's 200 samples
    first = spawn_ranks(_samples_of_first_epoch, 4, run_dir, 3, init_group=False)
    assert {stopped for _, stopped in first} == {"SIGTERM", "a signal on another rank"}
    second = spawn_ranks(_samples_of_first_epoch, 2, run_dir, None, init_group=False)
    before = [i for seen, _ in first for i in seen]
    after = [i for seen, _ in second for i in seen]
    assert len(before) == 4 * 32 and len(after) == 72
    assert sorted(before + after) == list(range(200))  # every sample exactly once in the epoch
    assert all(stopped is None for _, stopped in second)


def _launch_manual(rank: int, port: int, cwd: Path, *overrides: str) -> subprocess.Popen:
    env = python_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    return subprocess.Popen([sys.executable, "-m", "ddp.train", *overrides], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_all(procs, timeout: float) -> list[tuple[int, str]]:
    out = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
        out.append((proc.returncode, err))
    return out


def test_sigterm_to_one_rank_checkpoints_both_and_a_rerun_resumes(tmp_path):
    overrides = ("train.epochs=40", "log.every_steps=1", "log.tensorboard=false")
    port = free_port()
    procs = [_launch_manual(rank, port, tmp_path, *overrides) for rank in (0, 1)]
    version = tmp_path / "runs" / "digits" / "version_0"
    metrics = version / "metrics.jsonl"
    deadline = time.monotonic() + 90
    while not (metrics.exists() and metrics.read_text().count('"kind": "step"') >= 3):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "training never started"
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    results = _wait_all(procs, timeout=60)
    assert [code for code, _ in results] == [EXIT_PREEMPTED, EXIT_PREEMPTED], [err[-2000:] for _, err in results]
    assert "stopped by SIGTERM" not in results[0][1] and "a signal on another rank" in results[0][1]
    logs = [(version / "logs" / f"rank{rank}.log").read_text() for rank in (0, 1)]
    assert "stopped by SIGTERM" not in results[1][1]  # rank 1 says it in its log file, only rank 0 on the console
    stop_steps = [re.search(r"stopped by .* at step (\d+)", text).group(1) for text in logs]
    assert stop_steps[0] == stop_steps[1]  # polled every ~0.25 s, yet both ranks stopped after the same step
    latest = (version / "checkpoints" / "latest").read_text().strip()
    stopped_step = int(latest.removeprefix("step-").removesuffix(".pt"))
    assert 0 < stopped_step < 40 * 23
    port = free_port()
    finish = (*overrides, f"train.max_steps={stopped_step + 5}")  # a few more steps prove the run goes on
    results = _wait_all([_launch_manual(rank, port, tmp_path, *finish) for rank in (0, 1)], timeout=120)
    assert [code for code, _ in results] == [0, 0], [err[-2000:] for _, err in results]
    assert f"resumed from runs/digits/version_0/checkpoints/{latest}" in results[0][1]


def test_a_checkpoint_of_another_model_is_refused_in_one_line(tmp_path):
    from tests.harness import run_cli

    first = run_cli(["-m", "ddp.train", "train.epochs=1", "log.tensorboard=false"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    version = tmp_path / "runs" / "digits" / "version_0"
    recipe_before = (version / "recipe.yaml").read_text()
    other = run_cli(["-m", "ddp.train", "train.epochs=2", "model.name=mnist_mlp"], cwd=tmp_path)
    assert other.returncode == 2
    errors = [line for line in other.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "Traceback" not in other.stderr
    assert "with model.name=mnist_mlp: it was trained with model.name=digits_cnn" in errors[0]
    assert "HINT:" in errors[0]
    assert (version / "recipe.yaml").read_text() == recipe_before
    assert sorted(p.name for p in version.parent.iterdir()) == ["version_0"]


def test_resume_accepts_state_dicts_saved_with_wrapper_prefixes(tmp_path):
    from ddp.checkpoint import files
    from ddp.runner import execute

    first = execute(_recipe(tmp_path, "train.epochs=1"), SingleProcessEnv())
    directory = first.run_dir / "checkpoints"
    newest = files.candidates(directory)[0]
    payload = files.load(newest)
    payload["model"] = {f"module._orig_mod.{k}": v for k, v in payload["model"].items()}
    manifest = files.read_manifest(newest)
    files.save(directory, payload, manifest.step, manifest.epoch, manifest.metric, manifest.recipe)
    result = execute(_recipe(tmp_path, "train.epochs=2"), SingleProcessEnv())
    assert result.metrics["epoch"] == 2


def test_explicit_resume_path_must_be_valid(tmp_path):
    import pytest

    from ddp.checkpoint.files import CheckpointError
    from ddp.runner import execute

    with pytest.raises(CheckpointError, match="nope.pt does not exist"):
        execute(_recipe(tmp_path, f"train.resume={tmp_path}/nope.pt"), SingleProcessEnv())


def test_sigusr1_and_sigusr2_checkpoint_and_exit_75_like_sigterm(tmp_path):
    """Both are preemption signals (docs/faults.md): a checkpoint after the step, then exit 75."""
    from ddp.runner import execute

    for signum in (signal.SIGUSR1, signal.SIGUSR2):
        run_dir = tmp_path / signum.name
        with _signal_before_step(4, 0, signum):
            stopped = execute(_recipe(run_dir), SingleProcessEnv())
        assert (stopped.stopped_by, stopped.exit_code) == (signum.name, EXIT_PREEMPTED)
        assert (stopped.run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000004.pt"


# ---------------------------------------------------------------- the best checkpoint

def test_best_mode_min_points_at_the_lowest_metric_and_keeps_that_checkpoint(tmp_path):
    """checkpoint.best_mode=min on test_loss: 2 epochs, then 2 more resumed at a learning rate that
    ruins the model, so the lowest loss is not the newest checkpoint (nor what best_mode=max would
    pick); with keep=2 the best one survives pruning."""
    from ddp.runner import execute

    common = ("checkpoint.best_metric=test_loss", "checkpoint.best_mode=min", "checkpoint.keep=2")
    execute(_recipe(tmp_path, "train.epochs=2", *common), SingleProcessEnv())
    result = execute(_recipe(tmp_path, "train.epochs=4", "optim.lr=1.0", *common), SingleProcessEnv())
    losses = {r["step"]: r["test_loss"] for r in _metrics(result.run_dir) if r["kind"] == "epoch"}
    lowest, highest = min(losses, key=losses.get), max(losses, key=losses.get)
    assert lowest not in (max(losses), highest)  # neither the newest nor what best_mode=max would pick
    directory = result.run_dir / "checkpoints"
    assert (directory / "best").read_text().strip() == f"step-{lowest:08d}.pt"
    assert sorted(p.name for p in directory.glob("step-*.pt")) == sorted(
        {f"step-{lowest:08d}.pt", *(f"step-{s:08d}.pt" for s in sorted(losses)[-2:])})


# ---------------------------------------------------------------- TensorBoard after a resume

def test_tensorboard_hides_the_steps_lost_to_a_resume(tmp_path):
    """A run killed after logging steps its last checkpoint does not hold (simulated: the newest
    checkpoint removed) resumes from the older one; TensorBoard then shows each step once, with
    the resumed run's values (here a new optim.lr) after the checkpoint's step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ddp.runner import execute

    common = ("train.epochs=2", "log.tensorboard=true")
    first = execute(load_recipe(None, [f"run.dir={tmp_path}", "log.progress=false", "log.every_steps=5", *common]),
                    SingleProcessEnv())
    checkpoints = first.run_dir / "checkpoints"
    for name in ("step-00000090.pt", "step-00000090.json"):  # lost: the kill came before this save
        (checkpoints / name).unlink()
    resumed = execute(load_recipe(None, [f"run.dir={tmp_path}", "log.progress=false", "log.every_steps=5",
                                         "optim.lr=0.01", *common]), SingleProcessEnv())
    assert resumed.run_dir == first.run_dir
    logged = {r["step"]: r["lr"] for r in _metrics(resumed.run_dir) if r["kind"] == "step"}
    assert sorted(logged) == list(range(5, 91, 5))
    board = EventAccumulator(str(first.run_dir / "tensorboard"))
    board.Reload()
    shown = [(event.step, event.value) for event in board.Scalars("step/lr")]
    assert [step for step, _ in shown] == list(range(5, 91, 5))  # each step once, in order
    assert [value for _, value in shown] == pytest.approx([logged[step] for step, _ in shown], rel=1e-6)
    assert logged[50] < 0.01  # after step 45: the resumed run's learning rate, not the lost one's (~0.02)
    assert [event.step for event in board.Scalars("epoch/test_acc")] == [45, 90]
