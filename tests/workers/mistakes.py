"""Mistakes a new user makes with their own model and data (tests/test_mistakes.py)."""

import torch
from torch import nn
from torch.utils.data import TensorDataset


def tensors():
    """Returns (X, y) tensors instead of (train, test) Datasets."""
    return torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))


def datasets():
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    return TensorDataset(x[:48], y[:48]), TensorDataset(x[48:], y[48:])


class TwoClasses(nn.Module):
    """Two outputs, for data with ten classes."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 2)

    def forward(self, x):
        return self.fc(x.flatten(1))


class WrongInput(nn.Module):
    """Expects 784 features (28×28), gets 8×8 images."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))
