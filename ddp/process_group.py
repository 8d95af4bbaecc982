"""Process-group lifetime: init with a collective timeout, always tear down in ``finally``."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from ddp.environment import ClusterEnv
from ddp.peers import is_comm_failure, peer_lost, roll_call

log = logging.getLogger(__name__)


@contextmanager
def process_group(env: ClusterEnv, backend: str, device: torch.device, timeout_s: float) -> Iterator[None]:
    """All ranks must enter. Creates the group (when ``env.distributed``) and destroys it on exit.

    On a clean exit every rank passes a barrier first, so no rank tears down while a peer still
    needs it. After an error the barrier is skipped (peers may be stuck in another collective);
    the group is destroyed so the process can exit instead of hanging. A communication failure
    becomes ``PeerLost`` naming the ranks that no longer answer (``ddp.peers.roll_call``).
    """
    if not env.distributed:
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=timeout_s)
    store = _rendezvous_store(env, timeout)
    dist.init_process_group(backend=backend, store=store, rank=env.rank, world_size=env.world_size,
                            timeout=timeout)
    log.debug("process group up: %s, backend %s", env.describe(), backend)
    clean = False
    try:
        yield
        clean = True
    except Exception as err:
        if env.world_size > 1 and is_comm_failure(err):
            missing = roll_call(store, env.rank, env.world_size)
            raise peer_lost(err, missing, env.world_size, None if env.agent_store else 0) from err
        raise
    finally:
        _teardown(clean)


def _rendezvous_store(env: ClusterEnv, timeout: timedelta) -> dist.Store:
    """The TCPStore at master_addr:port (hosted by rank 0 unless torchrun's agent serves it),
    namespaced per restart attempt (see ``ClusterEnv.store_prefix``)."""
    store = dist.TCPStore(env.master_addr, env.master_port, env.world_size,
                          is_master=env.rank == 0 and not env.agent_store, timeout=timeout)
    return dist.PrefixStore(env.store_prefix, store)


def _teardown(clean: bool) -> None:
    if not dist.is_initialized():
        return
    try:
        if clean:
            dist.barrier()
    finally:
        dist.destroy_process_group()
