"""A model for the digits data whose forward uses ``Tensor.put_``, an op torch has no deterministic
kernel for, even on the CPU: it stands in for the CUDA ops that refuse ``train.deterministic``."""

import torch
from torch import nn


class PutNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(10, device=x.device).put_(torch.tensor([0], device=x.device), torch.ones(1, device=x.device))
        return self.linear(x.flatten(1)) + mask
