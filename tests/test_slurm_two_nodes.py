"""Against a real two-node Slurm cluster: ``python -m slurm.testbed start --nodes 2`` on this machine (root,
asked for with ``DDP_TEST_SYSTEM=1``, as .ci/run does). Nodes h0 and h1 are network namespaces with their own
addresses and hostnames, so a job's ranks on the two nodes meet over a network, as on a real cluster.

Jobs train the default recipe on 2 nodes × 2 ranks. train.sbatch's job, warned, requeued and resumed, must end
with the uninterrupted job's final metrics; a node lost mid-job is named by the other node's ranks, and Slurm
requeues the job. A sweep of 4 one-node runs, 2 at a time, runs on both nodes (each takes a node's CPUs); one of
its runs is preempted and resumes its own version.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from ddp.reporting import report
from slurm import cluster, submit, testbed
from tests.harness import REPO, python_env, run_cli
from tests.test_slurm_cluster import _final, _job_id, _one, _wait_for, submit_reference, module_testbed

SUBMIT = ["-m", "slurm.submit", "--nodes", "2", "--tasks-per-node", "2", "--time", "5"]


@pytest.fixture(scope="module")
def two_nodes():
    yield from module_testbed(2, "two-node Slurm tests (python -m slurm.testbed start --nodes 2 installs Slurm, "
                                     "makes network namespaces and starts daemons)")


@pytest.fixture(scope="module")
def reference(two_nodes, tmp_path_factory):
    """The default recipe on 2 nodes × 2 tasks through ``slurm.submit --wait``, uninterrupted."""
    return submit_reference(SUBMIT, tmp_path_factory.mktemp("reference2"))


def test_submit_on_two_nodes_trains_four_ranks_across_both(reference):
    cwd, done = reference
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert f"job {_job_id(done.stdout)}: COMPLETED" in done.stderr
    for rank, node in ((0, "h0"), (1, "h0"), (2, "h1"), (3, "h1")):
        log = _one(cwd, f"runs/plain/**/logs/rank{rank}.log").read_text()
        assert f"[rank {rank}/4 {node}]" in log and f"Slurm: rank {rank}/4" in log
    # the ranks on h1 reach the master on h0 over the nodes' network, through the interface of the route to it
    assert "set GLOO_SOCKET_IFNAME=eth0 (the route to the master h0 (10.98.0.1) via eth0 (from 10.98.0.2))" in \
        _one(cwd, "runs/plain/**/logs/rank2.log").read_text()
    assert _final(cwd, "plain")["test_acc"] >= 0.97  # as on one node


def test_train_sbatch_on_two_nodes_checkpoints_both_requeues_and_resumes(reference, tmp_path):
    """sbatch --nodes 2 + srun + torchrun (c10d rendezvous on h0); USR2 to the batch shell, as Slurm's warning:
    once during training (every rank on both nodes checkpoints, the job is requeued and resumes), and once
    after training ended, while the step is still running (nothing is requeued, no new version)."""
    env = python_env(PYTHON=str(REPO / "tests/workers/linger_python.sh"), REAL_PYTHON=sys.executable,
                     NPROC_PER_NODE="2", LINGER_S="6")
    done = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--time=5", "--cpus-per-task=2", "-o", "job-%j.out",
                           str(REPO / "slurm/train.sbatch"), "run.name=sbatch"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip().split(";")[0]
    log = tmp_path / f"job-{job_id}.out"
    _wait_for(lambda: log.exists() and "epoch 1/10" in log.read_text(), 150, f"job {job_id} to train an epoch")
    began = time.monotonic()
    subprocess.run(["scancel", "--batch", "--signal=USR2", job_id], check=True, timeout=30)
    _wait_for(lambda: "linger_python: training ended" in log.read_text(), 240, f"job {job_id} to train to the end")
    print(f"two nodes, train.sbatch: warning → requeued → resumed → trained to the end in "
          f"{time.monotonic() - began:.1f} s")
    subprocess.run(["scancel", "--batch", "--signal=USR2", job_id], check=True, timeout=30)  # a warning too late
    _wait_for(lambda: cluster.queue_state(job_id) is None, 60, f"job {job_id} to leave the queue")
    text = log.read_text()
    assert cluster.final_state(job_id) == "COMPLETED" and cluster.restarts(job_id) == 1, text[-3000:]
    assert f"train.sbatch: the step exited 0, not 75 (checkpointed to stop): not requeueing job {job_id}" in text
    assert [p.name for p in (tmp_path / "runs/sbatch").glob("version_*")] == ["version_0"]
    stopped = int(re.search(r"stopped by SIGTERM at step (\d+); checkpoint saved", text).group(1))
    resumed = re.search(r"resumed from \S+: epoch \d+, step (\d+),.*\(saved by 4 ranks, now 4\)", text)
    assert resumed and int(resumed.group(1)) == stopped > 0, text[-3000:]
    rank3 = _one(tmp_path, "runs/sbatch/**/logs/rank3.log").read_text()  # a rank on h1 stopped at the same step
    assert "[rank 3/4 h1]" in rank3 and f"stop requested by SIGTERM: checkpointing at step {stopped}" in rank3
    assert _final(tmp_path, "sbatch") == _final(reference[0], "plain")  # bit for bit the uninterrupted job


def test_a_lost_node_is_named_and_slurm_requeues_the_job(two_nodes, tmp_path):
    """h1's link goes down and every process on it is killed (a node lost). The ranks on h0 name it within the
    heartbeat timeout; Slurm sets h1 DOWN and requeues the job (it asked for 2 nodes, so it waits for them).
    How a requeued job resumes is the train.sbatch test's and the sweep's; here the job is then cancelled
    and the node brought back (``testbed start``) for the tests after this one."""
    done = run_cli([*SUBMIT, "run.name=lost", "dist.heartbeat_timeout_s=5"], tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    job_id = _job_id(done.stdout)
    log = tmp_path / f"runs/lost/slurm/{job_id}/{job_id}_0_log.err"
    checkpoints = tmp_path / "runs/lost/version_0/checkpoints"
    # the epoch's line is logged before its checkpoint is saved: the node is lost once that checkpoint is on disk
    _wait_for(lambda: log.exists() and "epoch 1/10" in log.read_text() and (checkpoints / "latest").exists(), 150,
              f"job {job_id} to train an epoch and checkpoint it", log)
    lost = time.monotonic()
    testbed.lose_node("h1")
    try:
        named = re.compile(r"lost ranks 2, 3 of 4: no heartbeat for 5 s .*ranks 2, 3 on h1")
        _wait_for(lambda: named.search(log.read_text()), 30, "rank 0 to name the lost node", log)
        print(f"node h1 lost: named by rank 0 after {time.monotonic() - lost:.1f} s")
        _wait_for(lambda: cluster.restarts(job_id) >= 1 and cluster.queue_state(job_id) == "PENDING", 90,
                  f"Slurm to requeue job {job_id}")
        print(f"node h1 lost: job requeued after {time.monotonic() - lost:.1f} s")
        assert "srun: error: Node failure on h1" in log.read_text()
        assert list(checkpoints.glob("step-*.pt"))  # what the requeued job resumes: not removed by the failure
    finally:  # the tests after this one need both nodes, whatever happened here
        subprocess.run(["scancel", job_id], timeout=30)
        testbed.start(quiet=True, nodes=2)
    _wait_for(lambda: cluster.queue_state(job_id) is None, 60, f"job {job_id} to leave the queue")


def test_a_sweep_runs_on_both_nodes_and_a_preempted_run_resumes_its_own_version(two_nodes, tmp_path, capsys):
    command = ["-m", "slurm.submit", "--nodes", "1", "--tasks-per-node", "2", "--time", "5",
               "--sweep", "optim.lr=0.1,0.05", "--sweep", "train.seed=0,1", "--parallel", "2", "run.name=sweep", "train.epochs=5"]
    done = run_cli(command, tmp_path, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    array = re.search(r"submitted job array (\d+) \(4 runs, at most 2 at a time\)", done.stdout).group(1)
    log = tmp_path / f"runs/sweep/slurm/{array}_0/{array}_0_0_log.err"
    _wait_for(lambda: log.exists() and "epoch 1/5" in log.read_text(), 150, "run 0 to train an epoch")
    subprocess.run(["scontrol", "requeue", f"{array}_0"], check=True, timeout=30)  # preempted: requeued
    _wait_for(lambda: cluster.queue_state(array) is None, 300, f"job array {array} to finish")
    text = log.read_text()
    stopped = int(re.search(r"stopped by SIGTERM at step (\d+); checkpoint saved", text).group(1))
    assert f"step {stopped}, sample" in re.search(r"resumed from .*", text).group(0), text[-3000:]
    nodes = subprocess.run(["sacct", "-n", "-X", "-P", "-j", array, "-o", "NodeList"], capture_output=True,
                           text=True, timeout=30).stdout.split()
    assert {"h0", "h1"} <= set(nodes), nodes  # two at a time: both nodes trained runs of the sweep
    group = tmp_path / "runs/sweep"
    for run in group.glob("optim.lr=*"):
        assert [p.name for p in run.glob("version_*")] == ["version_0"], run
    assert report.main([str(group)]) == 0
    table = capsys.readouterr().out
    print(table)
    rows = [line.split() for line in table.splitlines()[1:5]]
    assert sorted((row[0], row[1]) for row in rows) == [("0.05", "0"), ("0.05", "1"), ("0.1", "0"), ("0.1", "1")]
    assert all(row[6] == "finished" and row[4] == "5" for row in rows), table
    assert [float(row[2]) for row in rows] == sorted((float(row[2]) for row in rows), reverse=True)


@pytest.mark.parametrize("argv, message", [
    (["--nodes", "3"], "--nodes 3 but partition 'debug' has 2 node(s)"),
    (["--tasks-per-node", "3"], "= 3 CPUs, but the nodes of 'debug' have 2"),
])
def test_refusals_on_two_nodes_submit_nothing(two_nodes, in_tmp, capsys, argv, message):
    before = subprocess.run(["squeue", "-h", "-o", "%A"], capture_output=True, text=True).stdout
    per_node = [] if any(a.endswith("-per-node") for a in argv) else ["--tasks-per-node", "2"]
    nodes = [] if "--nodes" in argv else ["--nodes", "2"]
    code = submit.main(["--time", "5", *nodes, *per_node, *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert subprocess.run(["squeue", "-h", "-o", "%A"], capture_output=True, text=True).stdout == before
    assert not (in_tmp / "runs").exists()
