"""Rank helpers, safe to call before ``init_process_group`` and in a single process.

Functions marked "all ranks must call" run a collective: if one rank skips it, the others wait
until the collective timeout (``dist.timeout_s``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


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
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """All ranks must call. Returns rank ``src``'s ``obj`` on every rank."""
    if not is_initialized() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
