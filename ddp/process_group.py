"""Process-group lifetime: init with a collective timeout, always tear down in ``finally``."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from ddp.environment import ClusterEnv

log = logging.getLogger(__name__)


@contextmanager
def process_group(env: ClusterEnv, backend: str, device: torch.device, timeout_s: float) -> Iterator[None]:
    """All ranks must enter. Creates the group (when ``env.distributed``) and destroys it on exit.

    On a clean exit every rank passes a barrier first, so no rank tears down while a peer still
    needs it. After an error the barrier is skipped (peers may be stuck in another collective);
    the group is destroyed so the process can exit instead of hanging.
    """
    if not env.distributed:
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend=backend,
        init_method=env.init_method,
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    log.debug("process group up: %s, backend %s", env.describe(), backend)
    clean = False
    try:
        yield
        clean = True
    finally:
        _teardown(clean)


def _teardown(clean: bool) -> None:
    if not dist.is_initialized():
        return
    try:
        if clean:
            dist.barrier()
    finally:
        dist.destroy_process_group()
