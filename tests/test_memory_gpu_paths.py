"""The memory probe's GPU paths, shown on the CPU: the data kept on the device, NVML under a
CUDA_VISIBLE_DEVICES remap (a fake pynvml at the driver boundary), the end-of-run peak without the
probe's trials, and a model given to ``ddp.fit`` as an instance."""

from __future__ import annotations

import psutil
import pytest
import torch

from ddp import runner
from ddp.config import load_recipe
from ddp.cluster.environment import SingleProcessEnv

MB = 2**20


# ---------------------------------------------------------------- the end-of-run peak (item 9b)

def _tiny_run(run_dir) -> None:
    recipe = load_recipe(None, ["train.max_steps=2", "train.epochs=1", f"run.dir={run_dir}", "log.tensorboard=false",
                                "log.progress=false"])
    runner.execute(recipe, SingleProcessEnv())


def test_the_run_peak_leaves_out_memory_used_before_training(tmp_path):
    """A 300 MB tensor freed before training stands in for the probe's near-budget trial steps:
    the peak the run reports afterwards is the training's own, well below it."""
    _tiny_run(tmp_path / "warm")  # a first run in a process grows RSS for good (imports, thread pools)
    spike = torch.ones(300 * MB // 4)
    with_spike = psutil.Process().memory_info().rss / MB
    del spike
    _tiny_run(tmp_path / "run")
    peak = runner.peak_memory_mb(torch.device("cpu"))
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
    assert runner.peak_memory_mb(gpu) == 1000
    reset_peak_memory(gpu)
    fake.allocate(50 * MB)
    assert runner.peak_memory_mb(gpu) == 150
    assert set(fake.devices) == {gpu}


# ---------------------------------------------------------------- NVML under CUDA_VISIBLE_DEVICES (item 9a)

GiB = 2**30
UUIDS = ["GPU-0a0a0a0a-0000-0000-0000-000000000000", "GPU-1b1b1b1b-1111-1111-1111-111111111111",
         "GPU-2c2c2c2c-2222-2222-2222-222222222222", "GPU-3d3d3d3d-3333-3333-3333-333333333333"]


class FakeNvml:
    """The NVML driver of a machine with four GPUs, in NVML's own numbering; GPU n has n+1 GiB in
    use. Records every index and UUID it is asked for."""

    NVMLError = RuntimeError

    def __init__(self, uuids=tuple(UUIDS)) -> None:
        self.uuids = list(uuids)
        self.asked: list[tuple[str, object]] = []

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(self.uuids)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self.asked.append(("index", index))
        if not 0 <= index < len(self.uuids):
            raise self.NVMLError("Invalid Argument")
        return index

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> int:
        self.asked.append(("uuid", uuid))
        if uuid not in self.uuids:
            raise self.NVMLError("Not Found")
        return self.uuids.index(uuid)

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return self.uuids[handle]

    def nvmlDeviceGetMemoryInfo(self, handle: int):
        import types

        return types.SimpleNamespace(used=(handle + 1) * GiB, total=80 * GiB)

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list:
        return []


@pytest.fixture
def nvml(monkeypatch):
    """The fake driver as ``pynvml``; torch's CUDA side (the other end of the boundary) says the
    device name, and, unless a test says otherwise, cannot report UUIDs (no GPU here)."""
    import sys

    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")

    def no_properties(device=None):
        raise RuntimeError("No CUDA GPUs are available")

    monkeypatch.setattr(torch.cuda, "get_device_properties", no_properties)
    return fake


def _used_gib(index: int) -> str:
    from ddp.memory.readers import CudaReader

    return CudaReader(torch.device("cuda", index)).usage_line()


def test_nvml_reads_the_gpu_that_cuda_visible_devices_maps_an_index_to(nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert "4,096 of 81,920 MiB used" in _used_gib(0)  # cuda:0 is NVML's GPU 3, not GPU 0
    assert "2,048 of 81,920 MiB used" in _used_gib(1)
    assert ("index", 0) not in nvml.asked and ("index", 3) in nvml.asked
    assert _used_gib(2) == ""  # only two GPUs are visible: nothing to say, no wrong GPU


@pytest.mark.parametrize("visible, expected", [
    (f"{UUIDS[2]},{UUIDS[0]}", ("uuid", UUIDS[2])),
    ("GPU-2c2c2c2c,GPU-0a0a", ("uuid", "GPU-2c2c2c2c")),  # CUDA accepts a unique prefix
])
def test_nvml_finds_a_uuid_entry_of_cuda_visible_devices_by_uuid(nvml, monkeypatch, visible, expected):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert "3,072 of 81,920 MiB used" in _used_gib(0) and "1,024 of 81,920 MiB used" in _used_gib(1)
    assert nvml.asked[0] == expected


def test_nvml_prefers_the_uuid_torch_reports(nvml, monkeypatch):
    import types

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # contradicted by the device itself: the UUID wins
    bare = UUIDS[3].removeprefix("GPU-")  # torch prints the UUID without NVML's prefix
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: types.SimpleNamespace(uuid=bare))
    assert "4,096 of 81,920 MiB used" in _used_gib(0)
    assert set(nvml.asked) == {("uuid", UUIDS[3])}


def test_nvml_mig_and_hidden_entries(nvml, monkeypatch):
    nvml.uuids.append("MIG-9e9e9e9e-9999-9999-9999-999999999999")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-9e9e9e9e-9999-9999-9999-999999999999")
    assert "5,120 of 81,920 MiB used" in _used_gib(0)
    for hidden in ("", "-1", "-1,0"):  # CUDA ignores everything from the first invalid entry
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert _used_gib(0) == ""


def test_doctor_says_which_cuda_index_each_gpu_has_here(nvml, monkeypatch):
    from launch import doctor

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    found = doctor.gpus()
    assert [(g["index"], g["cuda_index"], g["memory_used_mib"]) for g in found] == \
        [(0, None, 1024), (1, 1, 2048), (2, None, 3072), (3, 0, 4096)]


# ---------------------------------------------------------------- the data kept on the device (item 8)

def _auto(*overrides: str):
    return load_recipe(None, ["data.batch_size=auto", *overrides])


def _digits():
    from ddp.config import DataConfig
    from ddp.data.datasets import load_digits

    return load_digits(DataConfig())


def test_check_budget_counts_the_dataset_the_memory_loader_keeps_on_the_device():
    """digits_cnn's state (1.7 MB) fits 2 MB; with the 0.45 MB of digits kept there it does not."""
    from ddp.errors import MemoryBudgetError
    from ddp.memory.resolve import check_budget

    digits, cpu = _digits(), torch.device("cpu")
    check_budget(_auto("memory.budget_mb=2", "data.loader=dataloader"), SingleProcessEnv(), digits, cpu)
    with pytest.raises(MemoryBudgetError) as info:
        check_budget(_auto("memory.budget_mb=2", "data.loader=memory"), SingleProcessEnv(), digits, cpu)
    assert "the model needs 2.2 MB before any activation per rank (parameters 0.6 + gradients 0.6 + optimizer 0.6 " \
           "+ data on device 0.5 MB), more than the memory budget of 2.0 MB" in str(info.value)


@pytest.fixture
def gpu_with_free(monkeypatch):
    """A CUDA device with ``free`` bytes free and nothing allocated by us (torch.cuda's answers)."""
    free = {"bytes": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    return free


def test_on_a_gpu_auto_loader_data_counts_only_where_the_memory_path_is_taken(gpu_with_free):
    """2.2 MB free: 90% of it holds the model state (1.7 MB), not state + data (2.2 MB). The auto
    loader takes the in-memory path there (the data fits half the free memory): refused."""
    from ddp.errors import MemoryBudgetError
    from ddp.memory.resolve import check_budget

    digits, gpu = _digits(), torch.device("cuda", 0)
    gpu_with_free["bytes"] = int(2.2 * MB)
    check_budget(_auto("data.loader=dataloader"), SingleProcessEnv(), digits, gpu)
    with pytest.raises(MemoryBudgetError, match="data on device 0.5 MB"):
        check_budget(_auto("data.loader=auto"), SingleProcessEnv(), digits, gpu)


def test_on_a_gpu_the_check_before_the_group_does_not_count_the_host_models_parameters_as_free(gpu_with_free):
    """Before the group forms the model is still in host memory, so the GPU's free memory is all it
    has: 1.85 MB free, 90% of it (1.67 MB) cannot hold the 1.7 MB of state. Counting the parameters
    (0.6 MB) as already there, as they are once the probe's copy is placed, would let it through."""
    from ddp.errors import MemoryBudgetError
    from ddp.memory.resolve import check_budget

    digits, gpu = _digits(), torch.device("cuda", 0)
    gpu_with_free["bytes"] = int(1.85 * MB)
    with pytest.raises(MemoryBudgetError, match="more than the memory budget of 1.7 MB"):
        check_budget(_auto("data.loader=dataloader"), SingleProcessEnv(), digits, gpu)
    gpu_with_free["bytes"] = int(1.95 * MB)  # 1.76 MB of budget: fits
    check_budget(_auto("data.loader=dataloader"), SingleProcessEnv(), digits, gpu)


def _mnist_like(train: int = 4000, test: int = 1000):
    """MNIST's layout: uint8 images that ``materialise`` turns into new float32 tensors (15.0
    MB here), so the in-memory path adds them to what each rank holds."""
    from torch.utils.data import TensorDataset

    from ddp.data.datasets import Splits, Tensors

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (train + test, 1, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (train + test,), generator=generator)
    splits = TensorDataset(images[:train], labels[:train]), TensorDataset(images[train:], labels[train:])

    def materialise() -> Tensors:
        return Tensors(*(t.float() / 255 if t.dtype == torch.uint8 else t for d in splits for t in d.tensors))

    return Splits(*splits, (1, 28, 28), 10, in_memory=False, materialise=materialise)


def test_on_the_cpu_each_rank_on_a_host_counts_its_own_copy_of_the_data(monkeypatch):
    """30 MB of RAM available: one rank's budget holds mnist_mlp and the 15.0 MB of data; with two
    ranks on the host each gets 15 MB, and its own copy of the data no longer fits beside the model."""
    import types

    from ddp.cluster.environment import ClusterEnv
    from ddp.errors import MemoryBudgetError
    from ddp.memory.resolve import check_budget

    from ddp.data.device_data import device_bytes

    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=30 * MB, total=64 * 2**30))
    recipe, data, cpu = _auto("model.name=mnist_mlp", "data.loader=memory"), _mnist_like(), torch.device("cpu")
    materialised = [t for t in vars(data.materialise()).values() if isinstance(t, torch.Tensor)]
    assert device_bytes(data) == sum(t.nbytes for t in materialised)  # what the loader will put on the device
    check_budget(recipe, ClusterEnv(), data, cpu)
    with pytest.raises(MemoryBudgetError, match=r"data on device 15\.0 MB"):
        check_budget(recipe, ClusterEnv(world_size=2, local_world_size=2), data, cpu)


def test_the_probe_table_says_how_much_data_is_on_the_device():
    from ddp.memory.resolve import probe_recipe, table_lines

    recipe = _auto("memory.budget_mb=40", "data.loader=memory")
    probe = probe_recipe(recipe, _digits(), torch.device("cpu"), 1, ["train"])
    report = probe.to_json()
    assert report["estimate_mb"]["data_on_device"] == pytest.approx(474_408 / MB, abs=1e-4)  # 1,797 × (8×8×4 + 8)
    state = report["probes"]["train"]["state_mb"]
    assert state == pytest.approx(probe.estimate.state / MB, abs=0.01)
    assert all(row["peak_mb"] <= 40 for row in report["probes"]["train"]["table"] if row["result"] == "fits")
    assert ", data on device 0.5 MB" in table_lines({"source": "probe", **report})[1]


# ---------------------------------------------------------------- a model given as an instance (item 10)

class Wide(torch.nn.Module):
    """An MLP for 8×8 digits whose defaults build a much larger model than the instances below."""

    def __init__(self, width: int = 2048) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, width), torch.nn.ReLU(),
                                        torch.nn.Linear(width, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class NeedsWidth(Wide):
    def __init__(self, width: int) -> None:  # no default: the class alone cannot be built
        super().__init__(width)


def _fit_auto(tmp_path, model):
    import ddp

    return ddp.fit(None, model=model, data__batch_size="auto", memory__budget_mb=40,
                   memory__cache=str(tmp_path / "cache.json"), run__dir=str(tmp_path / "run"), train__epochs=1,
                   train__max_steps=3, log__tensorboard=False, log__progress=False)


def _sized(run_dir) -> tuple[float, str]:
    """(parameters MB, architecture digest) of the model the probe sized, from memory_probe.json."""
    import json

    rank0 = json.loads((run_dir / "memory_probe.json").read_text())["ranks"][0]
    return rank0["estimate_mb"]["parameters"], json.loads(rank0["cache_key"])["model"].split("@")[1]


def _expected(model) -> tuple[float, str]:
    import hashlib

    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return round(size / MB, 4), hashlib.sha1(str(model).encode()).hexdigest()[:12]


@pytest.mark.parametrize("model", [Wide(width=6), NeedsWidth(width=6)], ids=["defaults", "required-argument"])
def test_fit_with_auto_sizes_the_model_instance_it_was_given(tmp_path, monkeypatch, model):
    """Not ``Wide()`` (153,610 parameters) rebuilt from the class path: the given 460-parameter model."""
    monkeypatch.chdir(tmp_path)
    result = _fit_auto(tmp_path, model)
    assert result.exit_code == 0
    assert _sized(result.run_dir) == _expected(model)
    assert all(torch.equal(v, result.state_dict[k]) for k, v in model.state_dict().items())  # it trained the instance


def test_check_budget_estimates_the_model_it_is_given():
    """Where the session passes its model, the check before the group is exact too: the 5 kB of
    state of Wide(6) fit 1 MB; the 1.8 MB of Wide()'s default build would not."""
    from ddp.errors import MemoryBudgetError
    from ddp.memory.resolve import check_budget

    recipe = _auto("memory.budget_mb=1", "data.loader=dataloader", f"model.name={__name__}:Wide")
    check_budget(recipe, SingleProcessEnv(), _digits(), torch.device("cpu"), model=Wide(6))
    with pytest.raises(MemoryBudgetError):
        check_budget(recipe, SingleProcessEnv(), _digits(), torch.device("cpu"))
