"""Memory readers: how much a rank may use, and what one trial step peaked at.

One small interface, two devices:

``CudaReader``  ``torch.cuda.reset_peak_memory_stats`` before a trial and ``max_memory_allocated``
                after it (exact bytes of live tensors, so readings barely vary between runs);
                the room is ``mem_get_info``'s free bytes (other processes already subtracted)
                plus blocks PyTorch has cached but not handed out; NVML (nvidia-ml-py) adds the
                device's total and used memory, all processes included, for the table (the same
                GPU, found by UUID: ``CUDA_VISIBLE_DEVICES`` renumbers GPUs for CUDA, not for NVML;
                see ``ddp.memory.nvml``).
``CpuReader``   host RAM. ``getrusage().ru_maxrss`` cannot be used per trial: it is the process's
                high-water mark since it started and never goes down, so after one large trial
                every later, smaller trial reads the same number. On Linux we reset the kernel's
                own high-water mark instead (``echo 5 > /proc/self/clear_refs`` resets ``VmHWM``
                to the current RSS) and read ``VmHWM`` from ``/proc/self/status`` after the trial:
                the exact peak RSS of that trial, spikes included. Elsewhere (or where
                ``clear_refs`` is not writable) a thread samples psutil's RSS every millisecond,
                which can miss spikes shorter than that. Before each trial ``malloc_trim(0)``
                returns memory the C allocator kept from earlier trials to the OS, so it cannot
                hide this trial's growth; while probing, blocks over 128 KiB are mmapped
                (glibc's ``M_MMAP_THRESHOLD`` fixed, instead of growing as large blocks are freed),
                so a freed tensor leaves RSS at once and the readings are affine in the batch
                (without it they scattered by up to 20% between close batch sizes). ``recover``
                sets the threshold to glibc's 32 MiB maximum for training. The room is psutil's
                available memory divided by the ranks on this host (they share it).

Readings are absolute (bytes the process holds); the probe subtracts its own baseline. Freed
memory that the C allocator keeps can make a later reading too high, never too low, so errors
are on the safe side.

``reset_peak_memory`` / ``peak_memory_mb``: the peak the run reports at its end. The probe's trial
steps go close to the budget on purpose, so the session resets the peak once the batch sizes are
settled (CUDA's peak counters; the kernel's ``VmHWM`` on Linux) and the reported peak is the
training's own. Where ``VmHWM`` cannot be reset or read, ``ru_maxrss`` (the whole process) is used.
"""

from __future__ import annotations

import ctypes
import gc
import platform
import resource
import sys
import threading
from pathlib import Path
from typing import Protocol

import psutil
import torch

from ddp.memory.nvml import memory_usage

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


class MemoryReader(Protocol):
    """What the probe needs from a device. Not collective: each rank reads its own device."""

    device: torch.device

    def room(self) -> int:
        """Bytes this rank may still allocate now."""

    def current(self) -> int:
        """Bytes this process holds on the device now."""

    def start(self) -> None:
        """Reset the peak before a trial."""

    def peak(self) -> int:
        """Highest ``current()`` since ``start()``."""

    def is_oom(self, err: BaseException) -> bool:
        """True when ``err`` is this device running out of memory."""

    def recover(self) -> None:
        """After an out-of-memory error: give cached memory back so the next trial starts clean."""

    def describe(self) -> str:
        """The device model, for the cache key and the table."""


class CudaReader:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def room(self) -> int:
        free, _total = torch.cuda.mem_get_info(self.device)
        cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return int(free + max(cached, 0))

    def current(self) -> int:
        return int(torch.cuda.memory_allocated(self.device))

    def start(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return int(torch.cuda.max_memory_allocated(self.device))

    def is_oom(self, err: BaseException) -> bool:
        oom = getattr(torch.cuda, "OutOfMemoryError", ())
        return (bool(oom) and isinstance(err, oom)) or "CUDA out of memory" in str(err)

    def recover(self) -> None:
        gc.collect()
        torch.cuda.empty_cache()

    def describe(self) -> str:
        name = torch.cuda.get_device_name(self.device)
        usage = memory_usage(self._index())
        return f"{name} ({usage[1] / 2**30:.0f} GiB)" if usage else name

    def usage_line(self) -> str:
        """Total and used memory of the device, every process included (NVML), or ''."""
        usage = memory_usage(self._index())
        if usage is None:
            return ""
        used, total = usage
        return f"{self.describe()}: {used / 2**20:,.0f} of {total / 2**20:,.0f} MiB used by all processes"

    def _index(self) -> int:
        """This device's CUDA index (NVML is asked for the same GPU, ``ddp.memory.nvml``)."""
        return self.device.index if self.device.index is not None else torch.cuda.current_device()


class CpuReader:
    warm_up = True  # the first backward grows RSS once (thread pools, kernel caches): run it uncounted

    def __init__(self, ranks_on_host: int = 1) -> None:
        self.device = torch.device("cpu")
        self.ranks_on_host = max(1, ranks_on_host)
        self._process = psutil.Process()
        self._sampler: _RssSampler | None = None
        self.exact_peak = _hwm_resettable()

    def room(self) -> int:
        return int(psutil.virtual_memory().available // self.ranks_on_host)

    def current(self) -> int:
        return int(self._process.memory_info().rss)

    def start(self) -> None:
        gc.collect()
        _mmap_threshold(PROBE_MMAP_THRESHOLD)
        _malloc_trim()
        if self.exact_peak:
            _CLEAR_REFS.write_text("5")
        else:
            self._sampler = _RssSampler(self._process)

    def peak(self) -> int:
        if self.exact_peak:
            return _read_hwm()
        sampler, self._sampler = self._sampler, None
        return sampler.stop() if sampler else self.current()

    def is_oom(self, err: BaseException) -> bool:
        text = str(err)
        return isinstance(err, MemoryError) or "DefaultCPUAllocator: can't allocate memory" in text or \
            "not enough memory" in text

    def recover(self) -> None:
        gc.collect()
        _mmap_threshold(TRAIN_MMAP_THRESHOLD)
        _malloc_trim()

    def describe(self) -> str:
        total = psutil.virtual_memory().total
        return f"cpu {platform.machine()} ({total / 2**30:.0f} GiB RAM)"

    def usage_line(self) -> str:
        memory = psutil.virtual_memory()
        return (f"host RAM: {memory.available / 2**20:,.0f} of {memory.total / 2**20:,.0f} MiB available, "
                f"shared by {self.ranks_on_host} rank(s) here")


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
PROBE_MMAP_THRESHOLD = 128 * 1024  # glibc's initial value: large blocks mmapped, returned when freed
TRAIN_MMAP_THRESHOLD = 32 * 2**20  # glibc's dynamic maximum on 64-bit: large blocks reused from the heap


def _mmap_threshold(size: int) -> None:
    """Fix glibc's mmap threshold (a no-op without glibc)."""
    try:
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, size)
    except (AttributeError, OSError):
        pass


def _malloc_trim() -> None:
    """Hand freed heap memory back to the OS (glibc), so memory a previous trial freed but the C
    allocator kept does not hide this trial's growth in RSS. A no-op without glibc."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass


def _hwm_resettable() -> bool:
    """True where the kernel lets this process reset and read its peak RSS (Linux ≥ 4.0)."""
    try:
        _CLEAR_REFS.write_text("5")
        return _read_hwm() > 0
    except (OSError, ValueError):
        return False


def _read_hwm() -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    raise ValueError("no VmHWM in /proc/self/status")


class _RssSampler:
    """Samples RSS every millisecond on a thread until ``stop()``; returns the highest value."""

    def __init__(self, process: psutil.Process, interval_s: float = 0.001) -> None:
        self._process, self._interval = process, interval_s
        self._peak = process.memory_info().rss
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(self._interval):
            self._peak = max(self._peak, self._process.memory_info().rss)

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return max(self._peak, self._process.memory_info().rss)


def reset_peak_memory(device: torch.device) -> None:
    """Start this process's peak memory on ``device`` afresh (not collective). The session calls it
    once the batch sizes are settled, so ``peak_memory_mb`` leaves out the probe's trial steps."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        _CLEAR_REFS.write_text("5")  # VmHWM := the current RSS
    except OSError:
        pass  # not Linux, or not writable here: the peak stays the whole process's


def peak_memory_mb(device: torch.device) -> float:
    """This process's peak memory on ``device`` in MB since ``reset_peak_memory``: CUDA's peak
    allocation, or the peak resident memory (``VmHWM``; ``ru_maxrss`` where there is no /proc)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        return _read_hwm() / 2**20
    except (OSError, ValueError):
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024  # bytes on macOS, KiB elsewhere


def reader_for(device: torch.device, ranks_on_host: int = 1) -> MemoryReader:
    """The reader for ``device`` (CUDA or host RAM)."""
    return CudaReader(device) if device.type == "cuda" else CpuReader(ranks_on_host)
