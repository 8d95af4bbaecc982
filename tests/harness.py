"""Real multi-rank jobs for tests: spawned gloo ranks on a free port, torchrun and CLI subprocesses.

Every helper has a short timeout; on timeout all ranks are killed and the test fails naming the
ranks that hung, so a bug shows up as a failure, never as a hung suite.
"""

from __future__ import annotations

import os
import queue
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parent.parent


SYSTEM_TESTS = "DDP_TEST_SYSTEM"  # =1: run the tests that need root, start daemons or install packages


def system_tests_asked() -> bool:
    return os.environ.get(SYSTEM_TESTS) == "1"


def require_system(what: str, missing: str | None = None) -> None:
    """Call first in a test or fixture that needs root, starts daemons or installs packages.

    On a user's machine (``make test``) it skips, saying how to ask; with ``DDP_TEST_SYSTEM=1``
    (what ``.ci/run`` sets) it runs, and anything that stops it running (not root, ``missing``:
    why it cannot run here) is a failure, so CI never passes on a skipped system test."""
    if not system_tests_asked():
        pytest.skip(f"{what}: needs root and changes the machine; run with {SYSTEM_TESTS}=1 as root "
                    f"(`sudo {SYSTEM_TESTS}=1 make test`, as .ci/run does)")
    if os.geteuid() != 0:
        pytest.fail(f"{SYSTEM_TESTS}=1 asks for {what}, but they need root")
    if missing:
        pytest.fail(f"{SYSTEM_TESTS}=1 asks for {what}, but {missing}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 90.0,
                init_group: bool = True) -> list[Any]:
    """Run ``fn(env, *args)`` on ``world`` spawned processes; return each rank's result, by rank.

    With ``init_group`` the gloo group is created around ``fn`` by the library's own
    ``process_group``; without it ``fn`` creates the group itself (e.g. through ``execute``).
    ``fn`` and its results must be picklable (return numpy arrays or plain data, not tensors).
    """
    ctx = mp.get_context("spawn")
    results: Any = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, rank, world, port, results, args, init_group), daemon=True)
             for rank in range(world)]
    for proc in procs:
        proc.start()
    collected: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(collected) < world:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world)) - set(collected))
                raise TimeoutError(f"ranks {missing} of {world} did not finish within {timeout:.0f} s")
            try:
                rank, status, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in collected]
                if dead:
                    raise RuntimeError(f"ranks {dead} died with exit codes {[procs[r].exitcode for r in dead]}")
                continue
            if status == "error":
                raise RuntimeError(f"rank {rank} raised:\n{payload}")
            collected[rank] = payload
        for proc in procs:
            proc.join(timeout=max(deadline - time.monotonic(), 5))
        codes = [proc.exitcode for proc in procs]
        if any(code != 0 for code in codes):
            raise RuntimeError(f"ranks finished but exit codes were {codes} (every rank must exit 0)")
        return [collected[rank] for rank in range(world)]
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5)


def _rank_main(fn: Callable[..., Any], rank: int, world: int, port: int, results: Any, args: tuple,
               init_group: bool) -> None:
    from ddp.cluster.environment import ClusterEnv, available_cpus
    from ddp.cluster.process_group import process_group

    torch.set_num_threads(max(1, available_cpus() // world))
    env = ClusterEnv(rank=rank, local_rank=rank, world_size=world, local_world_size=world,
                     master_addr="127.0.0.1", master_port=port)
    try:
        if init_group:
            with process_group(env, "gloo", torch.device("cpu"), timeout_s=60):
                payload = fn(env, *args)
        else:
            payload = fn(env, *args)
        results.put((rank, "ok", payload))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, "error", traceback.format_exc()))


def python_env(**extra: str) -> dict[str, str]:
    """Environment for CLI subprocesses: no inherited launcher variables, the repo importable."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_")) and k not in
           {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "MASTER_IP",
            "GROUP_RANK"}}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_cli(args: list[str], cwd: Path, timeout: float = 120.0, **extra_env: str) -> subprocess.CompletedProcess:
    """``python <args>`` in ``cwd`` with a timeout; output captured as text."""
    return subprocess.run([sys.executable, *args], cwd=cwd, env=python_env(**extra_env), capture_output=True,
                          text=True, timeout=timeout)


def run_torchrun(nproc: int, args: list[str], cwd: Path, timeout: float = 180.0,
                 extra: list[str] = (), **extra_env: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=N <args>`` (standalone picks a free port itself)."""
    cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *extra, *args]
    return run_cli(cmd, cwd, timeout, **extra_env)
