"""A simulated device for the batch-size search: memory affine in the batch plus noise, and a
CUDA-style out-of-memory error above a cap. Used by the tests and by ``python -m bench.batch_probe``.

``SimulatedDevice.attach(model)`` makes every forward of ``model`` check its batch against the cap
(raising ``torch.OutOfMemoryError`` above it, as the CUDA caching allocator does) and remember it;
the device is also a ``MemoryReader`` whose peak is ``fixed + per_sample × batch`` (± noise) above
the baseline. The budget at which exactly ``cap`` samples fit is ``budget()``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from torch import nn

MB = 2**20


@dataclass
class SimulatedDevice:
    cap: int  # the largest batch that does not run out of memory (and that the budget fits)
    per_sample: float = 1.0 * MB
    fixed_share: float = 0.02  # of the budget: workspaces, loss, allocator rounding
    noise: float = 0.003  # relative, uniform ± on every reading
    seed: int = 0
    oom_above: int | None = None  # run out of memory above this batch instead (a device holding less than the budget says)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    forwards: int = 0  # forward passes seen (trial steps, or Lightning's/Accelerate's steps)
    _batch: int = 0
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    @property
    def fixed(self) -> float:
        return self.fixed_share * self.per_sample * self.cap / (1 - self.fixed_share)

    def budget(self) -> float:
        """Bytes above the baseline at which exactly ``cap`` samples fit."""
        return self.fixed + self.per_sample * self.cap

    def attach(self, model: nn.Module) -> nn.Module:
        model.register_forward_pre_hook(self._check)
        return model

    def _check(self, _module: nn.Module, args: tuple) -> None:
        batch = args[0].shape[0]
        self.forwards += 1
        self._batch = batch
        limit = self.cap if self.oom_above is None else self.oom_above
        if batch > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {batch * self.per_sample / MB:.0f} MiB "
                                         f"(simulated: batch {batch} > {limit})")

    # --- MemoryReader -------------------------------------------------------------------------
    def room(self) -> int:
        return int(self.budget())

    def current(self) -> int:
        return 0

    def start(self) -> None:
        self._batch = 0

    def peak(self) -> int:
        return self.peak_for(self._batch) if self._batch else 0

    def peak_for(self, batch: int) -> int:
        """A noisy reading for ``batch`` (no cap check)."""
        exact = self.fixed + self.per_sample * batch
        return int(exact * (1 + self._rng.uniform(-self.noise, self.noise)))

    def is_oom(self, err: BaseException) -> bool:
        return isinstance(err, torch.OutOfMemoryError)

    def recover(self) -> None:
        pass

    def describe(self) -> str:
        return f"simulated (cap {self.cap})"
