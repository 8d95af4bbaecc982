"""The analytic memory table, in the seed tutorials' terms.

For P trainable parameters stored in dtype d (bytes(d) each):

    parameters     P × bytes(d)
    gradients      P × bytes(d)
    optimizer      SGD with momentum: 1 buffer per parameter; plain SGD: 0; Adam/AdamW: 2
                   (exp_avg, exp_avg_sq), each P × bytes(d), or P × 4 when d is lower than fp32
    master copy    P × 4 when d is lower than fp32 (mixed precision keeps fp32 weights to step on)
    DDP buckets    P × bytes(d) under DDP with more than one rank (its flat gradient buckets), unless
                   dist.gradient_as_bucket_view makes the gradients views into them
    sharded        under FSDP over S ranks (S = the world size): parameters, gradients, optimizer
                   state and master copy are each rank's shard, counted per parameter as FSDP2
                   pads it (ceil(rows / S) of its rows); no DDP buckets
    gathered       under FSDP over S > 1 ranks: what all-gathering adds on top of the shards. The
                   root (what no block holds) keeps its whole parameters from forward to backward;
                   one block at a time is gathered whole, and in its backward holds its whole
                   gradient too until the reduce-scatter, while the next block is gathered ahead
                   (backward prefetch). So: root parameters + the larger of (the largest block's
                   parameters × 2 + its gradient) and (the root's gradient)
    data on device the train and test tensors the in-memory loader (data.loader=memory, or auto
                   when it fits) keeps on the training device: float32 inputs, int64 targets; each
                   rank holds its own copy, on a GPU or in host RAM
    activations    measured: bytes per sample (the probe's fitted slope) × batch, plus the fixed
                   part of a step (the fitted intercept: workspaces, loss, allocator rounding)

e.g. ResNet-18 (11.2 M parameters, fp32) with SGD + momentum on 2 ranks: 42.7 + 42.7 + 42.7
+ 0 + 42.7 MB = 170.6 MB before the first activation (MB = 2^20 bytes throughout). Under
dist.parallel=fsdp at 4 ranks: 10.7 + 10.7 + 10.7 MB of shards + 54.1 MB gathered (the largest
BasicBlock's whole parameters, twice, and its gradient, 18 MB each, and the root's stem and head)
= 86.1 MB.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ddp.model.sharding import find_blocks

MB = 2**20
_COPIES = {"adam": 2, "adamw": 2}


def optimizer_copies(name: str, momentum: float = 0.0) -> int:
    """Per-parameter state tensors the optimizer keeps: SGD 1 with momentum (else 0), Adam/AdamW 2."""
    if name == "sgd":
        return 1 if momentum > 0 else 0
    return _COPIES[name]


@dataclass
class Estimate:
    """Bytes, per rank. ``per_sample`` and ``fixed`` come from the probe's fit (None before it)."""

    parameters: int
    gradients: int
    optimizer: int
    master: int
    ddp_buckets: int
    per_sample: float | None = None
    fixed: float | None = None
    data_on_device: int = 0  # the dataset the in-memory loader keeps on this rank's device
    shards: int = 1  # FSDP's shard group size (the world size under dist.parallel=fsdp), else 1
    gathered: int = 0  # under FSDP: the root's whole parameters + the largest gathered block (see gathered_bytes)

    @property
    def state(self) -> int:
        """Everything held before the first activation (the data kept on the device included)."""
        return (self.parameters + self.gradients + self.optimizer + self.master + self.ddp_buckets + self.gathered
                + self.data_on_device)

    def total(self, batch: int) -> float:
        return self.state + (self.fixed or 0.0) + (self.per_sample or 0.0) * batch

    def activations(self, batch: int) -> float:
        return (self.fixed or 0.0) + (self.per_sample or 0.0) * batch

    def rows(self, batch: int | None) -> list[tuple[str, str]]:
        """(item, MB) rows of the printed table."""
        per = f" ÷ {self.shards}" if self.shards > 1 else ""
        rows = [(f"parameters{per}", _mb(self.parameters)), (f"gradients{per}", _mb(self.gradients)),
                (f"optimizer state{per}", _mb(self.optimizer))]
        if self.master:
            rows.append((f"fp32 master copy{per}", _mb(self.master)))
        if self.ddp_buckets:
            rows.append(("DDP gradient buckets", _mb(self.ddp_buckets)))
        if self.gathered:
            rows.append(("gathered: root + largest block (whole)", _mb(self.gathered)))
        if self.data_on_device:
            rows.append(("data on device (in-memory loader)", _mb(self.data_on_device)))
        if self.per_sample is not None:
            rows.append(("activations per sample (measured)", f"{self.per_sample / MB:,.3f}"))
            rows.append(("fixed per step (measured)", _mb(self.fixed or 0.0)))
        if batch is not None and self.per_sample is not None:
            rows.append((f"total at batch {batch}", _mb(self.total(batch))))
        return rows

    def to_json(self) -> dict[str, float | int | None]:
        return asdict(self)


def _mb(value: float) -> str:
    return f"{value / MB:,.1f}"


def estimate_state(model: nn.Module, optimizer: str, momentum: float = 0.0, dtype: torch.dtype = torch.float32,
                   ddp_ranks: int = 1, bucket_views: bool = False, shards: int = 1,
                   blocks: tuple[str, ...] = ()) -> Estimate:
    """The analytic part of the table for ``model`` trained in ``dtype`` (parameters' dtype). Not
    collective: ``model`` is the plain, unsharded model.

    ``ddp_ranks``: the world size when DistributedDataParallel wraps the model (buckets exist only
    with more than one rank). ``bucket_views``: ``dist.gradient_as_bucket_view``, the gradients are
    views into the buckets, so the buckets cost nothing more. ``shards``: the world size under
    ``dist.parallel=fsdp`` (1 trains unwrapped: nothing is sharded or gathered), with ``blocks``
    the recipe's ``dist.fsdp_blocks``."""
    if ddp_ranks > 1 and shards > 1:
        raise ValueError("a model is either DDP-replicated or FSDP-sharded, not both")
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    width = torch.empty((), dtype=dtype).element_size()
    low = width < 4
    state_width = 4 if low else width
    count = sum(shard_numel(p, shards) for p in trainable)
    return Estimate(
        parameters=sum(shard_numel(p, shards) for p in params) * width,
        gradients=count * width,
        optimizer=count * optimizer_copies(optimizer, momentum) * state_width,
        master=count * 4 if low else 0,
        ddp_buckets=count * width if ddp_ranks > 1 and not bucket_views else 0,
        shards=shards,
        gathered=gathered_bytes(model, blocks, width) if shards > 1 else 0,
    )


def shard_numel(param: torch.Tensor, shards: int) -> int:
    """Elements of one rank's shard of ``param``: FSDP2 splits dim 0 into ``shards`` equal pieces,
    padding the last (ceil(rows / shards) rows each); a 0-dim tensor counts as one row."""
    if shards == 1:
        return param.numel()
    rows = param.shape[0] if param.dim() else 1
    return -(-rows // shards) * (param.numel() // max(rows, 1))


def gathered_bytes(model: nn.Module, blocks: tuple[str, ...] = (), width: int = 4) -> int:
    """Bytes FSDP's all-gathers add to the shards, at the worst moment of a step: the root's whole
    parameters (gathered from its forward to its backward) + the larger of a block's backward
    (its whole parameters and gradient, before the reduce-scatter, and the next block's whole
    parameters, which FSDP2 gathers ahead; the largest block counted for both) and the root's
    whole gradient (the root's backward, last). Blocks as ``ddp.model.sharding.find_blocks``
    picks them; a block's own parameters exclude those of the blocks inside it."""
    units = _block_units(model, find_blocks(model, blocks))
    owned = {id(p) for unit in units for p in unit}
    root = [p for p in model.parameters() if id(p) not in owned]
    ahead = max((_numel(unit) for unit in units), default=0)  # the next block, gathered ahead (prefetch)
    largest_block = max((_numel(unit) + _numel(unit, grads=True) + ahead for unit in units), default=0)
    return (_numel(root) + max(largest_block, _numel(root, grads=True))) * width


def _block_units(model: nn.Module, blocks: list[nn.Module]) -> list[list[torch.Tensor]]:
    """Each block's own parameters (children come first in ``blocks``, so a parent's exclude them)."""
    seen: set[int] = set()
    units = []
    for block in blocks:
        own = [p for p in block.parameters() if id(p) not in seen]
        seen.update(id(p) for p in own)
        units.append(own)
    return units


def _numel(params: list[torch.Tensor], grads: bool = False) -> int:
    return sum(p.numel() for p in params if p.requires_grad or not grads)
