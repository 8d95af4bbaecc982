"""Wrapping a model for data parallelism, and unwrapping it for saving and evaluation."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ddp.cluster import comm
from ddp.cluster.devices import Devices
from ddp.config import DistConfig, Parallel, Recipe
from ddp.errors import BackendError
from ddp.model.sharding import ShardPlan, parameter_names, repoint_optimizer, shard_model

log = logging.getLogger(__name__)


def wrap_model(model: nn.Module, parallel: Parallel, device: torch.device, devices: Devices,
               *, shard: ShardPlan | None = None, ddp_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Move ``model`` to ``device`` and wrap it. All ranks must call (DDP broadcasts rank 0's weights).

    ddp: DistributedDataParallel when more than one rank runs (``device_ids=[i]`` on GPU, none on
    CPU) and ``ddp_kwargs`` (``ddp_options``: bucket size, gradient views, static graph); with a
    single rank the model runs unwrapped, which is what DDP would compute anyway.
    fsdp: sharded in place by FSDP2 as ``shard`` says (``ddp.model.sharding``), each block moved to
    ``device`` as it is sharded; one rank: unwrapped.
    dp:  DataParallel over every visible GPU; with fewer than 2 GPUs it warns and runs unwrapped.
    """
    if parallel == Parallel.fsdp and comm.world_size() > 1:  # one block at a time: never the whole model on the device
        return shard_model(model, device, shard or ShardPlan())
    model = model.to(device)
    if parallel == Parallel.ddp and comm.world_size() > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, **(ddp_kwargs or {}))
    if parallel == Parallel.dp:
        if devices.cuda_count < 2:
            log.warning("dist.parallel=dp needs 2+ GPUs, %d visible: running unwrapped on %s",
                        devices.cuda_count, device)
            return model
        return nn.DataParallel(model, device_ids=list(range(devices.cuda_count)))
    return model


def wrap_for_recipe(model: nn.Module, recipe: Recipe, device: torch.device, devices: Devices,
                    optimizer: torch.optim.Optimizer | None = None) -> nn.Module:
    """All ranks must call. ``wrap_model`` as the recipe's ``dist`` keys say (FSDP's shard plan, DDP's
    options); under FSDP, which replaces the parameters with their shards, ``optimizer`` (made
    before) is pointed at them."""
    names = parameter_names(model)
    shard = ShardPlan.of(recipe, unused=changed_ddp_options(recipe.dist))
    wrapped = wrap_model(model, recipe.dist.parallel, device, devices, shard=shard, ddp_kwargs=ddp_options(recipe.dist))
    if optimizer is not None:
        repoint_optimizer(optimizer, names, unwrap_model(wrapped))
    return wrapped


def ddp_options(cfg: DistConfig) -> dict[str, Any]:
    """DistributedDataParallel's communication arguments from the recipe's ``dist`` keys
    (docs/performance.md#ddp-communication-options says how their defaults were measured)."""
    return {"gradient_as_bucket_view": cfg.gradient_as_bucket_view, "bucket_cap_mb": cfg.bucket_cap_mb,
            "static_graph": cfg.static_graph}


def changed_ddp_options(cfg: DistConfig) -> tuple[str, ...]:
    """The ``ddp_options`` the recipe changed from their defaults, as typed (``dist.static_graph=true``):
    what ``dist.parallel=fsdp`` has no use for, and says so."""
    default = ddp_options(DistConfig())
    return tuple(f"dist.{key}={_as_typed(value)}" for key, value in ddp_options(cfg).items() if value != default[key])


def _as_typed(value: object) -> str:
    """A value as it is typed on the command line: true, 10, 2.5."""
    return str(value).lower() if isinstance(value, bool) else f"{value:g}"


def check_sync_bn(enabled: bool, device: torch.device, world_size: int) -> None:
    """``dist.sync_bn`` needs CUDA (DDP refuses SyncBatchNorm on CPU modules): refuse it up front."""
    if enabled and world_size > 1 and device.type != "cuda":
        raise BackendError(f"dist.sync_bn=true needs CUDA devices, but the ranks train on {device.type} "
                           "(DDP runs SyncBatchNorm only on GPU modules).",
                           "set dist.sync_bn=false on CPU (each rank then normalises with its own batch statistics)")


def convert_sync_bn(model: nn.Module, enabled: bool, world_size: int) -> nn.Module:
    """Every BatchNorm as SyncBatchNorm (statistics over the global batch) when asked and distributed."""
    if not enabled or world_size < 2:
        return model
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    count = sum(isinstance(m, nn.SyncBatchNorm) for m in converted.modules())
    log.info("dist.sync_bn: %d BatchNorm layers synchronise their statistics across ranks", count)
    return converted


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / DataParallel / torch.compile wrappers. FSDP2 wraps nothing:
    a sharded model is its own module, its parameters sharded (``ddp.model.sharding``)."""
    while True:
        if isinstance(model, (DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod  # torch.compile's OptimizedModule
        else:
            return model
