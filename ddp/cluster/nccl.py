"""NCCL's failure handling, set on purpose before a NCCL process group forms.

NCCL errors and timeouts are asynchronous: torch's watchdog thread finds them, not the Python
call that waits. What it then does is chosen by environment variables; these are our defaults,
each exported only where the user has not set it (``ddp.cluster.environment.export_variables``):

``TORCH_NCCL_ASYNC_ERROR_HANDLING=2``  abort the communicators and raise in the training process
    (torch's own default, 3, kills the process from the watchdog, so nothing could say which
    rank was lost); the error then takes the same path as a Gloo failure: the heartbeat roll call
    (``ddp.cluster.heartbeat``) names the silent ranks and every rank exits 1.
``TORCH_NCCL_DUMP_ON_TIMEOUT=1`` + ``TORCH_FR_BUFFER_SIZE``  the flight recorder: the last
    collectives of every rank, dumped on a timeout, so a hang shows which collective and which
    rank did not arrive (read them with ``python -m torch.distributed.flight_recorder.fr_trace``).
``TORCH_FR_DUMP_TEMP_FILE``  dumps go to ``<run.root>/<run.name>/flight_recorder/rank_<N>``.

torch before 2.6 reads the flight recorder's older names (``TORCH_NCCL_TRACE_BUFFER_SIZE``,
``TORCH_NCCL_DEBUG_INFO_TEMP_FILE``); both are set.
"""

from __future__ import annotations

from pathlib import Path

from ddp.cluster.environment import export_variables

ASYNC_ERROR_HANDLING = "2"  # CleanUpOnly: abort the communicators, raise in Python
BUFFER_ENTRIES = "2000"  # collectives kept per rank for the dump (torchtitan keeps 20,000)
DUMP_SUBDIR = "flight_recorder"


def nccl_defaults(dump_dir: Path) -> dict[str, str]:
    """The variables this library wants under NCCL, dumps written under ``dump_dir``."""
    prefix = str(dump_dir / "rank_")
    return {
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": ASYNC_ERROR_HANDLING,
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_FR_BUFFER_SIZE": BUFFER_ENTRIES,
        "TORCH_NCCL_TRACE_BUFFER_SIZE": BUFFER_ENTRIES,
        "TORCH_FR_DUMP_TEMP_FILE": prefix,
        "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": prefix,
    }


def export_nccl_defaults(dump_dir: Path) -> list[str]:
    """Call before ``init_process_group`` with NCCL, on every rank. Returns the log lines. The dump
    directory itself is made once the run is sure to start (``make_dump_dir``)."""
    return export_variables(nccl_defaults(dump_dir), "NCCL failure handling, docs/devices.md")


def make_dump_dir(dump_dir: Path) -> None:
    """The flight recorder writes into an existing directory only."""
    dump_dir.mkdir(parents=True, exist_ok=True)
