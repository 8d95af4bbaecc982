"""Following a submitted job: what ``slurm.submit`` says once it is queued, and ``--wait``'s stream of
rank 0's output until the job ends, with its final state (Slurm's accounting, or submitit's local
executor's)."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Any

import submitit

from slurm import cluster


def announce(job: submitit.Job, partition: str) -> None:
    local = partition == "local"
    print(f"submitted job {job.job_id} " + ("to run on this machine" if local else f"to partition '{partition}'"))
    print(f"logs: {job.paths.stdout} and {job.paths.stderr} (rank 0; rank r writes {job.job_id}_r_log.*)")
    state = f"   state: squeue -j {job.job_id}" if not local else f"   state: ps -p {job.job_id} (a local process)"
    print(f"follow: tail -F {shlex.quote(str(job.paths.stderr))}{state}")


def wait(job: submitit.Job, kind: str) -> int:
    """Stream rank 0's output until the job ends; 0 when it COMPLETED."""
    streams = [_Tail(job.paths.stdout, sys.stdout), _Tail(job.paths.stderr, sys.stderr)]
    while not _ended(job, kind):
        for stream in streams:
            stream.pump()
        time.sleep(1.0)
    time.sleep(0.5)
    for stream in streams:
        stream.pump()
    state = cluster.final_state(job.job_id) if kind == "slurm" else local_state(job)
    print(f"job {job.job_id}: {state}", file=sys.stderr)
    return 0 if state in ("COMPLETED", "FINISHED") else 1


def local_state(job: submitit.Job) -> str:
    """submitit's local executor says FINISHED for every process that exited; a task that raised or
    wrote no result makes it FAILED here."""
    state = job.state
    return "FAILED" if state == "FINISHED" and job.exception() is not None else state


def _ended(job: submitit.Job, kind: str) -> bool:
    if kind == "local":
        return job.done()
    return cluster.queue_state(job.job_id) is None


class _Tail:
    """Prints what was appended to a file since the last call."""

    def __init__(self, path: Path, out: Any) -> None:
        self.path, self.out, self.offset = Path(path), out, 0

    def pump(self) -> None:
        try:
            with self.path.open("rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        if data:
            self.out.write(data.decode(errors="replace"))
            self.out.flush()
