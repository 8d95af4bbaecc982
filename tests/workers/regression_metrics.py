"""A regression setup for the trainer: data, a model and a custom metric function (``train.metrics``)."""

import torch
from torch.utils.data import TensorDataset


def data(n: int = 256):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=generator)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * torch.randn(n, 1, generator=generator)
    return TensorDataset(x[:192], y[:192]), TensorDataset(x[192:], y[192:])


def model():
    return torch.nn.Linear(4, 1)


def metrics(outputs, targets):
    """Per-sample absolute error, and a batch mean (both forms are accepted)."""
    return {"mae": (outputs - targets).abs().mean(dim=1), "bias": (outputs - targets).mean()}
