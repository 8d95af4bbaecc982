"""DataLoaders for distributed training and exact distributed evaluation.

Training uses ``ResumableSampler``, a ``DistributedSampler`` (shuffled, seeded, ``set_epoch`` every
epoch; it pads the shard so every rank runs the same number of steps) that can also start an epoch
at a global sample position, for mid-epoch resume. Evaluation uses ``ShardSampler``: rank r
takes samples r, r+W, r+2W, ... with no padding, so summing correct/total over ranks counts every
test sample exactly once whatever the world size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from ddp.cluster import progress


class ShardSampler(Sampler[int]):
    """Every ``world``-th index starting at ``rank``; no padding, no shuffling."""

    def __init__(self, size: int, rank: int, world: int) -> None:
        self.size, self.rank, self.world = size, rank, world

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world))


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way through.

    ``start`` counts the samples of this epoch's permutation already consumed by all ranks
    together (a global sample index). The rest of the permutation is dealt round-robin to the
    current ranks, padded like DistributedSampler. With the world size of the interrupted run
    this yields exactly the indices that run had left; with another world size it continues at
    the same global position, so no sample of the epoch is skipped or seen twice (apart from the
    usual padding).
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        if self.start == 0:
            return super().__iter__()
        order = self._permutation()
        remaining = order[self.start:]
        padding = -len(remaining) % self.num_replicas
        remaining += (order * (padding // max(len(order), 1) + 1))[:padding]
        return iter(remaining[self.rank::self.num_replicas])

    def __len__(self) -> int:
        if self.start == 0:
            return super().__len__()
        return math.ceil(max(len(self.dataset) - self.start, 0) / self.num_replicas)  # type: ignore[arg-type]

    def _permutation(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.dataset), generator=generator).tolist()  # type: ignore[arg-type]


def auto_workers(requested: int, in_memory: bool, cpus_per_rank: int) -> int:
    """-1 = auto: none for in-memory tensors (workers only add IPC), else leave one core to the step."""
    if requested >= 0:
        return requested
    if in_memory:
        return 0
    return max(0, min(4, cpus_per_rank - 1))


def train_loader(dataset: Dataset, batch_size: int, sampler: Sampler[int], seed: int, device: torch.device,
                 workers: int) -> DataLoader:
    """``seed`` seeds the workers' augmentation RNG (give each rank its own)."""
    return _loader(dataset, sampler, batch_size, device, workers, seed)


def eval_loader(dataset: Dataset, batch_size: int, rank: int, world: int, device: torch.device,
                workers: int) -> DataLoader:
    sampler = ShardSampler(len(dataset), rank, world)  # type: ignore[arg-type]
    return _loader(dataset, sampler, batch_size, device, workers, 0)


def _loader(dataset: Dataset, sampler: Sampler[int], batch_size: int, device: torch.device,
            workers: int, seed: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed),  # seeds workers' augmentation RNG
    )


class EpochLoader:
    """A training DataLoader that knows where it is, for a loop the user writes (``ddp.Run.loader``).

    Every pass over it is one epoch: it reseeds its ``ResumableSampler`` with the epoch number
    (so each epoch has its own order, the same on every rank and after a resume) and counts the
    samples all ranks consumed, so a save mid-epoch can resume at the same sample. Batches come
    out on ``device``.
    """

    def __init__(self, loader: DataLoader, sampler: ResumableSampler | ShardSampler, device: torch.device,
                 world: int) -> None:
        self.loader, self.sampler, self.device, self.world = loader, sampler, device, world
        self.epoch = 0  # the epoch the next (or current) pass is
        self.consumed = 0  # samples of that epoch consumed by all ranks together
        self._start = 0  # where the next pass starts (a resumed mid-epoch position)

    def place(self, epoch: int, consumed: int) -> None:
        """Continue at ``consumed`` samples into ``epoch`` (after a resume)."""
        self.epoch, self.consumed, self._start = epoch, consumed, consumed

    def __iter__(self) -> Iterator[Any]:
        self._place_sampler()
        self.consumed, self._start = self._start, 0
        for batch in progress.track(self.loader):
            self.consumed += _batch_size(batch) * self.world
            yield to_device(batch, self.device)
        self.epoch, self.consumed = self.epoch + 1, 0

    def __len__(self) -> int:
        self._place_sampler()
        return len(self.loader)

    def _place_sampler(self) -> None:
        if isinstance(self.sampler, ResumableSampler):  # an evaluation ShardSampler has no epochs
            self.sampler.set_epoch(self.epoch, self._start)


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors in a batch (nested in tuples, lists and dicts) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        moved = [to_device(item, device) for item in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    return batch


def _batch_size(batch: Any) -> int:
    """Samples in a batch: the first dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else 1
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        return _batch_size(item)
    return 1
