"""A small CNN with BatchNorm for the 8×8 digits (check e: ``dist.sync_bn=true`` needs BatchNorm layers).

Used as your own model: ``model.name=tests.gpu.bn_cnn:DigitsBN`` (the repository is on PYTHONPATH).
"""

from __future__ import annotations

from torch import nn


class DigitsBN(nn.Sequential):
    def __init__(self, channels: int = 1, classes: int = 10) -> None:
        super().__init__(
            nn.Conv2d(channels, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(64 * 4 * 4, 128), nn.ReLU(),
            nn.Linear(128, classes),
        )
