"""Helpers shared by the GPU checks: launching the CLI (plain or torchrun) and reading a run's files.

Launches use the suite's environment (``tests.harness.python_env``: no inherited launcher
variables, the repository on PYTHONPATH — which keeps the carried wheels' ``/tmp/site`` on it too),
but each runs in its own process session and the whole session is killed on a timeout or when the
check is interrupted (pytest-timeout), so no orphaned torchrun worker keeps holding the GPU while
the next check runs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import torch

from tests.harness import python_env

SMOKE = os.environ.get("GPU_CHECK_ON_CPU") == "1"  # CPU smoke mode, for developing the checks (never CI)
CUDA = torch.cuda.is_available()
RESULTS = os.environ.get("GPU_CHECK_RESULTS")  # the one-line-per-check results file (tests/gpu/run.sh)
# every time limit is multiplied by this: the CPU smoke mode runs on small, often shared machines
SLOW = float(os.environ.get("GPU_CHECK_SLOW", "6" if SMOKE and not CUDA else "1"))
QUIET = ("log.tensorboard=false", "log.progress=false")
DEVICE = "cuda:0" if CUDA else "cpu"  # where a one-GPU run must train (the CPU only in smoke mode)
BACKEND = "nccl" if CUDA else "gloo"


def start(args: list[str], cwd: Path, ranks: int | None = None, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
          stdin=subprocess.DEVNULL, **env: str) -> subprocess.Popen:
    """``python <args>``, or ``torchrun --standalone --nproc_per_node=ranks <args>``, in a session of its own."""
    launcher = [] if ranks is None else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    return subprocess.Popen([sys.executable, *launcher, *args], cwd=cwd, env=python_env(**env), stdin=stdin,
                            stdout=stdout, stderr=stderr, text=True, start_new_session=True)


def kill(proc: subprocess.Popen) -> None:
    """Kill the process and everything it started, if still there: its session, and its descendants
    wherever they are (torchrun starts its workers in sessions of their own)."""
    try:
        import psutil

        family = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
    except Exception:  # noqa: BLE001 - psutil missing or the process just ended
        family = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for child in family:
        try:
            child.kill()
        except Exception:  # noqa: BLE001 - already gone
            pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def finish(proc: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    """Wait for ``proc`` (at most ``timeout`` × SLOW s, then kill its session and fail)."""
    timeout *= SLOW
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill(proc)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(map(str, proc.args))[:200]} did not end within {timeout:.0f} s "
                             f"(killed): {((out or '') + (err or ''))[-2000:]}") from None
    finally:
        kill(proc)  # a launcher's leftovers (torchrun workers) go too
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run(args: list[str], cwd: Path, ranks: int | None = None, timeout: float = 120.0,
        **env: str) -> subprocess.CompletedProcess:
    return finish(start(args, cwd, ranks, **env), timeout)


def train(cwd: Path, *overrides: str, ranks: int | None = None, timeout: float = 120.0,
          **env: str) -> subprocess.CompletedProcess:
    """``python -m ddp.train`` (``ranks`` None) or ``torchrun --standalone --nproc_per_node=ranks -m ddp.train``."""
    return run(["-m", "ddp.train", *QUIET, *overrides], cwd, ranks, timeout, **env)


def console(done: subprocess.CompletedProcess) -> str:
    return (done.stdout or "") + (done.stderr or "")


def tail(done: subprocess.CompletedProcess, chars: int = 3000) -> str:
    return console(done)[-chars:]


def version(cwd: Path, name: str = "digits", number: int = 0) -> Path:
    return cwd / "runs" / name / f"version_{number}"


def epochs(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("kind") == "epoch"]


def final_acc(run_dir: Path) -> float:
    found = epochs(run_dir)
    assert found, f"no epoch record in {run_dir / 'metrics.jsonl'}"
    return float(found[-1]["test_acc"])


def placement(text: str) -> tuple[str, str]:
    """(backend, device) from the run's start line ``... | backend nccl, device cuda:0, 8 CPU threads ...``."""
    found = re.search(r"backend (\w+), device ([\w:]+)", text)
    assert found, "no 'backend ..., device ...' line in the output"
    return found.group(1), found.group(2)


def latest_checkpoint(run_dir: Path) -> Path:
    directory = run_dir / "checkpoints"
    return directory / (directory / "latest").read_text().strip()


def model_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The saved model's tensors (``torch.load(weights_only=True)``, as the library loads them)."""
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]


__all__ = ["BACKEND", "CUDA", "DEVICE", "QUIET", "RESULTS", "SLOW", "SMOKE", "console", "epochs", "final_acc", "finish", "kill",
           "latest_checkpoint", "model_tensors", "placement", "run", "start", "tail", "train", "version"]
