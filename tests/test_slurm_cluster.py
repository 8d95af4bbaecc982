"""Against a real Slurm cluster: ``python -m slurm.testbed`` on this machine (root, and asked for with
``DDP_TEST_SYSTEM=1``, as .ci/run does).

The module fixture starts the testbed (installing the Debian packages if missing) and stops it at
the end unless it was already up; without root the tests use a testbed that is up, else skip. Jobs run one at a time (the node has the machine's CPUs).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from slurm import cluster, submit, testbed
from tests.harness import REPO, require_system, run_cli, system_tests_asked

SUBMIT = ["-m", "slurm.submit", "--nodes", "1", "--tasks-per-node", "2", "--time", "5"]
TIMING = {"time", "samples_per_s", "epoch_time_s"}


def module_testbed(nodes: int, what: str) -> Iterator[None]:
    """A module fixture's body: the testbed with ``nodes`` nodes, stopped at the module's end unless it was up."""
    was_up = testbed.is_up(nodes=nodes)
    if was_up and not system_tests_asked():  # started earlier by hand: use it as it is, start nothing
        yield
        return
    require_system(what)
    print(f"testbed of {nodes} node(s) up in {testbed.start(quiet=True, nodes=nodes):.1f} s")
    yield
    if not was_up:
        testbed.stop(quiet=True)


def submit_reference(submit: list[str], cwd: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """The default recipe through ``slurm.submit --wait`` with ``submit``'s resources, uninterrupted: (cwd, the run)."""
    began = time.monotonic()
    done = run_cli([*submit, "--wait", "run.name=plain"], cwd, timeout=240)
    print(f"{' '.join(submit[2:6])}: submit --wait → COMPLETED in {time.monotonic() - began:.1f} s")
    return cwd, done


@pytest.fixture(scope="module")
def slurm_up():
    yield from module_testbed(1, "real-Slurm tests (python -m slurm.testbed start installs Slurm and starts its "
                                     "daemons)")


@pytest.fixture(scope="module")
def reference(slurm_up, tmp_path_factory):
    """The default recipe on 2 tasks through ``slurm.submit --wait``, uninterrupted."""
    return submit_reference(SUBMIT, tmp_path_factory.mktemp("reference"))


def test_default_recipe_on_two_tasks_completes(reference):
    cwd, done = reference
    assert done.returncode == 0, done.stdout + done.stderr
    job_id = _job_id(done.stdout)
    assert f"job {job_id}: COMPLETED" in done.stderr
    assert "Slurm: rank 0/2" in done.stderr  # rank 0's log, streamed
    assert "Slurm: rank 1/2" in _one(cwd, "runs/plain/**/logs/rank1.log").read_text()
    assert _final(cwd, "plain")["test_acc"] >= 0.97
    assert _one(cwd, "runs/plain/**/checkpoints/step-*.pt", many=True)


@pytest.mark.parametrize("how", ["USR2"])  # scontrol requeue: tests/test_slurm_two_nodes.py's sweep
def test_preempted_job_checkpoints_requeues_and_resumes(reference, tmp_path, how):
    """``scancel --signal=USR2`` (Slurm's warning); ``scontrol requeue`` (a requeue from outside) as well."""
    name = f"preempt_{how.lower()}"
    done = run_cli([*SUBMIT, f"run.name={name}"], tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    job_id = _job_id(done.stdout)
    log = tmp_path / f"runs/{name}/slurm/{job_id}/{job_id}_0_log.err"
    _wait_for(lambda: log.exists() and "epoch 1/10" in log.read_text(), 90, f"job {job_id} to train an epoch")
    began = time.monotonic()
    command = ["scancel", "--signal=USR2", job_id] if how == "USR2" else ["scontrol", "requeue", job_id]
    subprocess.run(command, check=True, timeout=30)
    _wait_for(lambda: cluster.queue_state(job_id) is None, 150, f"job {job_id} to leave the queue")
    print(f"{how}: signal → requeued → COMPLETED in {time.monotonic() - began:.1f} s")
    text = log.read_text()
    assert cluster.final_state(job_id) == "COMPLETED", text[-3000:]
    assert cluster.restarts(job_id) >= 1
    signal_name = "SIGUSR2" if how == "USR2" else "SIGTERM"
    stopped = re.search(rf"stopped by {signal_name} at step (\d+); checkpoint saved", text)
    resumed = re.search(r"resumed from \S+: epoch \d+, step (\d+)", text)
    assert stopped and resumed, text[-3000:]
    assert int(resumed.group(1)) == int(stopped.group(1)) > 0
    plain = _final(reference[0], "plain")
    assert _final(tmp_path, name) == plain  # bit-exact resume: the same result as the uninterrupted job


def test_dry_run_script_is_accepted_by_sbatch_test_only(slurm_up, tmp_path):
    done = run_cli([*SUBMIT, "--dry-run", "train.epochs=3"], tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    script, recipe = done.stdout.split("# resolved recipe\n")
    assert "#SBATCH --ntasks-per-node=2" in script and "#SBATCH --signal=USR2@120" in script
    assert "epochs: 3" in recipe
    (tmp_path / "job.sh").write_text(script)
    test_only = subprocess.run(["sbatch", "--test-only", "job.sh"], cwd=tmp_path, capture_output=True, text=True,
                               timeout=30)
    assert test_only.returncode == 0 and "to start at" in test_only.stderr, test_only.stderr
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.pkl"))  # nothing submitted


def test_user_program_runs_on_two_tasks(slurm_up, tmp_path):
    program = str(REPO / "tests/workers/allreduce_program.py")
    done = run_cli([*SUBMIT, "--wait", program, "--out", "out"], tmp_path, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = sorted((tmp_path / "out").glob("rank*.txt"))
    assert [p.read_text().split() for p in lines] == [["0", "2", "3", "0"], ["1", "2", "3", "1"]]


@pytest.mark.parametrize("argv, message", [
    (["--partition", "nosuch"], "unknown partition 'nosuch'. HINT: sinfo lists: debug"),
    (["--gpus-per-node", "1"], "partition 'debug' has no GPUs"),
    (["--tasks-per-node", "3"], "= 3 CPUs, but the nodes of 'debug' have 2"),
    (["--nodes", "2"], "--nodes 2 but partition 'debug' has 1 node(s)"),
    (["train.epoch=3"], "unknown key 'train.epoch'"),
])
def test_refusals_submit_nothing(slurm_up, in_tmp, capsys, argv, message):
    before = subprocess.run(["squeue", "-h", "-o", "%A"], capture_output=True, text=True).stdout
    per_node = [] if any(a.endswith("-per-node") for a in argv) else ["--tasks-per-node", "2"]
    code = submit.main(["--time", "5", *per_node, *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert subprocess.run(["squeue", "-h", "-o", "%A"], capture_output=True, text=True).stdout == before
    assert not (in_tmp / "runs").exists()


def _job_id(stdout: str) -> str:
    match = re.search(r"submitted job (\d+)", stdout)
    assert match, stdout
    return match.group(1)


def _one(root: Path, pattern: str, many: bool = False):
    found = sorted(root.glob(pattern))
    assert found if many else len(found) == 1, (pattern, found)
    return found if many else found[0]


def _final(root: Path, name: str) -> dict:
    """The last epoch record of the run, without timings."""
    records = [json.loads(line) for line in _one(root, f"runs/{name}/**/metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["kind"] == "epoch"][-1]
    return {k: v for k, v in last.items() if k not in TIMING}


def _wait_for(condition, seconds: float, what: str, log: Path | None = None) -> None:
    """Wait for ``condition``; on timeout the error ends with the tail of ``log``, to show why."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-4000:] if log is not None and log.exists() else ""
            raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}\n{tail}")
        time.sleep(0.2)
