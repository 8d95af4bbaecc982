"""Rank helpers, safe to call before ``init_process_group`` and in a single process.

Functions marked "all ranks must call" run a collective: if one rank skips it, the others wait
until the collective timeout (``dist.timeout_s``). A rank that fails where the others go on into a
collective must let them know first: ``all_or_none`` turns one rank's error into the same error on
every rank.

Python objects (decisions, errors, probe reports) travel on a Gloo side group when the training
backend is NCCL (detectron2's ``_get_global_gloo_group``): NCCL object collectives would copy
every object through the GPU and block on its stream, and a refusal must never wait on a GPU.
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ddp.errors import DDPError

log = logging.getLogger(__name__)

_control: Any = None  # the Gloo side group for objects under NCCL; None: the default group
_store: Any = None  # the rendezvous store, for waits that must not be bounded by the collective timeout
_waits = 0  # patient broadcasts so far: every rank counts the same, so the n-th has the same key everywhere
WAIT_POLL_S = 0.05
WAIT_LOG_S = 10.0


class RankFailed(DDPError):
    """Another rank failed where this one would have gone on into a collective."""

    exit_code = 1


def open_control_group(backend: str, timeout_s: float, store: Any = None) -> None:
    """All ranks must call, right after ``init_process_group``: under a non-Gloo backend, object
    collectives go through a new Gloo group from now on. ``store``: the rendezvous store, for
    ``patient_broadcast``."""
    global _control, _store, _waits
    _store, _waits = store, 0
    if backend != "gloo" and world_size() > 1:
        _control = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


def close_control_group() -> None:
    """Forget the side group (the process group is being destroyed, which frees it)."""
    global _control, _store
    _control = _store = None


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on global rank 0 (the rank that writes the console, metrics and files)."""
    return rank() == 0


def barrier() -> None:
    """All ranks must call. No-op without a process group."""
    if is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks must call. Sums ``tensor`` in place across ranks and returns it."""
    if is_initialized() and world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_object(obj: Any) -> list[Any]:
    """All ranks must call. Returns every rank's ``obj``, indexed by rank."""
    if not is_initialized() or world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj, group=_control)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """All ranks must call. Returns rank ``src``'s ``obj`` on every rank."""
    if not is_initialized() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_control)
    return box[0]


def patient_broadcast(obj: Any, what: str) -> Any:
    """All ranks must call. Rank 0's ``obj`` on every rank, however long rank 0 takes to get here.

    A collective would time out after ``dist.timeout_s`` and kill a healthy job whose rank 0 is
    busy with a long save; here the other ranks poll the rendezvous store instead, outside any
    collective, and log every ``WAIT_LOG_S`` seconds that they are waiting for ``what``. A rank 0
    that dies or freezes meanwhile is found by the watchdog (``ddp.cluster.watchdog``)."""
    global _waits
    if not is_initialized() or world_size() == 1 or _store is None:
        return broadcast_object(obj)
    _waits += 1
    key = f"patient/{_waits}"
    if is_main():
        _store.set(key, pickle.dumps(obj))
        return obj
    started = time.monotonic()
    next_log = started + WAIT_LOG_S
    while not _store.check([key]):
        time.sleep(WAIT_POLL_S)
        if time.monotonic() >= next_log:
            log.info("waiting %.0f s for rank 0 to finish %s", time.monotonic() - started, what)
            next_log += WAIT_LOG_S
    return pickle.loads(_store.get(key))  # noqa: S301 - written by rank 0 of this job, one line above


@contextmanager
def all_or_none(what: str) -> Iterator[None]:
    """All ranks must enter. When the body raises on any rank, it raises on every rank: the failing
    rank re-raises its own error, the others a copy of it naming that rank (a refusal keeps its exit
    code 2, so it is still said once, by rank 0). One object collective, after the body."""
    error: BaseException | None = None
    try:
        yield
    except Exception as err:  # noqa: BLE001 - every rank must hear about it
        error = err
    reports = all_gather_object(None if error is None else _describe(error))
    if error is not None:
        raise error
    failed = [(r, report) for r, report in enumerate(reports) if report is not None]
    if failed:
        rank_, (problem, hint, code) = failed[0]
        copy = RankFailed(f"{what} failed on rank {rank_}: {problem}", hint)
        copy.exit_code = code
        raise copy


def _describe(error: BaseException) -> tuple[str, str, int]:
    if isinstance(error, DDPError):
        return error.problem, error.hint, error.exit_code
    return f"{type(error).__name__}: {error}", f"see rank {rank()}'s log (logs/rank{rank()}.log)", 1
