"""Faults that reset nothing, with real processes: a frozen rank, a machine cut off from the
network, a stalled rank, and a save longer than the collective timeout. The decisions themselves
are tested with made-up clocks in tests/test_watchdog.py."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests import netns
from tests.harness import REPO, free_port, python_env, run_torchrun

QUICK = ("log.tensorboard=false", "log.every_steps=1")
NEVER = "dist.timeout_s=600"  # collectives alone would wait 10 minutes: only the watchdog can end these runs
WORKER = str(REPO / "tests" / "workers" / "slow_spots.py")


def _steps(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return metrics.read_text().count('"kind": "step"') if metrics.exists() else 0


def _wait_for_steps(procs, run_dir: Path, steps: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while _steps(run_dir) < steps:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "training never got going"
        time.sleep(0.2)


def _manual_rank(rank: int, port: int, cwd: Path, *overrides: str) -> subprocess.Popen:
    env = python_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                     OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "ddp.train", "train.epochs=200", "checkpoint.every_epochs=0",
                             *QUICK, *overrides], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("frozen, expected", [
    # a frozen rank 1: test_fault_tolerance.py (SIGSTOP), and on two machines below
    (0, "lost contact with rank 0 (at 127.0.0.1), which serves the rendezvous store, for "),
])
def test_a_frozen_rank_ends_the_other_within_the_heartbeat_timeout(tmp_path, frozen, expected):
    """SIGSTOP resets no connection: without the watchdog the survivor would wait dist.timeout_s."""
    timeout_s = 4
    port = free_port()
    procs = [_manual_rank(rank, port, tmp_path, NEVER, f"dist.heartbeat_timeout_s={timeout_s}") for rank in (0, 1)]
    survivor = procs[1 - frozen]
    try:
        _wait_for_steps(procs, tmp_path / "runs" / "digits" / "version_0", 5)
        procs[frozen].send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        _, err = survivor.communicate(timeout=60)
        took = time.monotonic() - stopped
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)
    assert survivor.returncode == 1, err[-3000:]
    assert took < timeout_s + 10, (took, err[-3000:])
    lines = [line for line in err.splitlines() if expected in line]
    assert len(lines) == 1 and "HINT:" in lines[0], err[-3000:]
    assert frozen == 0 or "last heard at " in lines[0], lines[0]
    assert "Traceback" not in err, err[-3000:]
    print(f"rank {1 - frozen} exited {took:.1f} s after rank {frozen} was frozen")


@pytest.mark.timeout(180)
def test_a_stalled_rank_is_shown_with_every_ranks_stack_and_a_save_longer_than_the_timeout_completes(tmp_path):
    """Rank 1 sleeps 5 s loading the batch after step 5 (stall timeout 2 s): every rank log gets a
    stack dump, the console names rank 1 as behind, and the job goes on. Then rank 0's first save
    takes 13 s, longer than dist.timeout_s=10: the other rank waits outside the collective."""
    done = run_torchrun(2, [WORKER, "train.epochs=1", *QUICK, "dist.stall_timeout_s=2", "dist.timeout_s=10"],
                        tmp_path, timeout=150, SLOW_DATA_RANK="1", SLOW_DATA_STEP="5", SLOW_DATA_S="5",
                        SLOW_SAVE_S="13")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    run_dir = tmp_path / "runs" / "digits" / "version_0"
    report = [line for line in out.splitlines() if "stalled: no rank finished a step for" in line]
    assert report and "rank 1 on " in report[0] and " behind: " in report[0], out[-4000:]
    assert "rank 1 loading data for step 6" in report[0] and "rank 0 computing step 6" in report[0], report[0]
    assert all("[rank 0/2" in line for line in report), report  # said by rank 0 only
    for rank in (0, 1):
        text = (run_dir / "logs" / f"rank{rank}.log").read_text()
        assert "stall report: stalled:" in text and 'File "' in text and "most recent call first" in text, text[-3000:]
    assert "in stuck_loading_data" in (run_dir / "logs" / "rank1.log").read_text()
    rank1 = (run_dir / "logs" / "rank1.log").read_text()
    assert "for rank 0 to finish the checkpoint of step" in rank1, rank1[-3000:]
    assert (run_dir / "checkpoints" / "latest").exists()


def _two_hosts_training(hosts: netns.TwoHosts, tmp_path: Path, timeout_s: int) -> tuple[list, list[Path]]:
    """launch node on both hosts, 2 ranks each, each in its own directory; returns once 5 steps ran."""
    argv = [sys.executable, "-m", "launch", "node", "--nnodes", "2", "--nproc", "2", "--master-addr"]
    run = ["train.epochs=200", "checkpoint.every_epochs=0", *QUICK, NEVER, f"dist.heartbeat_timeout_s={timeout_s}"]
    env = python_env()
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "OMP_NUM_THREADS"):
        env.pop(name, None)
    procs, logs = [], []
    for node in (0, 1):
        cwd = tmp_path / f"h{node}"
        cwd.mkdir()
        logs.append(cwd / "out.log")
        procs.append(hosts.popen(node, [*argv, hosts.master, "--node-rank", str(node), *run], env, cwd, logs[-1]))
    _wait_for_steps(procs, tmp_path / "h0" / "runs" / "digits" / "version_0", 5)
    return procs, logs


def _waited(procs, since: float, limit: float) -> list[float]:
    took = []
    for proc in procs:
        try:
            proc.wait(timeout=max(since + limit - time.monotonic(), 0.1))
        except (subprocess.TimeoutExpired, psutil.TimeoutExpired):
            pass
        took.append(time.monotonic() - since)
    return took


def _rank_process(hosts: netns.TwoHosts, host: int, rank: int) -> psutil.Process:
    """The training process of global rank ``rank`` on host ``host`` (a torchrun worker)."""
    pids = subprocess.run([netns.IP, "netns", "pids", hosts.names[host]], capture_output=True, text=True,
                          timeout=10).stdout.split()
    for pid in pids:
        try:
            proc = psutil.Process(int(pid))
            if "ddp.train" in proc.cmdline() and proc.environ().get("RANK") == str(rank):
                return proc
        except psutil.Error:
            continue
    raise AssertionError(f"no process of rank {rank} on host {host}")


@pytest.mark.timeout(240)
def test_a_frozen_rank_on_another_machine_ends_every_other_rank_naming_it(tmp_path):
    """Two hosts, 2 ranks each; rank 3 (host 1) is SIGSTOPped. Ranks 0 and 1 (host 0) and rank 2
    (beside it on host 1) each find the silence and exit within dist.heartbeat_timeout_s + 10 s."""
    netns.require()
    timeout_s = 5
    with netns.two_hosts() as hosts:
        procs, logs = _two_hosts_training(hosts, tmp_path, timeout_s)
        frozen, beside = _rank_process(hosts, 1, 3), _rank_process(hosts, 1, 2)
        frozen.suspend()
        stopped = time.monotonic()
        took = _waited([procs[0], beside], stopped, 60)
        code = procs[0].poll()
    out = logs[0].read_text(errors="replace")
    rank2 = (tmp_path / "h1" / "runs" / "digits" / "version_0" / "logs" / "rank2.log").read_text(errors="replace")
    assert code not in (0, None) and max(took) < timeout_s + 10, (code, took, out[-3000:])
    expected = "lost rank 3 of 4: no heartbeat for 5 s (dist.heartbeat_timeout_s); rank 3 on "
    assert [line for line in out.splitlines() if expected in line and "[rank 0/4" in line], out[-3000:]
    # rank 1 names rank 3 too, unless its launcher ended it first, as torchrun does once rank 0 exited;
    # whatever it said, it blamed no one else
    said = [line for line in out.splitlines() if "[rank 1/4" in line and " lost " in line]
    assert all(expected in line for line in said), said
    assert said or re.search(r"rank\s*: 1 \(local_rank: 1\)\s*exitcode\s*: -15", out), out[-3000:]
    assert expected in rank2, rank2[-3000:]
    print(f"host 0 exited {took[0]:.1f} s and rank 2 {took[1]:.1f} s after rank 3 was frozen")


@pytest.mark.timeout(240)
def test_a_machine_cut_off_from_the_network_ends_both_sides_naming_each_other(tmp_path):
    """Two hosts, 2 ranks each; host 1's link goes down mid-training. Nothing resets: each side
    finds the silence itself and exits within dist.heartbeat_timeout_s + 10 s."""
    netns.require()
    timeout_s = 5
    with netns.two_hosts() as hosts:
        procs, logs = _two_hosts_training(hosts, tmp_path, timeout_s)
        hosts.cut_off(1)
        cut = time.monotonic()
        took = _waited(procs, cut, 60)
        codes = [proc.poll() for proc in procs]
    outs = [log.read_text(errors="replace") for log in logs]
    assert codes[0] not in (0, None) and codes[1] not in (0, None), (codes, took, outs)
    assert max(took) < timeout_s + 10, (took, outs)
    assert "lost ranks 2, 3 of 4: no heartbeat for 5 s" in outs[0], outs[0][-3000:]
    assert "lost contact with node 0 (ranks 0-1 at " in outs[1], outs[1][-3000:]
    assert "; ranks 0, 1 on " in outs[1], outs[1][-3000:]  # the other machine's ranks, not rank 2 beside it
    print(f"host 0 exited {took[0]:.1f} s and host 1 {took[1]:.1f} s after host 1 was cut off")
