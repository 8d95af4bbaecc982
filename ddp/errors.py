"""The library's exception hierarchy.

Every error a user can fix carries a one-line message that names the problem and a HINT with the
fix. The entry point prints ``str(error)`` as a single line and exits with ``exit_code``.
"""

from __future__ import annotations


class DDPError(Exception):
    """Base of all user-facing errors: a problem, a hint, and a process exit code."""

    exit_code = 1
    said_by_every_rank = False  # a refusal (exit 2) is otherwise said once, by rank 0

    def __init__(self, problem: str, hint: str = "") -> None:
        self.problem = problem
        self.hint = hint
        super().__init__(f"{problem} HINT: {hint}" if hint else problem)


class ConfigError(DDPError):
    """A recipe or override is malformed: unknown key, wrong type, bad value, missing file."""

    exit_code = 2


class ClusterEnvError(DDPError):
    """The launcher's environment variables are missing, malformed or inconsistent."""

    exit_code = 2


class BackendError(DDPError):
    """The requested backend or parallel mode cannot run on this machine."""

    exit_code = 2


class DataError(DDPError):
    """A dataset cannot be found or read."""

    exit_code = 2


REFUSAL_GRACE_S = 3.0  # how long another rank waits before exiting on a refusal rank 0 says


def print_error(err: DDPError, rank: int) -> None:
    """The one line a user sees for a refused run; printed by rank 0 only. Every rank makes the same
    checks, and a launcher such as torchrun stops all ranks when the first one exits: so the others
    wait ``REFUSAL_GRACE_S`` before returning, or rank 0 could be stopped before it says why."""
    import sys

    if rank == 0:
        print(f"error: {err}", file=sys.stderr)
    elif err.exit_code == 2 and not err.said_by_every_rank:
        import time

        time.sleep(REFUSAL_GRACE_S)


class MemoryBudgetError(DDPError):
    """The memory budget cannot hold the model at batch 1 (``data.batch_size: auto``)."""

    exit_code = 2


class StorageError(DDPError):
    """The run directory's disk refused a write: full, over quota, an I/O error, read-only or not
    writable. Not the recipe's fault: free space or fix the disk, then run the same command again
    (a failed checkpoint save leaves the previous checkpoint as what it resumes). Said by every
    rank; sysexits ``EX_IOERR``."""

    exit_code = 74
