"""Seeding every random generator a training run touches."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device) with ``seed``.

    Every rank uses the same seed, so models start identical even before DDP's broadcast;
    data order differs per rank through the DistributedSampler, not through this seed.
    ``deterministic`` additionally forces deterministic CUDA kernels.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)
