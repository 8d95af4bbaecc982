"""Datasets by name: ``data.name`` → train and test splits plus their shape and class count.

Digits ships inside scikit-learn; MNIST, FashionMNIST, CIFAR-10 and ImageFolder are read by
torchvision's own classes from files under ``data.root`` (fetched by torchvision only when
``data.download=true``); synthetic is generated from a seed. Your own data function is named in
the recipe instead (``ddp.model.registry``).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, TensorDataset

from ddp.data.augment import CropFlip
from ddp.data.digits import standardised_split
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


def load_digits(cfg: DataConfig) -> Splits:
    """scikit-learn's 1,797 8×8 digit images, a seeded split, standardised by train statistics."""
    train_tensors, test_tensors = standardised_split(cfg.test_fraction, cfg.split_seed)
    train, test = TensorDataset(*train_tensors), TensorDataset(*test_tensors)
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
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IDX_FILES = "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"
MNIST_FILES = f"MNIST/raw/ with {IDX_FILES}"


def load_mnist(cfg: DataConfig) -> Splits:
    """torchvision's MNIST reader on ``<root>/MNIST/raw`` (the four uncompressed idx files)."""
    from torchvision import datasets

    return _idx_dataset(datasets.MNIST, cfg, MNIST_MEAN, MNIST_STD)


def load_fashion_mnist(cfg: DataConfig) -> Splits:
    """torchvision's FashionMNIST reader on ``<root>/FashionMNIST/raw`` (the same four idx file names)."""
    from torchvision import datasets

    return _idx_dataset(datasets.FashionMNIST, cfg, FASHION_MEAN, FASHION_STD)


def _idx_dataset(dataset_class: type, cfg: DataConfig, mean: tuple[float, ...], std: tuple[float, ...]) -> Splits:
    from torchvision import transforms

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    expected = f"{dataset_class.__name__}/raw/ with {IDX_FILES}"
    train, test = (_torchvision_split(dataset_class, cfg, expected,
                                      train=flag, transform=transform) for flag in (True, False))

    def materialise() -> Tensors:  # ToTensor + Normalize on the whole uint8 array at once
        images = [_normalise(split.data[:, None], mean, std) for split in (train, test)]
        return Tensors(images[0], train.targets.clone(), images[1], test.targets.clone())

    return Splits(train, test, (1, 28, 28), 10, in_memory=False, materialise=materialise)


def load_image_folder(cfg: DataConfig) -> Splits:
    """torchvision's ImageFolder on ``<root>/train/<class>/*`` and ``<root>/test/<class>/*`` (or ``val``),
    resized to ``data.image_size`` and normalised with ImageNet statistics (what pretrained weights expect)."""
    from torchvision import datasets, transforms

    size = cfg.image_size
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), normalize])
    test_tf = transforms.Compose([transforms.Resize(size * 8 // 7), transforms.CenterCrop(size),
                                  transforms.ToTensor(), normalize])
    root = Path(cfg.root)
    test_dir = next((root / name for name in ("test", "val") if (root / name).is_dir()), root / "test")
    expected = "train/<class>/<image> and test/<class>/<image> (or val/), e.g. train/cat/001.png"
    train = _image_folder(datasets.ImageFolder, root / "train", cfg, expected, train_tf)
    test = _image_folder(datasets.ImageFolder, test_dir, cfg, expected, test_tf)
    if test.classes != train.classes:
        raise DataError(f"data.name=image_folder: train classes {train.classes} differ from test classes "
                        f"{test.classes} under '{root.resolve()}'.", "give train/ and test/ the same class folders")
    return Splits(train, test, (3, size, size), len(train.classes), in_memory=False)


def _image_folder(dataset_class: type, folder: Path, cfg: DataConfig, expected: str, transform: object) -> Dataset:
    try:
        return dataset_class(str(folder), transform=transform)
    except (FileNotFoundError, OSError) as err:
        reason = " ".join(str(err).split())
        raise DataError(f"data.name=image_folder: no images in '{folder.resolve()}' ({reason}; expected {expected}"
                        f" under data.root='{Path(cfg.root).resolve()}').",
                        "put the class folders there or set data.root= to where they are") from None


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
        return dataset_class(root=cfg.root, download=cfg.download, **kwargs)
    # torchvision: RuntimeError when missing or failing md5; damaged files fail while parsing;
    # with data.download=true and no network: URLError (an OSError)
    except (RuntimeError, AssertionError, ValueError, OSError, EOFError, pickle.UnpicklingError) as err:
        reason = " ".join(str(err).split()) or "unreadable"
        raise DataError(
            f"data.name={cfg.name}: no readable {dataset_class.__name__} files under "
            f"data.root='{Path(cfg.root).resolve()}' ({type(err).__name__}: {reason}; expected {expected}).",
            "copy the files there, or set data.download=true on a machine with network access, or set data.root= "
            "to where they are",
        ) from None


DATASETS: dict[str, Callable[[DataConfig], Splits]] = {
    "digits": load_digits,
    "mnist": load_mnist,
    "fashion_mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "image_folder": load_image_folder,
    "synthetic": load_synthetic,
}


def build_datasets(cfg: DataConfig) -> Splits:
    return DATASETS[cfg.name](cfg)
