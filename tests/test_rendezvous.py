"""Item 7: a rank waiting for its peers says so; ranks started with different recipes refuse.

Real ``python -m ddp.train`` processes in the seed style on loopback (no namespaces needed).
"""

from __future__ import annotations

import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ddp.config import load_recipe, to_yaml
from ddp.cluster.rendezvous import recipe_differences
from tests.harness import free_port, python_env

QUICK = ("train.epochs=1", "log.tensorboard=false")


def _rank(rank: int, port: int, cwd: Path, *overrides: str) -> subprocess.Popen:
    env = python_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    return subprocess.Popen([sys.executable, "-m", "ddp.train", *QUICK, *overrides], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


class _Lines:
    """A process's output lines, read on a thread so that waiting for one never blocks past its deadline."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def next_with(self, pattern: re.Pattern, timeout: float) -> re.Match | None:
        """The next line matching ``pattern`` within ``timeout`` seconds; None at the end or the deadline."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                return None
            if line is None:
                return None
            self.seen.append(line)
            if match := pattern.search(line):
                return match
        return None


# dist.timeout_s is 600 s: a rank that said nothing until it gave up would say nothing within READ_S.
# READ_S only covers Python and torch starting on a loaded machine; the order of events is what is checked.
TIMEOUT_S = 600
READ_S = 90


@pytest.mark.timeout(240)
@pytest.mark.parametrize("rank, says", [
    (0, r"rank 0 waiting (?P<waited>\d+) s at 127\.0\.0\.1:(?P<port>\d+): joined 0, missing 1 of 2"),
    (1, r"rank 1: reaching the rendezvous store at 127\.0\.0\.1:(?P<port>\d+) .*still waiting after (?P<waited>\d+) s"),
])
def test_a_lone_rank_keeps_saying_it_waits_long_before_the_timeout(tmp_path, rank, says):
    """The wait line comes while the rank still waits (not when it gives up), names the address, and
    comes again: the second line reports a longer wait, both far short of dist.timeout_s."""
    port = free_port()
    proc = _rank(rank, port, tmp_path, f"dist.timeout_s={TIMEOUT_S}")
    lines = _Lines(proc)
    try:
        first = lines.next_with(re.compile(says), timeout=READ_S)
        alive_after_first = proc.poll() is None
        second = lines.next_with(re.compile(says), timeout=READ_S) if first else None
        alive_after_second = proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
    out = "".join(lines.seen)
    assert first is not None and second is not None, out
    assert alive_after_first and alive_after_second, out  # said while waiting, not on the way out
    assert int(first["port"]) == int(second["port"]) == port, out
    assert int(first["waited"]) < int(second["waited"]) < TIMEOUT_S, out
    assert "never joined" not in out and "Traceback" not in out, out


@pytest.mark.timeout(60)
def test_a_rank_alone_past_the_timeout_names_the_missing_ranks(tmp_path):
    proc = _rank(0, free_port(), tmp_path, "dist.timeout_s=3")
    out, _ = proc.communicate(timeout=50)
    assert proc.returncode == 1, out
    assert "ranks 1 of 2 never joined the rendezvous at 127.0.0.1" in out and "Traceback" not in out, out


@pytest.mark.timeout(90)
def test_ranks_with_different_recipes_both_refuse_naming_the_keys(tmp_path):
    port = free_port()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    procs = [_rank(0, port, tmp_path / "a"), _rank(1, port, tmp_path / "b", "optim.lr=0.1", "train.seed=3")]
    outs = [proc.communicate(timeout=80)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [2, 2], outs
    for out in outs:
        assert "different recipe than rank 0" in out and "optim.lr=" in out and "train.seed=" in out, out
        assert "collective mismatch" not in out and "Traceback" not in out, out


def test_recipe_differences_ignore_per_machine_keys():
    ours = load_recipe(None, ["optim.lr=0.1", "data.root=/b"])
    theirs = to_yaml(load_recipe(None, ["optim.lr=0.05", "data.root=/a"]))
    assert recipe_differences(theirs, ours) == "optim.lr=0.1≠0.05"
    assert recipe_differences(to_yaml(ours), ours) == ""


@pytest.mark.timeout(120)
def test_older_launcher_variables_train_together(tmp_path):
    """RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* and no LOCAL_WORLD_SIZE: used to train alone twice."""
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = python_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                         WORLD_SIZE="2")
        procs.append(subprocess.Popen([sys.executable, "-m", "ddp.train", *QUICK], cwd=tmp_path, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [proc.communicate(timeout=100)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outs
    assert "[rank 0/2" in outs[0] and "× 2 ranks" in outs[0] and "done: test accuracy" in outs[0], outs[0]


@pytest.mark.timeout(120)
def test_a_rank_that_agrees_still_refuses_when_another_differs(tmp_path):
    port = free_port()
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="3")
    procs = []
    for rank, extra in ((0, ()), (1, ()), (2, ("optim.lr=0.2",))):
        (tmp_path / str(rank)).mkdir()
        procs.append(subprocess.Popen([sys.executable, "-m", "ddp.train", *QUICK, *extra], cwd=tmp_path / str(rank),
                                      env=python_env(**env, RANK=str(rank)), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [proc.communicate(timeout=100)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [2, 2, 2], outs
    assert "rank 2 started with a different recipe than rank 0: optim.lr=0.2≠0.05" in outs[1], outs[1]


@pytest.mark.timeout(120)
def test_a_gloo_interface_the_user_set_is_kept_said_and_used(tmp_path):
    """Seed style, no LOCAL_RANK: the ranks may span machines, so the trainer picks Gloo's interface
    (lo here) unless GLOO_SOCKET_IFNAME is set. Set to an interface that does not exist, it is kept and
    said, and Gloo itself fails on it: had the trainer put lo in its place, these ranks would train."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "ddp.train", *QUICK], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=python_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                                             WORLD_SIZE="2", GLOO_SOCKET_IFNAME="nosuch0"))
             for rank in (0, 1)]
    outs = [proc.communicate(timeout=100)[0] for proc in procs]
    assert all(proc.returncode not in (0, None) for proc in procs), outs
    said = "rank 0: kept GLOO_SOCKET_IFNAME=nosuch0 (set by you; ours would be lo: the route to the master 127.0.0.1 " \
           "via lo"
    assert said in outs[0], outs[0]  # rank 0 writes the console
    assert "nosuch0" in outs[0].split(said, 1)[1] and "nosuch0" in outs[1], outs  # Gloo was given it, on both
    assert not any("set GLOO_SOCKET_IFNAME" in out or "done: test accuracy" in out for out in outs), outs
