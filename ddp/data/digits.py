"""scikit-learn's bundled 8×8 digits (1,797 images, BSD), read from the file scikit-learn ships.

``sklearn.datasets.load_digits`` imports scikit-learn and SciPy first: 3.2 s of CPU in every rank
of every run of the default recipe, for a 60 KB table. Reading the same ``digits.csv.gz`` with numpy
takes 0.3 s and gives the same arrays (``tests/test_datasets.py`` compares them). Where a
scikit-learn release keeps the file elsewhere, its own loader is used.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images, labels): float64 (1797, 64) pixel values 0-16 and int64 (1797,) classes 0-9,
    as ``sklearn.datasets.load_digits(return_X_y=True)`` returns them."""
    path = shipped_file()
    if path is None:
        from sklearn.datasets import load_digits

        images, labels = load_digits(return_X_y=True)
        return images, labels.astype(np.int64)
    with gzip.open(path) as handle:
        table = np.loadtxt(handle, delimiter=",")
    return table[:, :-1], table[:, -1].astype(np.int64)


def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """``digits_arrays`` as training reads them: float32 images (1797, 1, 8, 8), int64 labels."""
    pixels, classes = digits_arrays()
    return torch.tensor(pixels, dtype=torch.float32).view(-1, 1, 8, 8), torch.tensor(classes, dtype=torch.long)


def standardised_split(test_fraction: float, seed: int) -> tuple[tuple[torch.Tensor, torch.Tensor],
                                                                   tuple[torch.Tensor, torch.Tensor]]:
    """((train images, labels), (test images, labels)): a seeded split, both standardised by the
    train images' mean and standard deviation (what the default recipe and the bench train on)."""
    images, labels = digits_tensors()
    train, test = seeded_split(len(images), test_fraction, seed)
    mean, std = images[train].mean(), images[train].std()
    images = (images - mean) / std
    return (images[train], labels[train]), (images[test], labels[test])


def seeded_split(count: int, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed permutation of ``range(count)`` cut into (train, test) index tensors."""
    perm = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, round(count * test_fraction))
    return perm[n_test:], perm[:n_test]


def shipped_file() -> Path | None:
    """scikit-learn's ``datasets/data/digits.csv.gz``, found without importing scikit-learn; None
    when it is not installed there."""
    spec = importlib.util.find_spec("sklearn")
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(location) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None
