"""A lost machine under torchrun's c10d rendezvous, on two simulated hosts (tests/netns.py), 2 ranks
each, one shared run directory (as on a cluster's shared filesystem):

- killed and started again (``--max-restarts``): the group restarts with the new node, resumes
  from the last checkpoint and ends with the uninterrupted run's weights, bit for bit;
- cut off for good under an elastic node range (``--nnodes 1:2``): the other node goes on alone,
  at 2 ranks, from the last checkpoint, and finishes.

The rendezvous settings are shortened (torchrun's defaults: a node is dropped after 3 missed 5 s
keep-alives, and a round waits 30 s for more nodes once the minimum is there) so each test takes
about a minute; what is checked is what the user sees: exit codes, the resume line, the weights.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

from ddp.checkpoint import files
from tests import netns
from tests.harness import python_env, run_torchrun

RUN = ("train.epochs=2", "checkpoint.every_steps=5", "log.every_steps=1", "log.tensorboard=false",
       "dist.timeout_s=600", "dist.heartbeat_timeout_s=5")
FAST_RDZV = "last_call_timeout=2,keep_alive_interval=1,keep_alive_max_attempt=3"
RUN_DIR = Path("runs", "digits", "version_0")


@pytest.fixture(autouse=True)
def _namespaces_asked() -> None:
    netns.require()  # root and DDP_TEST_SYSTEM=1 (CI); skipped otherwise, saying how to ask


def _env() -> dict[str, str]:
    env = python_env()
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "OMP_NUM_THREADS", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"):
        env.pop(name, None)
    return env


def _node(hosts: netns.TwoHosts, node: int, nnodes: str, job: Path, log: str):
    argv = [sys.executable, "-m", "launch", "node", "--nnodes", nnodes, "--nproc", "2", "--master-addr",
            hosts.master, "--node-rank", str(node), "--run-id", "job", "--max-restarts", "2",
            "--rdzv-conf", FAST_RDZV, *RUN]
    return hosts.popen(node, argv, _env(), job, job / log)


def _steps(job: Path) -> int:
    metrics = job / RUN_DIR / "metrics.jsonl"
    return metrics.read_text().count('"kind": "step"') if metrics.exists() else 0


def _wait_for_step(job: Path, step: int, procs) -> None:
    deadline = time.monotonic() + 150
    while _steps(job) < step:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), _logs(job)
        time.sleep(0.1)


def _logs(job: Path) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-4000:]}" for log in sorted(job.glob("*.log")))


def _final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    newest = max(run_dir.glob("checkpoints/step-*.pt"))
    return files.load(newest)["model"]


@pytest.mark.timeout(300)
def test_a_node_killed_and_started_again_resumes_to_the_uninterrupted_weights(tmp_path):
    reference = tmp_path / "reference"
    reference.mkdir()
    done = run_torchrun(4, ["-m", "ddp.train", *RUN], reference, timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]
    job = tmp_path / "job"
    job.mkdir()
    with netns.two_hosts() as hosts:
        procs = [_node(hosts, 0, "2", job, "node0.log"), _node(hosts, 1, "2", job, "node1.log")]
        _wait_for_step(job, 8, procs)  # past the checkpoint of step 5
        hosts.kill_host(1)
        killed = time.monotonic()
        time.sleep(1)
        again = _node(hosts, 1, "2", job, "node1-again.log")
        codes = [p.wait(timeout=200) for p in (procs[0], again)]
        took = time.monotonic() - killed
    out = _logs(job)
    assert codes == [0, 0], out
    resumed = [line for line in out.splitlines() if "resumed from runs/digits/version_0/checkpoints/step-" in line]
    assert resumed and "(saved by 4 ranks, now 4)" in resumed[0], out
    assert not (job / "runs" / "digits" / "version_1").exists(), out  # the same run, not a new one
    ours, theirs = _final_model(job / RUN_DIR), _final_model(reference / RUN_DIR)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), "the resumed job's weights differ from the reference's"
    print(f"node 1 killed at step >= 8, started again 1 s later: the job finished {took:.1f} s after the kill; "
          f"{resumed[0].split('] ')[-1]}")


@pytest.mark.timeout(300)
def test_an_elastic_job_goes_on_without_a_node_cut_off_for_good(tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    with netns.two_hosts() as hosts:
        procs = [_node(hosts, 0, "1:2", job, "node0.log"), _node(hosts, 1, "1:2", job, "node1.log")]
        _wait_for_step(job, 8, procs)
        hosts.cut_off(1)
        cut = time.monotonic()
        code = procs[0].wait(timeout=200)
        took = time.monotonic() - cut
    out = _logs(job)
    node0 = (job / "node0.log").read_text(errors="replace")
    assert code == 0, out
    assert "node 0 of 1:2: " in node0 and "Logging error" not in out, out
    assert "lost ranks 2, 3 of 4: no heartbeat for 5 s" in node0 or "lost contact with " in node0, out
    resumed = [line for line in node0.splitlines() if "resumed from runs/digits/version_0/checkpoints/step-" in line]
    assert resumed and "(saved by 4 ranks, now 2)" in resumed[0], out
    finals = [line for line in node0.splitlines() if "done: test accuracy" in line]
    assert finals and "[rank 0/2 " in finals[-1], out  # finished by the 2 ranks left
    assert not (job / "runs" / "digits" / "version_1").exists(), out
    print(f"host 1 cut off at step >= 8: host 0 went on at 2 ranks and finished {took:.1f} s later; "
          f"{resumed[0].split('] ')[-1]}")
