"""Exact distributed evaluation: every test sample counted once, whatever the world size."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from ddp.cluster import comm
from ddp.model.registry import classifies


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float | None  # None when the outputs are not class logits (then only the loss is reported)
    count: int


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device,
             loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> EvalResult:
    """All ranks must call. ``model`` must be the UNWRAPPED module (no DDP hooks: shards differ
    in length by one sample, so a DDP forward could wait on a peer that has finished).

    Each rank sums (loss, correct, count) over its unpadded shard; one all_reduce adds them.
    ``loss_fn`` (a batch mean) replaces cross entropy; accuracy needs class logits on every rank.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, correct, count, batches without logits
    for inputs, targets in loader:
        inputs = inputs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        logits = model(inputs)
        if loss_fn is None:
            sums[0] += F.cross_entropy(logits, targets, reduction="sum").double()
        else:
            sums[0] += loss_fn(logits, targets).double() * targets.shape[0]
        if classifies(logits, targets):
            sums[1] += (logits.argmax(dim=1) == targets).sum()
        else:
            sums[3] += 1
        sums[2] += targets.shape[0]
    comm.all_reduce_sum(sums)
    model.train(was_training)
    loss_sum, correct, count, unclassified = sums.tolist()
    count = int(round(count))
    accuracy = correct / max(count, 1) if unclassified == 0 else None
    return EvalResult(loss=loss_sum / max(count, 1), accuracy=accuracy, count=count)
