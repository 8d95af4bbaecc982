"""NVML (nvidia-ml-py) for the GPU that a CUDA index means in this process.

CUDA numbers the GPUs this process may see 0, 1, ... in the order of ``CUDA_VISIBLE_DEVICES``;
NVML numbers every GPU of the machine and ignores that variable. With
``CUDA_VISIBLE_DEVICES=3,1``, ``cuda:0`` is the GPU NVML calls 3, so reading NVML at index 0 would
describe another GPU (possibly another job's). ``cuda_handle`` finds the right one:

1. by UUID, which both sides share: torch's ``get_device_properties(i).uuid`` (NVML writes it
   ``GPU-<uuid>``, or ``MIG-<uuid>`` for a MIG instance);
2. where torch cannot say (no CUDA in this torch, no device yet), through entry i of
   ``CUDA_VISIBLE_DEVICES``: a number is an NVML index (exact when CUDA_DEVICE_ORDER=PCI_BUS_ID or
   the GPUs are identical: CUDA's default order is fastest first), a ``GPU-``/``MIG-`` entry a UUID
   or, as CUDA accepts, a unique prefix of one; entries after the first invalid one are ignored, as
   CUDA does;
3. with the variable unset, CUDA index i is NVML index i.

Nothing here is collective; every failure (no driver, an unknown UUID) gives None, never an error:
NVML only adds the device's total and used memory to the probe table and to ``launch doctor``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ddp.cluster.environment import cuda_visible_devices

Nvml = Any  # the pynvml module, initialised
Handle = Any  # an NVML device handle


@contextmanager
def nvml_session() -> Iterator[Nvml | None]:
    """pynvml, initialised for the block and shut down after it; None without a driver or library."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver or library: nothing to add
        yield None
        return
    try:
        yield pynvml
    finally:
        pynvml.nvmlShutdown()


def cuda_handle(nvml: Nvml, index: int) -> Handle | None:
    """NVML's handle for ``cuda:index`` of this process (see the module's order), or None."""
    uuid = _torch_uuid(index)
    if uuid is not None:
        found = _by_uuid(nvml, uuid)
        if found is not None:
            return found
    visible = cuda_visible_devices()  # as CUDA reads it: up to the first invalid entry
    if visible is None:
        return _by_index(nvml, index)
    if index >= len(visible):
        return None
    entry = visible[index]
    return _by_index(nvml, int(entry)) if entry.isdigit() else _by_uuid(nvml, entry)


def uuid_of(nvml: Nvml, handle: Handle) -> str | None:
    """NVML's UUID string of ``handle`` (``GPU-...`` / ``MIG-...``), or None."""
    try:
        uuid = nvml.nvmlDeviceGetUUID(handle)
    except Exception:  # noqa: BLE001 - see the module docstring
        return None
    return uuid.decode() if isinstance(uuid, bytes) else str(uuid)


def memory_usage(index: int) -> tuple[int, int] | None:
    """(used, total) bytes of ``cuda:index`` through NVML, every process included; None without NVML
    or when the GPU cannot be found there."""
    with nvml_session() as nvml:
        if nvml is None:
            return None
        handle = cuda_handle(nvml, index)
        if handle is None:
            return None
        try:
            info = nvml.nvmlDeviceGetMemoryInfo(handle)
        except Exception:  # noqa: BLE001 - see the module docstring
            return None
        return int(info.used), int(info.total)


def _torch_uuid(index: int) -> str | None:
    """torch's UUID of ``cuda:index`` (``xxxxxxxx-xxxx-...``), or None where torch cannot tell."""
    try:
        uuid = torch.cuda.get_device_properties(index).uuid
    except Exception:  # noqa: BLE001 - a CPU-only torch, no GPU, an index out of range, an older torch
        return None
    text = str(uuid).strip() if uuid is not None else ""
    return text or None


def _by_index(nvml: Nvml, index: int) -> Handle | None:
    try:
        return nvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:  # noqa: BLE001 - an index NVML does not have
        return None


def _by_uuid(nvml: Nvml, uuid: str) -> Handle | None:
    """The device whose NVML UUID is ``uuid`` (with or without its GPU-/MIG- prefix), or whose UUID
    ``uuid`` is the unique prefix of (a short ``CUDA_VISIBLE_DEVICES`` entry such as GPU-8932f937)."""
    names = [uuid] if uuid.startswith(("GPU-", "MIG-")) else [f"GPU-{uuid}", f"MIG-{uuid}"]
    for name in names:
        try:
            return nvml.nvmlDeviceGetHandleByUUID(name)
        except Exception:  # noqa: BLE001 - not a full UUID NVML knows: try a prefix below
            pass
    try:
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
    except Exception:  # noqa: BLE001 - see the module docstring
        return None
    matches = [h for h in handles if (found := uuid_of(nvml, h)) and found.startswith(tuple(names))]
    return matches[0] if len(matches) == 1 else None
