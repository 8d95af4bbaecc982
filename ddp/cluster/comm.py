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

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ddp.errors import DDPError

_control: Any = None  # the Gloo side group for objects under NCCL; None: the default group


class RankFailed(DDPError):
    """Another rank failed where this one would have gone on into a collective."""

    exit_code = 1


def open_control_group(backend: str, timeout_s: float) -> None:
    """All ranks must call, right after ``init_process_group``: under a non-Gloo backend, object
    collectives go through a new Gloo group from now on."""
    global _control
    if backend != "gloo" and world_size() > 1:
        _control = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


def close_control_group() -> None:
    """Forget the side group (the process group is being destroyed, which frees it)."""
    global _control
    _control = None


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
