"""Datasets by name: ``data.name`` → train and test splits plus their shape and class count.

Nothing is downloaded: digits ships inside scikit-learn; MNIST and CIFAR-10 are read by
torchvision from files already under ``data.root``; synthetic is generated from a seed.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, TensorDataset

from ddp.augment import CropFlip
from ddp.config import DataConfig
from ddp.errors import DataError


@dataclass
class Tensors:
    """A dataset materialised after its deterministic transforms: the in-memory data path."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None  # train only


@dataclass
class Splits:
    train: Dataset
    test: Dataset
    shape: tuple[int, int, int]  # one sample: channels, height, width
    classes: int
    in_memory: bool  # both splits are tensors already (no per-sample decoding)
    materialise: Callable[[], Tensors] | None = None  # the same data as tensors, built on demand

    @property
    def tensor_bytes(self) -> int:
        """Size of ``materialise()``'s float32 images."""
        channels, height, width = self.shape
        return (len(self.train) + len(self.test)) * channels * height * width * 4  # type: ignore[arg-type]


def _from_tensor_datasets(train: TensorDataset, test: TensorDataset) -> Callable[[], Tensors]:
    return lambda: Tensors(*train.tensors, *test.tensors)


def seeded_split(count: int, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed permutation of ``range(count)`` cut into (train, test) index tensors."""
    perm = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, round(count * test_fraction))
    return perm[n_test:], perm[:n_test]


def load_digits(cfg: DataConfig) -> Splits:
    """scikit-learn's 1,797 8×8 digit images, a seeded split, standardised by train statistics."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = torch.tensor(bunch.data, dtype=torch.float32).view(-1, 1, 8, 8)
    labels = torch.tensor(bunch.target, dtype=torch.long)
    train_idx, test_idx = seeded_split(len(images), cfg.test_fraction, cfg.split_seed)
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std
    train = TensorDataset(images[train_idx], labels[train_idx])
    test = TensorDataset(images[test_idx], labels[test_idx])
    return Splits(train, test, (1, 8, 8), 10, in_memory=True, materialise=_from_tensor_datasets(train, test))


def load_synthetic(cfg: DataConfig) -> Splits:
    """Random images with random labels (for throughput work), seeded by ``data.split_seed``."""
    generator = torch.Generator().manual_seed(cfg.split_seed)
    shape = tuple(cfg.synthetic_shape)

    def make(count: int) -> TensorDataset:
        images = torch.randn((count, *shape), generator=generator)
        labels = torch.randint(0, cfg.synthetic_classes, (count,), generator=generator)
        return TensorDataset(images, labels)

    train, test = make(cfg.synthetic_train), make(cfg.synthetic_test)
    return Splits(train, test, shape, cfg.synthetic_classes, in_memory=True,  # type: ignore[arg-type]
                  materialise=_from_tensor_datasets(train, test))


MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
MNIST_FILES = ("MNIST/raw/ with train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
               "t10k-labels-idx1-ubyte")


def load_mnist(cfg: DataConfig) -> Splits:
    """torchvision's MNIST reader on ``<root>/MNIST/raw`` (the four uncompressed idx files)."""
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MNIST_MEAN, MNIST_STD)])
    train, test = (_torchvision_split(datasets.MNIST, cfg, MNIST_FILES,
                                      train=flag, transform=transform) for flag in (True, False))

    def materialise() -> Tensors:  # ToTensor + Normalize on the whole uint8 array at once
        images = [_normalise(split.data[:, None], MNIST_MEAN, MNIST_STD) for split in (train, test)]
        return Tensors(images[0], train.targets.clone(), images[1], test.targets.clone())

    return Splits(train, test, (1, 28, 28), 10, in_memory=False, materialise=materialise)


def load_cifar10(cfg: DataConfig) -> Splits:
    """torchvision's CIFAR-10 reader on ``<root>/cifar-10-batches-py``; crop+flip on train."""
    from torchvision import datasets, transforms

    normalize = transforms.Normalize(CIFAR_MEAN, CIFAR_STD)
    augment = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                  transforms.ToTensor(), normalize])
    plain = transforms.Compose([transforms.ToTensor(), normalize])
    where = "cifar-10-batches-py/ with data_batch_1..5, test_batch, batches.meta"
    train = _torchvision_split(datasets.CIFAR10, cfg, where, train=True, transform=augment)
    test = _torchvision_split(datasets.CIFAR10, cfg, where, train=False, transform=plain)

    def materialise() -> Tensors:  # the deterministic part once; crop+flip per batch on the device
        images = [_normalise(torch.from_numpy(split.data).permute(0, 3, 1, 2), CIFAR_MEAN, CIFAR_STD)
                  for split in (train, test)]
        zero = tuple(-m / s for m, s in zip(CIFAR_MEAN, CIFAR_STD))
        return Tensors(images[0], torch.tensor(train.targets), images[1], torch.tensor(test.targets),
                       augment=CropFlip(padding=4, fill=zero))

    return Splits(train, test, (3, 32, 32), 10, in_memory=False, materialise=materialise)


def _normalise(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 N×C×H×W → float, exactly as ToTensor (÷255) then Normalize ((x-mean)/std) compute it."""
    view = (1, len(mean), 1, 1)
    out = images.float().div(255)
    return out.sub_(torch.tensor(mean).view(view)).div_(torch.tensor(std).view(view)).contiguous()


def _torchvision_split(dataset_class: type, cfg: DataConfig, expected: str, **kwargs: object) -> Dataset:
    try:
        return dataset_class(root=cfg.root, download=False, **kwargs)
    # torchvision: RuntimeError when missing or failing md5; damaged files fail while parsing
    except (RuntimeError, AssertionError, ValueError, OSError, EOFError, pickle.UnpicklingError) as err:
        reason = " ".join(str(err).split()) or "unreadable"
        raise DataError(
            f"data.name={cfg.name}: no readable {dataset_class.__name__} files under "
            f"data.root='{Path(cfg.root).resolve()}' ({type(err).__name__}: {reason}; expected {expected}).",
            "copy the dataset files there (this tool never downloads) or set data.root=",
        ) from None


DATASETS: dict[str, Callable[[DataConfig], Splits]] = {
    "digits": load_digits,
    "mnist": load_mnist,
    "cifar10": load_cifar10,
    "synthetic": load_synthetic,
}


def build_datasets(cfg: DataConfig) -> Splits:
    return DATASETS[cfg.name](cfg)
