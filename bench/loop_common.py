"""What the competitor loops share: their arguments, their thread share and their step records.

Each loop writes the same step record as ``ddp.train`` with ``log.every_steps=1``: rank 0 appends
``{"kind": "step", "epoch": e, "step": k, "loss": ..., "time": time.time()}`` to a JSONL file and
flushes it right after optimizer step k, and every rank reads the loss back with ``.item()`` — the
same per-step host sync and file write ours does, so the measurement costs every side the same.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path
from typing import IO

import torch
import torch.distributed as dist

from bench.workloads import WORKLOADS, Workload


def parse_args(description: str) -> tuple[Workload, int, int, Path]:
    """``--workload KEY --max-steps S --epochs E --out FILE`` → (workload, S, E, FILE)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="mlp")
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps (-1: no cap)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("steps.jsonl"), help="step records (rank 0)")
    args = parser.parse_args()
    return WORKLOADS[args.workload], args.max_steps, args.epochs, args.out


def set_threads() -> int:
    """Each rank gets cores ÷ local ranks CPU threads, the rule ``ddp.train`` applies to itself."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = max(1, len(os.sched_getaffinity(0)) // local_ranks)
    torch.set_num_threads(threads)
    return threads


def reached(step: int, max_steps: int) -> bool:
    return 0 <= max_steps <= step


class StepRecorder:
    """Rank 0 appends one flushed JSON line per optimizer step; other ranks only sync the loss."""

    def __init__(self, path: Path, rank: int) -> None:
        self._file: IO[str] | None = None
        if rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("w", encoding="utf-8")

    def record(self, epoch: int, step: int, loss: torch.Tensor) -> None:
        value = loss.item()
        if self._file is not None:
            record = {"kind": "step", "epoch": epoch, "step": step, "loss": value, "time": time.time()}
            if step == 1:
                record["threads"] = torch.get_num_threads()  # to check the thread share after the fact
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def finish() -> None:
    """Every rank passes a barrier and destroys the group, so every rank exits 0.

    Call it after the function that owned the model has returned, so nothing (a DDP reducer, a
    Trainer, an Accelerator) still holds the Gloo process group and it is really torn down here,
    while the interpreter is fully alive. A rank whose group outlives this can die of SIGABRT at
    exit ("terminate called without an active exception"); one such abort, right after the last
    step, was seen in 112 two-rank launches before the loops were arranged this way.
    """
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
