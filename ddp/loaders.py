"""DataLoaders for distributed training and exact distributed evaluation.

Training uses ``DistributedSampler`` (shuffled, seeded, ``set_epoch`` every epoch; it pads the
shard so every rank runs the same number of steps). Evaluation uses ``ShardSampler``: rank r
takes samples r, r+W, r+2W, ... with no padding, so summing correct/total over ranks counts every
test sample exactly once whatever the world size.
"""

from __future__ import annotations

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


def auto_workers(requested: int, in_memory: bool, cpus_per_rank: int) -> int:
    """-1 = auto: none for in-memory tensors (workers only add IPC), else leave one core to the step."""
    if requested >= 0:
        return requested
    if in_memory:
        return 0
    return max(0, min(4, cpus_per_rank - 1))


def train_loader(dataset: Dataset, batch_size: int, rank: int, world: int, seed: int,
                 device: torch.device, workers: int) -> DataLoader:
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    return _loader(dataset, sampler, batch_size, device, workers, seed + rank)


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
