"""Model registry: ``model.name`` → a builder taking (input shape, number of classes)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

Shape = tuple[int, int, int]


def digits_cnn(shape: Shape, classes: int) -> nn.Module:
    """Small CNN for 8×8 digits: two 3×3 convs, a 2×2 pool, two linear layers (151k params)."""
    channels, height, width = shape
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(64 * (height // 2) * (width // 2), 128), nn.ReLU(),
        nn.Linear(128, classes),
    )


def mnist_mlp(shape: Shape, classes: int) -> nn.Module:
    """The seed tutorial's MLP: 784-128-10."""
    channels, height, width = shape
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * height * width, 128), nn.ReLU(),
                         nn.Linear(128, classes))


def mnist_cnn(shape: Shape, classes: int) -> nn.Module:
    """The pytorch/examples MNIST CNN (two convs, dropout, 9216-128-10 head)."""
    channels, height, width = shape
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3), nn.ReLU(),
        nn.Conv2d(32, 64, 3), nn.ReLU(),
        nn.MaxPool2d(2), nn.Dropout(0.25), nn.Flatten(),
        nn.Linear(64 * ((height - 4) // 2) * ((width - 4) // 2), 128), nn.ReLU(),
        nn.Dropout(0.5), nn.Linear(128, classes),
    )


def resnet18(shape: Shape, classes: int) -> nn.Module:
    """torchvision's ResNet-18, randomly initialised (no weight download)."""
    from torchvision.models import resnet18 as build  # torchvision import costs ~1 s: only here

    return build(weights=None, num_classes=classes)


MODELS: dict[str, Callable[[Shape, int], nn.Module]] = {
    "digits_cnn": digits_cnn,
    "mnist_mlp": mnist_mlp,
    "mnist_cnn": mnist_cnn,
    "resnet18": resnet18,
}


def build_model(name: str, shape: Shape, classes: int) -> nn.Module:
    return MODELS[name](shape, classes)
