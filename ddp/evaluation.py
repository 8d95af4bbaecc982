"""Exact distributed evaluation: every test sample counted once, whatever the world size."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from ddp import comm


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    count: int


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> EvalResult:
    """All ranks must call. ``model`` must be the UNWRAPPED module (no DDP hooks: shards differ
    in length by one sample, so a DDP forward could wait on a peer that has finished).

    Each rank sums (loss, correct, count) over its unpadded shard; one all_reduce adds them.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for inputs, targets in loader:
        inputs = inputs.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        logits = model(inputs)
        sums[0] += F.cross_entropy(logits, targets, reduction="sum").double()
        sums[1] += (logits.argmax(dim=1) == targets).sum()
        sums[2] += targets.numel()
    comm.all_reduce_sum(sums)
    model.train(was_training)
    loss_sum, correct, count = sums.tolist()
    count = int(round(count))
    return EvalResult(loss=loss_sum / max(count, 1), accuracy=correct / max(count, 1), count=count)
