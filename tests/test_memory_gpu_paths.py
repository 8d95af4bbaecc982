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
