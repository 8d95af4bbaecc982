"""The analytic memory table, in the seed tutorials' terms.

For P trainable parameters stored in dtype d (bytes(d) each):

    parameters     P × bytes(d)
    gradients      P × bytes(d)
    optimizer      SGD with momentum: 1 buffer per parameter; plain SGD: 0; Adam/AdamW: 2
                   (exp_avg, exp_avg_sq), each P × bytes(d), or P × 4 when d is lower than fp32
    master copy    P × 4 when d is lower than fp32 (mixed precision keeps fp32 weights to step on)
    DDP buckets    P × bytes(d) under DDP with more than one rank (its flat gradient buckets), unless
                   dist.gradient_as_bucket_view makes the gradients views into them
    data on device the train and test tensors the in-memory loader (data.loader=memory, or auto
                   when it fits) keeps on the training device: float32 inputs, int64 targets; each
                   rank holds its own copy, on a GPU or in host RAM
    activations    measured: bytes per sample (the probe's fitted slope) × batch, plus the fixed
                   part of a step (the fitted intercept: workspaces, loss, allocator rounding)

e.g. ResNet-18 (11.2 M parameters, fp32) with SGD + momentum on 2 ranks: 42.7 + 42.7 + 42.7
+ 0 + 42.7 MB = 170.6 MB before the first activation (MB = 2^20 bytes throughout).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

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

    @property
    def state(self) -> int:
        """Everything held before the first activation (the data kept on the device included)."""
        return self.parameters + self.gradients + self.optimizer + self.master + self.ddp_buckets + self.data_on_device

    def total(self, batch: int) -> float:
        return self.state + (self.fixed or 0.0) + (self.per_sample or 0.0) * batch

    def activations(self, batch: int) -> float:
        return (self.fixed or 0.0) + (self.per_sample or 0.0) * batch

    def rows(self, batch: int | None) -> list[tuple[str, str]]:
        """(item, MB) rows of the printed table."""
        rows = [("parameters", _mb(self.parameters)), ("gradients", _mb(self.gradients)),
                ("optimizer state", _mb(self.optimizer))]
        if self.master:
            rows.append(("fp32 master copy", _mb(self.master)))
        if self.ddp_buckets:
            rows.append(("DDP gradient buckets", _mb(self.ddp_buckets)))
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
                   ddp_ranks: int = 1, bucket_views: bool = False) -> Estimate:
    """The analytic part of the table for ``model`` trained in ``dtype`` (parameters' dtype).

    ``ddp_ranks``: the world size when DistributedDataParallel wraps the model (buckets exist only
    with more than one rank). ``bucket_views``: ``dist.gradient_as_bucket_view``, the gradients are
    views into the buckets, so the buckets cost nothing more."""
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    width = torch.empty((), dtype=dtype).element_size()
    low = width < 4
    state_width = 4 if low else width
    return Estimate(
        parameters=(count + frozen) * width,
        gradients=count * width,
        optimizer=count * optimizer_copies(optimizer, momentum) * state_width,
        master=count * 4 if low else 0,
        ddp_buckets=count * width if ddp_ranks > 1 and not bucket_views else 0,
    )
