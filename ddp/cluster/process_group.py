"""Process-group lifetime: init with a collective timeout, always tear down in ``finally``."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ddp.cluster import comm
from ddp.cluster import rendezvous
from ddp.cluster.nccl import DUMP_SUBDIR, export_nccl_defaults
from ddp.cluster.environment import ClusterEnv
from ddp.config import Recipe, StallAction
from ddp.errors import DDPError
from ddp.cluster.heartbeat import heartbeat, is_comm_failure, peer_lost, roll_call
from ddp.cluster.watchdog import WatchConfig

log = logging.getLogger(__name__)


@contextmanager
def process_group(env: ClusterEnv, backend: str, device: torch.device, timeout_s: float,
                  recipe: Recipe | None = None, gpu: str | None = None,
                  nccl_dumps: Path | None = None) -> Iterator[None]:
    """All ranks must enter. Creates the group (when ``env.distributed``) and destroys it on exit.

    Before the group forms: when peers run on other machines the interface that routes to the
    master is exported for Gloo (``rendezvous.choose_interface``); every rank checks in and a
    waiting rank logs who is missing (``rendezvous.gather``); with ``recipe`` every rank must
    hold rank 0's recipe (``rendezvous.agree_on_recipe``); under NCCL, ``gpu`` (this rank's GPU
    identity) must not be another rank's too (``rendezvous.check_gpus``), and NCCL's failure
    handling is set (``ddp.cluster.nccl``, flight-recorder dumps under ``nccl_dumps``). Under NCCL, object
    collectives use a Gloo side group (``comm.open_control_group``).

    On a clean exit every rank passes a barrier first, so no rank tears down while a peer still
    needs it. After an error the barrier is skipped (peers may be stuck in another collective);
    the group is destroyed so the process can exit instead of hanging. A communication failure
    becomes ``PeerLost`` naming the ranks whose heartbeat stopped (``ddp.cluster.heartbeat``). A rank
    or machine that falls silent without an error ends every other rank within
    ``dist.heartbeat_timeout_s``, and a stall is reported, by the watchdog (``ddp.cluster.watchdog``).
    """
    if not env.distributed:
        yield
        return
    timeout = timedelta(seconds=timeout_s)
    for line in rendezvous.choose_interface(env, backend):
        log.info("rank %d: %s", env.rank, line)
    store = rendezvous.connect(env, timeout)
    rendezvous.gather(store, env, timeout_s)
    if recipe is not None and env.world_size > 1:
        rendezvous.agree_on_recipe(store, env, recipe, timeout_s)
    if backend == "nccl":
        if gpu is not None and env.world_size > 1:
            rendezvous.check_gpus(store, env, gpu, timeout_s)
        for line in export_nccl_defaults(nccl_dumps or Path(DUMP_SUBDIR)):
            log.debug("rank %d: %s", env.rank, line)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, store=store, rank=env.rank, world_size=env.world_size,
                            timeout=timeout)
    log.debug("process group up: %s, backend %s", env.describe(), backend)
    clean = False
    try:
        comm.open_control_group(backend, timeout_s, store)
        with heartbeat(env.master_addr, env.master_port, env.store_prefix, env.rank, env.world_size, _store_host(env),
                       watch_config(recipe), nccl_dumps if backend == "nccl" else None,  # beats through the roll call
                       serves_store=env.rank == 0 and not env.agent_store):
            try:
                yield
            except Exception as err:
                if env.world_size > 1 and not isinstance(err, DDPError) and is_comm_failure(err):
                    missing = roll_call(store, env.rank, env.world_size)
                    raise peer_lost(err, missing, env.world_size, _store_host(env)) from err
                raise
        clean = True
    finally:
        comm.close_control_group()
        _teardown(clean)


def watch_config(recipe: Recipe | None) -> WatchConfig:
    """The watchdog's limits from ``dist.*`` (defaults without a recipe)."""
    if recipe is None:
        return WatchConfig()
    dist_cfg = recipe.dist
    return WatchConfig(dist_cfg.heartbeat_timeout_s, dist_cfg.stall_timeout_s, dist_cfg.stall_action == StallAction.exit)


def _store_host(env: ClusterEnv) -> str:
    """Who serves the rendezvous store, for the message when it is gone with its host."""
    if not env.agent_store:
        return f"rank 0 (at {env.master_addr}), which serves the rendezvous store,"
    node0 = f"0-{env.local_world_size - 1}" if env.local_world_size > 1 else "0"
    return (f"node 0 (ranks {node0} at {env.master_addr}:{env.master_port}), whose launcher serves the "
            "rendezvous store,")


def _teardown(clean: bool) -> None:
    if not dist.is_initialized():
        return
    try:
        if clean:
            dist.barrier()
    finally:
        dist.destroy_process_group()
