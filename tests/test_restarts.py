"""A restarted or requeued job never starts over: it continues its own version, or says that version
is finished and exits 0.

The decision in-process with the launchers' variables set (torchrun's run id and restart count,
Slurm's job id and requeue count), then real ``torchrun --max-restarts`` jobs that lose a rank
after their last checkpoint and before their first.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from ddp.checkpoint import files
from ddp.config import load_recipe, to_yaml
from ddp.errors import ClusterEnvError
from ddp.cluster.environment import Attempt, job_attempt
from ddp.lifecycle import lock
from ddp.lifecycle.decision import decide
from ddp.lifecycle.history import read_history
from ddp.lifecycle.versions import JOB_FILE, recorded_job
from tests.harness import REPO, run_torchrun

LAUNCHERS = ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
             "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    for name in LAUNCHERS:
        monkeypatch.delenv(name, raising=False)
    yield
    for held in list(lock._held):
        lock.release(held)


def _recipe(group: Path, resume: object = "auto", epochs: int = 2):
    base = load_recipe(None, [])
    return replace(base, run=replace(base.run, dir=str(group)), train=replace(base.train, resume=str(resume),
                                                                              epochs=epochs))


def _checkpoint(version: Path, step: int, epoch: int) -> Path:
    files.save(version / "checkpoints", {"format": 1}, step=step, epoch=epoch, metric=None,
               recipe=to_yaml(load_recipe(None, [])))
    return version / "checkpoints" / files.checkpoint_name(step)


def _launch(monkeypatch, restarts: int = 0, run_id: str = "run-a") -> Attempt:
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", run_id)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(restarts))
    return job_attempt()


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- who this job is ----------------------------------------------------------------------------

def test_a_job_is_known_by_slurms_job_id_and_torchruns_run_id(monkeypatch):
    assert job_attempt() == Attempt()
    assert not job_attempt().restarted
    monkeypatch.setenv("SLURM_JOB_ID", "812")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "812")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    attempt = job_attempt()
    assert attempt.job == "Slurm job 812, torchrun run 812" and attempt.restarted
    assert attempt.describe() == "Slurm requeue 1 of Slurm job 812, torchrun run 812"


def test_torchruns_static_rendezvous_is_told_apart_by_its_address(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    monkeypatch.setenv("MASTER_ADDR", "node01")
    monkeypatch.setenv("MASTER_PORT", "29511")
    attempt = job_attempt()
    assert attempt.job == "torchrun at node01:29511"
    assert attempt.describe() == "torchrun restart 2 of torchrun at node01:29511"


def test_a_count_without_a_job_is_no_restart_and_a_malformed_count_is_named(monkeypatch):
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    assert not job_attempt().restarted  # nothing to find its version by
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "x")
    with pytest.raises(ClusterEnvError, match="TORCHELASTIC_RESTART_COUNT='x' is not an integer"):
        job_attempt()


# --- the decision -------------------------------------------------------------------------------

def test_a_first_start_names_its_job_in_its_version(monkeypatch, tmp_path):
    decision = decide(_recipe(tmp_path), _launch(monkeypatch))
    assert decision.run_dir == tmp_path / "version_0"
    assert json.loads((decision.run_dir / JOB_FILE).read_text()) == {"job": "torchrun run run-a"}


def test_a_restart_continues_its_own_version_not_a_newer_one_made_by_someone_else(monkeypatch, tmp_path):
    own = _checkpoint(tmp_path / "version_0", 45, 1)
    decide(_recipe(tmp_path), _launch(monkeypatch))  # the first start named its job in version_0
    lock.release(tmp_path / "version_0")
    _checkpoint(tmp_path / "version_1", 90, 1)  # someone else's, newer and unfinished
    (tmp_path / "version_1" / JOB_FILE).write_text('{"job": "torchrun run run-b"}\n')
    decision = decide(_recipe(tmp_path), _launch(monkeypatch, restarts=1))
    assert (decision.run_dir, decision.checkpoint, decision.done) == (tmp_path / "version_0", own, "")
    assert decision.notice == f"torchrun restart 1 of torchrun run run-a: continuing {tmp_path / 'version_0'}"
    assert recorded_job(tmp_path / "version_1") == "torchrun run run-b"


def test_a_restart_that_finds_its_version_finished_trains_nothing_and_writes_nothing(monkeypatch, tmp_path):
    decide(_recipe(tmp_path), _launch(monkeypatch))
    lock.release(tmp_path / "version_0")
    _checkpoint(tmp_path / "version_0", 90, 2)
    before = _tree(tmp_path)
    decision = decide(_recipe(tmp_path), _launch(monkeypatch, restarts=1))
    assert decision.done.startswith(f"torchrun restart 1 of torchrun run run-a: {tmp_path / 'version_0'} already "
                                    f"finished at epoch 2, step 90: nothing to train")
    assert _tree(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["version_0"]


def test_a_plain_rerun_of_a_finished_run_still_starts_the_next_version(monkeypatch, tmp_path):
    decide(_recipe(tmp_path), _launch(monkeypatch))
    lock.release(tmp_path / "version_0")
    _checkpoint(tmp_path / "version_0", 90, 2)
    decision = decide(_recipe(tmp_path), _launch(monkeypatch, run_id="run-b"))  # a new command, not a restart
    assert decision.run_dir == tmp_path / "version_1" and "version_0 finished at epoch 2" in decision.notice


def test_a_restart_before_the_first_checkpoint_trains_its_version_again_from_step_0(monkeypatch, tmp_path):
    decide(_recipe(tmp_path), _launch(monkeypatch))
    lock.release(tmp_path / "version_0")
    _checkpoint(tmp_path / "version_1", 10, 0)  # someone else's, started meanwhile
    decision = decide(_recipe(tmp_path), _launch(monkeypatch, restarts=1))
    assert (decision.run_dir, decision.checkpoint) == (tmp_path / "version_0", None)
    assert decision.notice.endswith("has no checkpoint yet; training it again from step 0")
    assert decision.run_dir in lock._held


@pytest.mark.parametrize("resume", ["never", "auto"])
def test_a_requeue_continues_its_own_version_whatever_train_resume_says(monkeypatch, tmp_path, resume):
    monkeypatch.setenv("SLURM_JOB_ID", "812")
    decide(_recipe(tmp_path, resume), job_attempt())
    lock.release(tmp_path / "version_0")
    own = _checkpoint(tmp_path / "version_0", 45, 1)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    decision = decide(_recipe(tmp_path, resume), job_attempt())
    assert (decision.run_dir, decision.checkpoint) == (tmp_path / "version_0", own)


def test_a_restart_of_a_branch_without_a_checkpoint_begins_again_from_the_named_checkpoint(monkeypatch, tmp_path):
    _checkpoint(tmp_path / "version_0", 45, 1)
    older = _checkpoint(tmp_path / "version_0", 20, 0)  # not version_0's newest: the job branches into version_1
    first = decide(_recipe(tmp_path, older), _launch(monkeypatch))
    assert (first.run_dir, first.checkpoint) == (tmp_path / "version_1", older)
    lock.release(first.run_dir)
    again = decide(_recipe(tmp_path, older), _launch(monkeypatch, restarts=1))
    assert (again.run_dir, again.checkpoint) == (tmp_path / "version_1", older)
    assert again.notice.endswith(f"has no checkpoint yet; training it again from {older}")


def test_a_restart_of_a_job_that_chose_no_version_follows_train_resume(monkeypatch, tmp_path):
    _checkpoint(tmp_path / "version_0", 90, 2)  # finished, by someone else
    decision = decide(_recipe(tmp_path), _launch(monkeypatch, restarts=1))
    assert decision.run_dir == tmp_path / "version_1"
    assert recorded_job(decision.run_dir) == "torchrun run run-a"


def test_abandoning_a_refused_first_start_removes_its_job_file_with_its_version(monkeypatch, tmp_path):
    decision = decide(_recipe(tmp_path / "group"), _launch(monkeypatch))
    decision.abandon()
    assert not (tmp_path / "group").exists()


# --- real torchrun restarts -------------------------------------------------------------------------

RECIPE = ["train.epochs=1", "train.max_steps=6", "checkpoint.every_steps=3", "log.progress=false",
          "log.tensorboard=false", "dist.heartbeat_timeout_s=0"]
WORKER = str(REPO / "tests" / "workers" / "die_once.py")


def _versions(cwd: Path) -> list[str]:
    return sorted(p.name for p in (cwd / "runs" / "digits").glob("version_*"))


def test_a_rank_killed_after_the_last_save_restarts_into_one_line_and_exit_0(tmp_path):
    done = run_torchrun(2, [WORKER, *RECIPE], tmp_path, extra=["--max-restarts=1"], DIE_AT="save-6", DIE_RANK="1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _versions(tmp_path) == ["version_0"]
    finished = [line for line in done.stderr.splitlines() if "already finished" in line]
    assert len(finished) == 1, done.stderr[-3000:]
    assert "torchrun restart 1 of torchrun run" in finished[0] and "runs/digits/version_0 already finished at " \
        "epoch 0, step 6" in finished[0] and "nothing to train" in finished[0]
    history = read_history(tmp_path / "runs" / "digits" / "version_0" / "history.jsonl")
    assert [h["event"] for h in history] == ["start"], history  # the restart wrote nothing


def test_a_rank_killed_before_the_first_checkpoint_restarts_in_the_same_version(tmp_path):
    done = run_torchrun(2, [WORKER, *RECIPE], tmp_path, extra=["--max-restarts=1"], DIE_AT="step-2", DIE_RANK="1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _versions(tmp_path) == ["version_0"]
    assert "has no checkpoint yet; training it again from step 0" in done.stderr, done.stderr[-3000:]
    version = tmp_path / "runs" / "digits" / "version_0"
    history = read_history(version / "history.jsonl")
    assert [(h["event"], h["step"]) for h in history] == [("start", 0), ("start", 0)], history
    assert files.read_pointer(version / "checkpoints", "latest") == files.checkpoint_name(6)


def test_a_rank_killed_while_its_shards_are_written_in_the_background_restarts_from_the_last_whole_checkpoint(
        tmp_path):
    background = ["dist.parallel=fsdp", "checkpoint.async_save=true"]
    done = run_torchrun(2, [WORKER, *RECIPE, *background], tmp_path, extra=["--max-restarts=1"], DIE_AT="writing-6",
                        DIE_RANK="1")
    assert done.returncode == 0, done.stderr[-3000:]
    version = tmp_path / "runs" / "digits" / "version_0"
    assert "resumed from runs/digits/version_0/checkpoints/step-00000003.dcp: epoch 0, step 3" in done.stderr, \
        done.stderr[-3000:]
    history = read_history(version / "history.jsonl")
    assert [(h["event"], h["step"]) for h in history] == [("start", 0), ("resume", 3)], history
    assert files.read_pointer(version / "checkpoints", "latest") == "step-00000006.dcp"
    assert files.verify(version / "checkpoints" / "step-00000006.dcp").step == 6
