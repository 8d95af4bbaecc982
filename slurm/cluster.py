"""Questions to the Slurm cluster through its client commands (sinfo, squeue, scontrol, sacct)."""

from __future__ import annotations

import re
import shutil
import subprocess

from slurm.request import Partition, SubmitError, parse_sinfo

FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE")


def has_sbatch() -> bool:
    return shutil.which("sbatch") is not None


def require_sbatch() -> None:
    """SubmitError unless ``sbatch`` (and ``sinfo``) are on PATH."""
    for command in ("sbatch", "sinfo"):
        if shutil.which(command) is None:
            raise SubmitError(f"'{command}' is not on PATH: this machine is not a Slurm submit host.",
                              "run on a login node, or use --cluster local (or python -m slurm.testbed start)")


def partitions() -> dict[str, Partition]:
    """The cluster's partitions from ``sinfo``."""
    done = _run(["sinfo", "-h", "-o", "%P|%D|%c|%G"])
    if done.returncode != 0:
        raise SubmitError(f"sinfo failed: {_last_line(done.stderr)}.", "check that slurmctld is reachable")
    return parse_sinfo(done.stdout)


def queue_state(job_id: str) -> str | None:
    """The job's state in slurmctld's queue (PENDING, RUNNING, ...), None when it left the queue."""
    done = _run(["squeue", "-h", "-j", job_id, "-o", "%T"])
    states = done.stdout.split()
    return states[0] if done.returncode == 0 and states else None


def final_state(job_id: str) -> str:
    """The state of a job that left the queue: scontrol first (sacct lags), then sacct."""
    done = _run(["scontrol", "show", "job", "-o", job_id])
    match = re.search(r"JobState=(\S+)", done.stdout)
    if match:
        return match.group(1)
    done = _run(["sacct", "-X", "-n", "-P", "-o", "State", "-j", job_id])
    return done.stdout.split()[0] if done.stdout.split() else "UNKNOWN"


def restarts(job_id: str) -> int:
    """How many times the job was requeued (scontrol's Restarts=)."""
    match = re.search(r"Restarts=(\d+)", _run(["scontrol", "show", "job", "-o", job_id]).stdout)
    return int(match.group(1)) if match else 0


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return subprocess.CompletedProcess(cmd, 1, "", str(err))


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else "no output"
