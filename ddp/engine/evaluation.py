"""Exact distributed evaluation: every test sample counted once, whatever the world size.

Each rank sums its values over its unpadded shard (``ddp.data.loaders.ShardSampler``); one
all_reduce adds the ranks' sums, and every result is a sum over the whole test set divided by its
sample count. So only means over samples are exact here: loss, accuracy, and any metric function
that returns, per batch, one value per sample (a tensor of shape ``[batch]``) or the batch mean
(a 0-d tensor or a float, weighted by the batch size).

A model sharded by FSDP gathers each block's parameters from every rank in its forward, so there
every rank runs as many forwards: a rank whose shard has run out of batches runs a one-sample
stand-in, and its outputs are not counted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ddp.cluster import comm, progress
from ddp.errors import ConfigError
from ddp.model.registry import classifies
from ddp.model.sharding import is_sharded

MetricFn = Callable[[torch.Tensor, torch.Tensor], Mapping[str, Any]]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float | None  # None when the outputs are not class logits (then only the loss is reported)
    count: int
    metrics: dict[str, float] = field(default_factory=dict)  # from a metric function: name → mean over samples


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device, loss_fn: LossFn | None = None,
             metric_fn: MetricFn | None = None) -> EvalResult:
    """All ranks must call. ``model`` must be the UNWRAPPED module (no DDP hooks: shards differ
    in length by one sample, so a DDP forward could wait on a peer that has finished).

    The loss is cross entropy unless ``loss_fn`` (a batch mean) is given; accuracy is reported when
    every batch on every rank had class logits; ``metric_fn(outputs, targets)`` adds named means.
    """

    def per_batch(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
        if loss_fn is None:
            values: dict[str, Any] = {"loss": F.cross_entropy(outputs, targets, reduction="none")}
        else:
            values = {"loss": loss_fn(outputs, targets)}
        logits = classifies(outputs, targets)
        values["correct"] = (outputs.argmax(dim=1) == targets).double() if logits else outputs.new_zeros(())
        values["unclassified"] = outputs.new_zeros(()) if logits else outputs.new_ones(()) / targets.shape[0]
        if metric_fn is not None:
            values.update(_named(metric_fn(outputs, targets)))
        return values

    means, count = mean_over_samples(model, loader, device, per_batch)
    extra = {name: value for name, value in means.items() if name not in ("loss", "correct", "unclassified")}
    accuracy = means["correct"] if means.get("unclassified", 0.0) == 0.0 and count else None
    return EvalResult(loss=means.get("loss", float("nan")), accuracy=accuracy, count=count, metrics=extra)


@torch.no_grad()
def mean_over_samples(model: nn.Module, loader: Iterable, device: torch.device,
                      per_batch: Callable[[torch.Tensor, torch.Tensor], Mapping[str, Any]]
                      ) -> tuple[dict[str, float], int]:
    """All ranks must call. ``per_batch(outputs, targets)`` → named values, each per sample
    (shape ``[batch]``) or a batch mean; returns (name → mean over every sample of every rank,
    the sample count). Names are agreed between ranks, so a rank with an empty shard takes part."""
    was_training = model.training
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    count = 0
    batches = _in_lockstep(loader, device) if is_sharded(model) else loader
    for inputs, targets in progress.track(batches, progress.EVALUATING, progress.EVALUATING):
        inputs = inputs.to(device, non_blocking=True)
        outputs = model(inputs)
        if targets is None:
            continue  # a stand-in forward: this rank's shard has no batch left
        targets = targets.to(device, non_blocking=True)
        size = targets.shape[0]
        for name, value in per_batch(outputs, targets).items():
            total = _batch_sum(name, value, size, device)
            sums[name] = sums[name] + total if name in sums else total
        count += size
        progress.tick()
    model.train(was_training)
    names = sorted(set().union(*comm.all_gather_object(sorted(sums))))
    zero = torch.zeros((), dtype=torch.float64, device=device)
    packed = torch.stack([sums.get(name, zero) for name in names] + [zero + count])
    totals = comm.all_reduce_sum(packed).tolist()
    count = int(round(totals[-1]))
    return {name: total / max(count, 1) for name, total in zip(names, totals)}, count


def _in_lockstep(loader: Iterable, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """All ranks must call. The loader's batches, then (stand-in input, None) while another rank
    still has batches: every rank runs the same number of forwards. One small all-reduce per batch."""
    batches = iter(loader)
    batch = next(batches, None)
    mine = None if batch is None else (tuple(batch[0].shape[1:]), batch[0].dtype)
    known = [kind for kind in comm.all_gather_object(mine) if kind is not None]
    if not known:
        return  # no rank has a batch
    shape, dtype = known[0]
    while comm.all_reduce_sum(torch.tensor([float(batch is not None)], device=device)).item() > 0:
        yield (batch[0], batch[1]) if batch is not None else (torch.zeros((1, *shape), dtype=dtype), None)
        batch = next(batches, None) if batch is not None else None


def _named(values: Any) -> dict[str, Any]:
    if not isinstance(values, Mapping):
        raise ConfigError(f"a metric function must return a dict of name → value, got {type(values).__name__}.",
                          "return e.g. {'mae': (outputs - targets).abs().mean(dim=1)}")
    return dict(values)


def _batch_sum(name: str, value: Any, size: int, device: torch.device) -> torch.Tensor:
    """The batch's sum of ``value``: per-sample values are added, a batch mean is weighted by ``size``."""
    tensor = torch.as_tensor(value, device=device).detach().double()
    if tensor.dim() == 0:
        return tensor * size
    if tensor.dim() == 1 and tensor.shape[0] == size:
        return tensor.sum()
    raise ConfigError(f"metric {name!r} has shape {list(tensor.shape)} for a batch of {size}: it must be one value "
                      "per sample or the batch mean.", "reduce it per sample, e.g. .mean(dim=1), or to a scalar")
