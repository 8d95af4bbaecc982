"""Launching one implementation on one workload: ``torchrun --standalone`` in its own process group.

Every run gets a fresh directory, the same environment (repository on ``PYTHONPATH``, no inherited
launcher variables, ``OMP_NUM_THREADS`` = cores ÷ ranks) and a timeout after which its whole
process group is killed. The wall-clock time just before the launch is kept for time-to-first-step.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.quiet import ForeignCpu
from bench.workloads import Workload

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
INSTALL_HINT = "not installed: pip install '.[bench]'"
LAUNCHER_VARIABLES = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                      "MASTER_PORT", "MASTER_IP", "OMP_NUM_THREADS"}


@dataclass(frozen=True)
class Implementation:
    """One side of the comparison: ours (``-m ddp.train``) or a competitor script under ``bench/``."""

    key: str
    label: str
    script: str | None = None  # file under bench/; None = ours
    requires: str | None = None  # a module the script imports

    def missing(self) -> str | None:
        """Why this implementation cannot run here, or None."""
        if self.requires and importlib.util.find_spec(self.requires) is None:
            return INSTALL_HINT
        return None

    def arguments(self, workload: Workload, quick: bool, run_dir: Path, extra: tuple[str, ...] = ()) -> list[str]:
        """What follows ``torchrun --standalone --nproc_per_node=N``; ``extra`` overrides go to ours only."""
        if self.script is None:
            return ["-m", "ddp.train", *workload.ours_overrides(quick), *extra, f"run.dir={run_dir}"]
        max_steps, epochs = workload.length(quick)
        return [str(BENCH / self.script), "--workload", workload.key, "--max-steps", str(max_steps),
                "--epochs", str(epochs), "--out", str(steps_file(run_dir))]


OURS = Implementation("ours", "ddp-recipes")
COMPETITORS: dict[str, Implementation] = {impl.key: impl for impl in (
    Implementation("minimal", "minimal DDP loop", "minimal_ddp.py"),
    Implementation("lightning", "Lightning Trainer", "lightning_loop.py", requires="lightning"),
    Implementation("accelerate", "Accelerate", "accelerate_loop.py", requires="accelerate"),
)}


def steps_file(run_dir: Path) -> Path:
    """Where a run's step records land (ours writes ``metrics.jsonl`` into ``run.dir``'s first version;
    each measured run has a directory of its own)."""
    return run_dir / "version_0" / "metrics.jsonl"


class RunFailed(RuntimeError):
    """A launch that timed out or exited non-zero; the message names the log to read."""


@dataclass(frozen=True)
class Launch:
    launched_at: float  # time.time() just before torchrun started
    seconds: float  # wall time of the whole launch
    steps: Path
    foreign_cpu_s: float  # CPU time other processes used meanwhile (see bench.quiet)
    disturbed: bool


def launch(impl: Implementation, workload: Workload, world: int, quick: bool, run_dir: Path,
           timeout: float, ours_extra: tuple[str, ...] = ()) -> Launch:
    """Run ``impl`` on ``world`` ranks; every rank must exit 0 within ``timeout`` seconds."""
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               *impl.arguments(workload, quick, run_dir, ours_extra)]
    log = run_dir / "console.log"
    others = ForeignCpu()
    with log.open("w", encoding="utf-8") as out:
        others.start()
        launched_at, started = time.time(), time.perf_counter()
        proc = subprocess.Popen(command, cwd=run_dir, env=run_environment(world), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise RunFailed(f"{impl.key} on {workload.key} × {world} timed out after {timeout:.0f} s (log: {log})")
    seconds = time.perf_counter() - started
    foreign, disturbed = others.stop(len(os.sched_getaffinity(0)))
    if code != 0:
        raise RunFailed(f"{impl.key} on {workload.key} × {world} exited {code} (log: {log})")
    return Launch(launched_at, seconds, steps_file(run_dir), foreign, disturbed)


def run_environment(world: int) -> dict[str, str]:
    """The parent's environment minus launcher variables, plus the repo path and thread share."""
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCHER_VARIABLES and not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = str(threads_per_rank(world))
    return env


def threads_per_rank(world: int) -> int:
    return max(1, len(os.sched_getaffinity(0)) // world)


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the launcher and every rank it started (they share the launch's process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
