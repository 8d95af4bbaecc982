"""FSDP2 sharding (``dist.parallel=fsdp``): which blocks, how they are sharded, and the few places
where the training loop must know.

``torch.distributed.fsdp.fully_shard`` is applied to every block, then to the root: each rank keeps
1/N of every parameter, gradient and optimizer state, and gathers a block's whole parameters only
around its forward and backward. The blocks:

* ``dist.fsdp_blocks: [ClassName, ...]``: every module of those classes (the root excepted);
* ``[]`` (the default): the elements with parameters of the outermost ``nn.Sequential`` /
  ``nn.ModuleList`` containers — a transformer's layers, ResNet's BasicBlocks, the layers of a
  Sequential model, VGG's convolutions and linear layers; a model without such containers shards
  each direct child that has parameters.

Whatever no block holds (a stem, a head) belongs to the root, which keeps its parameters gathered
from forward to backward (it is needed first in backward). As DDP does, every rank starts from
rank 0's weights and buffers, and takes rank 0's buffers (BatchNorm statistics) before each
training forward; FSDP itself does neither. The device mesh is always explicit —
``init_device_mesh(device.type, (world,))`` — since without one FSDP2 takes CUDA whenever CUDA
exists (pytorch#132471). ``fully_shard`` replaces the module's parameters with sharded ones, so
an optimizer made before is pointed at them (``repoint_optimizer``). One rank trains unwrapped:
with nothing to shard, that is what FSDP would compute.

Any rank may call the checks; ``shard_model`` is a collective (all ranks must call).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ddp.config import Parallel, Precision, Recipe
from ddp.errors import ConfigError

log = logging.getLogger(__name__)

CONTAINERS = (nn.Sequential, nn.ModuleList)
_DTYPES = {Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}


@dataclass(frozen=True)
class ShardPlan:
    """How ``shard_model`` shards: the recipe's ``dist.fsdp_*`` keys and ``train.precision``."""

    blocks: tuple[str, ...] = ()
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    precision: Precision = Precision.fp32
    unused: tuple[str, ...] = ()  # DDP's keys the recipe changed from their defaults: FSDP has no use for them

    @classmethod
    def of(cls, recipe: Recipe, unused: tuple[str, ...] = ()) -> ShardPlan:
        dist = recipe.dist
        return cls(tuple(dist.fsdp_blocks), dist.fsdp_reshard_after_forward, dist.fsdp_cpu_offload,
                   recipe.train.precision, unused)


# --- checks, before any process group forms -------------------------------------------------

def check_recipe(recipe: Recipe, device: torch.device, world_size: int) -> None:
    """Refuse, naming the key and the fix, what ``dist.parallel=fsdp`` cannot run."""
    if recipe.dist.parallel != Parallel.fsdp:
        return
    if recipe.dist.fsdp_cpu_offload and device.type != "cuda":
        raise ConfigError(f"dist.fsdp_cpu_offload=true keeps GPU training's shards in host memory, but this run "
                          f"trains on {device.type}: its shards are in host memory already.",
                          "set dist.fsdp_cpu_offload=false on CPU ranks")
    if world_size < 2:
        return  # one rank trains unwrapped: nothing below applies
    if recipe.dist.sync_bn:
        raise ConfigError("dist.sync_bn=true is not supported with dist.parallel=fsdp.",
                          "use dist.parallel=ddp for SyncBatchNorm, or set dist.sync_bn=false")
    if recipe.train.channels_last:
        raise ConfigError("train.channels_last=true: FSDP shards only contiguous parameters, and channels-last "
                          "convolution weights are not.", "set train.channels_last=false with dist.parallel=fsdp")


def check_model(model: nn.Module, recipe: Recipe, world_size: int) -> None:
    """Refuse ``dist.fsdp_blocks`` names that match no module of ``model``."""
    if recipe.dist.parallel == Parallel.fsdp and world_size > 1:
        find_blocks(model, tuple(recipe.dist.fsdp_blocks))


def find_blocks(model: nn.Module, names: tuple[str, ...] = ()) -> list[nn.Module]:
    """The modules sharded one by one, children before their parents (see the module docstring)."""
    if names:
        return _named_blocks(model, names)
    blocks = _container_elements(model)
    return blocks or [child for child in model.children() if _has_parameters(child)]


def _named_blocks(model: nn.Module, names: tuple[str, ...]) -> list[nn.Module]:
    found = [m for m in model.modules() if m is not model and type(m).__name__ in names]
    seen = {type(m).__name__ for m in found}
    unknown = [name for name in names if name not in seen]
    if unknown:
        classes = sorted({type(m).__name__ for m in model.modules() if m is not model and _has_parameters(m)})
        raise ConfigError(f"dist.fsdp_blocks names {unknown}, which no module of this model is.",
                          f"name module classes of the model, e.g. {classes[:6]}, or [] for the default rule")
    return sorted(found, key=_depth(model), reverse=True)  # children before their parents


def _container_elements(module: nn.Module) -> list[nn.Module]:
    """The elements with parameters of the outermost containers under (or at) ``module``."""
    if isinstance(module, CONTAINERS):
        return [child for child in module.children() if _has_parameters(child)]
    blocks: list[nn.Module] = []
    for child in module.children():
        blocks += _container_elements(child)
    return blocks


def _depth(model: nn.Module):  # noqa: ANN202 - a sort key
    depths = {id(m): name.count(".") + 1 for name, m in model.named_modules() if name}
    return lambda module: depths[id(module)]


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


# --- sharding --------------------------------------------------------------------------------

def shard_model(model: nn.Module, device: torch.device, plan: ShardPlan) -> nn.Module:
    """All ranks must call, with the process group formed; ``model`` may be on the CPU. Shards every
    block, then the root, over all ranks; returns the same module (FSDP2 wraps nothing). A block
    goes to ``device`` just before it is sharded, so the device never holds more than one whole
    block besides the shards: a model larger than one GPU's memory is sharded from host memory. A
    model sharded already (after unfreezing) is returned as it is: FSDP2 follows ``requires_grad``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if is_sharded(model):
        return model
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the mesh takes the current device's index
    world = torch.distributed.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    options = {"mesh": mesh, "mp_policy": _precision_policy(plan.precision), **_offload(plan)}
    blocks = find_blocks(model, plan.blocks)
    kinds = _class_counts(blocks)  # before fully_shard renames the classes (FSDPLinear)
    placed: set[int] = set()
    for block in blocks:
        _place_from_rank0(block, device, placed)
        with _freeing_replaced(block):
            fully_shard(block, reshard_after_forward=plan.reshard_after_forward, **options)
    _place_from_rank0(model, device, placed)  # what no block holds: a stem, a head, buffers
    with _freeing_replaced(model):
        fully_shard(model, reshard_after_forward=False, **options)
    model.register_forward_pre_hook(_buffers_from_rank0)
    log.info("dist.parallel=fsdp: %d blocks%s and the root sharded over %d ranks (%s mesh)", len(blocks),
             f" ({kinds})" if blocks else "", world, device.type)
    if plan.unused and torch.distributed.get_rank() == 0:
        log.warning("%s: options of DistributedDataParallel, unused under dist.parallel=fsdp (remove them, or "
                    "use dist.parallel=ddp)", ", ".join(plan.unused))
    return model


BROADCAST_BUCKET_BYTES = 64 * 2**20  # rank 0's weights go out in pieces of this size at most


@contextlib.contextmanager
def _freeing_replaced(module: nn.Module) -> Iterator[None]:
    """Around ``fully_shard(module)``: the whole parameters it replaced by shards lose their data at
    once. An optimizer made before sharding still holds them (until ``repoint_optimizer``), which
    would otherwise keep every whole block on the device."""
    from torch.distributed.tensor import DTensor

    originals = [(owner, name, param) for owner in module.modules() for name, param in owner._parameters.items()
                 if param is not None and not isinstance(param, DTensor)]
    yield
    for owner, name, param in originals:
        if owner._parameters.get(name) is not param:  # FSDP registered its shard (a copy) instead
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)


@torch.no_grad()
def _place_from_rank0(module: nn.Module, device: torch.device, placed: set[int]) -> None:
    """All ranks must call. ``module``'s parameters and buffers not placed before (ids in
    ``placed``) nor sharded, moved to ``device`` in place (the same Parameter objects, which an
    optimizer may hold) and given rank 0's values."""
    from torch.distributed.tensor import DTensor

    moved: list[torch.Tensor] = []
    for owner in module.modules():
        for kind in (owner._parameters, owner._buffers):
            for name, tensor in kind.items():
                if tensor is None or isinstance(tensor, DTensor) or id(tensor) in placed:
                    continue
                if tensor.device != device:
                    if kind is owner._parameters:
                        tensor.data = tensor.data.to(device)
                    else:
                        tensor = kind[name] = tensor.to(device)
                placed.add(id(tensor))
                moved.append(tensor)
    _from_rank0(moved)


def _from_rank0(tensors: list[torch.Tensor]) -> None:
    """All ranks must call. Rank 0's values of ``tensors``, in place: one broadcast per bucket of
    tensors of one dtype (at most ``BROADCAST_BUCKET_BYTES``, or one tensor)."""
    buckets: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        bucket = buckets.setdefault(tensor.dtype, [])
        if bucket and sum(t.numel() for t in bucket + [tensor]) * tensor.element_size() > BROADCAST_BUCKET_BYTES:
            _broadcast_bucket(bucket)
            bucket.clear()
        bucket.append(tensor)
    for bucket in buckets.values():
        _broadcast_bucket(bucket)


@torch.no_grad()
def _broadcast_bucket(bucket: list[torch.Tensor]) -> None:
    flat = torch.cat([tensor.detach().reshape(-1) for tensor in bucket])
    torch.distributed.broadcast(flat, src=0)
    for tensor, part in zip(bucket, flat.split([tensor.numel() for tensor in bucket])):
        tensor.copy_(part.view_as(tensor))


def _buffers_from_rank0(module: nn.Module, _inputs: object) -> None:
    """Forward pre-hook of the root: in training, rank 0's buffers (DDP's ``broadcast_buffers``)."""
    buffers = list(module.buffers())
    if module.training and buffers:
        _from_rank0(buffers)


def _precision_policy(precision: Precision):  # noqa: ANN202 - torch's MixedPrecisionPolicy
    """bf16/fp16: parameters gathered and computed in that type, gradients reduced in fp32; the
    sharded weights the optimizer steps stay fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == Precision.fp32:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=_DTYPES[precision], reduce_dtype=torch.float32)


def _offload(plan: ShardPlan) -> dict:
    from torch.distributed.fsdp import CPUOffloadPolicy

    return {"offload_policy": CPUOffloadPolicy()} if plan.cpu_offload else {}


def _class_counts(blocks: list[nn.Module]) -> str:
    counts: dict[str, int] = {}
    for block in blocks:
        counts[type(block).__name__] = counts.get(type(block).__name__, 0) + 1
    return ", ".join(f"{n} {name}" for name, n in counts.items())


def is_sharded(model: nn.Module) -> bool:
    """True for a model ``fully_shard`` sharded (also inside ``torch.compile``'s wrapper)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(getattr(model, "_orig_mod", model), FSDPModule)


# --- what the loop needs to know ---------------------------------------------------------------

@contextlib.contextmanager
def gradient_sync_off(model: nn.Module) -> Iterator[None]:
    """FSDP's ``no_sync``: gradients accumulate unsharded on each rank, and are reduce-scattered
    with the next backward that runs outside this block (the last micro-batch's)."""
    module = getattr(model, "_orig_mod", model)
    module.set_requires_gradient_sync(False)  # type: ignore[operator]
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)  # type: ignore[operator]


def parameter_names(model: nn.Module) -> dict[int, str]:
    """``id(parameter)`` → its name: taken before sharding, to find each parameter after."""
    return {id(param): name for name, param in model.named_parameters()}


def repoint_optimizer(optimizer: torch.optim.Optimizer, names: dict[int, str], model: nn.Module) -> None:
    """Point ``optimizer``'s groups at the parameters of the same names in ``model`` (unwrapped),
    after sharding replaced them. A no-op when nothing was replaced (DDP). An optimizer that has
    stepped already holds whole-model state that would not follow: refused."""
    present = {id(param) for param in model.parameters()}
    moved = [param for group in optimizer.param_groups for param in group["params"] if id(param) not in present]
    if not moved:
        return
    current = dict(model.named_parameters())
    if any(optimizer.state.get(param) for param in moved):
        raise ConfigError("the optimizer has stepped before dist.parallel=fsdp sharded the model: its state "
                          "cannot follow the parameters into their shards.",
                          "make the optimizer before training starts and resume its state with run.resume")
    for group in optimizer.param_groups:
        group["params"] = [current.get(names.get(id(p), ""), p) for p in group["params"]]
