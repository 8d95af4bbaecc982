import logging

import torch
from torch import nn

from ddp.model import parallel
from ddp.cluster.devices import Devices
from ddp.config import Parallel
from ddp.model.parallel import unwrap_model, wrap_model


def test_dp_with_one_gpu_warns_and_runs_unwrapped(caplog):
    model = nn.Linear(2, 2)
    with caplog.at_level(logging.WARNING):
        wrapped = wrap_model(model, Parallel.dp, torch.device("cpu"), Devices(True, 1))
    assert wrapped is model
    assert "dist.parallel=dp needs 2+ GPUs, 1 visible" in caplog.text


def test_dp_wraps_every_visible_gpu(monkeypatch):
    seen = {}

    class FakeDataParallel(nn.Module):  # the real one needs CUDA: fake the boundary only
        def __init__(self, module, device_ids):
            super().__init__()
            self.module = module
            seen["device_ids"] = device_ids

    monkeypatch.setattr(parallel.nn, "DataParallel", FakeDataParallel)
    wrapped = wrap_model(nn.Linear(2, 2), Parallel.dp, torch.device("cpu"), Devices(True, 3))
    assert isinstance(wrapped, FakeDataParallel) and seen["device_ids"] == [0, 1, 2]


def test_single_rank_ddp_and_none_run_unwrapped():
    model = nn.Linear(2, 2)
    assert wrap_model(model, Parallel.ddp, torch.device("cpu"), Devices(False, 0)) is model
    assert wrap_model(model, Parallel.none, torch.device("cpu"), Devices(False, 0)) is model


def test_unwrap_strips_dataparallel_and_compile_wrappers():
    inner = nn.Linear(2, 2)
    wrapped = nn.DataParallel(inner)  # without CUDA it just holds the module
    compiled = type("Compiled", (nn.Module,), {})()
    compiled._orig_mod = wrapped
    assert unwrap_model(compiled) is inner
    assert list(unwrap_model(compiled).state_dict()) == ["weight", "bias"]  # no module./_orig_mod. prefix
