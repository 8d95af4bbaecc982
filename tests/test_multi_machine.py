"""Multi-machine runs on two simulated hosts (network namespaces, see tests/netns.py).

No test sets GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME: choosing the interface is what is tested.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from tests import netns
from tests.harness import python_env



@pytest.fixture(autouse=True)
def _namespaces_asked() -> None:
    netns.require()  # root and DDP_TEST_SYSTEM=1 (CI); skipped otherwise, saying how to ask

QUICK = ("train.epochs=2", "log.tensorboard=false", "log.every_steps=5")
USER_SCRIPT = '''
import os, sys, datetime
import torch, torch.distributed as dist
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
rank, world = dist.get_rank(), dist.get_world_size()
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)
print(f"user script rank={rank} world={world} args={sys.argv[1:]} sum={t.item()}", flush=True)
dist.barrier()
dist.destroy_process_group()
'''


def _env(**extra: str) -> dict[str, str]:
    env = python_env(**extra)
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "OMP_NUM_THREADS"):
        env.pop(name, None)
    return env


def _node(hosts: netns.TwoHosts, rank: int, *args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "launch", "node", "--nnodes", "2", "--node-rank", str(rank), "--master-addr",
            hosts.master, "--nproc", str(nproc), *args]


def _start_both(hosts, tmp_path: Path, argv_of, env=None) -> tuple[list, list[Path]]:
    procs, logs = [], []
    for rank in (0, 1):
        cwd = tmp_path / f"h{rank}"
        cwd.mkdir(exist_ok=True)
        logs.append(cwd / "out.log")
        procs.append(hosts.popen(rank, argv_of(rank), env or _env(), cwd, logs[-1]))
    return procs, logs


def _wait(procs, timeout: float) -> list[int | None]:
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except Exception:  # noqa: BLE001 - reported by the caller's assertion
            pass
    return [proc.poll() for proc in procs]


def _text(logs: list[Path]) -> str:
    return "\n".join(f"--- {log.parent.name}\n{log.read_text(errors='replace')}" for log in logs)


@pytest.mark.timeout(180)
def test_launch_node_trains_the_default_recipe_on_two_hosts(tmp_path):
    with netns.two_hosts() as hosts:
        start = time.monotonic()
        procs, logs = _start_both(hosts, tmp_path, lambda r: _node(hosts, r, *QUICK))
        codes = _wait(procs, 150)
        took = time.monotonic() - start
    out = _text(logs)
    assert codes == [0, 0], out
    assert "done: test accuracy" in logs[0].read_text(), out
    assert f"set GLOO_SOCKET_IFNAME={netns.IFNAME}" in out and "set OMP_NUM_THREADS=" in out, out
    print(f"two-host launch node run (2 nodes x 2 ranks, 2 epochs): {took:.1f} s")


@pytest.mark.timeout(150)
def test_seed_style_one_rank_per_host(tmp_path):
    with netns.two_hosts() as hosts:
        procs, logs = [], []
        for rank in (0, 1):
            (tmp_path / f"h{rank}").mkdir()
            logs.append(tmp_path / f"h{rank}" / "out.log")
            env = _env(MASTER_IP=hosts.master, RANK=str(rank), WORLD_SIZE="2")
            procs.append(hosts.popen(rank, [sys.executable, "-m", "ddp.train", *QUICK], env, tmp_path / f"h{rank}",
                                     logs[rank]))
        codes = _wait(procs, 120)
    out = _text(logs)
    assert codes == [0, 0], out
    assert "done: test accuracy" in logs[0].read_text(), out
    assert f"rank 0: set GLOO_SOCKET_IFNAME={netns.IFNAME}" in logs[0].read_text(), out  # the trainer chose it


@pytest.mark.timeout(150)
def test_plain_user_script_through_launch_node(tmp_path):
    script = tmp_path / "user_ddp.py"
    script.write_text(USER_SCRIPT)
    with netns.two_hosts() as hosts:
        procs, logs = _start_both(hosts, tmp_path, lambda r: _node(hosts, r, str(script), "--epochs", "3", "-x"))
        codes = _wait(procs, 120)
    out = _text(logs)
    assert codes == [0, 0], out
    for rank in range(4):
        assert f"user script rank={rank} world=4 args=['--epochs', '3', '-x'] sum=10.0" in out, out


@pytest.mark.timeout(120)
def test_c10d_rendezvous_with_a_run_id(tmp_path):
    script = tmp_path / "user_ddp.py"
    script.write_text(USER_SCRIPT)
    with netns.two_hosts() as hosts:
        procs, logs = _start_both(hosts, tmp_path, lambda r: _node(hosts, r, "--run-id", "job1", str(script), nproc=1))
        codes = _wait(procs, 90)
    out = _text(logs)
    assert codes == [0, 0], out
    assert "user script rank=0 world=2" in out and "user script rank=1 world=2" in out, out


# Bounds below only mean "did not wait for the collective timeout": every run here has
# dist.timeout_s=600, and a node gets at most 120 s to exit; what is checked is what it said and did.
NEVER = "dist.timeout_s=600"


@pytest.mark.timeout(180)
def test_unreachable_master_fails_preflight_in_one_line(tmp_path):
    with netns.two_hosts() as hosts:
        (tmp_path / "h1").mkdir()
        start = time.monotonic()
        proc = hosts.popen(1, _node(hosts, 1, *QUICK, NEVER), _env(), tmp_path / "h1", tmp_path / "h1" / "out.log")
        code = _wait([proc], 120)[0]
        took = time.monotonic() - start
    out = (tmp_path / "h1" / "out.log").read_text()
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert code == 2, (code, took, out)
    assert len(errors) == 1 and f"{hosts.master}:29500" in errors[0] and netns.IFNAME in errors[0], out
    assert "within 15 s" in errors[0], out  # the preflight's own limit (--preflight-timeout), not a collective's
    assert "start node 0 first" in errors[0] and "Traceback" not in out, out
    assert not (tmp_path / "h1" / "runs").exists(), out  # refused before any rank started
    print(f"preflight failure after {took:.1f} s: {errors[0]}")


@pytest.mark.timeout(120)
def test_port_taken_on_the_master_is_named(tmp_path):
    holder = "import socket, time\ns = socket.socket()\ns.bind(('', 29500))\ns.listen()\nprint('listening', flush=True)\n" \
             "time.sleep(100)\n"
    with netns.two_hosts() as hosts:
        (tmp_path / "h0").mkdir()
        holding = hosts.popen(0, [sys.executable, "-c", holder], _env(), tmp_path, tmp_path / "holder.log")
        deadline = time.monotonic() + 60
        while "listening" not in (tmp_path / "holder.log").read_text():  # the port is taken before node 0 starts
            assert holding.poll() is None and time.monotonic() < deadline, (tmp_path / "holder.log").read_text()
            time.sleep(0.1)
        proc = hosts.popen(0, _node(hosts, 0, *QUICK), _env(), tmp_path / "h0", tmp_path / "h0" / "out.log")
        code = _wait([proc], 60)[0]
    out = (tmp_path / "h0" / "out.log").read_text()
    assert code == 2, out
    line = next(line for line in out.splitlines() if line.startswith("error:"))
    assert "port 29500" in line and "taken by pid" in line and "s = socket.socket()" in line, out
    assert out.count("error:") == 1 and "Traceback" not in out, out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("dead, names", [(0, "lost contact with node 0 (ranks 0-1 at "), (1, "lost rank 2, 3 of 4")])
def test_dead_node_ends_the_other_node_promptly(tmp_path, dead, names):
    long_run = ("train.epochs=200", "log.tensorboard=false", "log.every_steps=1", "checkpoint.every_epochs=0", NEVER)
    survivor = 1 - dead
    with netns.two_hosts() as hosts:
        procs, logs = _start_both(hosts, tmp_path, lambda r: _node(hosts, r, *long_run))
        metrics = tmp_path / "h0" / "runs" / "digits" / "version_0" / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text().count('"step"') >= 5):
            assert time.monotonic() < deadline and procs[survivor].poll() is None, _text(logs)
            time.sleep(0.2)
        hosts.kill_host(dead)
        killed = time.monotonic()
        code = _wait([procs[survivor]], 120)[0]  # None: it sat in a collective, waiting for the 600 s timeout
        took = time.monotonic() - killed
    out = logs[survivor].read_text()
    assert code not in (0, None), (code, took, out)
    assert names in out, out
    print(f"node {survivor} exited {code} {took:.1f} s after node {dead} was killed")
