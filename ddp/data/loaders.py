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

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler


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
