"""A run's lifecycle as a user meets it: run twice, start fresh, continue with more epochs or
another lr, change what cannot change, press Ctrl-C, name a checkpoint that is not there.

Each of issue 7's five reports is a test here, on real processes (the CLI, torchrun).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ddp.config import load_recipe, to_yaml
from ddp.lifecycle.changes import Policy, policy_of, recipe_changes
from ddp.lifecycle.history import read_history
from ddp.reporting.compare import run_state
from ddp.model.optim import build_optimizer, build_scheduler, schedule_position
from tests.harness import REPO, python_env, run_cli

QUIET = ("log.tensorboard=false", "log.progress=false")


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` with a hash of its bytes: a snapshot to compare."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _records(version: Path, kind: str) -> list[dict]:
    lines = (version / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _train(cwd: Path, *overrides: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return run_cli(["-m", "ddp.train", *QUIET, *overrides], cwd=cwd, timeout=timeout)


# --- 1. a fresh start never touches another run's files --------------------------------------

def test_resume_never_starts_a_new_version_and_leaves_the_old_run_byte_for_byte(tmp_path):
    first = _train(tmp_path, "train.epochs=4")
    assert first.returncode == 0, first.stderr[-2000:]
    group = tmp_path / "runs" / "digits"
    before = _tree(group / "version_0")
    fresh = _train(tmp_path, "train.epochs=1", "train.resume=never")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert "train.resume=never: starting runs/digits/version_1" in fresh.stderr
    assert _tree(group / "version_0") == before  # not pruned, not re-pointed, no metrics spliced
    new = group / "version_1"
    latest = (new / "checkpoints" / "latest").read_text().strip()
    assert latest == "step-00000045.pt" and (new / "checkpoints" / latest).exists()
    assert [r["step"] for r in _records(new, "epoch")] == [45]
    again = _train(tmp_path, "train.epochs=4")  # auto: the newest version (1) is unfinished at 4 epochs
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from runs/digits/version_1/checkpoints/step-00000045.pt" in again.stderr
    assert _tree(group / "version_0") == before


# --- 2. continuing with a changed recipe ------------------------------------------------------

def test_more_epochs_and_a_new_lr_follow_the_longer_runs_schedule_and_are_recorded(tmp_path):
    every = ("log.every_steps=1",)
    (tmp_path / "a").mkdir()
    short = _train(tmp_path / "a", "train.epochs=2", *every)
    assert short.returncode == 0, short.stderr[-2000:]
    more = _train(tmp_path / "a", "train.epochs=4", "optim.lr=0.01", *every)
    assert more.returncode == 0, more.stderr[-2000:]
    assert "resuming with changes: optim.lr 0.05 → 0.01, train.epochs 2 → 4" in more.stderr
    (tmp_path / "b").mkdir()
    straight = _train(tmp_path / "b", "train.epochs=4", "optim.lr=0.01", *every)
    assert straight.returncode == 0, straight.stderr[-2000:]
    resumed_lr = {r["step"]: r["lr"] for r in _records(tmp_path / "a/runs/digits/version_0", "step")}
    straight_lr = {r["step"]: r["lr"] for r in _records(tmp_path / "b/runs/digits/version_0", "step")}
    after = sorted(step for step in straight_lr if step > 90)
    assert len(after) == 90 and [resumed_lr[s] for s in after] == [straight_lr[s] for s in after]
    assert max(resumed_lr[s] for s in after) < 0.01 * 0.51  # the second half of a cosine: never climbs again
    version = tmp_path / "a/runs/digits/version_0"
    assert load_recipe(version / "recipe.yaml").optim.lr == 0.01  # what runs now
    assert "resumed at step 90 (epoch 2) on 1 rank with changes: optim.lr 0.05 → 0.01" in (
        version / "recipe.yaml").read_text()
    history = [json.loads(line) for line in (version / "history.jsonl").read_text().splitlines()]
    assert [h["event"] for h in history] == ["start", "resume"]
    assert history[1]["changes"] == {"optim.lr": [0.05, 0.01], "train.epochs": [2, 4]}


def test_a_change_resuming_cannot_honour_is_refused_in_one_line_and_writes_nothing(tmp_path):
    first = _train(tmp_path, "train.epochs=1")
    assert first.returncode == 0
    before = _tree(tmp_path)
    refused = _train(tmp_path, "train.epochs=3", "train.seed=7")
    assert refused.returncode == 2
    assert refused.stderr.count("ERROR") == 1 and "Traceback" not in refused.stderr
    assert "train.seed=7: it was trained with train.seed=0" in refused.stderr
    assert "train.resume=never to start a new version" in refused.stderr
    assert _tree(tmp_path) == before


# --- 3. Ctrl-C ------------------------------------------------------------------------------------

def _wait_for_steps(path: Path, proc: subprocess.Popen, count: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().count('"kind": "step"') >= count):
        assert proc.poll() is None, "the run ended before it was interrupted"
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.05)


def test_ctrl_c_on_one_process_checkpoints_exits_130_and_the_rerun_resumes(tmp_path):
    args = [sys.executable, "-m", "ddp.train", *QUIET, "train.epochs=40", "log.every_steps=5"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=python_env(), stderr=subprocess.PIPE, text=True)
    version = tmp_path / "runs" / "digits" / "version_0"
    _wait_for_steps(version / "metrics.jsonl", proc, 3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "interrupted: saving a checkpoint after the current step" in err
    assert "stopped by SIGINT at step" in err and "Exit code 130: run the same command to resume" in err
    latest = (version / "checkpoints" / "latest").read_text().strip()
    step = int(latest.removeprefix("step-").removesuffix(".pt"))
    assert 15 <= step < 40 * 45
    history = read_history(version / "history.jsonl")
    assert [(h["event"], h["step"]) for h in history] == [("start", 0), ("stop", step)], history
    assert history[1]["signal"] == "SIGINT" and history[1]["exit_code"] == 130
    assert run_state(version) == "stopped"  # what python -m ddp.report shows for it: the same command resumes it
    assert f"stopped by SIGINT at step {step}\n" in (version / "recipe.yaml").read_text()
    rerun = _train(tmp_path, "train.epochs=40", f"train.max_steps={step + 5}")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resumed from runs/digits/version_0/checkpoints/{latest}" in rerun.stderr
    assert [h["event"] for h in read_history(version / "history.jsonl")] == ["start", "stop", "resume"]


def test_ctrl_c_on_two_torchrun_ranks_checkpoints_once_and_resumes(tmp_path):
    """Every rank exits 130 after checkpointing at the same step (the one the checkpoint holds), and
    the same command resumes from it. Each rank is ``python -m ddp.train`` run by a shim that writes
    the status it exits with (torchrun does not report its ranks' exit codes after a signal)."""
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(REPO / "tests" / "workers" / "record_exit.py"), *QUIET, "train.epochs=40", "log.every_steps=5"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=python_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    version = tmp_path / "runs" / "digits" / "version_0"
    try:
        _wait_for_steps(version / "metrics.jsonl", proc, 3)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal does: torchrun gets it and forwards it to the ranks
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # torchrun itself ends with its own SignalException traceback and exit code 1 (its agent re-raises
    # the signal; docs/runs.md says so); the ranks print no traceback, say once what happened,
    # checkpoint together and exit 130.
    assert proc.returncode == 1 and "SignalException" in out, out[-3000:]
    assert "KeyboardInterrupt" not in out and "/ddp/" not in out, out[-3000:]
    assert out.count("stopped by SIGINT at step") == 1, out[-3000:]
    assert [(tmp_path / f"exit-rank{rank}.txt").read_text().strip() for rank in (0, 1)] == ["130", "130"]
    latest = (version / "checkpoints" / "latest").read_text().strip()
    step = int(latest.removeprefix("step-").removesuffix(".pt"))
    for rank in (0, 1):
        text = (version / "logs" / f"rank{rank}.log").read_text()
        assert re.findall(r"stopped by SIGINT at step (\d+)", text) == [str(step)], f"rank {rank}"
        assert "Exit code 130" in text
    assert step >= 3 * 5  # after the 3 step records the test waited for
    resumed = run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ddp.train",
                       *QUIET, "train.epochs=40", f"train.max_steps={step + 4}"], cwd=tmp_path, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from runs/digits/version_0/checkpoints/{latest}" in resumed.stderr


_SECOND_CTRL_C = """
import os, signal, sys, time
from ddp.engine.trainer import Trainer
from ddp.train import main

original = Trainer._run_batch


def run_batch(self, inputs, targets, sums):
    if self.state.global_step == 2 and not getattr(run_batch, "sent", False):
        run_batch.sent = True
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: a checkpoint after this step is asked for
        time.sleep(1.5)  # longer than one keypress reaching the process twice
        os.kill(os.getpid(), signal.SIGINT)  # pressed again
        print("still running after the second Ctrl-C", file=sys.stderr, flush=True)
    return original(self, inputs, targets, sums)


Trainer._run_batch = run_batch
sys.exit(main(sys.argv[1:]))
"""


def test_a_second_ctrl_c_quits_at_once_but_the_same_keypress_forwarded_does_not(monkeypatch, tmp_path):
    from ddp.engine import stop as signals

    # a real process: the second Ctrl-C, 1.5 s after the first and within the same step, exits 130
    # at once — the step is not finished and nothing is saved
    done = run_cli(["-c", _SECOND_CTRL_C, *QUIET, "train.epochs=2"], cwd=tmp_path, timeout=120)
    assert done.returncode == 130, done.stderr[-2000:]
    assert "interrupted again: exiting now, without a checkpoint" in done.stderr
    assert "still running after the second Ctrl-C" not in done.stderr and "stopped by" not in done.stderr
    checkpoints = tmp_path / "runs" / "digits" / "version_0" / "checkpoints"
    assert not (checkpoints.exists() and list(checkpoints.iterdir()))  # no checkpoint, no pointer, no temp file

    # in-process, on a fake clock: a second SIGINT 0.2 s after the first is torchrun forwarding the
    # same keypress and does not quit; one 2 s later does
    class Quit(Exception):
        pass

    def fake_exit(code):
        raise Quit(code)

    clock = iter([100.0, 100.2, 102.0])
    monkeypatch.setattr(signals.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(signals.os, "_exit", fake_exit)
    monkeypatch.setattr(signals.os, "write", lambda fd, data: len(data))
    stop = signals.StopRequest(timeout_s=5)
    stop._handle(signal.SIGINT, None)
    assert stop.poll() and stop.exit_code == 130 and stop.name == "SIGINT"
    stop._handle(signal.SIGINT, None)  # 0.2 s later: torchrun forwarding the same Ctrl-C
    with pytest.raises(Quit, match="130"):
        stop._handle(signal.SIGINT, None)  # 2 s later: the user pressed it again


def test_a_preemption_signal_after_ctrl_c_makes_it_exit_75_for_a_requeue():
    from ddp.engine import stop as signals

    stop = signals.StopRequest(timeout_s=5)
    stop.received, stop.preempted = signal.SIGINT, False
    assert stop.exit_code == 130
    stop._handle(signal.SIGTERM, None)
    assert stop.exit_code == 75 and stop.name == "SIGTERM"


# --- 4. the README's commands, run twice --------------------------------------------------------

def test_running_the_same_command_twice_trains_twice_in_two_versions(tmp_path):
    first = _train(tmp_path, "train.epochs=1")
    second = _train(tmp_path, "train.epochs=1")
    assert first.returncode == second.returncode == 0, second.stderr[-2000:]
    assert ("runs/digits/version_0 finished at epoch 1, step 45, test_acc" in second.stderr
            and "starting runs/digits/version_1" in second.stderr)
    assert "train.resume=runs/digits/version_0 train.epochs=<more than 1>" in second.stderr
    group = tmp_path / "runs" / "digits"
    for version in ("version_0", "version_1"):
        assert [r["epoch"] for r in _records(group / version, "epoch")] == [1]


# --- 5. refused and no-op runs write nothing ----------------------------------------------------

def test_a_missing_resume_path_is_refused_and_creates_no_directory(tmp_path):
    done = _train(tmp_path, f"train.resume={tmp_path}/doesnotexist.pt")
    assert done.returncode == 2
    assert "doesnotexist.pt does not exist" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()


def test_naming_a_finished_run_says_so_and_adds_no_file(tmp_path):
    first = _train(tmp_path, "train.epochs=1", "log.tensorboard=true")
    assert first.returncode == 0
    before = _tree(tmp_path)
    again = _train(tmp_path, "train.epochs=1", "log.tensorboard=true", "train.resume=runs/digits/version_0")
    assert again.returncode == 0
    assert "already finished at epoch 1, step 45" in again.stderr and "To train more: raise train.epochs" in again.stderr
    assert _tree(tmp_path) == before  # no log lines appended, no empty TensorBoard events file


def test_an_older_checkpoint_named_explicitly_branches_into_a_new_version(tmp_path):
    first = _train(tmp_path, "train.epochs=3")
    assert first.returncode == 0
    group = tmp_path / "runs" / "digits"
    before = _tree(group / "version_0")
    old = group / "version_0" / "checkpoints" / "step-00000090.pt"
    branch = _train(tmp_path, "train.epochs=4", f"train.resume={old}")
    assert branch.returncode == 0, branch.stderr[-2000:]
    assert "starting runs/digits/version_1 from" in branch.stderr and "not its newest checkpoint" in branch.stderr
    assert _tree(group / "version_0") == before
    assert [r["epoch"] for r in _records(group / "version_1", "epoch")] == [3, 4]


# --- policies and the schedule, in-process ----------------------------------------------------

def test_the_lifecycle_reads_each_keys_declared_resume_policy():
    assert policy_of("model.name")[0] == Policy.refused and policy_of("optim.lr")[0] == Policy.honoured
    assert policy_of("model.args.width") == policy_of("model.args")  # inside a dict: the dict's policy
    assert policy_of("train.resume")[0] == Policy.ignored and policy_of("run.dir")[0] == Policy.ignored
    assert policy_of("no.such_key")[0] == Policy.refused


def test_recipe_changes_name_each_key_with_before_and_after():
    saved = to_yaml(load_recipe(None, []))
    now = load_recipe(None, ["optim.lr=0.01", "model.name=mnist_mlp", "run.name=other", "train.resume=never"])
    changes = {c.key: (c.before, c.after, c.policy) for c in recipe_changes(saved, now)}
    assert changes == {"optim.lr": (0.05, 0.01, Policy.honoured),
                       "model.name": ("digits_cnn", "mnist_mlp", Policy.refused)}


def _torch_lrs(schedule: str, lr: float, warmup: int, steps_per_epoch: int, total: int, step_epochs: int,
               gamma: float) -> list[float]:
    """The learning rate of each of ``total`` steps from torch's own schedulers, stepped one step at
    a time: LinearLR from lr/(warmup+1) up to lr over the warm-up, then a fresh CosineAnnealingLR /
    StepLR / OneCycleLR / constant over the remaining steps."""
    import torch
    from torch.optim import lr_scheduler as schedulers

    def run(make, steps):
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
        scheduler, out = make(optimizer), []
        for _ in range(steps):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return out

    rest = total - warmup
    main = {"cosine": lambda o: schedulers.CosineAnnealingLR(o, T_max=rest),
            "step": lambda o: schedulers.StepLR(o, step_size=step_epochs * steps_per_epoch, gamma=gamma),
            "onecycle": lambda o: schedulers.OneCycleLR(o, max_lr=lr, total_steps=rest, cycle_momentum=False),
            "none": lambda o: schedulers.ConstantLR(o, factor=1.0, total_iters=0)}[schedule]
    ramp = run(lambda o: schedulers.LinearLR(o, start_factor=1 / (warmup + 1), total_iters=warmup), warmup)
    return ramp + run(main, rest)


@pytest.mark.parametrize("warmup", [0, 5])
@pytest.mark.parametrize("schedule", ["cosine", "step", "none", "onecycle"])
def test_a_scheduler_placed_at_step_k_continues_exactly_like_one_stepped_there(schedule, warmup):
    """Every schedule, with and without warm-up, against torch's own schedulers stepped k times; a
    scheduler placed at step k (what a resume builds) then steps on bitwise like ours stepped there."""
    import torch

    total, per_epoch = 40, 10
    cfg = load_recipe(None, [f"optim.schedule={schedule}", f"optim.warmup_steps={warmup}", "optim.step_epochs=1",
                             "optim.gamma=0.5", "optim.lr=0.4"]).optim
    expected = _torch_lrs(schedule, 0.4, warmup, per_epoch, total, step_epochs=1, gamma=0.5)

    def lrs_from(start: int) -> list[float]:
        optimizer = build_optimizer(torch.nn.Linear(2, 2), cfg)
        scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=per_epoch, total_steps=total, start_step=start)
        out = []
        for _ in range(start, total):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return out

    stepped = lrs_from(0)
    assert stepped == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert stepped[0] != stepped[-1] or (schedule == "none" and not warmup)  # the schedule moves
    for k in range(total):
        placed = lrs_from(k)
        assert placed == stepped[k:], f"placed at step {k}"  # to the bit, and on through the last step
        assert placed == pytest.approx(expected[k:], rel=1e-9, abs=1e-15), f"placed at step {k}"


def test_schedule_position_counts_steps_at_the_new_batch():
    assert schedule_position(epoch=2, sample_index=0, steps_per_epoch=45, global_batch=32) == 90
    assert schedule_position(epoch=1, sample_index=320, steps_per_epoch=45, global_batch=32) == 55
    assert schedule_position(epoch=1, sample_index=320, steps_per_epoch=90, global_batch=16) == 110


def test_the_same_command_started_twice_side_by_side_never_shares_a_version(tmp_path):
    args = [sys.executable, "-m", "ddp.train", *QUIET, "train.epochs=40", "log.every_steps=5"]
    first = subprocess.Popen(args, cwd=tmp_path, env=python_env(), stderr=subprocess.PIPE, text=True)
    version = tmp_path / "runs" / "digits" / "version_0"
    try:
        _wait_for_steps(version / "metrics.jsonl", first, 2)
        second = _train(tmp_path, "train.epochs=40")
        assert second.returncode == 2
        assert f"{version.relative_to(tmp_path)} is in use by another run (pid {first.pid} on " in second.stderr
        assert second.stderr.count("ERROR") == 1 and not (version.parent / "version_1").exists()
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=60)
    finally:
        first.kill()
    assert first.returncode == 130
    third = _train(tmp_path, "train.epochs=40", "train.max_steps=1")  # the lock died with its holder
    assert third.returncode == 0, third.stderr[-2000:]
