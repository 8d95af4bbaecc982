"""Slurm's warning requeues a job only when its ranks stopped to checkpoint, never after training
ended: ``slurm/train.sbatch`` and submitit's jobs (``slurm.job``), without a Slurm daemon.

``train.sbatch`` runs with small fakes of ``srun``, ``scancel`` and ``scontrol`` on PATH and a real
torchrun step of 2 ranks: the warning during training makes every rank checkpoint and exit 75, the
script requeues and the requeued job continues the same version; a requeue that finds the run
finished says so and exits 0. The requeue rule itself (only after the warning, only on 75) is
checked on the script's own shell function. submitit's jobs run in-process with a fake of submitit's
checkpoint-and-requeue handler and a fake training.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ddp.cluster.environment import ClusterEnv
from ddp.config import load_recipe, to_yaml
from ddp.engine import stop
from slurm import job as slurm_job
from tests.harness import REPO, SYSTEM_TESTS, python_env

SCRIPT = REPO / "slurm" / "train.sbatch"
FAKES = {
    # one task: the command in a process group of its own, as a job step; its id for scancel
    "srun": '''while [[ "$1" == --* ]]; do shift; done
echo $$ > "$FAKE_DIR/step"
export SLURM_STEP_NODELIST=localhost SLURM_STEP_NUM_NODES=1
exec setsid "$@"''',
    # Slurm signals every process of the job's steps
    "scancel": '''echo "scancel $*" >> "$FAKE_DIR/calls"
kill "-${1#--signal=}" -- "-$(cat "$FAKE_DIR/step")"''',
    "scontrol": '''echo "scontrol $*" >> "$FAKE_DIR/calls"''',
}
RECIPE = ["train.epochs=4", "log.progress=false", "log.tensorboard=false"]


def _fakes(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKES.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/bash\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return bin_dir


def _job(tmp_path: Path, requeues: int, warn_after: str | None = None) -> tuple[int, str, list[str]]:
    """Run the script as Slurm's job 812 (its ``requeues``-th requeue); with ``warn_after``, send the
    batch shell USR2 once its output holds that text. (exit code, output, fake calls)"""
    calls = tmp_path / "calls"
    calls.unlink(missing_ok=True)
    env = python_env(PYTHON=sys.executable, NPROC_PER_NODE="2", SLURM_JOB_ID="812", SLURM_JOB_NODELIST="localhost",
                     SLURM_RESTART_COUNT=str(requeues), FAKE_DIR=str(tmp_path),
                     PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / f"job-{requeues}.out"
    with out.open("w") as handle:
        job = subprocess.Popen(["bash", str(SCRIPT), *RECIPE], cwd=tmp_path, env=env, stdout=handle,
                               stderr=subprocess.STDOUT, start_new_session=True)
        try:
            if warn_after is not None:
                deadline = time.monotonic() + 120
                while warn_after not in out.read_text() and job.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.05)
                job.send_signal(signal.SIGUSR2)
            code = job.wait(timeout=180)
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
                job.wait()
    return code, out.read_text(), calls.read_text().splitlines() if calls.exists() else []


# --- train.sbatch ---------------------------------------------------------------------------------

@pytest.mark.skipif(os.environ.get(SYSTEM_TESTS) == "1" and os.geteuid() == 0,
                    reason="with DDP_TEST_SYSTEM=1 as root, tests/test_slurm_two_nodes.py runs train.sbatch on a real "
                           "two-node Slurm (warning, requeue, resume): this fake-srun version is for machines without it")
def test_the_warning_checkpoints_requeues_and_the_requeued_job_continues_its_version(tmp_path):
    _fakes(tmp_path)
    code, text, calls = _job(tmp_path, 0, warn_after="epoch 1/4 step")
    assert code == 75, text[-3000:]
    assert "stopped by SIGTERM at step" in text and calls == ["scancel --signal=TERM 812", "scontrol requeue 812"], \
        (calls, text[-3000:])
    code, text, calls = _job(tmp_path, 1)
    assert code == 0 and calls == [], text[-3000:]
    assert "Slurm requeue 1 of Slurm job 812, torchrun run 812: continuing runs/digits/version_0" in text, text[-3000:]
    code, text, calls = _job(tmp_path, 2)
    assert code == 0 and calls == [], text[-3000:]
    assert "Slurm requeue 2 of Slurm job 812, torchrun run 812: runs/digits/version_0 already finished at epoch 4" \
        in text, text[-3000:]
    assert sorted(p.name for p in (tmp_path / "runs" / "digits").iterdir()) == ["version_0"]


def _requeue_rule(tmp_path: Path, warned: bool, step_code: int) -> tuple[list[str], str]:
    """The script's ``requeue_if_checkpointed`` alone, after the step exited ``step_code``."""
    function = SCRIPT.read_text().split("requeue_if_checkpointed() {", 1)[1].split("\n}\n", 1)[0]
    shell = (f"requeue_if_checkpointed() {{{function}\n}}\nrequeue={int(warned)}\n"
             f"requeue_if_checkpointed {step_code}")
    env = {**os.environ, "FAKE_DIR": str(tmp_path), "SLURM_JOB_ID": "812",
           "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-c", shell], env=env, capture_output=True, text=True, timeout=30)
    calls = tmp_path / "calls"
    made = calls.read_text().splitlines() if calls.exists() else []
    calls.unlink(missing_ok=True)
    return made, done.stderr


def test_only_a_step_that_stopped_to_checkpoint_after_the_warning_is_requeued(tmp_path):
    _fakes(tmp_path)
    assert _requeue_rule(tmp_path, warned=True, step_code=75) == (["scontrol requeue 812"], "")
    calls, said = _requeue_rule(tmp_path, warned=True, step_code=0)  # the warning came after training ended
    assert calls == [] and said == ("train.sbatch: the step exited 0, not 75 (checkpointed to stop): not "
                                    "requeueing job 812\n")
    assert _requeue_rule(tmp_path, warned=True, step_code=1)[0] == []  # a failed step
    assert _requeue_rule(tmp_path, warned=False, step_code=75) == ([], "")  # stopped from outside: Slurm decides


# --- submitit's jobs (slurm.job) -------------------------------------------------------------------

@pytest.fixture
def submitit_handler(monkeypatch, tmp_path):
    """Calls of a fake of submitit's checkpoint-and-requeue handler for USR2, installed as submitit does."""
    calls: list[int] = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    monkeypatch.setattr(slurm_job, "task_environment", lambda: ClusterEnv())
    monkeypatch.setattr(stop, "_listened", False)
    monkeypatch.chdir(tmp_path)
    yield calls
    signal.signal(signal.SIGUSR2, previous)


def _train_job(monkeypatch, tmp_path, training, code: int = 0, stopped_by: int = 0) -> slurm_job.TrainJob:
    """A TrainJob whose training is ``training()``, ending with ``code`` after ``stopped_by``."""
    def run(recipe, env):
        training()
        return code

    monkeypatch.setattr(slurm_job, "run", run)
    monkeypatch.setattr(slurm_job, "last_received", lambda: stopped_by)
    return slurm_job.TrainJob(to_yaml(load_recipe(None, [])), str(tmp_path))


def _warning() -> None:
    os.kill(os.getpid(), signal.SIGUSR2)


def test_a_warning_after_training_ended_requeues_nothing(monkeypatch, tmp_path, submitit_handler, capfd):
    def trains_then_warned():
        monkeypatch.setattr(stop, "_listened", True)  # a StopRequest took the signals, then gave them back
        _warning()

    assert _train_job(monkeypatch, tmp_path, trains_then_warned)() == {"rank": 0, "exit_code": 0}
    _warning()  # after the run returned, too
    assert submitit_handler == []
    said = capfd.readouterr().err
    assert said.count("slurm.job: SIGUSR2 came after training ended: nothing to checkpoint, the job is not "
                      "requeued") == 2


def test_a_warning_before_training_began_is_submitits(monkeypatch, tmp_path, submitit_handler):
    assert _train_job(monkeypatch, tmp_path, _warning)() == {"rank": 0, "exit_code": 0}
    assert submitit_handler == [signal.SIGUSR2]


def test_ranks_stopped_by_the_warning_hand_it_to_submitit(monkeypatch, tmp_path, submitit_handler):
    job = _train_job(monkeypatch, tmp_path, lambda: None, code=75, stopped_by=signal.SIGUSR2)
    with pytest.raises(SystemExit) as stopped:
        job()
    assert stopped.value.code == 75 and submitit_handler == [signal.SIGUSR2]
