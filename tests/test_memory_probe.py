"""Memory probes on one process: readers (CPU for real, CUDA through fakes), the estimate, state
restoration, the probe table on a real model, the cache, bad budgets and the session path."""

from __future__ import annotations

import json
import random
import sys
import time
import types

import numpy as np
import pytest
import torch
from torch import nn

from ddp.config import load_recipe
from ddp.cluster.environment import SingleProcessEnv
from ddp.errors import MemoryBudgetError
from ddp.memory import cache
from ddp.memory.estimate import estimate_state, optimizer_copies
from ddp.memory.trials import probe_model, restored
from ddp.memory.readers import CpuReader, CudaReader
from ddp.model.zoo import digits_cnn
from ddp.runner import execute
from tests.harness import run_cli

MB = 2**20


def test_estimate_counts_each_part():
    model = nn.Linear(1000, 1000)  # 1,001,000 parameters
    n = 1_001_000
    sgd = estimate_state(model, "sgd", 0.9)
    assert (sgd.parameters, sgd.gradients, sgd.optimizer, sgd.master, sgd.ddp_buckets) == (4 * n, 4 * n, 4 * n, 0, 0)
    assert estimate_state(model, "sgd", 0.0).optimizer == 0
    adam = estimate_state(model, "adamw", ddp_ranks=4)
    assert adam.optimizer == 8 * n and adam.ddp_buckets == 4 * n and adam.state == 20 * n
    views = estimate_state(model, "adamw", ddp_ranks=4, bucket_views=True)  # dist.gradient_as_bucket_view
    assert views.ddp_buckets == 0 and views.state == 16 * n
    half = estimate_state(model, "adam", dtype=torch.float16)  # AMP-style: fp32 master and fp32 moments
    assert (half.parameters, half.gradients, half.optimizer, half.master) == (2 * n, 2 * n, 8 * n, 4 * n)
    assert optimizer_copies("adam") == 2


@pytest.mark.parametrize("exact", [True, False], ids=["VmHWM", "sampler"])
def test_cpu_reader_peak_is_per_trial_not_since_process_start(exact):
    """A trial's peak counts the memory it touched, even freed again before the reading; the next,
    smaller trial reads its own, smaller peak (ru_maxrss would still report the first)."""
    reader = CpuReader()
    if not exact:
        reader.exact_peak = False  # the psutil sampler used where /proc/self/clear_refs is not writable
    elif not reader.exact_peak:
        pytest.skip("the kernel's VmHWM cannot be reset here")
    try:
        reader.start()
        base = reader.current()
        big = torch.ones(64 * MB // 4)  # 64 MB of pages really touched
        if not exact:
            time.sleep(0.5)  # the sampler polls every millisecond: give it a chance to see the spike
        del big  # gone again before the reading: only a real peak still shows it
        left = reader.current() - base
        first = reader.peak() - base
        reader.start()
        base = reader.current()
        small = torch.ones(8 * MB // 4)
        if not exact:
            time.sleep(0.5)
        del small
        second = reader.peak() - base
    finally:
        reader.recover()
    assert left < 16 * MB  # the freed 64 MB left the process: only a true peak can still count them
    assert 60 * MB <= first < 100 * MB
    assert 6 * MB <= second < 16 * MB

class FakeNvml(types.SimpleNamespace):
    pass


def test_cuda_reader_through_fakes(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (6 * 2**30, 16 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 5 * 2**30)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-40GB")
    info = types.SimpleNamespace(used=30 * 2**30, total=40 * 2**30)
    nvml = FakeNvml(nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlDeviceGetHandleByIndex=lambda i: i,
                    nvmlDeviceGetMemoryInfo=lambda handle: info)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # CUDA index 0 is NVML index 0
    reader = CudaReader(torch.device("cuda", 0))
    assert reader.room() == 7 * 2**30  # free + cached by us but unallocated
    reader.start()
    assert calls == ["reset"] and reader.peak() == 5 * 2**30 and reader.current() == 2 * 2**30
    assert reader.is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not reader.is_oom(RuntimeError("shape mismatch"))
    reader.recover()
    assert calls[-1] == "empty_cache"
    assert reader.describe() == "NVIDIA A100-SXM4-40GB (40 GiB)"
    assert "30,720 of 40,960 MiB used by all processes" in reader.usage_line()


class DropoutBnNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(torch.relu(self.bn(self.conv(x)))).flatten(1))


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return {
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()},
        "optim": json.dumps({k: v for k, v in optimizer.state_dict().items() if k != "state"}),
        "buffers": {i: {k: v.clone() for k, v in s.items()} for i, s in optimizer.state_dict()["state"].items()},
        "rng": (torch.get_rng_state().clone(), np.random.get_state()[1].copy(), random.getstate()),
        "training": model.training,
    }


def test_probe_leaves_model_optimizer_and_rng_exactly_as_before():
    torch.manual_seed(3)
    model = DropoutBnNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss = model(torch.randn(4, 1, 8, 8)).sum()  # some training already happened: momentum, grads, BN stats
    loss.backward()
    optimizer.step()
    before = _snapshot(model, optimizer)
    estimate = estimate_state(model, "sgd", 0.9)
    results = probe_model(model, optimizer, (1, 8, 8), 10, CpuReader(), estimate.state + 200 * MB,
                          {"train": 512, "eval": 512}, estimate)
    assert results["train"].search.trials  # trial steps did run
    after = _snapshot(model, optimizer)
    for key in ("weights", "grads"):
        assert before[key].keys() == after[key].keys()
        for name, tensor in before[key].items():
            assert torch.equal(tensor, after[key][name]), name
    assert before["optim"] == after["optim"]
    for index, state in before["buffers"].items():
        assert all(torch.equal(v, after["buffers"][index][k]) for k, v in state.items())
    assert torch.equal(before["rng"][0], after["rng"][0]) and (before["rng"][1] == after["rng"][1]).all()
    assert before["rng"][2] == after["rng"][2] and after["training"]


def test_restored_also_on_error():
    model = DropoutBnNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError):
        with restored(model, optimizer):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
            raise RuntimeError("trial failed")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())


def test_cpu_probe_of_a_real_model_gives_a_sane_monotone_table():
    torch.manual_seed(0)
    model = digits_cnn((1, 8, 8), 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    estimate = estimate_state(model, "sgd", 0.9)
    budget = 160 * MB
    results = probe_model(model, optimizer, (1, 8, 8), 10, CpuReader(), budget, {"train": 100_000}, estimate)
    train = results["train"]
    rows = [r for r in train.table() if r["peak_mb"] is not None]
    fits = sorted((r["batch"], r["peak_mb"]) for r in rows if r["result"] == "fits")
    assert [b for b, _ in fits] == sorted({b for b, _ in fits})
    assert all(later[1] > earlier[1] for earlier, later in zip(fits, fits[1:]))  # more samples, more memory
    assert all(r["peak_mb"] <= budget / MB for r in rows if r["result"] == "fits")
    assert train.pick == fits[-1][0] and 100 < train.pick < 100_000
    assert 0.01 < estimate.per_sample / MB < 1.0  # digits_cnn: about 0.08 MB of activations per sample
    assert len(train.search.trials) <= 8


class CountingReader(CpuReader):
    def __init__(self) -> None:
        super().__init__()
        self.trials = 0

    def start(self) -> None:
        self.trials += 1
        super().start()


def test_budget_below_the_model_state_refuses_before_any_trial():
    model = digits_cnn((1, 8, 8), 10)
    reader = CountingReader()
    estimate = estimate_state(model, "sgd", 0.9)
    with pytest.raises(MemoryBudgetError) as info:
        probe_model(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), (1, 8, 8), 10, reader,
                    1 * MB, {"train": 100}, estimate)
    assert reader.trials == 0
    message = str(info.value)
    assert "needs 1.7 MB before any activation" in message and "parameters 0.6 + gradients 0.6 + optimizer 0.6" in message
    assert "budget of 1.0 MB" in message and "HINT: raise memory.budget_mb" in message and "\n" not in message


def test_budget_below_batch_1_names_the_activations():
    model = digits_cnn((1, 8, 8), 10)
    estimate = estimate_state(model, "sgd", 0.9)
    from bench.simulated_memory import SimulatedDevice

    device = SimulatedDevice(cap=10, per_sample=50 * MB, noise=0.0)
    device.attach(model)
    with pytest.raises(MemoryBudgetError) as info:
        probe_model(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), (1, 8, 8), 10, device,
                    estimate.state + 20 * MB, {"train": 100}, estimate)
    activations = (device.fixed + device.per_sample) / MB  # 60.2 MB
    total = activations + estimate.state / MB
    assert f"needs {total:,.1f} MB at batch 1" in str(info.value)
    assert f"optimizer 0.6 + activations {activations:,.1f} MB)" in str(info.value)
    assert device.forwards == 1


def test_cache_reuses_only_while_the_budget_matches(tmp_path):
    path = tmp_path / "runs" / ".probe_cache.json"
    key = cache.cache_key("cpu", "digits_cnn", "Sequential(...)", (1, 8, 8), "float32", "sgd+momentum", 2)
    assert cache.lookup(path, key, ["train"], 1000.0) is None
    cache.store(path, key, {"train": {"pick": 300, "need_mb": 800.0, "budget_mb": 1000.0}})
    assert cache.lookup(path, key, ["train"], 1000.0) == {"train": 300}
    assert cache.lookup(path, key, ["train"], 1080.0) == {"train": 300}
    assert cache.lookup(path, key, ["train"], 700.0) is None  # the pick would not fit any more
    assert cache.lookup(path, key, ["train"], 2000.0) is None  # much more room: probe again
    assert cache.lookup(path, key, ["train", "eval"], 1000.0) is None
    other = cache.cache_key("cpu", "digits_cnn", "Sequential(...)", (1, 8, 8), "float32", "adam", 2)
    assert cache.lookup(path, other, ["train"], 1000.0) is None



def test_a_bad_cache_entry_costs_a_probe_not_the_run(tmp_path):
    path = tmp_path / ".probe_cache.json"
    key = cache.cache_key("cpu", "digits_cnn", "Sequential(...)", (1, 8, 8), "float32", "sgd+momentum", 2)
    path.write_text(json.dumps({key: {"train": 300}}))  # edited by hand: no need_mb, no budget_mb
    assert cache.lookup(path, key, ["train"], 1000.0) is None
    path.write_text(json.dumps({key: [1, 2]}))
    cache.store(path, key, {"train": {"pick": 300, "need_mb": 800.0, "budget_mb": 1000.0}})
    assert cache.lookup(path, key, ["train"], 1000.0) == {"train": 300}

def _train(tmp_path, overrides):
    recipe = load_recipe(None, ["log.tensorboard=false", f"run.dir={tmp_path / 'run'}",
                                f"memory.cache={tmp_path / 'cache.json'}", *overrides])
    return execute(recipe, SingleProcessEnv())


def test_auto_trains_exactly_like_the_size_it_picked(tmp_path, monkeypatch):
    """No probe step leaks into training: the same weights as passing the picked size by hand."""
    monkeypatch.chdir(tmp_path)
    auto = _train(tmp_path / "a", ["data.batch_size=auto", "memory.budget_mb=40", "train.max_steps=6",
                                   "train.epochs=1"])
    picked = json.loads((auto.run_dir / "memory_probe.json").read_text())["agreed"]["batch_size"]
    recorded = load_recipe(auto.run_dir / "recipe.yaml")
    assert recorded.data.batch_size == picked and isinstance(picked, int) and 1 < picked <= 1438
    fixed = _train(tmp_path / "b", [f"data.batch_size={picked}", "train.max_steps=6", "train.epochs=1"])
    for name, tensor in auto.state_dict.items():
        assert torch.equal(tensor, fixed.state_dict[name]), name


def test_rerun_uses_the_cache_and_resume_keeps_the_checkpoint_size(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = _train(tmp_path, ["data.batch_size=auto", "data.eval_batch_size=auto", "memory.budget_mb=40",
                            "train.epochs=1"])
    first = json.loads((run.run_dir / "memory_probe.json").read_text())
    assert first["source"] == "probe" and (tmp_path / "cache.json").is_file()
    size = first["agreed"]["batch_size"]
    # resume (train.epochs=2) with a budget that would give another size: the checkpoint's size wins
    resumed = _train(tmp_path, ["data.batch_size=auto", "data.eval_batch_size=auto", "memory.budget_mb=400",
                                "train.epochs=2"])
    assert resumed.run_dir == run.run_dir
    second = json.loads((run.run_dir / "memory_probe.json").read_text())
    assert second["source"] == "checkpoint" and second["agreed"]["batch_size"] == size
    # a fresh run with the first budget: the cache answers, no trial step
    fresh = _train(tmp_path, ["data.batch_size=auto", "data.eval_batch_size=auto", "memory.budget_mb=40",
                              "train.epochs=1", "train.resume=never"])
    third = json.loads((fresh.run_dir / "memory_probe.json").read_text())
    assert third["source"] == "cache" and third["agreed"]["batch_size"] == size


@pytest.mark.parametrize("args, expected", [
    (["data.batch_size=big"], "data.batch_size='big' is invalid: it must be an integer ≥ 1 or auto"),
    (["data.eval_batch_size=0.5"], "data.eval_batch_size=0.5 is invalid: it must be an integer ≥ 1 or auto"),
])
def test_non_integer_batch_size_is_one_line_exit_2(tmp_path, args, expected):
    done = run_cli(["-m", "ddp.train", *args], cwd=tmp_path, timeout=60)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert expected in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()


def test_probe_cli_prints_estimate_and_tables_and_writes_nothing(tmp_path):
    done = run_cli(["-m", "ddp.probe", "--ranks", "2", "memory.budget_mb=60", "dist.gradient_as_bucket_view=false"],
                   cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "budget 60.0 MB per rank" in out and "parameters 0.6 MB, gradients 0.6 MB, optimizer 0.6 MB" in out
    assert "DDP buckets 0.6 MB" in out and "MB/sample" in out  # the gradients' own copy, bucket views off
    assert "train:" in out and "eval:" in out and out.count("← pick") == 2
    assert list(tmp_path.iterdir()) == []


def test_probe_cli_budget_too_small_is_one_line_exit_2(tmp_path):
    done = run_cli(["-m", "ddp.probe", "memory.budget_mb=1"], cwd=tmp_path, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [done.stderr.strip()]
    # digits on the CPU take the in-memory path (data.loader=auto): the 0.5 MB of data count too
    assert done.stderr.startswith("error: data.batch_size=auto: the model needs 2.2 MB before any activation")
    assert "+ data on device 0.5 MB)" in done.stderr
    assert "HINT:" in done.stderr and "Traceback" not in done.stderr


def test_batchnorm_models_start_at_batch_2():
    from ddp.memory.trials import smallest_batch

    assert smallest_batch(DropoutBnNet()) == 2 and smallest_batch(digits_cnn((1, 8, 8), 10)) == 1


def test_train_refuses_a_budget_below_the_model_state_before_any_file(tmp_path):
    done = run_cli(["-m", "ddp.train", "data.batch_size=auto", "memory.budget_mb=1"], cwd=tmp_path, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith("error: data.batch_size=auto: the model needs 2.2 MB before any activation per rank "
                                  "(parameters 0.6 + gradients 0.6 + optimizer 0.6 + data on device 0.5 MB), more "
                                  "than the memory budget of 1.0 MB. HINT:")
    assert not (tmp_path / "runs").exists()


class FixedRoomReader(CpuReader):
    """Host RAM as it is, except that the free memory reads ``room`` bytes."""

    def __init__(self, room: int) -> None:
        super().__init__()
        self._room = room

    def room(self) -> int:
        return self._room


@pytest.mark.parametrize("fraction", [None, 0.5], ids=["default", "0.5"])
def test_without_budget_mb_the_budget_is_memory_fraction_of_free_memory_plus_what_the_rank_holds(fraction):
    """memory.budget_mb unset: the budget is memory.fraction (0.9 by default) × (free memory +
    the model's parameters + the data the in-memory loader already holds), and the pick fits it."""
    from ddp.data.datasets import build_datasets
    from ddp.memory.resolve import probe_recipe

    recipe = load_recipe(None, ["data.batch_size=auto", *([f"memory.fraction={fraction}"] if fraction else [])])
    assert recipe.memory.budget_mb == 0
    share = fraction or 0.9
    splits = build_datasets(recipe.data)
    parameters = sum(p.numel() * 4 for p in digits_cnn(splits.shape, splits.classes).parameters())
    data = splits.tensor_bytes + (len(splits.train) + len(splits.test)) * 8  # float32 images, int64 labels
    room = int(round(16 * MB / share)) - parameters - data  # a budget of 16 MB either way
    probe = probe_recipe(recipe, splits, torch.device("cpu"), 1, ["train"], FixedRoomReader(room))
    assert probe.budget == pytest.approx(share * (room + parameters + data), abs=1)
    assert probe.to_json()["budget_mb"] == pytest.approx(16.0, abs=0.01)
    train = probe.results["train"]
    assert 1 < train.pick < len(splits.train)  # the budget, not the data, bounds it
    picked = next(t for t in train.search.trials if t.batch == train.pick)
    assert picked.fits and train.search.budget <= probe.budget
