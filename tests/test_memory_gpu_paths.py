"""The memory probe's GPU paths, shown on the CPU: the data kept on the device, NVML under a
CUDA_VISIBLE_DEVICES remap (a fake pynvml at the driver boundary), the end-of-run peak without the
probe's trials, and a model given to ``ddp.fit`` as an instance."""

from __future__ import annotations

import psutil
import pytest
import torch

from ddp import session
from ddp.config import load_recipe
from ddp.environment import SingleProcessEnv

MB = 2**20


# ---------------------------------------------------------------- the end-of-run peak (item 9b)

def _tiny_run(run_dir) -> None:
    recipe = load_recipe(None, ["train.max_steps=2", "train.epochs=1", f"run.dir={run_dir}", "log.tensorboard=false",
                                "log.progress=false"])
    session.execute(recipe, SingleProcessEnv())


def test_the_run_peak_leaves_out_memory_used_before_training(tmp_path):
    """A 300 MB tensor freed before training stands in for the probe's near-budget trial steps:
    the peak the run reports afterwards is the training's own, well below it."""
    _tiny_run(tmp_path / "warm")  # a first run in a process grows RSS for good (imports, thread pools)
    spike = torch.ones(300 * MB // 4)
    with_spike = psutil.Process().memory_info().rss / MB
    del spike
    _tiny_run(tmp_path / "run")
    peak = session.peak_memory_mb(torch.device("cpu"))
    assert peak < with_spike - 150, (peak, with_spike)


class FakeCudaAllocator:
    """torch.cuda's peak counters for one device: what the driver boundary would report."""

    def __init__(self) -> None:
        self.current = self.peak = 0
        self.devices: list = []

    def allocate(self, size: int) -> None:
        self.current += size
        self.peak = max(self.peak, self.current)

    def reset_peak_memory_stats(self, device=None) -> None:
        self.devices.append(device)
        self.peak = self.current

    def max_memory_allocated(self, device=None) -> int:
        self.devices.append(device)
        return self.peak


def test_the_cuda_peak_is_reset_after_the_probe(monkeypatch):
    from ddp.memory.readers import reset_peak_memory

    fake = FakeCudaAllocator()
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", fake.reset_peak_memory_stats)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", fake.max_memory_allocated)
    gpu = torch.device("cuda", 1)
    fake.allocate(100 * MB)
    fake.allocate(900 * MB)  # the probe's largest trial
    fake.allocate(-900 * MB)
    assert session.peak_memory_mb(gpu) == 1000
    reset_peak_memory(gpu)
    fake.allocate(50 * MB)
    assert session.peak_memory_mb(gpu) == 150
    assert set(fake.devices) == {gpu}
