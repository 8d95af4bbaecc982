"""The in-memory data path: the whole dataset as tensors on the device, batches sliced by index.

For small datasets a per-sample DataLoader (index → __getitem__ → collate) costs more than the
step itself. ``MemoryLoader`` takes the same sampler (so each rank gets exactly the shard and
order DistributedSampler would give it, mid-epoch resume included) and slices the batch with one
``index_select``; random augmentation runs on the whole batch on the device.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator

import psutil
import torch
from torch.utils.data import Sampler

from ddp.config import LoaderKind
from ddp.data.datasets import Splits
from ddp.errors import ConfigError

log = logging.getLogger(__name__)

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


class MemoryLoader:
    """Iterates (inputs, targets) batches like ``DataLoader(batch_size, sampler, drop_last=False)``."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, sampler: Sampler[int], batch_size: int,
                 augment: Augment | None = None, seed: int = 0) -> None:
        self.inputs, self.targets = inputs, targets
        self.sampler, self.batch_size = sampler, batch_size
        self.augment, self.seed = augment, seed
        self._generator = torch.Generator(device=inputs.device) if augment else None

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.tensor(list(self.sampler), dtype=torch.long, device=self.inputs.device)
        for offset in range(0, len(order), self.batch_size):
            index = order[offset:offset + self.batch_size]
            inputs = self.inputs.index_select(0, index)
            if self.augment is not None:
                inputs = self.augment(inputs, self._batch_generator(offset))
            yield inputs, self.targets.index_select(0, index)

    def _batch_generator(self, offset: int) -> torch.Generator:
        """Seeded by (seed, epoch, rank, the batch's global sample position in the epoch), so a
        resumed run draws the same augmentation for the same batch."""
        sampler = self.sampler
        world, rank = getattr(sampler, "num_replicas", 1), getattr(sampler, "rank", 0)
        position = getattr(sampler, "start", 0) + offset * world
        key = hash((self.seed, getattr(sampler, "epoch", 0), rank, position)) & (2**63 - 1)
        assert self._generator is not None
        return self._generator.manual_seed(key)


def choose_loader(kind: LoaderKind, splits: Splits, device: torch.device, limit_mb: int) -> bool:
    """True for the in-memory path. ``auto`` takes it when the materialised tensors fit both
    ``data.memory_limit_mb`` and half of the device's free memory."""
    memory, why_not = _choice(kind, splits, device, limit_mb)
    if why_not:
        log.info("%s", why_not)
    return memory


def data_on_device(kind: LoaderKind, splits: Splits, device: torch.device, limit_mb: int) -> int:
    """Bytes the in-memory path will keep on ``device`` (``device_bytes``), 0 where the DataLoader
    is chosen: what ``data.batch_size=auto`` takes off the memory budget (``ddp.memory``). Asked
    before the model is on the device: where ``auto`` says DataLoader then, it says so later too
    (less is free); where it changes its mind the other way, the budget was only smaller than it
    had to be. Not collective."""
    return device_bytes(splits) if _choice(kind, splits, device, limit_mb)[0] else 0


def device_bytes(splits: Splits) -> int:
    """The train and test tensors as materialised: float32 inputs and int64 targets."""
    return splits.tensor_bytes + (len(splits.train) + len(splits.test)) * 8  # type: ignore[arg-type]


def _choice(kind: LoaderKind, splits: Splits, device: torch.device, limit_mb: int) -> tuple[bool, str]:
    """(in-memory path?, why auto did not take it: '' otherwise)."""
    if kind == LoaderKind.dataloader:
        return False, ""
    if splits.materialise is None:
        if kind == LoaderKind.memory:
            raise ConfigError("data.loader=memory: this dataset cannot be materialised as tensors.",
                              "use data.loader=dataloader or auto")
        return False, ""
    needed = splits.tensor_bytes
    if kind == LoaderKind.memory:
        return True, ""
    if needed <= limit_mb * 2**20 and needed <= free_memory(device) // 2:
        return True, ""
    return False, (f"data.loader=auto: {needed / 2**20:.0f} MiB of tensors is too big for the in-memory path; "
                   "using DataLoader")


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device`` (host RAM for the CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return psutil.virtual_memory().available
