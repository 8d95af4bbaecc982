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


def cifar10_cnn(shape: Shape, classes: int) -> nn.Module:
    """The PyTorch CIFAR-10 tutorial's net: conv(6,5x5)-pool-conv(16,5x5)-pool, 120-84-classes (62k params)."""
    channels, height, width = shape
    out_h, out_w = ((height - 4) // 2 - 4) // 2, ((width - 4) // 2 - 4) // 2  # two 5×5 convs, two 2×2 pools
    return nn.Sequential(
        nn.Conv2d(channels, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(16 * out_h * out_w, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, classes),
    )


def cifar_resnet18(shape: Shape, classes: int) -> nn.Module:
    """ResNet-18 adapted to 32×32 images: a 3×3 stride-1 stem and no max-pool (11.2M params)."""
    from torchvision.models import resnet18 as build

    model = build(weights=None, num_classes=classes)
    model.conv1 = nn.Conv2d(shape[0], 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def vgg16(shape: Shape, classes: int) -> nn.Module:
    """torchvision's VGG-16, randomly initialised (138M params; pretrained via model.pretrained)."""
    from torchvision.models import vgg16 as build

    return build(weights=None, num_classes=classes)


MODELS: dict[str, Callable[[Shape, int], nn.Module]] = {
    "digits_cnn": digits_cnn,
    "mnist_mlp": mnist_mlp,
    "mnist_cnn": mnist_cnn,
    "cifar10_cnn": cifar10_cnn,
    "cifar_resnet18": cifar_resnet18,
    "resnet18": resnet18,
    "vgg16": vgg16,
}


def build_model(name: str, shape: Shape, classes: int) -> nn.Module:
    """A built-in model by name (``ddp.model.registry.build_model`` also takes your own)."""
    return MODELS[name](shape, classes)
